"""STOP end to end: videos/s, peak memory and MFU of the fast path against the reference path.

    python benchmarks/bench_model.py --out benchmarks/results/model.json      (on a CUDA machine)

bf16 autocast, frozen ViT-B/32 (random weights: speed does not depend on their values), B x T frames.
A training step is forward + backward into the prompters; with the backbone frozen it needs no weight
gradients, so it costs about 2x the forward FLOPs. Both paths run side by side in one process.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch
import torch._dynamo

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import provenance, write_json  # noqa: E402

H100_BF16_DENSE_PEAK = 989e12  # FLOP/s, the data-sheet figure MFU is quoted against


def forward_flops(model, counts: torch.Tensor) -> float:
    """FLOPs of one forward pass: patch embedding + every block on the ragged sequences."""
    v = model.visual
    d = model.width
    layers = len(v.transformer.resblocks)
    patch = v.conv1.kernel_size[0]
    lengths = (1 + model.num_patches + counts.flatten()).double()
    blocks = layers * (24 * d * d * lengths.sum() + 4 * d * (lengths**2).sum())
    embed = 2 * counts.numel() * model.num_patches * 3 * patch * patch * d
    return float(blocks + embed)


def time_ms(fn, warmup: int = 3, reps: int = 10) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch", type=int, default=128, help="videos per step (default 128 x 12 = 1536 frames)")
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--out", default="benchmarks/results/model.json")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd fast path")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_model: no CUDA device here; run this on a GPU machine (nothing measured)")
        return 0

    import stop_fast

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = stop_fast.build_stop(stop_fast.STOPConfig(model_name=args.model, num_frames=args.frames), device="cuda")
    with torch.no_grad():  # non-zero prompters, as after training
        for p in model.trainable_parameters():
            p.normal_(0, 0.02)
    s = model.image_size
    videos = [torch.randn(args.batch, args.frames, 3, s, s, device="cuda") for _ in range(2)]
    counts = model.explain(videos[0][:8])["counts"]
    mean_tokens = 1 + model.num_patches + counts.float().mean().item()
    flops_fwd = forward_flops(model, counts) * args.batch / 8

    results = {}
    for impl in ("reference", "fast"):
        def infer(impl=impl):
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                model.encode_video(videos[0], impl=impl, check_inputs=False)

        def train(impl=impl):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                feats = model.encode_video(videos[1], impl=impl, check_inputs=False)
            feats.square().sum().backward()

        row = {}
        for name, fn, flops in (("inference", infer, flops_fwd), ("train_step", train, 2 * flops_fwd)):
            torch.cuda.reset_peak_memory_stats()
            ms = time_ms(fn)
            row[name] = {
                "ms": ms,
                "videos_per_s": args.batch / (ms / 1e3),
                "tflops": flops / (ms / 1e3) / 1e12,
                "mfu_vs_989_tflops": flops / (ms / 1e3) / H100_BF16_DENSE_PEAK,
                "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
            }
            print(f"{impl:9s} {name:10s} {ms:8.2f} ms  {row[name]['videos_per_s']:8.1f} videos/s  "
                  f"{row[name]['tflops']:6.1f} TFLOP/s  peak {row[name]['peak_memory_gib']:.2f} GiB")
        results[impl] = row
    if args.compile:
        # the packed token count becomes an unbacked size instead of a graph break
        torch._dynamo.config.capture_scalar_outputs = True
        compiled = torch.compile(model.encode_video, fullgraph=True)

        def train_compiled():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                feats = compiled(videos[1], impl="fast", check_inputs=False)
            feats.square().sum().backward()

        ms = time_ms(train_compiled, warmup=3)
        results["fast_compiled"] = {"train_step": {"ms": ms, "videos_per_s": args.batch / (ms / 1e3)}}
        print(f"fast+compile train_step {ms:8.2f} ms")
    speedup = {k: results["reference"][k]["ms"] / results["fast"][k]["ms"] for k in ("inference", "train_step")}
    print("fast / reference speed-up:", {k: round(v, 2) for k, v in speedup.items()})
    write_json(args.out, {
        **provenance(),
        "model": args.model, "batch": args.batch, "frames": args.frames,
        "mean_tokens_per_frame": mean_tokens,
        "forward_gflops_per_video": flops_fwd / args.batch / 1e9,
        "results": results, "speedup_fast_over_reference": speedup,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
