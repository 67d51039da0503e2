"""Where a step's GPU time goes: its CUDA kernels grouped by kind, from ``torch.profiler``.

    record["profile"] = kernel_breakdown(step, device)          # bench_model.py, with run.py --profile

The step runs ``iters`` times under the profiler after the caller's warm-up; every figure is per step.
``wall_ms`` is the host's time for the profiled steps over ``iters`` (profiling adds a little), and
``gpu_busy_ms`` the sum of the kernels' durations: their difference is time the GPU waited (launch
gaps, host syncs, copies). Kernels are grouped by name (``KINDS``, first match wins) so that a
compiled step, an eager one and a baseline compare at a glance: GEMMs are the useful work; fused
Triton kernels from inductor (``triton_``) are the norms, activations and residuals; stop_fast's own
kernels and the other attention implementations have their own rows.
"""
from __future__ import annotations

import time
from collections import defaultdict
from typing import Any, Callable, Dict, List, Tuple

import torch

# (kind, name fragments): the first kind with a fragment in the kernel's lower-cased name
KINDS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("stop_fast attention", ("_attn_",)),
    ("stop_fast scoring", ("_score", "_topk", "_scoring")),
    ("stop_fast packing", ("_pack", "_unpack", "_overlay", "_slot")),
    ("other attention (flash, flex, SDPA)", ("flash", "fmha", "flex", "attention", "sdpa")),
    ("GEMM (cuBLAS / CUTLASS)", ("gemm", "nvjet", "cutlass", "xmma", "wgmma", "sm90_", "sm80_", "cublas",
                                 "triton_tem")),  # triton_tem: inductor's GEMM templates (max-autotune)
    ("fused Triton (inductor)", ("triton_",)),
    ("copies and casts", ("copy", "memcpy", "memset", "catarray", "fill")),
    ("eager element-wise and reductions", ("elementwise", "reduce", "softmax", "layer_norm", "norm")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, fragments in KINDS:
        if any(f in low for f in fragments):
            return kind
    return "other"


def kernel_breakdown(step: Callable[[], Any], device: torch.device, iters: int = 3, top: int = 12) -> Dict[str, Any]:
    """Per-step kernel time by kind and the ``top`` kernels, from ``iters`` profiled calls of ``step``
    (already warmed up). On a CPU device it returns ``{"skipped": ...}``: there are no kernels."""
    if device.type != "cuda":
        return {"skipped": "kernel profiles are taken on CUDA only"}
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(iters):
            step()
        torch.cuda.synchronize(device)
        wall = time.perf_counter() - start
    by_name: Dict[str, List[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        # GPU-side user annotations (dynamo's and inductor's region labels) span kernels: not kernels
        if event.device_type != torch.autograd.DeviceType.CUDA or getattr(event, "is_user_annotation", False):
            continue
        entry = by_name[event.name]
        entry[0] += event.time_range.elapsed_us()
        entry[1] += 1
    by_kind: Dict[str, float] = defaultdict(float)
    for name, (us, _) in by_name.items():
        by_kind[kind_of(name)] += us
    busy_us = sum(us for us, _ in by_name.values())
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "iters": iters,
        "wall_ms": wall * 1e3 / iters,
        "gpu_busy_ms": busy_us / 1e3 / iters,
        "kernels_per_step": sum(n for _, n in by_name.values()) / iters,
        "by_kind_ms": {k: v / 1e3 / iters for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": name[:160], "kind": kind_of(name), "ms": us / 1e3 / iters, "calls": n / iters}
                        for name, (us, n) in ranked],
    }


def format_breakdown(case_id: str, profile: Dict[str, Any]) -> str:
    """A few lines for the log: wall vs busy, the kinds, the top kernels."""
    if "by_kind_ms" not in profile:
        return f"{case_id}: profile {profile.get('skipped') or profile.get('error')}"
    lines = [f"{case_id}: wall {profile['wall_ms']:.2f} ms/step, GPU busy {profile['gpu_busy_ms']:.2f} ms, "
             f"{profile['kernels_per_step']:.0f} kernels/step"]
    lines += [f"    {ms:8.3f} ms  {kind}" for kind, ms in profile["by_kind_ms"].items()]
    lines += [f"      {k['ms']:8.3f} ms  x{k['calls']:<5.0f} {k['name'][:110]}" for k in profile["top_kernels"]]
    return "\n".join(lines)
