"""Training speed of STOP: videos/s and peak memory of the full optimiser step, with and without the loader.

    python benchmarks/bench_train.py --out benchmarks/results/train.json          (ViT-B/32, T = 12, on a GPU)
    python benchmarks/bench_train.py --quick --out /tmp/train-quick.json        (stop-tiny, runs on a CPU)

Three variants side by side in one process: the fast path compiled (``stop_fast.model.compiled``,
eager with a warning where it is missing), the fast path eager, and the reference path; bf16
autocast with the backbone cast once on CUDA, fp32 on a CPU. Random frozen weights: speed does
not depend on their values.

- loader excluded: ``micro_step`` + ``optimiser_step`` of ``stop_fast.train.loop`` (forward, loss,
  backward, clip, AdamW, schedule) on one CLIP-normalised batch resident on the device, timed with
  a sync after ``--steps`` steps (after ``--warmup`` steps, which include compiling);
- loader included: ``stop_fast.train.train`` itself on generated clips (H.264 for NVDEC on a GPU,
  VP9 elsewhere, listed repeatedly in a CSV so one epoch holds every timed step); the videos/s of
  its logging intervals after the first (the first pays for start-up and compiling), and the peak
  memory it logs.
"""
from __future__ import annotations

import argparse
import csv
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import provenance, write_json  # noqa: E402

VARIANTS = {"fast-compiled": ("fast", True), "fast-eager": ("fast", False), "reference": ("reference", False)}


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: the process's peak RSS


