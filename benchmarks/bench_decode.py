"""Decoded clips per second: DALI GPU (NVDEC), DALI CPU, and PyAV with DataLoader workers, same files.

    python benchmarks/bench_decode.py --out benchmarks/results/decode.json [--videos DIR]

T = 12 frames at 224 px per clip (SPEC defaults). Without --videos it first writes 64 test clips
(320 x 240, 48 frames, VP9 so every decoder reads the same files; H.264 copies probe NVDEC). It also
records whether NVDEC works here (``nvdec_available``: a DALI "mixed" decode of an H.264 clip). Runs
anywhere; GPU rows are skipped without CUDA, DALI rows without DALI (the JSON's ``skipped`` says why).
The DALI GPU row yields bf16 (the training dtype); the others fp32. When bench_model.py's model.json
lies beside --out (as run_gpu.sh arranges), its training-step videos/s are copied in for comparison.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from common import provenance, write_json  # noqa: E402


def make_clips(folder: str, count: int = 64, codec: str = "libvpx-vp9", ext: str = "webm"):
    from data_fixtures import write_video

    return [str(write_video(os.path.join(folder, f"clip{i:03d}.{ext}"), num_frames=48, width=320, height=240, codec=codec, fps=24))
            for i in range(count)]


def clips_per_second(loader, epochs: int = 2) -> float:
    count, start = 0, None
    for epoch in range(epochs + 1):  # the first pass warms up (worker start, pipeline build)
        if epoch == 1:
            start = time.perf_counter()
        loader.set_epoch(epoch)
        for batch in loader:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if epoch:
                count += int(batch["valid"].sum())
    return count / (time.perf_counter() - start)


def nvdec_probe(folder: str) -> dict:
    if not torch.cuda.is_available():
        return {"nvdec_available": False, "reason": "no CUDA device"}
    try:
        from stop_fast.data.dali_reader import decode_frames_dali

        (path,) = make_clips(folder, 1, "libx264", "mp4")
        frames = decode_frames_dali(path, [0, 10, 20], use_gpu=True)
        return {"nvdec_available": tuple(frames.shape) == (3, 240, 320, 3), "reason": "decoded H.264 with DALI mixed"}
    except Exception as exc:  # the answer we are after, whatever the failure
        return {"nvdec_available": False, "reason": f"{type(exc).__name__}: {exc}"[:500]}


def versions() -> dict:
    out = {}
    for name, module in (("av", "av"), ("dali", "nvidia.dali"), ("open_clip", "open_clip")):
        try:
            out[name] = __import__(module, fromlist=["__version__"]).__version__
        except Exception:  # not installed: recorded as such
            out[name] = None
    return out


def training_step_rate(out_path: str):
    """The fast training step's videos/s from bench_model.py's JSON beside ours (run_gpu.sh writes both
    into one folder), so the decode figures sit next to what training consumes; None when absent."""
    path = os.path.join(os.path.dirname(os.path.abspath(out_path)), "model.json")
    try:
        with open(path) as f:
            results = json.load(f)["results"]
    except (OSError, ValueError, KeyError):
        return None
    rates = {k: v["train_step"]["videos_per_s"] for k, v in results.items() if "train_step" in v}
    return {"source": path, "train_step_videos_per_s": rates} if rates else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", help="folder of videos (default: generate 64 VP9 clips)")
    parser.add_argument("--out", default="benchmarks/results/decode.json")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()

    from stop_fast.data.datasets import Sample, VideoDataset
    from stop_fast.data.loader import VideoLoader
    from stop_fast.data.prepare import _video_files

    with tempfile.TemporaryDirectory() as tmp:
        paths = list(_video_files(__import__("pathlib").Path(args.videos))) if args.videos else make_clips(tmp)
        ds = VideoDataset("bench", "train", [Sample(p, 0) for p in paths], classes=["x"])
        rows, skipped = {}, {}
        for workers in (0, 2, 8):
            if workers > 2 * (os.cpu_count() or 1):
                skipped[f"pyav_workers{workers}"] = f"more workers than twice the {os.cpu_count()} cores"
                continue
            loader = VideoLoader(ds, args.frames, args.batch, args.size, mode="train", num_workers=workers)
            rows[f"pyav_workers{workers}"] = clips_per_second(loader)
        threads = os.cpu_count() or 1
        devices = ["cpu"] + (["gpu"] if torch.cuda.is_available() else [])
        for device in devices:
            try:
                from stop_fast.data.dali_loader import DaliVideoLoader

                loader = DaliVideoLoader(ds, args.frames, args.batch, args.size, "train", device=device,
                                         num_threads=threads, dtype=torch.bfloat16 if device == "gpu" else torch.float32)
                rows[f"dali_{device}"] = clips_per_second(loader)
                rows[f"dali_{device}_failures"] = loader.stats["failures"]
            except Exception as exc:  # DALI missing, or no file of a codec this decoder reads: say so, go on
                skipped[f"dali_{device}"] = f"{type(exc).__name__}: {exc}"[:300]
        probe = nvdec_probe(tmp)
    for name, value in rows.items():
        print(f"{name:16s} {value:8.1f}" + ("" if name.endswith("failures") else " clips/s"))
    for name, why in skipped.items():
        print(f"{name:16s} skipped: {why}")
    print(probe)
    write_json(args.out, {**provenance(), "versions": versions(), "cpu_count": os.cpu_count(), "clips": len(paths),
                          "clip": {"frames": args.frames, "size": args.size, "batch": args.batch},
                          "clips_per_second": rows, "skipped": skipped,
                          "training_step": training_step_rate(args.out), **probe})
    return 0


if __name__ == "__main__":
    sys.exit(main())
