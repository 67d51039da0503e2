"""The kernel variants (``stop_fast.kernels.dispatch.VARIANTS``, off by default until measured) against
the default kernels they would replace, side by side in one process: each group times its default
and its variant interleaved (``common.run_group``), so their ratio holds on a busy machine too.

    python benchmarks/bench_kernel_variants.py --out variants.json     (= run.py --only variants; any device)

Cases (``variants/<op>/<shape>/<default|variant>/<forward|forward_backward>``), inputs in bf16 on CUDA
(fp32 on a CPU, where the ops run their PyTorch implementations unless TRITON_INTERPRET=1, so only a
GPU's figures mean anything):
- ``variants/scoring``: :func:`scoring_case`, ``patch_scores(split=False)`` against ``split=True``
  (``scoring_split``) at ViT-B/16 (384 frames, N = 196: the case the variant is for) and ViT-B/32
  (1,536 frames, N = 49); D = 768, 12 heads, k = 6, as ``bench_scoring.py``.
- ``variants/attention``: :func:`attention_case`, ``varlen_attention_qkvpacked(short_backward=...)``
  (``attn_bwd_short``) on a ViT-B/16 batch: 384 frames of 197 + n_t tokens (n_t uniform in 0..12),
  12 heads x 64. The forward is the same kernel in both members (a control: its ratio should be ~1).
- ``variants/packing``: :func:`packing_case`, ``pack_sequences`` + ``F.pad`` to the bucket (what
  ``fast_forward(bucket=True)`` does by default) against ``pack_sequences(rows=bucket)``
  (``pack_bucketed``), ViT-B/32 and ViT-B/16 batches of 384 frames, k = 6, rho = 12.

Each record has the median and spread, GB/s against the bytes the op must move at least, and
``ratios``: the member's time over the other's, round by round (below 1: faster). On a lent GPU
(torch + triton only; nothing else of the project is imported), stage the package as run_gpu.sh does
and run this file (about 1-2 minutes, the Triton compiles and the attention autotuning included):

    mkdir -p /tmp/pkg && cp -r stop_fast /tmp/pkg/ && rm -rf /tmp/pkg/stop_fast/kernels \\
      && cp -r kernels /tmp/pkg/stop_fast/kernels \\
      && PYTHONPATH=/tmp/pkg python benchmarks/bench_kernel_variants.py --out "$OUT/kernel_variants.json"
"""
from __future__ import annotations

import os
import random
import sys
from typing import Any, Callable, Dict, Tuple

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

WIDTH, HEADS, K, RHO, ALPHA, BETA = 768, 12, 6, 12, 0.4, 4.0

SCORING_SHAPES = {"vit_b16": (384, 196), "vit_b32": (1536, 49)}  # (frames, N)
ATTENTION_SHAPES = {"vit_b16": (384, 197)}  # (frames, 1 + N): frames of 1 + N + n_t tokens
PACKING_SHAPES = {"vit_b32": (384, 49), "vit_b16": (384, 196)}  # (frames, N)
QUICK = {"scoring": {"small": (24, 49)}, "attention": {"small": (8, 197)}, "packing": {"small": (24, 49)}}
IMPLS = {"scoring": ("default", "scoring_split"), "attention": ("default", "attn_bwd_short"),
         "packing": ("default", "pack_bucketed")}


def _dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _backend(*tensors: torch.Tensor) -> str:
    from stop_fast.kernels.dispatch import use_triton

    return "triton" if use_triton(*tensors) else "pytorch"


