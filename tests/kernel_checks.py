"""Shared checks of the kernel tests: the tolerance rule and the sm_90 compile report."""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
from typing import Dict, List

import torch


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


# the epsilon of the rule, relative to the largest true value: a few units in the last place
RELATIVE_EPS = {torch.float32: 2e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def assert_within_rule(fast: torch.Tensor, plain: torch.Tensor, truth: torch.Tensor, what: str = "", scale=None) -> None:
    """FlashAttention's rule: |fast - truth| <= 2 |plain - truth| + eps, where ``plain`` is the PyTorch
    computation in the same dtype as ``fast``, ``truth`` a float64 computation, and eps a few units in
    the last place of the largest true value (``RELATIVE_EPS``), or of ``scale`` where the truth
    itself is (nearly) zero, e.g. a gradient that vanishes in exact arithmetic."""
    err, base = max_err(fast, truth), max_err(plain, truth)
    if scale is None:
        scale = truth.abs().max().item() if truth.numel() else 0.0
    eps = RELATIVE_EPS[fast.dtype] * scale
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
