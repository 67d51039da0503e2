"""Decoding the frames of a clip on the CPU with PyAV (FFmpeg): any codec FFmpeg knows.

Decode only what the clip needs. With a frame index (:class:`~.probe.VideoProbe` from a ``prepare``
manifest, or :func:`~.probe.cached_probe`, once per file and process) that names frames by
presentation timestamp, the sampled frames are grouped: a frame is reached by decoding forward from
the previous one when no key frame lies between them, otherwise by seeking to the key frame at or
before it. After a seek, frames are recognised by their timestamps, and every step is checked:

- the first packet after the seek must be a key frame at or before the one asked for (a demuxer that
  lands later would skip frames);
- every frame the decoder outputs must be in the index, and from the key frame on, frames must come
  out as consecutive indices (no index entry skipped, none unknown);
- the frames asked for must all arrive before the file ends.

Anything else (a corrupt packet, a truncated file, an index that does not match the decoder) makes the
read decode forward from frame 0 instead, counting frames as the decoder outputs them: frame ``i``
is by definition the ``i``-th frame out of a decode from the start, so the fallback is exact and
never returns a neighbouring frame. A file that needed the fallback is not seeked again in this
process.

Three rules keep this path safe with any PyAV release and any input:

- Frames are converted (pixel format, size, colour range) by a private, single-threaded swscale
  context (:class:`Scaler`), never by ``VideoFrame.to_ndarray(format=...)`` / ``reformat``: from
  PyAV 19 those share one scaler per thread whose worker-thread pool does not survive ``fork``, so a
  DataLoader or ``prepare`` worker forked after the parent decoded a video would wait forever.
- Frames are resized to the requested short side by swscale while still 8-bit, all to the first
  frame's size and rotation (a stream whose resolution changes mid-way still stacks), and coded sizes
  above :data:`~.probe.MAX_PIXELS` are refused: a 4000 x 4000 frame never becomes a float tensor.
- Only real videos are read (:func:`~.probe.open_video`).
"""
from __future__ import annotations

import bisect
import logging
import os
import random
import threading
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import VideoDecodeError
from .probe import (VideoProbe, cached_probe, check_frame_size, color_range_name, display_rotation, from_runs,
                    import_av, open_video, quarter_turns)
from .sampling import resized_shape, sample_indices

log = logging.getLogger(__name__)


class Scaler:
    """Converts frames to RGB uint8 (or another format) at a chosen size with its own single-threaded
    swscale context.

    One instance per video read (not shared across threads or processes), so nothing of it outlives a
    ``fork``: see the module docstring. The source's colour range is passed explicitly: a full-range
    frame (JPEG range, as MJPEG decodes) is converted as full range on every PyAV release."""

    def __init__(self):
        import_av()
        from av.video.reformatter import VideoReformatter

        self._reformatter = VideoReformatter()
        self._threads = True

    def __call__(self, frame, width: Optional[int] = None, height: Optional[int] = None, format: str = "rgb24",
                 dst_color_range: Optional[str] = None):
        kwargs = dict(width=width, height=height, format=format, interpolation="BILINEAR",
                      src_color_range="JPEG" if color_range_name(frame) == "full" else "MPEG")
        if dst_color_range is not None:
            kwargs["dst_color_range"] = dst_color_range
        if self._threads:
            try:
                return self._reformatter.reformat(frame, threads=1, **kwargs)
            except TypeError:  # a PyAV without the `threads` argument has no scaler thread pool either
                self._threads = False
        return self._reformatter.reformat(frame, **kwargs)

    def rgb(self, frame, width: Optional[int] = None, height: Optional[int] = None) -> np.ndarray:
        return self(frame, width, height).to_ndarray()


def upright(rgb: np.ndarray, rotation) -> np.ndarray:
    """Apply a display rotation (degrees counter-clockwise, FFmpeg's convention) to an (H, W, 3) frame."""
    quarter = quarter_turns(rotation)
    return np.ascontiguousarray(np.rot90(rgb, k=quarter)) if quarter else rgb


# ----------------------------------------------------------------------------------------------------
# Which frames to decode


