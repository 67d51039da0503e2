"""``stop-fast prepare``: probe every video of a dataset once, write a manifest, optionally re-encode.

The manifest is JSON lines, one record per video, appended as each video is done, so an interrupted
run resumes where it stopped:

    {"path": ..., "ok": true, "codec": "h264", "frames": 300, "fps": 29.97, "width": 320, "height": 240,
     "rotation": 0, "duration": 10.0, "prepared": "<re-encoded file or null>", "error": null}

``frames`` counts decoded frames (the index space the samplers use, also for variable frame rate);
``width`` / ``height`` are the coded size and ``rotation`` the display rotation in degrees
counter-clockwise (the copies are written upright, with rotation 0).

Loaders drop the files marked bad (``exclude_bad``). Re-encoding writes a decode-friendly copy:
short side 256 (default), a key frame every 8 frames, VP9 or MJPEG (both decode on DALI's CPU
decoder and on NVDEC) or H.264.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from .datasets import DATASETS, VideoDataset, build_dataset
from .errors import VideoDecodeError

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = {".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv"}
CODECS = {"vp9": ("libvpx-vp9", ".webm", "yuv420p"), "mjpeg": ("mjpeg", ".avi", "yuvj420p"), "h264": ("libx264", ".mp4", "yuv420p")}


def probe_video(path: str) -> Dict:
    """Codec, frame count (by demuxing), fps, size and duration of a video; ``ok`` False with the error."""
    import av

    record = {"path": path, "ok": False, "codec": None, "frames": 0, "fps": None, "width": None, "height": None,
              "rotation": 0, "duration": None, "prepared": None, "error": None}
    try:
        if not os.path.isfile(path):
            raise VideoDecodeError(path, "file not found")
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoDecodeError(path, "no video stream (audio-only or data file)")
            stream = container.streams.video[0]
            record.update(codec=stream.codec_context.name, width=stream.codec_context.width,
                          height=stream.codec_context.height,
                          fps=float(stream.average_rate) if stream.average_rate else None)
            frames = 0
            for frame in container.decode(stream):  # decode, not just demux: proves the file reads
                if frames == 0:
                    record["rotation"] = int(round(getattr(frame, "rotation", 0) or 0))
                frames += 1
            record["frames"] = frames
            if stream.duration is not None and stream.time_base is not None:
                record["duration"] = float(stream.duration * stream.time_base)
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
    one frame per decoded frame at the average rate (variable frame rate becomes constant)."""
    import av

    from .pyav_reader import _upright, probe_stream

    if codec not in CODECS:
        raise ValueError(f"codec must be one of {sorted(CODECS)}, got {codec!r}")
    if rotation is None:
        rotation = probe_stream(src)[2]
    quarter = int(round(rotation / 90.0)) % 4
    name, _, pix_fmt = CODECS[codec]
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    tmp = dst + ".part" + os.path.splitext(dst)[1]
    with av.open(src) as inp, av.open(tmp, mode="w") as out:
        vin = inp.streams.video[0]
        w, h = vin.codec_context.width, vin.codec_context.height
        if quarter % 2:
            w, h = h, w
        scale = short_side / min(w, h)
        width, height = max(2, round(w * scale / 2) * 2), max(2, round(h * scale / 2) * 2)
        rate = vin.average_rate or 25
        vout = out.add_stream(name, rate=rate)
        vout.width, vout.height, vout.pix_fmt = width, height, pix_fmt
        vout.options = {"g": str(gop)} if codec != "mjpeg" else {"q:v": "3"}
        if codec == "vp9":
            vout.options.update({"crf": "32", "b:v": "0", "deadline": "realtime", "cpu-used": "8"})
        for frame in inp.decode(vin):
            if quarter:
                frame = av.VideoFrame.from_ndarray(_upright(frame.to_ndarray(format="rgb24"), rotation), format="rgb24")
            frame = frame.reformat(width=width, height=height, format=pix_fmt)
            frame.pts = None
            for packet in vout.encode(frame):
                out.mux(packet)
        for packet in vout.encode():
            out.mux(packet)
    os.replace(tmp, dst)


def _prepare_one(job) -> Dict:
    path, out_path, codec, short_side, gop = job
    record = probe_video(path)
    if record["ok"] and out_path:
        try:
            reencode_video(path, out_path, codec, short_side, gop, record["rotation"])
            record["prepared"] = out_path
        except Exception as exc:
            record["ok"], record["error"] = False, f"re-encoding failed: {type(exc).__name__}: {exc}"
    return record


def read_manifest(path: str) -> Dict[str, Dict]:
    """path -> record of a manifest (later records win; a torn last line from a killed run is skipped)."""
    records = {}
    if not os.path.exists(path):
        return records
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                r = json.loads(line)
                records[r["path"]] = r
            except (json.JSONDecodeError, KeyError):
                continue
    return records


def exclude_bad(dataset: VideoDataset, manifest: str, use_prepared: bool = True) -> VideoDataset:
    """The dataset without the files the manifest marks unreadable (re-encoded copies swapped in)."""
    records = read_manifest(manifest)
    keep = []
    dropped = 0
    for s in dataset.samples:
        r = records.get(s.path)
        if r is not None and not r["ok"]:
            dropped += 1
            continue
        if use_prepared and r is not None and r.get("prepared"):
            s = dataclasses.replace(s, path=r["prepared"])
        keep.append(s)
    if dropped:
        log.warning("%s: %d unreadable videos left out (see %s)", dataset.name, dropped, manifest)
    return dataclasses.replace(dataset, samples=keep)


def _video_files(folder: Path) -> Iterable[str]:
    for p in sorted(folder.rglob("*")):
        if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file():
            yield str(p)


def run_prepare(args) -> int:
    from tqdm import tqdm

    if args.dataset:
        if not args.root:
            raise ValueError("--dataset needs --root, the dataset's folder")
        paths = [s.path for s in build_dataset(args.dataset, args.root, args.split).samples]
        base = Path(args.root)
    else:
        base = Path(args.videos)
        if not base.is_dir():
            raise ValueError(f"--videos must be a folder, got {base}")
        paths = list(_video_files(base))
    paths = list(dict.fromkeys(paths))
    done = read_manifest(args.manifest)
    todo = [p for p in paths if p not in done]
    jobs = []
    for p in todo:
        out = None
        if args.reencode_dir:
            rel = os.path.relpath(p, base) if os.path.abspath(p).startswith(os.path.abspath(base)) else os.path.basename(p)
            out = str(Path(args.reencode_dir) / Path(rel).with_suffix(CODECS[args.codec][1]))
        jobs.append((p, out, args.codec, args.short_side, args.gop))
    os.makedirs(os.path.dirname(os.path.abspath(args.manifest)), exist_ok=True)
    bad: List[Dict] = []
    with open(args.manifest, "a", encoding="utf-8") as manifest, ProcessPoolExecutor(max(1, args.workers)) as pool:
        for record in tqdm(pool.map(_prepare_one, jobs, chunksize=4), total=len(jobs), desc="prepare", unit="video"):
            manifest.write(json.dumps(record) + "\n")
            manifest.flush()
            if not record["ok"]:
                bad.append(record)
    for r in bad:
        print(f"unreadable: {r['path']}: {r['error']}")
    print(json.dumps({"videos": len(paths), "already_in_manifest": len(paths) - len(todo), "probed": len(jobs),
                      "unreadable": len(bad), "manifest": args.manifest}))
    return 0
