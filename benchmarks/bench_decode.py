"""Decoded clips per second: DALI GPU (NVDEC), DALI CPU, and PyAV with DataLoader workers, same files.

    python benchmarks/bench_decode.py --out benchmarks/results/decode.json [--videos DIR]

T = 12 frames at 224 px per clip (SPEC defaults). Without --videos it first writes 64 test clips
(320 x 240, 48 frames, VP9 so every decoder reads the same files; H.264 copies probe NVDEC). It also
records whether NVDEC works here (``nvdec_available``: a DALI "mixed" decode of an H.264 clip). Runs
anywhere; GPU rows are skipped without CUDA.
"""
from __future__ import annotations

import argparse
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
        rows = {}
        for workers in (0, 2, 8):
            if workers > 2 * (os.cpu_count() or 1):
                continue
            loader = VideoLoader(ds, args.frames, args.batch, args.size, mode="train", num_workers=workers)
            rows[f"pyav_workers{workers}"] = clips_per_second(loader)
        try:
            from stop_fast.data.dali_loader import DaliVideoLoader

            threads = os.cpu_count() or 1
            rows["dali_cpu"] = clips_per_second(DaliVideoLoader(ds, args.frames, args.batch, args.size, "train",
                                                                device="cpu", num_threads=threads))
            if torch.cuda.is_available():
                rows["dali_gpu"] = clips_per_second(DaliVideoLoader(ds, args.frames, args.batch, args.size, "train",
                                                                    device="gpu", num_threads=threads))
        except ImportError as exc:
            print(f"DALI rows skipped: {exc}")
        probe = nvdec_probe(tmp)
    for name, value in rows.items():
        print(f"{name:16s} {value:8.1f} clips/s")
    print(probe)
    write_json(args.out, {**provenance(), "cpu_count": os.cpu_count(), "clips": len(paths),
                          "clip": {"frames": args.frames, "size": args.size, "batch": args.batch},
                          "clips_per_second": rows, **probe})
    return 0


if __name__ == "__main__":
    sys.exit(main())