def seek_plan(indices: Sequence[int], key_frames: Sequence[int]) -> List[Tuple[Optional[int], List[int]]]:
    """Groups ``[(start, frames), ...]`` covering the distinct ``indices`` in order: each group seeks
    to key frame ``start`` (None: decodes from the file's start, no seek) and decodes forward through
    its frames. A frame joins the current group when no key frame lies after the current position
    and at or before it (decoding forward costs no more than seeking); otherwise it starts a group at
    the last key frame at or before it. Frames before the first key frame come from the file's start."""
    groups: List[Tuple[Optional[int], List[int]]] = []
    position = 0  # the next frame decoding forward would output
    for i in sorted(set(indices)):
        k = bisect.bisect_right(key_frames, i) - 1
        key = key_frames[k] if k >= 0 else None
        if groups and (key is None or key <= position):
            groups[-1][1].append(i)  # decode forward: no key frame to gain by seeking
        elif not groups and (key is None or key == 0):
            groups.append((None, [i]))  # from the file's start, no seek: exact by definition
        else:
            groups.append((key, [i]))
        position = i + 1
    return groups


class _Fallback(Exception):
    """Seeking cannot deliver the frames exactly; decode forward from frame 0 instead."""


# paths (absolute) whose index did not match their decoder or whose seeks landed wrong: decoded
# forward for the rest of the process
_DECODE_FORWARD: set = set()
_DECODE_FORWARD_LOCK = threading.Lock()


def _new_lock() -> None:  # a child forked while another thread held the lock gets a free one
    global _DECODE_FORWARD_LOCK
    _DECODE_FORWARD_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_new_lock)


class _Output:
    """Converts decoded frames to upright RGB uint8 at one size (the first frame's, scaled)."""

    def __init__(self, path: str, size: Optional[int], width: int, height: int, rotation: int):
        self.path, self.rotation = path, rotation
        self.height, self.width = resized_shape(height, width, size) if size is not None else (height, width)
        self.scaler = Scaler()

    def __call__(self, frame, index: int) -> np.ndarray:
        try:
            return upright(self.scaler.rgb(frame, self.width, self.height), self.rotation)
        except Exception as exc:  # not the file's tail: say what failed
            raise VideoDecodeError(self.path, f"frame {index} ({frame.format.name}, {frame.width} x {frame.height}) "
                                              f"could not be converted to RGB ({type(exc).__name__}: {exc})") from exc


def _decode_seeking(path: str, wanted: List[int], output: _Output, probe: VideoProbe, cost: List[int]) -> Dict[int, np.ndarray]:
    """The frames ``wanted`` (sorted, distinct) by :func:`seek_plan`, checked as the module docstring
    says; raises :class:`_Fallback` when that is not possible. ``cost[0]`` counts decoded frames."""
    pts = from_runs(probe.pts)
    position = {p: i for i, p in enumerate(pts)}
    found: Dict[int, np.ndarray] = {}
    container = open_video(path)
    try:
        stream = container.streams.video[0]
        stream.thread_count = 1  # frame threads would decode frames past the last one needed; one clip, one core
        for start, frames in seek_plan(wanted, from_runs(probe.key_frames)):
            todo = list(reversed(frames))  # the next frame needed is todo[-1]
            if start is not None:
                try:
                    container.seek(pts[start], stream=stream, backward=True, any_frame=False)
                except Exception as exc:
                    raise _Fallback(f"seeking to frame {start} failed ({type(exc).__name__}: {exc})") from exc
            previous = (start if start is not None else 0) - 1  # frames must follow on from here
            landed = start is None
            try:
                for packet in container.demux(stream):
                    if not landed and packet.size:
                        landed = True
                        if not packet.is_keyframe or packet.pts is None or packet.pts > pts[start]:
                            raise _Fallback(f"the seek to frame {start} landed on a packet after it")
                    for frame in packet.decode():
                        cost[0] += 1
                        i = position.get(frame.pts)
                        if i is None:
                            raise _Fallback(f"the decoder output a frame (pts {frame.pts}) the index does not know")
                        if i <= previous and start is not None:
                            continue  # frames before the key frame: decoded on the way, not ours
                        if i != previous + 1:
                            raise _Fallback(f"the decoder output frame {i} after frame {previous}")
                        previous = i
                        check_frame_size(path, frame.width, frame.height)
                        if i == todo[-1]:
                            found[i] = output(frame, i)
                            todo.pop()
                            if not todo:
                                break
                    if not todo:
                        break
            except (_Fallback, VideoDecodeError):
                raise
            except Exception as exc:  # corrupt data: the forward decode reads what it can
                raise _Fallback(f"decoding failed ({type(exc).__name__}: {exc})") from exc
            if todo:
                raise _Fallback(f"the file ended before frame {todo[-1]}")
    finally:
        container.close()
    return found


