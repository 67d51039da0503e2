"""When the Triton kernels run and when the PyTorch implementations of the same semantics do.

Triton runs on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was
imported (that is how CI and reviewers test the kernels without a GPU). Everywhere else the
functional entry points fall back to PyTorch, so ``impl="fast"`` works on any machine.
"""
from __future__ import annotations

import os

import torch

from ._triton import triton

HAS_TRITON = triton is not None  # CUDA builds of torch ship triton; CPU-only builds may not


def interpreter_enabled() -> bool:
    """True when Triton's CPU interpreter is switched on for this process."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernels should run for these tensors.

    All tensors must live on one device: CUDA, or the CPU with the interpreter enabled.
    """
    if not HAS_TRITON or os.environ.get("STOP_FAST_DISABLE_TRITON", "0") == "1":
        return False
    devices = {t.device.type for t in tensors}
    if devices == {"cuda"}:
        return True
    return devices == {"cpu"} and interpreter_enabled()
