"""The fused scoring kernel against its PyTorch implementation, and against the copy roofline.

    python benchmarks/bench_scoring.py --out benchmarks/results/scoring.json
    pytest benchmarks/bench_scoring.py --benchmark-enable

Shapes: ViT-B/32, 1536 frames (128 videos x 12), N = 49, D = 768, 12 heads, k = 6, u in bf16. The
kernel must read u (F x 50 x 768 x 2 bytes) and the two logit maps, and write A, Dyn, S, R, g and v;
achieved bandwidth is those bytes over the median time, next to a device-to-device copy measured in
the same run.
"""
from __future__ import annotations

import argparse
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench_ms, copy_bandwidth_gbs, provenance, require_cuda, write_json  # noqa: E402


def make_inputs(frames=1536, n=49, width=768, heads=12, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(frames, n + 1, width, generator=g).to("cuda", dtype)
    keys = (torch.randn(heads, width, generator=g) * width**-0.5).cuda()
    bias = torch.randn(heads, generator=g).cuda()
    dyn = torch.randn(frames, n, generator=g).cuda().requires_grad_()
    w = torch.randn(frames, n, generator=g).cuda().requires_grad_()
    return u, keys, bias, dyn, w


def measure(k=6):
    from stop_fast.kernels.scoring import patch_scores, patch_scores_reference

    u, keys, bias, dyn, w = make_inputs()
    frames, length, width = u.shape
    n = length - 1
    fwd_bytes = u.numel() * u.element_size() + 2 * frames * n * 4 + 3 * frames * n * 4 + frames * k * 12 + frames * 4
    bwd_bytes = frames * (k * 12 + 4) + 4 * frames * n * 4 + 2 * frames * n * 4
    dg, dv = torch.randn(frames, k, device="cuda"), torch.randn(frames, device="cuda")
    copy = copy_bandwidth_gbs()
    rows = {}
    for name, fn in (("triton_fused", patch_scores), ("pytorch", patch_scores_reference)):
        def fwd(fn=fn):
            return fn(u, keys, bias, dyn, w, k, 0.4, 4.0, **({"check_inputs": False} if fn is patch_scores else {}))

        out = fwd()
        fwd_ms = bench_ms(fwd)

        def fwd_bwd():
            r = fwd()
            torch.autograd.backward([r.gate, r.variation], [dg, dv])

        both_ms = bench_ms(fwd_bwd)
        rows[name] = {"forward_ms": fwd_ms, "forward_backward_ms": both_ms,
                      "forward_gbs": fwd_bytes / fwd_ms / 1e6,
                      "forward_fraction_of_copy": fwd_bytes / fwd_ms / 1e6 / copy}
        print(f"{name:14s} fwd {fwd_ms:7.3f} ms  {rows[name]['forward_gbs']:7.0f} GB/s "
              f"({100 * rows[name]['forward_fraction_of_copy']:.0f}% of copy)   fwd+bwd {both_ms:7.3f} ms")
        del out
    return {"shape": {"frames": frames, "patches": n, "width": width, "heads": keys.shape[0], "k": k, "u_dtype": "bf16"},
            "bytes": {"forward": fwd_bytes, "backward": bwd_bytes}, "copy_gbs": copy, "results": rows,
            "speedup_forward_backward": rows["pytorch"]["forward_backward_ms"] / rows["triton_fused"]["forward_backward_ms"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/scoring.json")
    args = parser.parse_args()
    if not require_cuda("bench_scoring"):
        return 0
    write_json(args.out, {**provenance(), **measure()})
    return 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_patch_scores_forward(benchmark):
    from stop_fast.kernels import patch_scores

    u, keys, bias, dyn, w = make_inputs()

    def step():
        patch_scores(u, keys, bias, dyn, w, 6, 0.4, 4.0, check_inputs=False)
        torch.cuda.synchronize()

    benchmark(step)


if __name__ == "__main__":
    sys.exit(main())
