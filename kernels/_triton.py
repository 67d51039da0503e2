"""Triton, when it is installed. Without it (CPU-only torch builds, macOS) the kernel modules still
import: ``jit`` leaves the kernel functions as plain Python, which nothing calls, because
``dispatch.use_triton`` is False and every op runs its PyTorch implementation.

Also the helpers that keep Triton's CPU interpreter honest about bfloat16. The interpreter (triton
3.6 to 3.8) multiplies bf16 ``tl.dot`` operands as raw 16-bit integers (garbage results), and its
fp32 -> bf16 conversion truncates where a GPU rounds to nearest even. Kernels take an ``INTERPRETER``
constexpr (True only in interpreter runs, so compiled kernels are unchanged) and route their dots and
16-bit downcasts through :func:`dot` and :func:`round_to`, which then compute what the GPU computes.
"""
from __future__ import annotations

try:
    import triton
    import triton.language as tl

    jit = triton.jit
except ImportError:  # pragma: no cover - exercised by a test that hides triton
    triton = tl = None

    def jit(fn):
        return fn


@jit
def dot(a, b, INTERPRETER: tl.constexpr):
    """``a @ b`` with fp32 accumulation; IEEE fp32 for fp32 operands (tf32 would lose to PyTorch's
    fp32 matmuls; 16-bit operands ignore the flag). In the interpreter, 16-bit operands are multiplied
    as the fp32 numbers they are (exact products and fp32 accumulation, as a tensor core does)."""
    if INTERPRETER:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision="ieee")


@jit
def round_to(x, dtype: tl.constexpr, INTERPRETER: tl.constexpr):
    """fp32 ``x`` converted to ``dtype`` with round-to-nearest-even, in the interpreter too: there,
    for bf16, the rounding is done on the bits (add half an ulp, ties to even) so that the
    interpreter's truncating conversion then keeps the right value."""
    if INTERPRETER:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            # keep only the rounded high half: the interpreter also mishandles fp32 subnormals
            x = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return x.to(dtype)


__all__ = ["triton", "tl", "jit", "dot", "round_to"]
