"""Training speed of STOP: videos/s and peak memory of the full optimiser step, without the loader, with
it, and of the loader alone, on `stop-fast prepare`'s copies of long-GOP originals.

    python benchmarks/bench_train.py --out benchmarks/results/h100/train.json     (ViT-B/32, T = 12, on a GPU)
    python benchmarks/bench_train.py --quick --out /tmp/train-quick.json        (stop-tiny, runs on a CPU)

The clips: ``--clips`` generated H.264 videos shaped like downloaded footage (320 x 240, 25 fps, one
key frame per 250 frames, B-frames), copied once by ``stop_fast.data.prepare`` into its default
training copies (H.264 all-intra, short side 224) with a manifest; ``--input originals`` reads the
originals instead. The JSON records the clips (count, frames, size, bytes, codec) beside each figure.

Three variants side by side in one process: the fast path compiled (``compile_encoder``), the fast
path eager, and the reference path; bf16 autocast with the backbone cast once on CUDA, fp32 on a CPU.
Random frozen weights: speed does not depend on their values.

- loader excluded: ``micro_step`` + ``optimiser_step`` of ``stop_fast.train.loop`` (forward, loss,
  backward, clip, AdamW, schedule) on one CLIP-normalised batch resident on the device. Warm-up runs
  until three steps in a row take under 1.5x the fastest so far (compilation, autotuning, and the
  recompilations a new bucket of packed rows brings while the prompts change the token counts, are
  done; at least ``--warmup`` steps), the time beyond those steps recorded as ``compile_s``; then
  ``--steps`` steps are timed with one sync at the end;
- loader included: ``stop_fast.train.train`` itself, with the manifest; the videos/s of its logging
  intervals after the first (the first pays for start-up and compiling), and the peak memory it logs;
- decode only: the loader ``train`` builds (``setup.build_loader``: PyAV workers, or DALI where NVDEC
  decodes), iterated alone for as many batches, clips/s.
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
MAX_WARMUP = 30  # steps; a variant still compiling after that is timed as it is (its JSON says how many ran)
SETTLED = 3  # warm-up ends when this many steps in a row take under 1.5x the fastest step so far


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: the process's peak RSS


def run_config(args, impl: str, compile: bool, device: torch.device, root: str, **kw):
    from stop_fast import STOPConfig
    from stop_fast.train import TrainConfig

    return TrainConfig(dataset="csv", video_root=root, stop=STOPConfig(model_name=args.model, num_frames=args.frames),
                       batch_size=args.batch, epochs=1, workers=args.workers, decoder=args.decoder, device=str(device),
                       impl=impl, compile=compile, progress=False, manifest=args.manifest, **kw)


def bench_step(args, impl: str, compile: bool, device: torch.device) -> dict:
    """The optimiser step on a resident batch (no loader)."""
    from stop_fast.train import distributed
    from stop_fast.train.loop import micro_step, optimiser_step
    from stop_fast.train.optim import build_optimizer, build_scheduler
    from stop_fast.train.setup import autocast_for, build_model, make_encoder
    from stop_fast.train.tasks import RecognitionTask

    config = run_config(args, impl, compile, device, root=None).resolved(device.type == "cuda")
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
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():
        loss = micro_step(encoder, task, batch, autocast, info)
        optimiser_step(params, optimizer, scheduler, config.grad_clip)
        return loss

    warm, times = time.perf_counter(), []
    while len(times) < MAX_WARMUP:  # until compiling (and any recompilation) is over
        tic = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - tic)
        settled = len(times) >= max(SETTLED, args.warmup) and max(times[-SETTLED:]) < 1.5 * min(times)
        if settled:  # the last steps all as fast as the fastest: nothing compiling any more
            break
    warmup_s = time.perf_counter() - warm
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    float(loss)
    sync()
    seconds = time.perf_counter() - start
    step_s = seconds / args.steps
    out = {"videos_per_s": round(args.batch / step_s, 2), "step_ms": round(1e3 * step_s, 3),
           "warmup_steps": len(times), "compile_s": round(max(0.0, warmup_s - len(times) * step_s), 2),
           "peak_memory_gb": round(peak_memory_gb(device), 3)}
    return out  # the model, optimiser and batch are freed on return (main empties the CUDA cache)


def bench_with_loader(args, impl: str, compile: bool, device: torch.device, root: str) -> dict:
    """``train()`` over the clips: videos/s as its logging intervals report them."""
    from stop_fast.train import train
    from stop_fast.train.records import read_metrics

    out = tempfile.mkdtemp(prefix=f"bench-{impl}-", dir=root)
    config = run_config(args, impl, compile, device, root, log_every=args.log_every, eval_every=0, out=out,
                        stop_after_steps=args.warmup + args.steps, keep_checkpoints=1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(config)
    records = [r for r in read_metrics(os.path.join(out, "metrics.jsonl")) if "videos_per_s" in r]
    timed = [r["videos_per_s"] for r in records[1:]] or [r["videos_per_s"] for r in records]
    if not timed:  # stopped (a signal, a time limit) before its first logging interval
        return {"error": f"no logging interval finished ({len(records)} records in metrics.jsonl)"}
    return {"videos_per_s": round(statistics.median(timed), 2), "intervals": timed,
            "peak_memory_gb": round(peak_memory_gb(device), 3)}


def bench_decode_only(args, device: torch.device, root: str) -> dict:
    """The training loader alone: clips/s over as many batches as a loader-included run times."""
    from stop_fast.train import distributed
    from stop_fast.train.setup import build_datasets, build_loader

    config = run_config(args, "fast", False, device, root).resolved(device.type == "cuda")
    import open_clip

    import stop_fast.backbone  # noqa: F401 - registers stop-tiny with open_clip

    train_set, _ = build_datasets(config)
    size = open_clip.get_model_config(args.model)["vision_cfg"]["image_size"]  # what the model reads
    loader = build_loader(config, train_set, "train", distributed.Dist(), device, size, args.batch)
    loader.set_epoch(0)
    batches, clips, tic = 0, 0, None
    for batch in loader:
        if batches == args.warmup:  # workers started and their first batches out: the clock starts
            tic, clips = time.perf_counter(), 0
        video = batch["video"].to(device, non_blocking=True)
        clips += video.shape[0]
        batches += 1
        if batches == args.warmup + args.steps:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - tic
    return {"clips_per_s": round(clips / seconds, 2), "batches": args.steps, "decoder": type(loader).__name__,
            "workers": config.workers}


def write_originals(folder: str, count: int, frames: int, width: int, height: int) -> list:
    """``count`` H.264 clips shaped like downloaded footage (one key frame per 250 frames, B-frames) of
    moving noise, so the decoder has real work; returns their file names."""
    import av
    import numpy as np

    rng = np.random.default_rng(0)
    names = []
    for i in range(count):
        name = f"clip{i:04d}.mp4"
        with av.open(os.path.join(folder, name), mode="w") as c:
            s = c.add_stream("libx264", rate=25)
            s.width, s.height, s.pix_fmt = width, height, "yuv420p"
            s.options = {"g": "250", "bf": "2", "preset": "veryfast"}
            base = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
            for t in range(frames):
                for packet in s.encode(av.VideoFrame.from_ndarray(np.roll(base, 4 * t, axis=1), format="rgb24")):
                    c.mux(packet)
            for packet in s.encode():
                c.mux(packet)
        names.append(name)
    return names


def make_dataset(args, root: str) -> dict:
    """Originals under ``root/videos``, CSV lists, and (``--input copies``) prepare's copies + manifest."""
    from stop_fast.data.prepare import CopySettings, prepare

    videos = os.path.join(root, "videos")
    os.makedirs(videos)
    names = write_originals(videos, args.clips, args.clip_frames, args.width, args.height)
    needed = args.batch * (args.warmup + args.steps + 1)
    for split, rows in (("train", (names * (needed // len(names) + 1))[:needed]), ("val", names[:2])):
        with open(os.path.join(root, f"{split}.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "label"])
            w.writerows([f"videos/{n}", f"class {i % 2}"] for i, n in enumerate(rows))
    paths = [os.path.join(videos, n) for n in names]
    clips = {"count": args.clips, "frames": args.clip_frames, "size": [args.width, args.height], "codec": "h264",
             "key_frame_every": 250, "b_frames": 2, "bytes_per_clip": round(sum(map(os.path.getsize, paths)) / len(paths))}
    if args.input == "copies":
        args.manifest = os.path.join(root, "manifest.jsonl")
        copies = os.path.join(os.path.dirname(root), os.path.basename(root) + "-copies")
        tic = time.perf_counter()
        prepare(paths, root, args.manifest, copies, CopySettings(), workers=args.workers or 1)
        copy_files = [os.path.join(dp, n) for dp, _, ns in os.walk(copies) for n in ns]
        clips["copies"] = {"settings": "stop-fast prepare's default (H.264 all-intra, short side 224)",
                           "bytes_per_clip": round(sum(map(os.path.getsize, copy_files)) / len(copy_files)),
                           "prepare_s": round(time.perf_counter() - tic, 1)}
    return clips


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="stop-tiny, T = 4, B = 4, few steps: minutes on a CPU")
    p.add_argument("--model", default=None, help="default ViT-B-32 (stop-tiny with --quick)")
    p.add_argument("--frames", type=int, default=None, help="default 12 (4 with --quick)")
    p.add_argument("--batch", type=int, default=None, help="videos per step (default 32; 4 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20; 3 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first, at least (default 5; 1 with --quick)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    p.add_argument("--no-loader", action="store_true", help="skip the loader-included and decode-only runs")
    p.add_argument("--input", choices=["copies", "originals"], default="copies",
                   help="what the loader reads: prepare's copies through their manifest (default), or the originals")
    p.add_argument("--decoder", default="auto", choices=["auto", "dali", "pyav"])
    p.add_argument("--workers", type=int, default=None, help="decoding workers (default: CPU count, at most 16)")
    p.add_argument("--clips", type=int, default=None, help="distinct generated clips (default 64; 8 with --quick)")
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 with --quick on a CPU, where a second thread waiting on a busy "
                        "core made the step ~40x slower on a shared 2-core machine; else torch's default)")
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
    args.clip_frames, args.width, args.height = (48, 160, 120) if quick else (250, 320, 240)
    args.manifest = None
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads or (quick and device.type == "cpu"):
        torch.set_num_threads(args.threads or 1)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")

    results = {"provenance": provenance(device), "model": args.model, "frames": args.frames, "batch": args.batch,
               "steps": args.steps, "warmup": args.warmup, "quick": quick, "input": args.input,
               "torch_threads": torch.get_num_threads(), "variants": {}}
    with tempfile.TemporaryDirectory() as scratch:
        root = os.path.join(scratch, "data")
        if not args.no_loader:
            results["clips"] = make_dataset(args, root)
            results["decode_only"] = bench_decode_only(args, device, root)
            print(f"decode only: {results['decode_only']}", flush=True)
        for name in variants:
            impl, compile = VARIANTS[name]
            entry = {"loader_excluded": bench_step(args, impl, compile, device)}
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(f"{name}: loader excluded {entry['loader_excluded']}", flush=True)
            if not args.no_loader:
                entry["loader_included"] = bench_with_loader(args, impl, compile, device, root)
                included = entry["loader_included"].get("videos_per_s")
                if included:
                    entry["loader_included_vs_excluded"] = round(included / entry["loader_excluded"]["videos_per_s"], 3)
                print(f"{name}: loader included {entry['loader_included']}", flush=True)
            results["variants"][name] = entry
            write_json(args.out, results)  # after every variant: a run cut short keeps what finished
    write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
