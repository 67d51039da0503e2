"""Patch scoring + top-K (``stop_fast.kernels.patch_scores``) against the same math in PyTorch, eager
and under ``torch.compile``, in GB/s against the copy bandwidth measured in the same run.

    python benchmarks/run.py --only scoring --out results.json
    pytest benchmarks/test_bench.py -k scores --benchmark-enable

Shapes (u in bf16 on CUDA, fp32 on a CPU): ``vit_b32``: 1536 frames (128 videos x 12), N = 49;
``vit_b16``: 384 frames (32 x 12), N = 196; D = 768, 12 heads, k = 6. The op must read u
(F x (N+1) x D) and the two logit maps and write A, Dyn, S (fp32), R, g and v; its backward reads
dg, dv and the saved maps and writes the two logit gradients. GB/s counts those bytes once.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable, Dict, List, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import CaseGroup, fused_op_cases  # noqa: E402

SHAPES = {"vit_b32": (1536, 49), "vit_b16": (384, 196)}
QUICK_SHAPES = {"vit_b32_small": (24, 49)}
WIDTH, HEADS, K, ALPHA, BETA = 768, 12, 6, 0.4, 4.0
IMPLS = ("stop_fast", "pytorch", "pytorch_compiled")


def make_inputs(device: torch.device, frames: int, n: int, seed: int = 0):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(frames, n + 1, WIDTH, generator=g).to(device, dtype)
    keys = (torch.randn(HEADS, WIDTH, generator=g) * WIDTH**-0.5).to(device)
    bias = torch.randn(HEADS, generator=g).to(device)
    dyn = torch.randn(frames, n, generator=g).to(device).requires_grad_()
    w = torch.randn(frames, n, generator=g).to(device).requires_grad_()
    dg = torch.randn(frames, K, generator=g).to(device)
    dv = torch.randn(frames, generator=g).to(device)
    return u, keys, bias, dyn, w, dg, dv


def scoring_function(impl: str):
    from stop_fast.kernels.scoring import patch_scores, patch_scores_reference

    if impl == "stop_fast":
        return lambda *a: patch_scores(*a, check_inputs=False)
    if impl == "pytorch":
        return patch_scores_reference
    return torch.compile(patch_scores_reference)


def min_bytes(u: torch.Tensor) -> Dict[str, int]:
    frames, length, width = u.shape
    n = length - 1
    forward = u.numel() * u.element_size() + 2 * frames * n * 4 + 3 * frames * n * 4 + frames * K * 12 + frames * 4
    backward = frames * (K * 4 + 4) + 4 * frames * n * 4 + 2 * frames * n * 4  # dg, dv, saved maps in; 2 grads out
    return {"forward": forward, "forward_backward": forward + backward}


def prepare(ctx, shape, impl: str, step: str) -> Tuple[Callable[[], Any], int, Dict[str, Any]]:
    """The timed callable of ``impl`` at ``step``, the bytes it must move, the record's fields."""
    from stop_fast.kernels.dispatch import use_triton

    u, keys, bias, dyn, w, dg, dv = make_inputs(ctx.device, *shape)
    fn = scoring_function(impl)

    def forward():
        with torch.no_grad():
            return fn(u, keys, bias, dyn, w, K, ALPHA, BETA)

    def forward_backward():
        r = fn(u, keys, bias, dyn, w, K, ALPHA, BETA)
        torch.autograd.grad([r.gate, r.variation], [dyn, w], [dg, dv])

    timed = forward if step == "forward" else forward_backward
    nbytes = min_bytes(u)[step]
    return timed, nbytes, dict(frames=shape[0], patches=shape[1], width=WIDTH, heads=HEADS, k=K,
                               u_dtype=str(u.dtype).split(".")[-1],
                               backend=("triton" if use_triton(u) else "pytorch") if impl == "stop_fast" else "pytorch")


def cases(ctx) -> List[CaseGroup]:
    return fused_op_cases(ctx, "scoring", SHAPES, QUICK_SHAPES, IMPLS, prepare)