# --------------------------------------------------------------------------- scoring_split
def scoring_case(ctx, shape: Tuple[int, int], impl: str, step: str) -> Tuple[Callable[[], Any], int, Dict[str, Any]]:
    """patch_scores, the one-pass forward (``default``) or the split one (``scoring_split``); the
    backward kernel is the same in both."""
    from stop_fast.kernels import patch_scores

    frames, n = shape
    g = torch.Generator().manual_seed(0)
    u = torch.randn(frames, n + 1, WIDTH, generator=g).to(ctx.device, _dtype(ctx.device))
    keys = (torch.randn(HEADS, WIDTH, generator=g) * WIDTH**-0.5).to(ctx.device)
    bias = torch.randn(HEADS, generator=g).to(ctx.device)
    dyn = torch.randn(frames, n, generator=g).to(ctx.device).requires_grad_()
    w = torch.randn(frames, n, generator=g).to(ctx.device).requires_grad_()
    dg = torch.randn(frames, K, generator=g).to(ctx.device)
    dv = torch.randn(frames, generator=g).to(ctx.device)
    split = impl == "scoring_split"

    def forward():
        with torch.no_grad():
            return patch_scores(u, keys, bias, dyn, w, K, ALPHA, BETA, check_inputs=False, split=split)

    def forward_backward():
        r = patch_scores(u, keys, bias, dyn, w, K, ALPHA, BETA, check_inputs=False, split=split)
        torch.autograd.grad([r.gate, r.variation], [dyn, w], [dg, dv])

    fwd_bytes = u.numel() * u.element_size() + 2 * frames * n * 4 + 3 * frames * n * 4 + frames * K * 12 + frames * 4
    bwd_bytes = frames * (K * 4 + 4) + 4 * frames * n * 4 + 2 * frames * n * 4
    nbytes = fwd_bytes if step == "forward" else fwd_bytes + bwd_bytes
    fields = dict(variant=impl, frames=frames, patches=n, width=WIDTH, heads=HEADS, k=K,
                  u_dtype=str(u.dtype).split(".")[-1], backend=_backend(u))
    return (forward if step == "forward" else forward_backward), nbytes, fields


