"""Decoded clips per second: DALI GPU (NVDEC), DALI CPU, and PyAV with DataLoader workers, same files.

    python benchmarks/bench_decode.py --out benchmarks/results/decode.json [--videos DIR]

T = 12 frames at 224 px per clip (SPEC defaults). Without --videos it first writes 64 test clips
(320 x 240, 48 frames, VP9 so every decoder reads the same files; H.264 copies probe NVDEC). It also
records whether NVDEC works here (``nvdec_available``: a DALI "mixed" decode of an H.264 clip). Runs
anywhere; GPU rows are skipped without CUDA, DALI rows without DALI (the JSON's ``skipped`` says why).
The DALI GPU row yields bf16 (the training dtype); the others fp32. When run.py's results.json lies
beside --out (as run_gpu.sh arranges), its training-step videos/s are copied in for comparison.

DataLoader workers start from a fork server that imported torch but never decoded (PyAV 19 hangs in a
process forked after its parent decoded: its frame-scaling thread pool), and the row that decodes in
this process (no workers) runs last. The JSON is rewritten after every row, so a run stopped by a
time limit keeps what it measured.
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


def training_step_rate(out_path: str):
    """Training-step videos/s of the whole-model cases in run.py's results.json beside ours (run_gpu.sh
    writes both into one folder), so decode figures sit next to what training consumes; None if absent."""
    path = os.path.join(os.path.dirname(os.path.abspath(out_path)), "results.json")
    try:
        with open(path) as f:
            cases = json.load(f)["cases"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    rates = {k: v["videos_per_s"] for k, v in cases.items()
             if k.startswith("model/") and k.endswith("/train") and "videos_per_s" in v}
    return {"source": path, "train_step_videos_per_s": rates} if rates else None


def start_workers_from_a_fork_server() -> None:
    import torch.multiprocessing as mp

    try:
        mp.set_start_method("forkserver", force=True)
        mp.set_forkserver_preload(["torch", "stop_fast.data.loader"])
    except ValueError:  # no fork server on this platform: spawn is safe too
        mp.set_start_method("spawn", force=True)


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

    start_workers_from_a_fork_server()
    rows, skipped = {}, {}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    payload = {**provenance(device), "cpu_count": os.cpu_count(),
               "clip": {"frames": args.frames, "size": args.size, "batch": args.batch},
               "clips_per_second": rows, "skipped": skipped}

    def save():
        payload["training_step"] = training_step_rate(args.out)
        write_json(args.out, payload)

    with tempfile.TemporaryDirectory() as tmp:
        paths = list(_video_files(__import__("pathlib").Path(args.videos))) if args.videos else make_clips(tmp)
        payload["clips"] = len(paths)
        ds = VideoDataset("bench", "train", [Sample(p, 0) for p in paths], classes=["x"])
        for workers in (2, 8, 0):  # 0 decodes in this process: last, after every forked worker
            if workers > 2 * (os.cpu_count() or 1):
                skipped[f"pyav_workers{workers}"] = f"more workers than twice the {os.cpu_count()} cores"
                continue
            loader = VideoLoader(ds, args.frames, args.batch, args.size, mode="train", num_workers=workers)
            rows[f"pyav_workers{workers}"] = clips_per_second(loader)
            print(f"pyav_workers{workers:<4d} {rows[f'pyav_workers{workers}']:8.1f} clips/s", flush=True)
            save()
        threads = os.cpu_count() or 1
        devices = ["cpu"] + (["gpu"] if torch.cuda.is_available() else [])
        for device in devices:
            try:
                from stop_fast.data.dali_loader import DaliVideoLoader

                loader = DaliVideoLoader(ds, args.frames, args.batch, args.size, "train", device=device,
                                         num_threads=threads, dtype=torch.bfloat16 if device == "gpu" else torch.float32)
                rows[f"dali_{device}"] = clips_per_second(loader)
                rows[f"dali_{device}_failures"] = loader.stats["failures"]
                print(f"dali_{device:<10s} {rows[f'dali_{device}']:8.1f} clips/s", flush=True)
            except Exception as exc:  # DALI missing, or no file of a codec this decoder reads: say so, go on
                skipped[f"dali_{device}"] = f"{type(exc).__name__}: {exc}"[:300]
            save()
        payload.update(nvdec_probe(tmp))
    for name, why in skipped.items():
        print(f"{name:16s} skipped: {why}")
    print({k: payload.get(k) for k in ("nvdec_available", "reason")})
    save()
    return 0

if __name__ == "__main__":
    sys.exit(main())
