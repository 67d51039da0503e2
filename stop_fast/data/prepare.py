"""``stop-fast prepare``: probe every video of a dataset once, write a manifest, optionally re-encode.

The manifest is JSON lines, one record per video, appended as each video is done, so an interrupted
run resumes where it stopped:

    {"path": "Archery/v_Archery_g01_c01.avi", "root": "/data/UCF101", "ok": true, "codec": "h264",
     "frames": 300, "fps": 29.97, "width": 320, "height": 240, "rotation": 0, "duration": 10.0,
     "bytes": 1234567, "mtime_ns": 1700000000000000000, "prepared": "<re-encoded file or null>", "error": null}

``path`` is the key: the path relative to ``root`` (the dataset root or ``--videos`` folder; an
absolute path for a video outside it), so a video named by a relative or an absolute path is probed
once, and a dataset that moves keeps its manifest. ``bytes`` and ``mtime_ns`` tell whether the file
changed since it was probed: a changed file is probed again (and never trusted by the loaders).
``frames`` counts decoded frames (the index space the samplers use, also for variable frame rate);
``width`` / ``height`` are the coded size and ``rotation`` the display rotation in degrees
counter-clockwise (the copies are written upright, with rotation 0).

Nothing a killed run leaves behind stops the next one: lines that cannot be read (torn, not UTF-8,
not JSON objects, records without ``path`` / ``ok``) are skipped and reported, and new records start
on a new line. A worker that dies on a file (a decoder crash, the out-of-memory killer) is found by
running the unfinished files one at a time, recorded as unreadable, and the run goes on; workers die
with the run when it is killed.

Loaders drop the files marked bad (``exclude_bad``). Re-encoding writes a decode-friendly copy:
short side 256 (default), a key frame every 8 frames, VP9 or MJPEG (both decode on DALI's CPU
decoder and on NVDEC) or H.264, named after the source's relative path and full name
(``a/clip.mp4`` -> ``<reencode-dir>/a/clip.mp4.webm``).
"""
from __future__ import annotations

import collections
import dataclasses
import json
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
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Union

