"""Scaling of the whole model: step time against frames T, prompt budget rho and batch B.

    python benchmarks/run.py --only scaling --out results.json

ViT-B/32 (stop-tiny with ``--quick``), one axis moved at a time from (B, T, rho) = (--batch, 12, 12):
T in 8..64, rho in 0..24, B in 8..64. Each point times inference and a training step of the fast and
reference paths, eager (``bench_model``'s cases and definitions), interleaved (one group per point
and mode: their ratio holds under load); ``--scaling-compiled`` adds the compiled fast path (each
point compiles anew). Token counts are measured on each point's batch.
"""
from __future__ import annotations

import os
import sys
from typing import List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_model import MODES, Setup, run_variants  # noqa: E402
from common import Case, CaseGroup  # noqa: E402

AXES = {"frames": (8, 16, 32, 64), "rho": (0, 4, 12, 24), "batch": (8, 16, 32, 64)}
# many points: shorter timing than the model cases (the spread is recorded all the same)
TIMING = {"warmup": 2, "min_reps": 5, "target_s": 0.3}
QUICK_AXES = {"frames": (4, 8, 16), "rho": (0, 12, 24), "batch": (1, 2, 4)}


def cases(ctx) -> List[CaseGroup]:
    name = "stop-tiny" if ctx.quick else "ViT-B-32"
    base = {"batch": ctx.quick_batch(name) if ctx.quick else ctx.batch, "frames": ctx.frames, "rho": 12}
    impls = ["fast", "reference"] + (["fast_compiled"] if ctx.scaling_compiled else [])
    timing = ctx.timing if ctx.quick else TIMING
    out = []
    for axis, values in (QUICK_AXES if ctx.quick else AXES).items():
        for value in values:
            point = {**base, axis: value}

            def setup_fn(point=point):
                return ctx.current_setup(Setup, name, point["batch"], point["frames"], point["rho"])

            for mode in MODES:
                members = {impl: Case(f"scaling/{name}/{axis}={value}/{impl}/{mode}", None,
                                      estimate_s=(lambda mode=mode: ctx.compile_estimate("fast_compiled", mode))
                                      if impl == "fast_compiled" else 10,
                                      priority=impls.index(impl))
                           for impl in impls}
                group = f"scaling/{name}/{axis}={value}/{mode}"
                out.append(CaseGroup(group, members, lambda names, setup_fn=setup_fn, mode=mode, group=group:
                                     run_variants(ctx, setup_fn, names, mode, group, timing)))
    return out
