"""The packed sequence build (overlay + packing) against its PyTorch implementation and the copy roofline.

    python benchmarks/bench_packing.py --out benchmarks/results/packing.json
    pytest benchmarks/bench_packing.py --benchmark-enable

Shapes: ViT-B/32, 1536 frames, N = 49, D = 768, k = 6, rho = 12, counts uniform in 0..12, bf16. The
forward must read z, the k prompts and the n_t temporal tokens of every frame and write the packed
tokens; the backward reads the packed gradient and writes dz, d intra, d gate and d inter.
"""
from __future__ import annotations

import argparse
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench_ms, copy_bandwidth_gbs, provenance, require_cuda, write_json  # noqa: E402


def make_inputs(frames=1536, n=49, width=768, k=6, rho=12, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(frames, n + 1, width, generator=g).to("cuda", dtype).requires_grad_()
    counts = torch.randint(0, rho + 1, (frames,), generator=g, dtype=torch.int32).cuda()
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(frames)]).cuda()
    gate = torch.rand(frames, k, generator=g).cuda().requires_grad_()
    intra = torch.randn(frames, k, width, generator=g).to("cuda", dtype).requires_grad_()
    inter = torch.randn(frames, rho, width, generator=g).to("cuda", dtype).requires_grad_()
    return z, counts, idx, gate, intra, inter


def measure():
    from stop_fast.kernels import cu_seqlens_from_counts
    from stop_fast.kernels.packing import pack_sequences, pack_sequences_reference

    z, counts, idx, gate, intra, inter = make_inputs()
    frames, length, width = z.shape
    cu, total, _ = cu_seqlens_from_counts(counts, length)
    esize = z.element_size()
    moved = (z.numel() + intra.numel() + int(counts.sum()) * width + total * width) * esize + gate.numel() * 4 + idx.numel() * 8
    bwd_moved = (total * width + z.numel() + intra.numel() * 2 + inter.numel()) * esize + gate.numel() * 8 + idx.numel() * 8
    dx = torch.randn(total, width, device="cuda", dtype=z.dtype)
    copy = copy_bandwidth_gbs()
    rows = {}
    for name, fn in (("triton", pack_sequences), ("pytorch", pack_sequences_reference)):
        kwargs = {"check_inputs": False} if fn is pack_sequences else {}

        def fwd(fn=fn, kwargs=kwargs):
            return fn(z, counts, cu, total, idx, gate, intra, inter, **kwargs)

        fwd_ms = bench_ms(fwd)
        both_ms = bench_ms(lambda: torch.autograd.grad(fwd(), (z, gate, intra, inter), dx))
        bwd_ms = max(both_ms - fwd_ms, 1e-6)
        rows[name] = {"forward_ms": fwd_ms, "forward_backward_ms": both_ms,
                      "forward_gbs": moved / fwd_ms / 1e6, "forward_fraction_of_copy": moved / fwd_ms / 1e6 / copy,
                      "backward_gbs_estimate": bwd_moved / bwd_ms / 1e6}
        print(f"{name:8s} fwd {fwd_ms:7.3f} ms {rows[name]['forward_gbs']:7.0f} GB/s "
              f"({100 * rows[name]['forward_fraction_of_copy']:.0f}% of copy)   fwd+bwd {both_ms:7.3f} ms")
    return {"shape": {"frames": frames, "patches": length - 1, "width": width, "k": idx.shape[1],
                      "rho": inter.shape[1], "dtype": "bf16", "total_tokens": total},
            "bytes": {"forward": moved, "backward": bwd_moved}, "copy_gbs": copy, "results": rows,
            "speedup_forward_backward": rows["pytorch"]["forward_backward_ms"] / rows["triton"]["forward_backward_ms"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/packing.json")
    args = parser.parse_args()
    if not require_cuda("bench_packing"):
        return 0
    write_json(args.out, {**provenance(), **measure()})
    return 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pack_sequences_forward(benchmark):
    from stop_fast.kernels import cu_seqlens_from_counts, pack_sequences

    z, counts, idx, gate, intra, inter = make_inputs()
    cu, total, _ = cu_seqlens_from_counts(counts, z.shape[1])

    def step():
        pack_sequences(z, counts, cu, total, idx, gate, intra, inter, check_inputs=False)
        torch.cuda.synchronize()

    benchmark(step)


if __name__ == "__main__":
    sys.exit(main())