from .datasets import VideoDataset, build_dataset
from .errors import VideoDecodeError

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = {".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".ts", ".3gp"}
CODECS = {"vp9": ("libvpx-vp9", ".webm", "yuv420p"), "mjpeg": ("mjpeg", ".avi", "yuvj420p"), "h264": ("libx264", ".mp4", "yuv420p")}
OUTSIDE_ROOT = "_outside_root"  # where copies of videos named outside the root go, under the reencode dir


# ----------------------------------------------------------------------------------------------------
# Keys and the manifest file


def manifest_key(path: str, root: Optional[str]) -> str:
    """The manifest key of a video: its path relative to ``root`` ('/'-separated) when it lies
    inside, else its absolute path."""
    absolute = os.path.abspath(path)
    if root:
        base = os.path.abspath(root)
        if absolute == base or absolute.startswith(base.rstrip(os.sep) + os.sep):
            return Path(os.path.relpath(absolute, base)).as_posix()
    return absolute


def _file_state(path: str) -> Dict:
    try:
        st = os.stat(path)
    except OSError:
        return {"bytes": None, "mtime_ns": None}
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def is_current(record: Dict, path: str) -> bool:
    """Whether ``path`` is still the file ``record`` describes (same size and modification time).
    Records written before these fields existed are not trusted."""
    if record.get("bytes") is None or record.get("mtime_ns") is None:
        return False
    return _file_state(path) == {"bytes": record["bytes"], "mtime_ns": record["mtime_ns"]}


class Manifest(dict):
    """key -> record of a manifest (later records win), with what could not be read in ``skipped``
    ("line N: reason") and :meth:`find` to look a video up by its path."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.skipped: List[str] = []
        self._by_absolute: Optional[Dict[str, Dict]] = None

    def find(self, path: str, root: Optional[str] = None) -> Optional[Dict]:
        """The record of the video at ``path``: by its key under ``root`` (a dataset's root), else by
        its absolute path (each record's ``root`` joined to its key)."""
        if root:
            record = self.get(manifest_key(path, root))
            if record is not None:
                return record
        if self._by_absolute is None:
            self._by_absolute = {os.path.abspath(os.path.join(r.get("root") or "", k)): r for k, r in self.items()}
        return self._by_absolute.get(os.path.abspath(path))

    @property
    def unreadable(self) -> int:
        return sum(not r["ok"] for r in self.values())


def _check_manifest_path(path: str) -> None:
    if os.path.isdir(path):
        raise ValueError(f"--manifest {path} is a folder; name a file, e.g. {os.path.join(path, 'manifest.jsonl')}")


def read_manifest(path: str) -> Manifest:
    """Every readable record of a manifest; unreadable lines are skipped and listed in ``.skipped``
    (a torn last line, invalid UTF-8, JSON that is not an object, a record without ``path`` / ``ok``)."""
    manifest = Manifest(path)
    if not os.path.exists(path):
        return manifest
    _check_manifest_path(path)
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        torn = number == len(lines)  # no newline after it: a run killed while writing it
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            manifest.skipped.append(f"line {number}: not UTF-8")
            continue
        except json.JSONDecodeError:
            manifest.skipped.append(f"line {number}: {'torn (a killed run)' if torn else 'not JSON'}")
            continue
        if not isinstance(record, dict):
            manifest.skipped.append(f"line {number}: not a JSON object")
        elif not isinstance(record.get("path"), str) or not isinstance(record.get("ok"), bool):
            manifest.skipped.append(f"line {number}: a record needs a string 'path' and a boolean 'ok'")
        else:
            manifest[record["path"]] = record
    if manifest.skipped:
        log.warning("%s: %d unreadable lines skipped (%s)", path, len(manifest.skipped), "; ".join(manifest.skipped[:3]))
    return manifest


def _as_manifest(manifest: Union[str, os.PathLike, Manifest]) -> Manifest:
    return manifest if isinstance(manifest, Manifest) else read_manifest(os.fspath(manifest))


class _Appender:
    """Appends records to the manifest, each on its own line, flushed as it is written."""

    def __init__(self, path: str):
        _check_manifest_path(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.file = open(path, "ab")
        if self.file.tell() > 0:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # a torn last line: never glue a record onto it
                    self.file.write(b"\n")

    def write(self, record: Dict) -> None:
        self.file.write(json.dumps(record).encode("utf-8") + b"\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


# ----------------------------------------------------------------------------------------------------
# One video: probe, re-encode


def _empty_record(path: str) -> Dict:
    return {"path": path, "ok": False, "codec": None, "frames": 0, "fps": None, "width": None, "height": None,
            "rotation": 0, "duration": None, **_file_state(path), "prepared": None, "error": None}


def probe_video(path: str) -> Dict:
    """Codec, frame count (by decoding), fps, size, duration and file state of a video; ``ok`` False
    with the error when it cannot be used."""
    from .pyav_reader import _open, check_frame_size, display_rotation

    record = _empty_record(path)
    try:
        container = _open(path)  # refuses missing files, non-videos and oversized frames
        try:
            stream = container.streams.video[0]
            record.update(codec=stream.codec_context.name, width=stream.codec_context.width,
                          height=stream.codec_context.height,
                          fps=float(stream.average_rate) if stream.average_rate else None)
            frames = 0
            for frame in container.decode(stream):  # decode, not just demux: proves the file reads
                check_frame_size(path, frame.width, frame.height)
                if frames == 0:
                    record["rotation"] = display_rotation(frame)
                frames += 1
            record["frames"] = frames
            if stream.duration is not None and stream.time_base is not None:
                record["duration"] = float(stream.duration * stream.time_base)
        finally:
            container.close()
        if record["frames"] == 0:
            raise VideoDecodeError(path, "the video stream holds no frames")
        record["ok"] = True
    except VideoDecodeError as exc:
        record["error"] = exc.reason
    except Exception as exc:  # FFmpeg errors: corrupt data, unsupported codec, ...
        record["error"] = f"{type(exc).__name__}: {exc}"
    return record


def reencode_video(src: str, dst: str, codec: str = "vp9", short_side: int = 256, gop: int = 8,
                   rotation: Optional[int] = None) -> None:
    """Write a decode-friendly copy of ``src``: short side ``short_side`` (even sizes), GOP ``gop``,
    upright (``rotation``, degrees counter-clockwise, is applied to the pixels; probed when None),
    one frame per decoded frame at the average rate (variable frame rate becomes constant). Frames
    whose size changes mid-stream are scaled to the first frame's output size."""
    import av

    from .pyav_reader import Scaler, _open, _upright, probe_stream

    if codec not in CODECS:
        raise ValueError(f"codec must be one of {sorted(CODECS)}, got {codec!r}")
    if rotation is None:
        rotation = probe_stream(src)[2]
    quarter = int(round(rotation / 90.0)) % 4
    name, _, pix_fmt = CODECS[codec]
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    tmp = dst + ".part" + os.path.splitext(dst)[1]
    scaler = Scaler()
    try:
        with _open(src) as inp, av.open(tmp, mode="w") as out:
            vin = inp.streams.video[0]
            w, h = vin.codec_context.width, vin.codec_context.height
            if quarter % 2:
                w, h = h, w
            scale = short_side / min(w, h)
            width, height = max(2, round(w * scale / 2) * 2), max(2, round(h * scale / 2) * 2)
            rate = Fraction(vin.average_rate or 25).limit_denominator(1001000)
            vout = out.add_stream(name, rate=rate)
            vout.width, vout.height, vout.pix_fmt = width, height, pix_fmt
            vout.options = {"g": str(gop)} if codec != "mjpeg" else {"q:v": "3"}
            if codec == "vp9":
                vout.options.update({"crf": "32", "b:v": "0", "deadline": "realtime", "cpu-used": "8"})
            time_base = 1 / rate
            for index, frame in enumerate(inp.decode(vin)):
                if quarter:
                    upright = _upright(scaler.rgb(frame), rotation)
                    frame = av.VideoFrame.from_ndarray(upright, format="rgb24")
                frame = scaler(frame, width, height, pix_fmt)
                frame.pts, frame.time_base = index, time_base  # one frame per decoded frame, evenly spaced
                for packet in vout.encode(frame):
                    out.mux(packet)
            for packet in vout.encode():
                out.mux(packet)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _prepare_one(job) -> Dict:
    path, key, root, out_path, codec, short_side, gop = job
    record = probe_video(path)
    record["path"], record["root"] = key, root
    if record["ok"] and out_path:
        try:
            reencode_video(path, out_path, codec, short_side, gop, record["rotation"])
            record["prepared"] = out_path
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


def run_jobs(jobs: List[tuple], workers: int, on_record: Callable[[Dict], None],
             worker: Callable[[tuple], Dict] = _prepare_one) -> int:
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
# Loaders' side


def exclude_bad(dataset: VideoDataset, manifest: Union[str, os.PathLike, Manifest], use_prepared: bool = True) -> VideoDataset:
    """The dataset without the files the manifest marks unreadable (re-encoded copies swapped in).
    Records of files that changed since they were probed are ignored (the loaders check those files
    at run time); re-run ``stop-fast prepare`` to refresh them."""
    records = _as_manifest(manifest)
    keep = []
    dropped = stale = 0
    for s in dataset.samples:
        r = records.find(s.path, dataset.root)
        if r is not None and not is_current(r, s.path):
            stale += 1
            r = None
        if r is not None and not r["ok"]:
            dropped += 1
            continue
        if use_prepared and r is not None and r.get("prepared") and os.path.isfile(r["prepared"]):
            s = dataclasses.replace(s, path=r["prepared"])
        keep.append(s)
    if dropped:
        log.warning("%s: %d unreadable videos left out (see %s)", dataset.name, dropped, records.path)
    if stale:
        log.warning("%s: %d videos changed since %s was written; re-run `stop-fast prepare`", dataset.name, stale,
                    records.path)
    return dataclasses.replace(dataset, samples=keep)


# ----------------------------------------------------------------------------------------------------
# The command


def _video_files(folder: Path) -> Iterable[str]:
    for p in sorted(folder.rglob("*")):
        if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file():
            yield str(p)


def copy_path(reencode_dir: str, key: str, codec: str) -> str:
    """Where the copy of the video with manifest key ``key`` goes: its relative path and full name
    (suffix included, so ``same.mp4`` and ``same.avi`` get different copies) under ``reencode_dir``."""
    if os.path.isabs(key):
        key = os.path.join(OUTSIDE_ROOT, os.path.relpath(key, os.path.abspath(os.sep)))
    return os.path.join(reencode_dir, key + CODECS[codec][1])


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _check_arguments(args) -> Path:
    if args.short_side is None or args.short_side < 2:
        raise ValueError(f"--short-side must be at least 2 pixels, got {args.short_side}")
    if args.gop < 1:
        raise ValueError(f"--gop must be at least 1, got {args.gop}")
    if args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    if args.codec not in CODECS:
        raise ValueError(f"--codec must be one of {sorted(CODECS)}, got {args.codec!r}")
    _check_manifest_path(args.manifest)
    if args.dataset:
        if not args.root:
            raise ValueError("--dataset needs --root, the dataset's folder")
        base = Path(args.root)
        if not base.is_dir():
            raise ValueError(f"--root must be a folder, got {base}")
    else:
        base = Path(args.videos)
        if not base.is_dir():
            raise ValueError(f"--videos must be a folder, got {base}")
    if args.reencode_dir and _inside(args.reencode_dir, str(base)):
        flag = "--root" if args.dataset else "--videos"
        raise ValueError(f"--reencode-dir {args.reencode_dir} lies inside {flag} {base}: the copies would replace "
                         "originals or be re-encoded on the next run; choose a folder outside it")
    return base


def run_prepare(args) -> int:
    import tqdm as tqdm_module

    from .pyav_reader import _import_av

    base = _check_arguments(args)
    _import_av()  # a missing PyAV is one line here, not a traceback from every worker
    root = os.path.abspath(base)
    if args.dataset:
        paths = [s.path for s in build_dataset(args.dataset, args.root, args.split).samples]
    else:
        paths = list(_video_files(base))
    videos = {}  # key -> path: a video named twice (relative and absolute) is one video
    for p in paths:
        videos.setdefault(manifest_key(p, root), p)
    done = read_manifest(args.manifest)
    todo = [(p, k) for k, p in videos.items() if k not in done or not is_current(done[k], p)]
    jobs = [(p, k, root, copy_path(args.reencode_dir, k, args.codec) if args.reencode_dir else None,
             args.codec, args.short_side, args.gop) for p, k in todo]
    bad: List[Dict] = []
    totals = dict(done)
    appender = _Appender(args.manifest)
    tqdm_module.tqdm.monitor_interval = 0  # no monitor thread: the workers fork from this process
    progress = tqdm_module.tqdm(total=len(jobs), desc="prepare", unit="video")

    def on_record(record: Dict) -> None:
        appender.write(record)
        totals[record["path"]] = record
        progress.update(1)
        if not record["ok"]:
            bad.append(record)

    try:
        crashed = run_jobs(jobs, args.workers, on_record) if jobs else 0
    finally:
        progress.close()
        appender.close()
    for line in done.skipped:
        print(f"manifest {args.manifest}: skipped {line}")
    for r in bad:
        print(f"unreadable: {os.path.join(root, r['path'])}: {r['error']}")
    print(json.dumps({"videos": len(videos), "already_in_manifest": len(videos) - len(todo), "probed": len(jobs),
                      "unreadable": len(bad), "workers_died": crashed, "manifest": args.manifest,
                      "manifest_videos": len(totals), "manifest_unreadable": sum(not r["ok"] for r in totals.values()),
                      "manifest_lines_skipped": len(done.skipped)}))
    return 0
