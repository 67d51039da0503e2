"""Shared checks of the kernel tests: the device they run on, the tolerance rule and the sm_90 compile
report."""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
from typing import Dict, List

import torch


# The kernels run on CUDA tensors where there is a GPU; elsewhere on CPU tensors through Triton's
# interpreter (conftest switches it on). CPU tensors on a CUDA machine would take the PyTorch
# implementations and test no kernel.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def scoring_inputs(frames, n, width, heads, dtype=torch.float32, seed=0, with_w=True, device=DEVICE):
    """Fresh random inputs of ``patch_scores``: tokens u, folded CLS keys and bias, Dyn and W logits."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(frames, n + 1, width, generator=g).to(device, dtype)
    keys = (torch.randn(heads, width, generator=g) * width**-0.5 * 2).to(device)
    bias = torch.randn(heads, generator=g).to(device)
    dyn = (torch.randn(frames, n, generator=g) * 2).to(device).requires_grad_()
    w = torch.randn(frames, n, generator=g).to(device).requires_grad_() if with_w else None
    return u, keys, bias, dyn, w


def packing_inputs(frames, n, width, k, rho, dtype=torch.float32, counts="random", seed=0, device=DEVICE):
    """Fresh random inputs of ``pack_sequences`` (``counts``: random, ``zero`` or ``full`` = rho); any
    frame count, none included."""
    g = torch.Generator().manual_seed(seed)

    def leaf(t):
        return t.to(device=device, dtype=dtype).requires_grad_()

    z = leaf(torch.randn(frames, n + 1, width, generator=g))
    if counts == "zero" or rho == 0:
        c = torch.zeros(frames, dtype=torch.int32)
    elif counts == "full":
        c = torch.full((frames,), rho, dtype=torch.int32)
    else:
        c = torch.randint(0, rho + 1, (frames,), generator=g, dtype=torch.int32)
    idx = gate = intra = None
    if k:
        idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(frames)] or [torch.empty(0, k)])
        idx = idx.to(device, torch.int64).view(frames, k)
        gate = (torch.rand(frames, k, generator=g) * 2).to(device).requires_grad_()
        intra = leaf(torch.randn(frames, k, width, generator=g))
    inter = leaf(torch.randn(frames, rho, width, generator=g)) if rho else None
    return z, c.to(device), idx, gate, intra, inter


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


# the epsilon of the rule, relative to the largest true value: a few units in the last place
RELATIVE_EPS = {torch.float32: 2e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def flash_eps(truth: torch.Tensor, dtype: torch.dtype) -> float:
    """flash-attention's own epsilon in its tests: twice the rounding of ``x + 0.3 - 0.3`` in dtype."""
    t = truth.to(dtype)
    return 2 * (t + 0.3 - 0.3 - t).abs().max().item() if t.numel() else 0.0


def assert_within_rule(fast: torch.Tensor, plain: torch.Tensor, truth: torch.Tensor, what: str = "", scale=None,
                       strict: bool = False) -> None:
    """FlashAttention's rule: |fast - truth| <= 2 |plain - truth| + eps, where ``plain`` is the PyTorch
    computation in the same dtype as ``fast``, ``truth`` a float64 computation, and eps a few units in
    the last place of the largest true value (``RELATIVE_EPS``), or of ``scale`` where the truth
    itself is (nearly) zero, e.g. a gradient that vanishes in exact arithmetic. ``strict`` takes the
    smaller of that eps and flash-attention's (:func:`flash_eps`; in fp32 it is ~20x smaller, small
    enough to see errors of a few ulps that the 2x factor alone lets through)."""
    err, base = max_err(fast, truth), max_err(plain, truth)
    if scale is None:
        scale = truth.abs().max().item() if truth.numel() else 0.0
    eps = RELATIVE_EPS[fast.dtype] * scale
    if strict:
        eps = min(eps, flash_eps(truth, fast.dtype))
    assert err <= 2 * base + eps, f"{what}: fast error {err:.3e} > 2 x PyTorch error {base:.3e} + {eps:.1e}"


@functools.lru_cache(maxsize=None)
def sm90_report() -> List[Dict]:
    """Every shipped kernel configuration compiled for sm_90 by Triton's real compiler (no GPU needed).

    Runs in a subprocess without TRITON_INTERPRET: under the interpreter the kernels are not compilable
    objects. Computed once per test session.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "report.json")
        done = subprocess.run(
            [sys.executable, "-m", "stop_fast.kernels.compile_report", "--arch", "90", "--json", path],
            env=env, capture_output=True, text=True,
        )
        assert done.returncode == 0, f"compiling for sm_90 failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        with open(path) as f:
            return json.load(f)


def assert_compiles_without_spills(cases) -> None:
    """Each of ``cases`` (a kernel module's compile_cases()) compiled for sm_90, with no spills."""
    report = {row["name"]: row for row in sm90_report()}
    assert cases, "no compile cases"
    for case in cases:
        row = report.get(case.name)
        assert row is not None, f"{case.name} missing from the sm_90 report"
        assert row["registers"] > 0, case.name
        assert row["spill_stores"] + row["spill_loads"] == 0, f"{case.name} spills on sm_90: {row}"