def _decode_forward(path: str, wanted: List[int], size: Optional[int], cost: List[int]) -> Tuple[Dict[int, np.ndarray], Optional[int]]:
    """The frames ``wanted`` by decoding from frame 0, counting frames as they come out (the
    definition of frame indices). Returns them and, when the stream ended or broke before the last
    one, how many frames did decode (a truncated file; None otherwise)."""
    wanted_set = set(wanted)
    last = max(wanted)
    found: Dict[int, np.ndarray] = {}
    decoded = 0
    output = None
    container = open_video(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = container.decode(stream)
        while decoded <= last:
            try:
                frame = next(frames)
            except StopIteration:
                break
            except Exception:  # a truncated or corrupt tail: keep what decoded
                break
            check_frame_size(path, frame.width, frame.height)
            if output is None:
                output = _Output(path, size, frame.width, frame.height, display_rotation(frame))
            if decoded in wanted_set:
                found[decoded] = output(frame, decoded)
            decoded += 1
    finally:
        container.close()
    cost[0] += decoded
    return found, (decoded if decoded <= last else None)


def _decode(path: str, indices: Sequence[int], size: Optional[int], probe: Optional[VideoProbe]):
    """(frames by index, frames decoded, frames available when the file came up short, else None)."""
    path = os.fspath(path)
    wanted = sorted(set(indices))
    cost = [0]
    if probe is None:
        probe = cached_probe(path)
    key = os.path.abspath(path)
    if probe.seekable and key not in _DECODE_FORWARD:
        output = _Output(path, size, probe.width, probe.height, probe.rotation)
        try:
            return _decode_seeking(path, wanted, output, probe, cost), cost[0], None
        except _Fallback as why:
            with _DECODE_FORWARD_LOCK:
                _DECODE_FORWARD.add(key)
            log.info("%s: decoding forward from frame 0 (%s)", path, why)
    found, available = _decode_forward(path, wanted, size, cost)
    return found, cost[0], available


def decode_frames(path: str, indices: Sequence[int], size: Optional[int] = None,
                  probe: Optional[VideoProbe] = None) -> Tuple[List[np.ndarray], int]:
    """Decode the frames at ``indices`` as RGB uint8 (H, W, 3) arrays of one size, upright.

    ``size``: the short side is scaled to ``size`` (the long side keeps the aspect ratio, as
    :func:`~stop_fast.data.transforms.resize_crop_normalise` computes it) by swscale at decode time;
    None keeps the first frame's size. Every frame gets the first frame's size and rotation.
    ``probe``: the file's frame index (e.g. from a ``prepare`` manifest); None probes the file once
    per process. Returns the frames (in the order of ``indices``, repeats included; fewer when the
    file ends or breaks before some of them) and the number of frames the decoder produced.
    """
    found, decoded, _ = _decode(path, indices, size, probe)
    return [found[i] for i in indices if i in found], decoded


def read_clip_pyav(path: Union[str, os.PathLike], num_frames: int, mode: str = "eval",
                   rng: Optional[random.Random] = None, size: Optional[int] = None,
                   probe: Optional[VideoProbe] = None):
    """The sampled frames of a clip as a uint8 tensor (num_frames, H, W, 3), the short side scaled
    to ``size`` (None: the video's own size). ``probe``: the file's frame index (None: probed once
    per process). A file that decodes fewer frames than its index counts (a truncated file) is
    resampled over the frames that do decode."""
    import torch

    path = os.fspath(path)
    total = (probe or cached_probe(path)).frames
    for _ in range(2):
        indices = sample_indices(total, num_frames, mode, rng)
        found, _, available = _decode(path, indices, size, probe)
        if len(found) == len(set(indices)):
            return torch.from_numpy(np.stack([found[i] for i in indices]))
        if not available:
            break
        total = available  # the index over-counted (a truncated file): resample what exists
    raise VideoDecodeError(path, "no decodable frames" if not available else f"decoding failed after {total} frames")
