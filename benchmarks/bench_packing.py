"""The packed sequence build (``stop_fast.kernels.pack_sequences``: prompt overlay + packing) against
the same math in PyTorch, eager and under ``torch.compile``, in GB/s against the copy bandwidth.

    python benchmarks/run.py --only packing --out results.json
    pytest benchmarks/test_bench.py -k pack --benchmark-enable

Shapes (bf16 on CUDA, fp32 on a CPU): ``vit_b32``: 1536 frames, N = 49; ``vit_b16``: 384 frames,
N = 196; D = 768, k = 6, rho = 12, counts uniform in 0..12. The forward must read z, the k prompts and
the n_t temporal tokens of every frame and write the packed tokens; the backward reads the packed
gradient and writes dz, d gate, d intra and d inter. GB/s counts those bytes once.
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
WIDTH, K, RHO = 768, 6, 12
IMPLS = ("stop_fast", "pytorch", "pytorch_compiled")


def make_inputs(device: torch.device, frames: int, n: int, seed: int = 0):
    from stop_fast.kernels import cu_seqlens_from_counts

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(frames, n + 1, WIDTH, generator=g).to(device, dtype).requires_grad_()
    counts = torch.randint(0, RHO + 1, (frames,), generator=g, dtype=torch.int32).to(device)
    idx = torch.stack([torch.randperm(n, generator=g)[:K] for _ in range(frames)]).to(device)
    gate = torch.rand(frames, K, generator=g).to(device).requires_grad_()
    intra = torch.randn(frames, K, WIDTH, generator=g).to(device, dtype).requires_grad_()
    inter = torch.randn(frames, RHO, WIDTH, generator=g).to(device, dtype).requires_grad_()
    cu, total, _ = cu_seqlens_from_counts(counts, n + 1)
    dx = torch.randn(total, WIDTH, generator=g).to(device, dtype)
    return z, counts, cu, total, idx, gate, intra, inter, dx


def packing_function(impl: str):
    from stop_fast.kernels.packing import pack_sequences, pack_sequences_reference

    if impl == "stop_fast":
        return lambda *a: pack_sequences(*a, check_inputs=False)
    reference = lambda *a: pack_sequences_reference(*a, check_inputs=False)  # noqa: E731
    return reference if impl == "pytorch" else torch.compile(reference)


def min_bytes(z, counts, total, intra, inter) -> Dict[str, int]:
    e = z.element_size()
    frames, _, width = z.shape
    temporal = int(counts.sum()) * width
    forward = (z.numel() + intra.numel() + temporal + total * width) * e + frames * K * (4 + 8)
    backward = (total * width + z.numel() + 2 * intra.numel() + inter.numel()) * e + frames * K * (8 + 8)
    return {"forward": forward, "forward_backward": forward + backward}


def prepare(ctx, shape, impl: str, step: str) -> Tuple[Callable[[], Any], int, Dict[str, Any]]:
    """The timed callable of ``impl`` at ``step``, the bytes it must move, the record's fields."""
    from stop_fast.kernels.dispatch import use_triton

    z, counts, cu, total, idx, gate, intra, inter, dx = make_inputs(ctx.device, *shape)
    fn = packing_function(impl)
    args = (z, counts, cu, total, idx, gate, intra, inter)

    def forward():
        with torch.no_grad():
            return fn(*args)

    def forward_backward():
        torch.autograd.grad(fn(*args), (z, gate, intra, inter), dx)

    timed = forward if step == "forward" else forward_backward
    nbytes = min_bytes(z, counts, total, intra, inter)[step]
    return timed, nbytes, dict(frames=shape[0], patches=shape[1], width=WIDTH, k=K, rho=RHO,
                               total_tokens=total, dtype=str(z.dtype).split(".")[-1],
                               backend=("triton" if use_triton(z) else "pytorch") if impl == "stop_fast" else "pytorch")


def cases(ctx) -> List[CaseGroup]:
    return fused_op_cases(ctx, "packing", SHAPES, QUICK_SHAPES, IMPLS, prepare)
