"""When the Triton kernels run and when the PyTorch implementations of the same semantics do.

Triton runs on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was
imported (that is how CI and reviewers test the kernels without a GPU). Everywhere else the
functional entry points fall back to PyTorch, so ``impl="fast"`` works on any machine.

Also the switch of the kernel variants (faster kernels not yet measured on a GPU, off by default):
:func:`variant_enabled`, read by the ops' functional entries and by the fast path.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

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


# --------------------------------------------------------------------------- kernel variants
# Faster kernels that no GPU has measured yet. Each is off by default (the default path is the one the
# H100 figures describe) and switched on by name, in one place: the environment variable
# STOP_FAST_KERNEL_VARIANTS (comma-separated names, or "all"), or per call by the functional entries'
# keyword arguments (which win over the variable). Under torch.compile the variable is read when a
# function is traced.
VARIANTS_ENV = "STOP_FAST_KERNEL_VARIANTS"
VARIANTS = {
    "scoring_split": "patch_scores forward in two kernels: the logits over blocks of rows of all frames, "
                     "then one light program per frame for softmax, top-K, gate and variation "
                     "(patch_scores(split=...))",
    "attn_bwd_short": "varlen attention backward: one program per (sequence, head) for sequences of 2-4 "
                      "blocks (ViT-B/16 frames), instead of the delta, dK/dV and dQ kernels "
                      "(varlen_attention(short_backward=...))",
    "pack_bucketed": "fast path with bucketed rows: pack_sequences writes the bucket's zero rows itself, "
                     "no F.pad copy forward and backward (pack_sequences(rows=...))",
}


def enabled_variants() -> frozenset:
    """The variant names STOP_FAST_KERNEL_VARIANTS switches on (empty by default). An unknown name is
    an error, not a silent no-op."""
    value = os.environ.get(VARIANTS_ENV, "")
    names = frozenset(name.strip() for name in value.split(",") if name.strip())
    if "all" in names:
        return frozenset(VARIANTS)
    unknown = sorted(names - set(VARIANTS))
    if unknown:
        raise ValueError(f"{VARIANTS_ENV} names unknown kernel variants {unknown}; known: {sorted(VARIANTS)} or 'all'")
    return names


def variant_enabled(name: str, override: Optional[bool] = None) -> bool:
    """Whether kernel variant ``name`` runs: ``override`` (a functional entry's keyword argument) when
    given, else whether STOP_FAST_KERNEL_VARIANTS names it."""
    if name not in VARIANTS:
        raise ValueError(f"unknown kernel variant {name!r}; known: {sorted(VARIANTS)}")
    if override is not None:
        return bool(override)
    return name in enabled_variants()


@contextlib.contextmanager
def kernel_variants(*names: str) -> Iterator[None]:
    """Switch exactly ``names`` on (and every other variant off) for the ``with`` block, through
    STOP_FAST_KERNEL_VARIANTS; the previous value comes back afterwards. For tests and benchmarks."""
    for name in names:
        if name != "all" and name not in VARIANTS:
            raise ValueError(f"unknown kernel variant {name!r}; known: {sorted(VARIANTS)} or 'all'")
    before = os.environ.get(VARIANTS_ENV)
    os.environ[VARIANTS_ENV] = ",".join(names)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(VARIANTS_ENV, None)
        else:
            os.environ[VARIANTS_ENV] = before