# --------------------------------------------------------------------------- attn_bwd_short
def attention_case(ctx, shape: Tuple[int, int], impl: str, step: str) -> Tuple[Callable[[], Any], int, Dict[str, Any]]:
    """varlen_attention_qkvpacked on ViT-B/16 frames, the default backward (delta, dK dV and dQ
    kernels) or the short multi-block one (``attn_bwd_short``); the forward is the same kernel."""
    from stop_fast.kernels import cu_seqlens_from_counts, varlen_attention_qkvpacked

    frames, base = shape
    rng = random.Random(16)
    counts = torch.tensor([rng.randint(0, RHO) for _ in range(frames)], device=ctx.device)
    cu, total, max_seqlen = cu_seqlens_from_counts(counts, base, RHO)
    dtype = _dtype(ctx.device)
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(total, 3, HEADS, WIDTH // HEADS, generator=g).to(ctx.device, dtype).requires_grad_()
    do = torch.randn(total, HEADS, WIDTH // HEADS, generator=g).to(ctx.device, dtype)
    short = impl == "attn_bwd_short"

    def forward():
        with torch.no_grad():
            return varlen_attention_qkvpacked(qkv, cu, max_seqlen, check_inputs=False, short_backward=short)

    def forward_backward():
        out = varlen_attention_qkvpacked(qkv, cu, max_seqlen, check_inputs=False, short_backward=short)
        torch.autograd.grad(out, qkv, do)

    tensor = total * HEADS * (WIDTH // HEADS) * qkv.element_size()
    stats = 2 * HEADS * total * 4
    # forward: q, k, v in, out and the statistics out; backward: q, k, v, out, dO and the statistics in,
    # dq, dk, dv out
    nbytes = 4 * tensor + stats if step == "forward" else 4 * tensor + stats + 8 * tensor + stats
    fields = dict(variant=impl, frames=frames, tokens=total, max_seqlen=max_seqlen, heads=HEADS,
                  head_dim=WIDTH // HEADS, dtype=str(dtype).split(".")[-1], backend=_backend(qkv, cu))
    return (forward if step == "forward" else forward_backward), nbytes, fields


# --------------------------------------------------------------------------- pack_bucketed
def bucket_rows_without_model(total: int, longest: int, frames: int) -> int:
    """``stop_fast.model.fast.bucket_rows``'s rounding (a multiple of 1 to 8 frames' worth of rows, one
    more per 48 frames), for machines without open_clip, which importing the model needs (tested
    equal in tests/test_kernel_pack_bucketed.py)."""
    multiple = min(max(frames // 48, 1), 8) * longest
    return -(-total // multiple) * multiple


def _bucket_rows(total: int, longest: int, frames: int) -> int:
    try:
        from stop_fast.model.fast import bucket_rows
    except ImportError:  # a bare GPU machine
        return bucket_rows_without_model(total, longest, frames)
    return bucket_rows(total, longest, frames)


def packing_case(ctx, shape: Tuple[int, int], impl: str, step: str) -> Tuple[Callable[[], Any], int, Dict[str, Any]]:
    """The packed rows of the compiled encoder's bucket: ``pack_sequences`` then ``F.pad`` to the
    bucket (``default``, what ``fast_forward(bucket=True)`` does), or ``pack_sequences(rows=bucket)``
    (``pack_bucketed``), forward and backward from a gradient of the bucket's shape."""
    from stop_fast.kernels import cu_seqlens_from_counts, pack_sequences

    frames, n = shape
    dtype = _dtype(ctx.device)
    g = torch.Generator().manual_seed(2)
    z = torch.randn(frames, n + 1, WIDTH, generator=g).to(ctx.device, dtype).requires_grad_()
    counts = torch.randint(0, RHO + 1, (frames,), generator=g, dtype=torch.int32).to(ctx.device)
    idx = torch.stack([torch.randperm(n, generator=g)[:K] for _ in range(frames)]).to(ctx.device)
    gate = (torch.rand(frames, K, generator=g) * 2).to(ctx.device).requires_grad_()
    intra = torch.randn(frames, K, WIDTH, generator=g).to(ctx.device, dtype).requires_grad_()
    inter = torch.randn(frames, RHO, WIDTH, generator=g).to(ctx.device, dtype).requires_grad_()
    cu, total, _ = cu_seqlens_from_counts(counts, n + 1)
    rows = _bucket_rows(total, 1 + n + RHO, frames)
    dx = torch.randn(rows, WIDTH, generator=g).to(ctx.device, dtype)
    leaves = [z, gate, intra, inter]

    def build():
        if impl == "pack_bucketed":
            return pack_sequences(z, counts, cu, total, idx, gate, intra, inter, check_inputs=False, rows=rows)
        x = pack_sequences(z, counts, cu, total, idx, gate, intra, inter, check_inputs=False)
        return F.pad(x, (0, 0, 0, rows - total))

    def forward():
        with torch.no_grad():
            return build()

    def forward_backward():
        torch.autograd.grad(build(), leaves, dx)

    item = z.element_size()
    fwd_bytes = (z.numel() + intra.numel() + inter.numel() + rows * WIDTH) * item + frames * K * 12
    bwd_bytes = (total * WIDTH + intra.numel() + z.numel() + intra.numel() + inter.numel()) * item + frames * K * 12
    nbytes = fwd_bytes if step == "forward" else fwd_bytes + bwd_bytes
    fields = dict(variant=impl, frames=frames, patches=n, width=WIDTH, k=K, rho=RHO, tokens=total, rows=rows,
                  dtype=str(dtype).split(".")[-1], backend=_backend(z))
    return (forward if step == "forward" else forward_backward), nbytes, fields


# --------------------------------------------------------------------------- cases
def cases(ctx) -> list:
    """One interleaved group (``common.CaseGroup``: default against variant) per op, shape and step."""
    from common import fused_op_cases

    out = []
    for op, shapes, prepare in (("scoring", SCORING_SHAPES, scoring_case), ("attention", ATTENTION_SHAPES, attention_case),
                                ("packing", PACKING_SHAPES, packing_case)):
        out += fused_op_cases(ctx, f"variants/{op}", shapes, QUICK[op], IMPLS[op], prepare)
    return out


if __name__ == "__main__":  # the suite's runner, on this group only: `run.py --only variants` does the same
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import run

    sys.exit(run.main(["--only", "variants", *sys.argv[1:]]))
