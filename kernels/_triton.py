"""Triton, when it is installed. Without it (CPU-only torch builds, macOS) the kernel modules still
import: ``jit`` leaves the kernel functions as plain Python, which nothing calls, because
``dispatch.use_triton`` is False and every op runs its PyTorch implementation."""
try:
    import triton
    import triton.language as tl

    jit = triton.jit
except ImportError:  # pragma: no cover - exercised by a test that hides triton
    triton = tl = None

    def jit(fn):
        return fn

__all__ = ["triton", "tl", "jit"]
