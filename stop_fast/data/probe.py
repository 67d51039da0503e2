"""One probe of a video file: what every reader and ``prepare`` need to know about it.

:func:`probe_file` opens a file once and returns a :class:`VideoProbe`: codec, first frame's size,
rotation and colour range, frame rate, and the frame index: how many frames it has, the presentation
timestamp of each (``pts``) and which frames decoding can start at after a seek (``key_frames``).
Frame ``i`` is the ``i``-th frame the decoder outputs when the file is decoded from its start, the one
definition every reader keeps (B-frames, open GOPs, variable frame rate, edit lists and streams whose
first timestamp is not zero included). Frames are named by that index, never by time.

Two ways to build the index:

- ``full_decode=True`` (``stop-fast prepare``): every packet is decoded, which proves the file reads,
  and the index is the decoder's own output: exact for every codec and container.
- ``full_decode=False`` (the readers, once per file and process: :func:`cached_probe`): packets are
  demuxed, not decoded (only the first frame is, for rotation and colour range). Their timestamps
  name the frames only where one packet is one output frame: the codecs and containers listed in
  :data:`SEEKABLE_CODECS` / :data:`SEEKABLE_CONTAINERS`, packets flagged "discard" (edit lists) left
  out. Elsewhere (MPEG-4 Part 2's non-coded and packed frames, VP8's hidden frames, field pictures in
  MPEG-TS, ...) the index holds the packet count only (``pts`` None) and the readers decode forward
  from frame 0, exactly as before.

Runs: ``pts`` and ``key_frames`` are stored as arithmetic runs ``[[first, step, count], ...]``
(one run for a constant frame rate or a fixed GOP), so a manifest stays small for all-intra copies.

Files that are not videos are refused here, for every reader: FFmpeg's text-art and still-image
demuxers (which turn a ``.txt`` or a ``.png`` into a "video"), coded sizes above :data:`MAX_PIXELS`,
and a degenerate display matrix counts as no rotation.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import os
import threading
from typing import Dict, List, Optional, Sequence, Tuple

from .errors import VideoDecodeError

# 8K UHD. Larger frames are refused before decoding: one such frame is 100 MB of RGB.
MAX_PIXELS = 7680 * 4320

# Demuxers and codecs that FFmpeg offers for files that are not videos: text art (`.txt`, `.nfo`,
# `.ans` ...) and single pictures. Animated formats (gif, apng, webp) stay readable.
NOT_VIDEO_DEMUXERS = {"tty", "bin", "xbin", "adf", "idf", "image2"}
NOT_VIDEO_CODECS = {"ansi", "bintext", "xbin", "idf"}

# Where a demuxed packet is exactly one decoded frame, so packet timestamps index the frames: codecs
# whose every coded packet yields one output frame (H.264 / HEVC access units, VP9 superframes, AV1
# temporal units, JPEG pictures), in containers that store whole frames as samples (not MPEG-TS/PS or
# raw streams, whose parsers may cut field pictures into separate packets).
SEEKABLE_CODECS = frozenset({"h264", "hevc", "vp9", "av1", "mjpeg"})
SEEKABLE_CONTAINERS = frozenset({"mov", "mp4", "matroska", "webm", "avi"})

Runs = Tuple[Tuple[int, int, int], ...]  # ((first, step, count), ...)


def import_av():
    """PyAV, or an ImportError that says how to install it."""
    try:
        import av
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("decoding videos on the CPU needs PyAV: pip install av") from exc
    return av


# ----------------------------------------------------------------------------------------------------
# Runs of integers


def to_runs(values: Sequence[int]) -> Runs:
    """``values`` as arithmetic runs ``((first, step, count), ...)``, greedily: each run takes as many
    values as keep its step."""
    runs: List[Tuple[int, int, int]] = []
    i, n = 0, len(values)
    while i < n:
        if i + 1 == n:
            runs.append((int(values[i]), 1, 1))
            break
        step = int(values[i + 1]) - int(values[i])
        j = i + 1
        while j + 1 < n and int(values[j + 1]) - int(values[j]) == step:
            j += 1
        runs.append((int(values[i]), step, j - i + 1))
        i = j + 1
    return tuple(runs)


def from_runs(runs: Runs) -> List[int]:
    return [first + step * k for first, step, count in runs for k in range(count)]


def runs_from_json(value, what: str) -> Runs:
    """Runs read back from JSON (lists of three integers, count >= 1), or a ValueError naming ``what``."""
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{what} must be a list of [first, step, count] runs, got {type(value).__name__}")
    runs = []
    for run in value:
        if (not isinstance(run, (list, tuple)) or len(run) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in run)
                or run[2] < 1):
            raise ValueError(f"{what}: {run!r} is not a [first, step, count] run of integers with count >= 1")
        runs.append(tuple(run))
    return tuple(runs)


# ----------------------------------------------------------------------------------------------------
# Opening a file


def display_rotation(frame) -> int:
    """The frame's display rotation in degrees counter-clockwise (FFmpeg's convention); 0 when there
    is none or the display matrix is degenerate (FFmpeg's NaN, which PyAV turns into INT_MIN)."""
    value = getattr(frame, "rotation", 0) or 0  # PyAV releases before 14 have no frame rotation
    try:
        value = float(value)
    except (TypeError, ValueError):
        return 0
    if not math.isfinite(value) or abs(value) > 360:
        return 0
    return int(round(value))


def quarter_turns(rotation: int) -> int:
    """Counter-clockwise quarter turns (0..3) that make a frame with this display rotation upright."""
    return int(round((rotation or 0) / 90.0)) % 4


def check_frame_size(path: str, width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise VideoDecodeError(path, f"frames of {width} x {height} exceed the {MAX_PIXELS:,}-pixel limit (8K)")


def _demuxers(container) -> set:
    return set((getattr(container.format, "name", "") or "").split(","))


def _not_a_video(container, stream) -> Optional[str]:
    demuxers = _demuxers(container)
    codec = stream.codec_context.name
    if demuxers & NOT_VIDEO_DEMUXERS or any(d.endswith("_pipe") for d in demuxers):
        kind = "a text file" if demuxers & {"tty", "bin", "xbin", "adf", "idf"} else "a still image"
        return f"{kind} (FFmpeg demuxer {'/'.join(sorted(demuxers))}), not a video"
    if codec in NOT_VIDEO_CODECS:
        return f"text art (codec {codec}), not a video"
    return None


def open_video(path: str):
    """The PyAV container of ``path``, its first video stream checked: a real video, of a size we
    decode. Every refusal is a :class:`VideoDecodeError` naming the file."""
    av = import_av()
    if not os.path.isfile(path):
        raise VideoDecodeError(path, "file not found")
    try:
        container = av.open(path)
    except Exception as exc:  # FFmpeg's errors differ by version; the reason is in the message
        raise VideoDecodeError(path, f"not a readable video container ({type(exc).__name__}: {exc})") from exc
    try:
        if not container.streams.video:
            raise VideoDecodeError(path, "no video stream (audio-only or data file)")
        stream = container.streams.video[0]
        reason = _not_a_video(container, stream)
        if reason:
            raise VideoDecodeError(path, reason)
        check_frame_size(path, stream.codec_context.width or 0, stream.codec_context.height or 0)
    except BaseException:
        container.close()
        raise
    return container


def color_range_name(frame) -> str:
    """"full" (JPEG range, 0..255) or "limited" (MPEG range, 16..235; also what FFmpeg assumes when a
    stream says nothing) for a decoded frame."""
    full = int(getattr(frame, "color_range", 0) or 0) == 2 or frame.format.name.startswith("yuvj")
    return "full" if full else "limited"


# ----------------------------------------------------------------------------------------------------
# The probe


@dataclasses.dataclass(frozen=True)
class VideoProbe:
    """What a reader needs to know about a file. ``frames``: the frame count (decoded frames, or
    demuxed packets where ``pts`` is None). ``pts``: presentation timestamps of frames 0..frames-1
    in the stream's time base, as runs, or None when frames cannot be named by timestamp (the readers
    then decode forward from frame 0). ``key_frames``: frame indices a seek can start decoding at,
    as runs. ``exact``: the index comes from decoding every frame."""

    codec: str
    width: int  # the first frame's coded size (every frame of a clip is scaled to it)
    height: int
    rotation: int  # degrees counter-clockwise, the first frame's
    color_range: str  # "full" or "limited"
    fps: Optional[float]
    duration: Optional[float]
    frames: int
    pts: Optional[Runs]
    key_frames: Runs
    exact: bool

    @property
    def seekable(self) -> bool:
        return self.pts is not None and bool(self.key_frames)

    def index_record(self) -> Dict:
        """The frame index as JSON-ready fields of a manifest record."""
        return {"frames": self.frames, "key_frames": [list(r) for r in self.key_frames],
                "pts": None if self.pts is None else [list(r) for r in self.pts]}

    def record(self) -> Dict:
        """Every field as JSON-ready values (a manifest record's probe part)."""
        return {"codec": self.codec, "width": self.width, "height": self.height, "rotation": self.rotation,
                "color_range": self.color_range, "fps": self.fps, "duration": self.duration, **self.index_record()}

    @classmethod
    def from_record(cls, record: Dict, what: str = "record") -> "VideoProbe":
        """The probe a manifest record holds (``prepare`` decoded the file: exact), or a ValueError
        naming ``what`` when a field is missing or malformed (records of older manifests lack the
        index; the loaders then probe the file themselves)."""
        frames = record.get("frames")
        if not isinstance(frames, int) or isinstance(frames, bool) or frames < 1:
            raise ValueError(f"{what}: 'frames' must be a positive integer, got {frames!r}")
        if "key_frames" not in record or "pts" not in record:
            raise ValueError(f"{what}: no frame index ('key_frames', 'pts'); re-run `stop-fast prepare`")
        pts = None if record["pts"] is None else runs_from_json(record["pts"], f"{what}: 'pts'")
        keys = runs_from_json(record["key_frames"], f"{what}: 'key_frames'")
        if pts is not None and sum(r[2] for r in pts) != frames:
            raise ValueError(f"{what}: 'pts' names {sum(r[2] for r in pts)} frames, not {frames}")
        if any(not 0 <= k < frames for k in from_runs(keys)):
            raise ValueError(f"{what}: 'key_frames' lie outside 0..{frames - 1}")
        return cls(codec=str(record.get("codec") or ""), width=int(record.get("width") or 0),
                   height=int(record.get("height") or 0), rotation=int(record.get("rotation") or 0),
                   color_range=str(record.get("color_range") or "limited"), fps=record.get("fps"),
                   duration=record.get("duration"), frames=frames, pts=pts, key_frames=keys, exact=True)


def _seekable_container(container) -> bool:
    return bool(_demuxers(container) & SEEKABLE_CONTAINERS)


def _index(path: str, presented: List[Optional[int]], keys: List[Optional[int]]) -> Tuple[Optional[Runs], Runs]:
    """(pts runs, key-frame runs) from the timestamps of the frames in output order and those of the
    key-frame packets; (None, ()) when timestamps cannot name the frames (missing, repeated, or not
    increasing in output order)."""
    if not presented or any(p is None for p in presented):
        return None, ()
    if any(b <= a for a, b in zip(presented, presented[1:])):
        return None, ()
    position = {p: i for i, p in enumerate(presented)}
    key_frames = sorted({position[k] for k in keys if k in position})
    return to_runs(presented), to_runs(key_frames)


def probe_file(path: str, full_decode: bool = False) -> VideoProbe:
    """Probe ``path`` (see the module docstring). ``full_decode``: decode every frame (exact index,
    and proof that the file decodes); otherwise demux, decoding the first frame only. Raises
    :class:`VideoDecodeError` naming the file for anything that makes it unusable."""
    path = os.fspath(path)
    container = open_video(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        codec = stream.codec_context.name
        first = None
        presented: List[Optional[int]] = []  # decoded frames' pts, in output order (full decode)
        packet_pts: List[Optional[int]] = []  # demuxed frames' pts (packets that yield a frame)
        key_pts: List[Optional[int]] = []
        first_packet_is_key = None
        try:
            for packet in container.demux(stream):
                if packet.size:
                    if first_packet_is_key is None:
                        first_packet_is_key = packet.is_keyframe
                    if not packet.is_discard:  # an edit list's cut: decoded for reference, never output
                        packet_pts.append(packet.pts)
                        if packet.is_keyframe:
                            key_pts.append(packet.pts)
                if first is not None and not full_decode:
                    continue
                try:
                    frames = packet.decode()
                except Exception:
                    if full_decode and packet.size:
                        raise
                    frames = []  # a damaged first packet: the demuxed count still decides
                for frame in frames:
                    check_frame_size(path, frame.width, frame.height)
                    if first is None:
                        first = frame
                    presented.append(frame.pts)
        except VideoDecodeError:
            raise
        except Exception as exc:
            raise VideoDecodeError(path, f"corrupt stream while probing ({type(exc).__name__}: {exc})") from exc
        if full_decode:
            count = len(presented)
            if count == 0:
                raise VideoDecodeError(path, "the video stream holds no frames")
            pts, keys = _index(path, presented, key_pts)
        else:
            count = len(packet_pts)
            if count == 0:
                raise VideoDecodeError(path, "the video stream holds no frames")
            pts, keys = None, ()
            if codec in SEEKABLE_CODECS and _seekable_container(container) and first_packet_is_key:
                pts, keys = _index(path, sorted(packet_pts, key=lambda p: (p is None, p or 0)), key_pts)
            # Packets the decoder never outputs (the leading B-frames of an open-GOP cut, HEVC RASL
            # pictures after a leading CRA) still have timestamps: then the demuxed index numbers
            # frames that do not exist, and the first decoded frame is not its frame 0. Such a file
            # decodes forward (the decoded index, from `prepare`, is exact for it).
            if pts is not None and (first is None or first.pts != from_runs(pts)[0]):
                pts, keys = None, ()
        duration = None
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        width = first.width if first is not None else stream.codec_context.width
        height = first.height if first is not None else stream.codec_context.height
        return VideoProbe(
            codec=codec, width=width, height=height,
            rotation=display_rotation(first) if first is not None else 0,
            color_range=color_range_name(first) if first is not None else "limited",
            fps=float(stream.average_rate) if stream.average_rate else None, duration=duration,
            frames=count, pts=pts, key_frames=keys, exact=full_decode)
    finally:
        container.close()


# ----------------------------------------------------------------------------------------------------
# Once per file and process


def file_state(path: str) -> Optional[Tuple[int, int]]:
    """(size in bytes, modification time in ns) of ``path``, or None when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


class ProbeCache:
    """Probes remembered per (path, size, modification time), least recently used first out: a file
    that changes is probed again. Thread-safe (the DALI loader probes on a thread pool) and fork-safe
    (DataLoader and ``prepare`` workers are forked)."""

    def __init__(self, capacity: int = 16384):
        self.capacity = capacity
        self._probes: "collections.OrderedDict[tuple, VideoProbe]" = collections.OrderedDict()
        self._lock = threading.Lock()
        # a process forked while another thread held the lock (DALI's host threads probe) gets a free one
        os.register_at_fork(after_in_child=self._new_lock)

    def _new_lock(self) -> None:
        self._lock = threading.Lock()

    def get(self, path: str) -> VideoProbe:
        path = os.path.abspath(os.fspath(path))
        key = (path, file_state(path))
        with self._lock:
            if key in self._probes:
                self._probes.move_to_end(key)
                return self._probes[key]
        probe = probe_file(path)  # outside the lock: probes of different files run in parallel
        with self._lock:
            self._probes[key] = probe
            while len(self._probes) > self.capacity:
                self._probes.popitem(last=False)
        return probe

    def clear(self) -> None:
        with self._lock:
            self._probes.clear()


CACHE = ProbeCache()


def cached_probe(path: str) -> VideoProbe:
    """:func:`probe_file` (demuxing) of ``path``, once per file and process."""
    return CACHE.get(path)