def bench_step(args, impl: str, compile: bool, device: torch.device) -> dict:
    """The optimiser step on a resident batch (no loader)."""
    from stop_fast import STOPConfig
    from stop_fast.train import TrainConfig, distributed
    from stop_fast.train.loop import micro_step, optimiser_step
    from stop_fast.train.optim import build_optimizer, build_scheduler
    from stop_fast.train.setup import autocast_for, build_model, make_encoder
    from stop_fast.train.tasks import RecognitionTask

    config = TrainConfig(stop=STOPConfig(model_name=args.model, num_frames=args.frames), batch_size=args.batch,
                         device=str(device), impl=impl, compile=compile).resolved(device.type == "cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(config, device)
    autocast = autocast_for(device, config.precision)
    task = RecognitionTask(model, [f"class {i}" for i in range(args.classes)], config.class_template, autocast)
    params = list(model.trainable_parameters())
    optimizer = build_optimizer(params, config)
    scheduler = build_scheduler(optimizer, 10**6, 0.0)
    encoder = make_encoder(model, impl, compile)
    gen = torch.Generator(device="cpu").manual_seed(0)
    dtype = torch.bfloat16 if config.precision == "bf16" else torch.float32
    s = model.image_size
    batch = {"video": torch.randn(args.batch, args.frames, 3, s, s, generator=gen).to(device, dtype),
             "target": torch.randint(0, args.classes, (args.batch,), generator=gen).to(device)}
    info = distributed.Dist()

    def step():
        loss = micro_step(encoder, task, batch, autocast, info)
        optimiser_step(params, optimizer, scheduler, config.grad_clip)
        return loss

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    float(loss)
    sync()
    seconds = time.perf_counter() - start
    out = {"videos_per_s": round(args.batch * args.steps / seconds, 2), "step_ms": round(1e3 * seconds / args.steps, 3),
           "peak_memory_gb": round(peak_memory_gb(device), 3)}
    del model, optimizer, batch
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def write_clips(folder: str, count: int, frames: int, width: int, height: int, codec: str) -> list:
    """``count`` clips of moving noise (so the decoder has real work), named by index."""
    import av
    import numpy as np

    rng = np.random.default_rng(0)
    suffix = "mp4" if codec == "libx264" else "webm"
    paths = []
    for i in range(count):
        path = os.path.join(folder, f"clip{i:04d}.{suffix}")
        with av.open(path, mode="w") as c:
            s = c.add_stream(codec, rate=25)
            s.width, s.height, s.pix_fmt = width, height, "yuv420p"
            s.options = {"g": "8"}
            base = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
            for t in range(frames):
                img = np.roll(base, 4 * t, axis=1)
                for packet in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    c.mux(packet)
            for packet in s.encode():
                c.mux(packet)
        paths.append(os.path.basename(path))
    return paths


def bench_with_loader(args, impl: str, compile: bool, device: torch.device, root: str) -> dict:
    """``train()`` over the generated clips: videos/s as its logging intervals report them."""
    from stop_fast.train import TrainConfig, train
    from stop_fast.train.records import read_metrics

    out = tempfile.mkdtemp(prefix=f"bench-{impl}-", dir=root)
    steps = args.warmup + args.steps
    from stop_fast import STOPConfig

    config = TrainConfig(dataset="csv", video_root=root, stop=STOPConfig(model_name=args.model, num_frames=args.frames),
                         batch_size=args.batch, epochs=1, workers=args.workers, decoder=args.decoder, device=str(device), impl=impl,
                         compile=compile, log_every=args.log_every, eval_every=0, out=out, progress=False,
                         stop_after_steps=steps, keep_checkpoints=1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(config)
    records = [r for r in read_metrics(os.path.join(out, "metrics.jsonl")) if "videos_per_s" in r]
    timed = [r["videos_per_s"] for r in records[1:]] or [r["videos_per_s"] for r in records]
    with open(os.path.join(out, "config.json")) as f:
        import json

        used = json.load(f)
    if not timed:  # stopped (a signal, a time limit) before its first logging interval
        return {"error": f"no logging interval finished ({len(records)} records in metrics.jsonl)"}
    return {"videos_per_s": round(statistics.median(timed), 2), "intervals": timed,
            "peak_memory_gb": round(peak_memory_gb(device), 3), "decoder": args.decoder,
            "workers": args.workers, "precision": used["precision"]}


def make_dataset(args, root: str, device: torch.device) -> None:
    codec = "libx264" if device.type == "cuda" else "libvpx-vp9"
    names = write_clips(os.path.join(root), args.clips, args.clip_frames, args.width, args.height, codec)
    needed = args.batch * (args.warmup + args.steps + 1)
    for split, rows in (("train", (names * (needed // len(names) + 1))[:needed]), ("val", names[:2])):
        with open(os.path.join(root, f"{split}.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "label"])
            w.writerows([n, f"class {i % 2}"] for i, n in enumerate(rows))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="stop-tiny, T = 4, B = 4, few steps: minutes on a CPU")
    p.add_argument("--model", default=None, help="default ViT-B-32 (stop-tiny with --quick)")
    p.add_argument("--frames", type=int, default=None, help="default 12 (4 with --quick)")
    p.add_argument("--batch", type=int, default=None, help="videos per step (default 32; 4 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20; 3 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; 1 with --quick)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    p.add_argument("--no-loader", action="store_true", help="skip the loader-included runs")
    p.add_argument("--decoder", default="auto", choices=["auto", "dali", "pyav"])
    p.add_argument("--workers", type=int, default=None, help="decoding workers (default: CPU count, at most 16)")
    p.add_argument("--clips", type=int, default=None, help="distinct generated clips (default 64; 8 with --quick)")
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--out", default="benchmarks/results/train.json")
    args = p.parse_args()
    quick = args.quick
    args.model = args.model or ("stop-tiny" if quick else "ViT-B-32")
    args.frames = args.frames or (4 if quick else 12)
    args.batch = args.batch or (4 if quick else 32)
    args.steps = args.steps or (3 if quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 5)
    args.workers = args.workers if args.workers is not None else min(16, os.cpu_count() or 1)
    args.clips = args.clips or (8 if quick else 64)
    args.classes = 101
    args.log_every = max(1, args.warmup)  # the first logging interval holds the warm-up
    args.clip_frames, args.width, args.height = (16, 96, 64) if quick else (48, 320, 240)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")

    results = {"provenance": provenance(device), "model": args.model, "frames": args.frames, "batch": args.batch,
               "steps": args.steps, "warmup": args.warmup, "quick": quick, "variants": {}}
    with tempfile.TemporaryDirectory() as root:
        if not args.no_loader:
            make_dataset(args, root, device)
        for name in variants:
            impl, compile = VARIANTS[name]
            entry = {"loader_excluded": bench_step(args, impl, compile, device)}
            print(f"{name}: loader excluded {entry['loader_excluded']}", flush=True)
            if not args.no_loader:
                entry["loader_included"] = bench_with_loader(args, impl, compile, device, root)
                print(f"{name}: loader included {entry['loader_included']}", flush=True)
            results["variants"][name] = entry
            write_json(args.out, results)  # after every variant: a run cut short keeps what finished
    write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
