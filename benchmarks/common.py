"""Shared bits of the benchmark scripts: the run's provenance and JSON output."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from typing import Any, Dict

import torch


def provenance() -> Dict[str, Any]:
    """Device, versions and commit: every recorded figure carries these."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # pragma: no cover
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except OSError:  # pragma: no cover
        commit = None
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_json(path: str, payload: Dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {path}")


def bench_ms(fn, rep: int = 100) -> float:
    """Median milliseconds of ``fn`` on the GPU (triton.testing.do_bench: warm-up, cache flush)."""
    from triton.testing import do_bench

    return float(do_bench(fn, rep=rep, return_mode="median"))


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth (read + write bytes per second), the roofline we
    compare bandwidth-bound kernels against."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms / 1e3) / 1e9


def require_cuda(script: str) -> bool:
    if torch.cuda.is_available():
        return True
    print(f"{script}: no CUDA device here; run it on a GPU machine (nothing measured)")
    return False
