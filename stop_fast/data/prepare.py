"""Preparing a dataset for training: probe every video once into a manifest, write copies made for
decoding (the library behind ``stop-fast prepare``; the command's flags live in
``stop_fast/commands/prepare.py``).

:func:`prepare` probes each video by decoding it (:func:`~.probe.probe_file` with ``full_decode``:
proof that it reads, and its exact frame index), appends one record per video to the manifest
(:mod:`.manifest`) as each is done, so an interrupted run resumes where it stopped, and returns a
:class:`PrepareResult`. A worker that dies on a file (a decoder crash, the out-of-memory killer) is
found by running the unfinished files one at a time, recorded as unreadable, and the run goes on;
workers die with the run when it is killed.

With a copy folder, :func:`reencode_video` writes each readable video again, made for training
(:class:`CopySettings`; the default chosen by measurement, see stop_fast/data/README.md): H.264,
every frame a key frame (all-intra), no B-frames, short side 224 (never upscaled), upright, every
decoded frame kept at the source's average frame rate (optionally capped: ``max_fps``), colours
kept (full-range and limited-range sources alike). NVDEC and PyAV read it; DALI's CPU decoder does
not (it reads VP8 / VP9 / MJPEG: ``codec="vp9"`` or ``"mjpeg"``). The copy's own frame index goes
into the record (``prepared_index``), so the loaders seek in it without probing.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from fractions import Fraction
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional

from ..io import atomic_path
from .errors import VideoDecodeError
from .manifest import ManifestWriter, check_manifest_path, is_current, manifest_key, read_manifest, state_fields
from .probe import VideoProbe, import_av, open_video, probe_file, quarter_turns

log = logging.getLogger(__name__)

OUTSIDE_ROOT = "_outside_root"  # where copies of videos named outside the root go, under the copy folder


@dataclasses.dataclass(frozen=True)
class Format:
    """How a copy is encoded: FFmpeg encoder, file suffix, pixel format, colour range, and the
    encoder options for a key-frame interval ``gop``."""

    encoder: str
    suffix: str
    pix_fmt: str
    color_range: str  # "limited" (MPEG, 16..235) or "full" (JPEG, 0..255)
    options: Callable[[int], Dict[str, str]]


# H.264: no B-frames (frames are decoded in the order they are shown, so a seek decodes nothing it
# does not keep), x264's fastdecode tuning (CAVLC, no deblocking: the cheapest H.264 to decode),
# crf 23 (x264's default quality). VP9 and MJPEG: the formats DALI's CPU decoder also reads.
FORMATS: Dict[str, Format] = {
    "h264": Format("libx264", ".mp4", "yuv420p", "limited",
                   lambda gop: {"g": str(gop), "bf": "0", "crf": "23", "preset": "veryfast", "tune": "fastdecode"}),
    "vp9": Format("libvpx-vp9", ".webm", "yuv420p", "limited",
                  lambda gop: {"g": str(gop), "crf": "32", "b:v": "0", "deadline": "realtime", "cpu-used": "8"}),
    "mjpeg": Format("mjpeg", ".avi", "yuvj420p", "full", lambda gop: {"q:v": "3"}),
}
CODECS = tuple(FORMATS)


@dataclasses.dataclass(frozen=True)
class CopySettings:
    """What :func:`reencode_video` writes: ``codec`` (a key of :data:`FORMATS`), short side at most
    ``short_side`` pixels (a smaller video keeps its size), a key frame every ``gop`` frames (1: all
    intra; MJPEG is always all-intra), and at most ``max_fps`` frames per second (None: every frame)."""

    codec: str = "h264"
    short_side: int = 224
    gop: int = 1
    max_fps: Optional[float] = None

    def __post_init__(self):
        if self.codec not in FORMATS:
            raise ValueError(f"codec must be one of {list(FORMATS)}, got {self.codec!r}")
        if isinstance(self.short_side, bool) or not isinstance(self.short_side, int) or self.short_side < 2:
            raise ValueError(f"short_side must be an int of at least 2 pixels, got {self.short_side!r}")
        if isinstance(self.gop, bool) or not isinstance(self.gop, int) or self.gop < 1:
            raise ValueError(f"gop must be an int >= 1, got {self.gop!r}")
        if self.max_fps is not None and not (isinstance(self.max_fps, (int, float)) and self.max_fps > 0):
            raise ValueError(f"max_fps must be a positive number or None, got {self.max_fps!r}")


# ----------------------------------------------------------------------------------------------------
# One video: probe, re-encode


def _empty_record(path: str) -> Dict:
    return {"path": path, "ok": False, "codec": None, "frames": 0, "key_frames": [], "pts": None, "fps": None,
            "width": None, "height": None, "rotation": 0, "color_range": None, "duration": None,
            **state_fields(path), "prepared": None, "prepared_index": None, "error": None}


def probe_video(path: str) -> Dict:
    """The manifest record of a video, probed by decoding every frame (:func:`~.probe.probe_file`):
    codec, frame index, fps, size, rotation, colour range, duration and file state; ``ok`` False with
    the ``error`` when it cannot be used."""
    record = _empty_record(path)
    try:
        record.update(probe_file(path, full_decode=True).record())
        record["ok"] = True
    except VideoDecodeError as exc:
        record["error"] = exc.reason
    except Exception as exc:  # FFmpeg errors: corrupt data, unsupported codec, ...
        record["error"] = f"{type(exc).__name__}: {exc}"
    return record


def copy_size(width: int, height: int, short_side: int) -> tuple:
    """(width, height) of a copy: the short side scaled to ``short_side`` unless it is shorter already
    (never upscaled), both rounded down to even numbers (4:2:0 chroma needs them)."""
    scale = min(1.0, short_side / min(width, height))
    return max(2, int(width * scale) // 2 * 2), max(2, int(height * scale) // 2 * 2)


def kept_frames(fps: Optional[float], max_fps: Optional[float]):
    """A predicate on decoded-frame indices: which frames a copy capped at ``max_fps`` keeps (all of
    them when there is no cap or the video is not faster). Output frame ``k`` (at time ``k / max_fps``)
    is the source frame nearest that time, ``round(k * fps / max_fps)``: FFmpeg's ``fps`` filter's
    choice (as CLIP4Clip's compress_video.py runs it), on frame indices rather than timestamps."""
    if max_fps is None or not fps or fps <= max_fps:
        return lambda i: True
    step = fps / max_fps

    def keep(i: int) -> bool:
        k = int(i / step + 0.5)  # the output frame nearest this source frame...
        return int(k * step + 0.5) == i  # ...keeps it when this is the source frame nearest to it

    return keep


def reencode_video(src: str, dst: str, settings: CopySettings = CopySettings(), probe: Optional[VideoProbe] = None) -> VideoProbe:
    """Write the copy of ``src`` that ``settings`` describe to ``dst`` (atomically: a killed run
    leaves no half file under that name) and return the copy's probe (decoded: its exact frame index).

    One output frame per decoded source frame (or per kept frame, with ``max_fps``), evenly spaced
    at the source's average frame rate (variable frame rate becomes constant); every frame scaled to
    the first frame's output size; rotation applied to the pixels (the copy is upright); colours
    converted from the source's range (full or limited, as each decoded frame says) to the format's,
    and the source's colour matrix, primaries and transfer tagged on the copy."""
    if not isinstance(settings, CopySettings):
        raise TypeError(f"settings must be a CopySettings, got {type(settings).__name__}")
    av = import_av()
    from .pyav_reader import Scaler, upright

    probe = probe or probe_file(src)
    fmt = FORMATS[settings.codec]
    quarter = quarter_turns(probe.rotation)
    w, h = (probe.height, probe.width) if quarter % 2 else (probe.width, probe.height)
    width, height = copy_size(w, h, settings.short_side)
    keep = kept_frames(probe.fps, settings.max_fps)
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    scaler = Scaler()
    dst_range = "JPEG" if fmt.color_range == "full" else "MPEG"
    with atomic_path(dst) as tmp:
        with open_video(src) as inp, av.open(tmp, mode="w", format=_muxer(fmt)) as out:
            vin = inp.streams.video[0]
            vin.thread_type = "AUTO"
            source_rate = Fraction(vin.average_rate or 25).limit_denominator(1001000)
            rate = source_rate
            if settings.max_fps is not None and probe.fps and probe.fps > settings.max_fps:
                rate = Fraction(settings.max_fps).limit_denominator(1001)
            vout = out.add_stream(fmt.encoder, rate=rate)
            vout.width, vout.height, vout.pix_fmt = width, height, fmt.pix_fmt
            vout.options = fmt.options(settings.gop)
            vout.codec_context.color_range = 2 if fmt.color_range == "full" else 1
            written = 0
            for index, frame in enumerate(inp.decode(vin)):
                if not keep(index):
                    continue
                if written == 0:  # the source's colour description, carried to the copy
                    for name in ("colorspace", "color_primaries", "color_trc"):
                        setattr(vout.codec_context, name, getattr(frame, name))
                if quarter:
                    turned = av.VideoFrame.from_ndarray(upright(scaler.rgb(frame), probe.rotation), format="rgb24")
                    turned.colorspace = frame.colorspace  # the RGB -> YUV matrix: the source's
                    frame = turned
                frame = scaler(frame, width, height, fmt.pix_fmt, dst_color_range=dst_range)
                frame.pts, frame.time_base = written, 1 / rate  # evenly spaced
                frame.pict_type = av.video.frame.PictureType.NONE  # the source's I-frames force no key frames
                for packet in vout.encode(frame):
                    out.mux(packet)
                written += 1
            for packet in vout.encode():
                out.mux(packet)
    return probe_file(dst, full_decode=True)


def _muxer(fmt: Format) -> str:
    return {".mp4": "mp4", ".webm": "webm", ".avi": "avi"}[fmt.suffix]


class Job(NamedTuple):
    path: str  # the video
    key: str  # its manifest key
    root: str  # the root its key is relative to
    copy: Optional[str]  # where its copy goes (None: probe only)
    settings: CopySettings


def prepare_one(job: Job) -> Dict:
    """The manifest record of one video: probed, and copied when the job names a copy."""
    record = probe_video(job.path)
    record["path"], record["root"] = job.key, job.root
    if record["ok"] and job.copy:
        try:
            copy = reencode_video(job.path, job.copy, job.settings, VideoProbe.from_record(record))
            record["prepared"] = job.copy
            record["prepared_index"] = {**copy.record(), **state_fields(job.copy)}
            record["prepared_settings"] = dataclasses.asdict(job.settings)
        except Exception as exc:
            record["ok"], record["error"] = False, f"re-encoding failed: {type(exc).__name__}: {exc}"
    return record


# ----------------------------------------------------------------------------------------------------
# Workers that die with the run, and a run that survives a worker dying


PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """Pool initializer: end this worker when the process that started it ends, even by ``kill -9``
    (Linux: the kernel sends SIGKILL; elsewhere a thread watches the parent)."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # it died before the line above took effect
        os._exit(1)
    if not sys.platform.startswith("linux"):
        def watch():
            while os.getppid() == parent:
                threading.Event().wait(1.0)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()


def _pool(workers: int) -> ProcessPoolExecutor:
    # fork: the workers start at once and need nothing re-imported; decoding is fork-safe (see
    # pyav_reader). Platforms without a safe fork use their default.
    method = "fork" if sys.platform.startswith("linux") else None
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method),
                               initializer=_die_with_parent, initargs=(os.getpid(),))


def _crash_record(job, processes) -> Dict:
    path, key, root = job[0], job[1], job[2]
    codes = []
    for p in processes:
        try:
            # The pool's manager thread reaps the dead worker too. Whichever thread's waitpid loses
            # gets no status, and ours may return before the winner has stored it in the shared
            # Process object: wait (briefly) for the code to appear rather than read it once.
            deadline = time.monotonic() + 5.0
            p.join(5)
            while p.exitcode is None and time.monotonic() < deadline:
                time.sleep(0.01)
            codes += [p.exitcode] if p.exitcode else []
        except (AssertionError, ValueError, AttributeError):  # a process object the pool already closed
            pass
    how = ""
    if codes and codes[0] < 0:
        try:
            how = f" (killed by {signal.Signals(-codes[0]).name})"
        except ValueError:
            how = f" (signal {-codes[0]})"
    return {**_empty_record(path), "path": key, "root": root,
            "error": f"the worker decoding it died{how}: a decoder crash or the out-of-memory killer"}


def run_jobs(jobs: List[Job], workers: int, on_record: Callable[[Dict], None],
             worker: Callable[[Job], Dict] = prepare_one) -> int:
    """Run ``worker`` over ``jobs`` on ``workers`` processes, calling ``on_record`` with each result.

    A worker process that dies (segfault, SIGKILL) breaks the pool and every unfinished job with it.
    Those jobs become suspects and run one at a time in a pool of one: the job that kills its worker
    alone is recorded as unreadable; the others complete. Then the run goes on at full width.
    Returns how many jobs killed their worker."""
    pending = collections.deque(jobs)
    suspects: collections.deque = collections.deque()
    crashed = 0
    window = 2 * workers  # jobs in flight at once: what a break can put under suspicion
    while pending or suspects:
        if suspects:
            pool = _pool(1)
            try:
                while suspects:
                    job = suspects[0]
                    future = pool.submit(worker, job)
                    # the worker's Process object, kept to read how it died (the pool forgets it)
                    processes = list((getattr(pool, "_processes", None) or {}).values())
                    try:
                        record = future.result()
                    except BrokenProcessPool:
                        record = _crash_record(job, processes)
                        crashed += 1
                        pool.shutdown(wait=True)
                        pool = _pool(1)
                    suspects.popleft()
                    on_record(record)
            finally:
                pool.shutdown(wait=True)
            continue
        pool = _pool(workers)
        in_flight: Dict = {}
        try:
            while pending or in_flight:
                while pending and len(in_flight) < window:
                    job = pending.popleft()
                    try:
                        in_flight[pool.submit(worker, job)] = job
                    except BrokenProcessPool:
                        pending.appendleft(job)
                        raise
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                broken = False
                for future in done:
                    job = in_flight.pop(future)
                    try:
                        on_record(future.result())
                    except BrokenProcessPool:
                        suspects.append(job)
                        broken = True
                if broken:
                    raise BrokenProcessPool("a worker died")
        except BrokenProcessPool:
            suspects.extend(in_flight.values())
            log.warning("a worker process died; finding the file that killed it among %d", len(suspects))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return crashed




# ----------------------------------------------------------------------------------------------------
# A dataset


def copy_path(copy_dir: str, key: str, codec: str) -> str:
    """Where the copy of the video with manifest key ``key`` goes: its relative path and full name
    (suffix included, so ``same.mp4`` and ``same.avi`` get different copies) under ``copy_dir``,
    plus the format's suffix; videos outside the root under ``_outside_root/``."""
    if os.path.isabs(key):
        key = os.path.join(OUTSIDE_ROOT, os.path.relpath(key, os.path.abspath(os.sep)))
    return os.path.join(copy_dir, key + FORMATS[codec].suffix)


def inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies under it (symbolic links resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


@dataclasses.dataclass
class PrepareResult:
    """What a :func:`prepare` run did: ``summary`` (the counts the command prints as JSON), the
    records of the videos found unreadable in this run, and the manifest lines that could not be
    read (``"line N: reason"``)."""

    summary: Dict
    unreadable: List[Dict]
    skipped_lines: List[str]


def prepare(paths: Iterable[str], root: str, manifest: str, copy_dir: Optional[str] = None,
            settings: CopySettings = CopySettings(), workers: int = 1,
            on_record: Optional[Callable[[Dict], None]] = None) -> PrepareResult:
    """Probe (and with ``copy_dir``, copy) every video of ``paths`` not yet in ``manifest`` or changed
    since, on ``workers`` processes, appending each record as it is done. Videos are keyed by their
    path relative to ``root`` (a video named twice, relatively and absolutely, is one video).
    ``on_record`` sees each new record (a progress bar). A ``copy_dir`` equal to or inside ``root``
    is refused: the copies would replace originals or be copied again on the next run."""
    import_av()  # a missing PyAV is one error here, not one per worker
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    if not os.path.isdir(root):
        raise ValueError(f"root must be a folder, got {root}")
    check_manifest_path(manifest)
    if copy_dir is not None and inside(copy_dir, root):
        raise ValueError(f"the copy folder {copy_dir} lies inside the videos' root {root}: the copies would replace "
                         "originals or be copied again on the next run; choose a folder outside it")
    root = os.path.abspath(root)
    copy_dir = os.path.abspath(copy_dir) if copy_dir is not None else None  # the manifest must name it from anywhere
    videos: Dict[str, str] = {}  # key -> path: a video named twice (relative and absolute) is one video
    for p in paths:
        videos.setdefault(manifest_key(p, root), p)
    done = read_manifest(manifest)

    def needs_work(key: str, path: str) -> bool:
        """Not probed, changed since, or (copies asked for) without a current copy made as asked."""
        record = done.get(key)
        if record is None or not is_current(record, path):
            return True
        if copy_dir is None or not record["ok"]:
            return False
        copy, index = record.get("prepared"), record.get("prepared_index")
        return not (copy == copy_path(copy_dir, key, settings.codec) and isinstance(index, dict)
                    and is_current(index, copy) and record.get("prepared_settings") == dataclasses.asdict(settings))

    todo = [(p, k) for k, p in videos.items() if needs_work(k, p)]
    jobs = [Job(p, k, root, copy_path(copy_dir, k, settings.codec) if copy_dir else None, settings) for p, k in todo]
    bad: List[Dict] = []
    totals = dict(done)
    writer = ManifestWriter(manifest)

    def record_done(record: Dict) -> None:
        writer.write(record)
        totals[record["path"]] = record
        if not record["ok"]:
            bad.append(record)
        if on_record is not None:
            on_record(record)

    try:
        crashed = run_jobs(jobs, workers, record_done) if jobs else 0
    finally:
        writer.close()
    summary = {"videos": len(videos), "already_in_manifest": len(videos) - len(todo), "probed": len(jobs),
               "unreadable": len(bad), "workers_died": crashed, "manifest": manifest,
               "manifest_videos": len(totals), "manifest_unreadable": sum(not r["ok"] for r in totals.values()),
               "manifest_lines_skipped": len(done.skipped)}
    return PrepareResult(summary, bad, list(done.skipped))
