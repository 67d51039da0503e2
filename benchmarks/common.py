"""What every benchmark shares: provenance, timing, the device's measured ceilings, FLOP counts, JSON.

Timing rules (the same for every case, so figures compare):
- warm-up calls first (compilation, autotuning, allocator growth stay out of the numbers);
- on CUDA each repetition is timed with its own pair of CUDA events, optionally after writing a
  buffer larger than L2 (so memory-bound ops are not timed out of cache); on a CPU, with
  ``time.perf_counter``;
- enough repetitions for about ``target_s`` seconds of timed work (at least ``min_reps``), reported
  as median and 10th / 90th percentiles;
- peak memory is the CUDA allocator's high-water mark over warm-up and timed calls.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# Dense bf16 tensor-core peaks from NVIDIA's data sheets (TFLOP/s, no sparsity), matched against
# torch.cuda.get_device_name(). Longest key first, so "H100 PCIe" wins over "H100".
DATASHEET_BF16_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,  # SXM5
    "H200": 989.0,
    "GH200": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
}


# --------------------------------------------------------------------------- provenance
def _run(cmd, cwd=None) -> Optional[str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def commit_info() -> Dict[str, Any]:
    """The commit measured: ``STOP_FAST_COMMIT`` when set (machines that get a copy of the tree
    without .git; ``STOP_FAST_DIRTY=1`` marks uncommitted changes), else ``git`` in the repository.
    ``dirty``: uncommitted changes to tracked files, None when unknown."""
    env = os.environ.get("STOP_FAST_COMMIT")
    if env:
        dirty = os.environ.get("STOP_FAST_DIRTY")
        return {"commit": env, "dirty": None if dirty is None else dirty not in ("0", "", "false"),
                "commit_source": "STOP_FAST_COMMIT"}
    commit = _run(["git", "rev-parse", "HEAD"], cwd=REPO)
    if commit:
        status = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO)
        return {"commit": commit, "dirty": bool(status) if status is not None else None, "commit_source": "git"}
    return {"commit": None, "dirty": None, "commit_source": None}


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module, fromlist=["__version__"]).__version__
    except Exception:  # not installed (or broken): recorded as absent
        return None


def versions() -> Dict[str, Optional[str]]:
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
            "triton": _version("triton"), "open_clip": _version("open_clip"), "nvidia_dali": _version("nvidia.dali"),
            "av": _version("av"), "numpy": _version("numpy")}


def device_info(device: torch.device) -> Dict[str, Any]:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", str(device.index or 0)])
        return {"device": props.name, "device_type": "cuda", "sm_count": props.multi_processor_count,
                "capability": f"{props.major}.{props.minor}", "memory_gib": round(props.total_memory / 2**30, 1),
                "driver": driver}
    return {"device": f"cpu ({platform.processor() or platform.machine()})", "device_type": "cpu",
            "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "driver": None}


def provenance(device: torch.device) -> Dict[str, Any]:
    """Device, driver, versions, commit and date: every recorded figure carries these."""
    return {**device_info(device), "versions": versions(), **commit_info(),
            "triton_interpreter": os.environ.get("TRITON_INTERPRET") == "1",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "argv": sys.argv}


def datasheet_bf16_tflops(name: str) -> Optional[Dict[str, Any]]:
    for key in sorted(DATASHEET_BF16_TFLOPS, key=len, reverse=True):
        if key in name:
            return {"tflops": DATASHEET_BF16_TFLOPS[key], "part": key}
    return None


# --------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _L2Flush:
    """Writes 256 MiB between timed repetitions (H100 L2: 50 MiB), outside the timed region."""

    def __init__(self, device: torch.device):
        self.buffer = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device=device)

    def __call__(self) -> None:
        self.buffer.zero_()


def measure(fn: Callable[[], Any], device: torch.device, *, warmup: int = 3, min_reps: int = 10,
            max_reps: int = 1000, target_s: float = 1.0, flush_l2: bool = False) -> Dict[str, Any]:
    """Median and spread of ``fn()`` in milliseconds, and the peak memory over the calls (see the
    module docstring). ``fn`` must do the same work on every call."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    flush = _L2Flush(device) if (flush_l2 and cuda) else None
    start = time.perf_counter()
    for _ in range(max(warmup, 1)):
        fn()
    synchronize(device)
    per_call = (time.perf_counter() - start) / max(warmup, 1)
    reps = int(min(max_reps, max(min_reps, target_s / max(per_call, 1e-6))))
    times = []
    if cuda:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for begin, end in events:
            if flush is not None:
                flush()
            begin.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [b.elapsed_time(e) for b, e in events]
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    out = summarize(times)
    if cuda:
        out["peak_memory_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        out["peak_memory_above_inputs_mib"] = round((torch.cuda.max_memory_allocated(device) - base) / 2**20, 1)
    return out


def summarize(times_ms) -> Dict[str, Any]:
    ordered = sorted(times_ms)

    def pct(q):
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]

    return {"median_ms": statistics.median(ordered), "p10_ms": pct(0.1), "p90_ms": pct(0.9),
            "min_ms": ordered[0], "reps": len(ordered)}


def first_call_s(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall seconds of one call, synchronised (the first call of a compiled function: its compile)."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- device ceilings
def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy, bytes read + written per second: the roofline of memory-bound ops."""
    src = torch.randint(0, 255, (nbytes // 2,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = measure(lambda: dst.copy_(src), device, target_s=0.5)["median_ms"]
    return 2 * src.numel() / (ms / 1e3) / 1e9


def matmul_tflops(device: torch.device, dtype: torch.dtype, size: int = 8192) -> float:
    """A square matmul through the framework's BLAS, FLOP/s: the compute ceiling actually reachable."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    ms = measure(lambda: a @ b, device, target_s=0.5)["median_ms"]
    return 2 * size**3 / (ms / 1e3) / 1e12


def ceilings(device: torch.device, quick: bool) -> Dict[str, Any]:
    """The copy bandwidth and matmul rate measured now, on this device, and the data-sheet figure."""
    if device.type == "cuda":
        out = {"copy_gbs": copy_bandwidth_gbs(device), "matmul_bf16_tflops": matmul_tflops(device, torch.bfloat16)}
        sheet = datasheet_bf16_tflops(torch.cuda.get_device_name(device))
        out["datasheet_bf16_tflops"] = sheet["tflops"] if sheet else None
        out["datasheet_part"] = sheet["part"] if sheet else None
        return out
    size = 1024 if quick else 2048
    return {"copy_gbs": copy_bandwidth_gbs(device, 1 << 27), "matmul_fp32_tflops": matmul_tflops(device, torch.float32, size),
            "datasheet_bf16_tflops": None, "datasheet_part": None}


def compute_ceiling_tflops(ceil: Dict[str, Any]) -> Optional[float]:
    return ceil.get("matmul_bf16_tflops") or ceil.get("matmul_fp32_tflops")


# --------------------------------------------------------------------------- FLOPs of a ViT over ragged frames
def vit_flops(visual, lengths: torch.Tensor, frames: int) -> Dict[str, float]:
    """Forward FLOPs of the vision tower over frames of ``lengths`` tokens (multiply-add = 2 FLOPs).

    ``gemm``: QKV, output projection and MLP of every block, ``24 D^2`` per token and layer (MLP ratio
    4); ``attention``: ``QK^T`` and ``PV``, ``4 L^2 D`` per frame and layer; ``embed``: the patch
    embedding. Norms, activations and STOP's prompters are left out (they are a few percent and move
    bytes, not FLOPs).
    """
    d = visual.conv1.out_channels
    layers = len(visual.transformer.resblocks)
    patch = visual.conv1.kernel_size[0]
    grid = visual.grid_size[0] * visual.grid_size[1]
    lengths = lengths.double().flatten().cpu()
    mlp = visual.transformer.resblocks[0].mlp.c_fc.out_features / d
    gemm = layers * (8 + 4 * mlp) * d * d * float(lengths.sum())
    attention = layers * 4 * d * float((lengths**2).sum())
    embed = 2.0 * frames * grid * 3 * patch * patch * d
    return {"gemm": gemm, "attention": attention, "embed": embed, "forward": gemm + attention + embed}


def training_flops(f: Dict[str, float], input_grad: bool = False) -> float:
    """Forward + backward through a frozen tower: the backward needs only activation gradients (one
    GEMM per forward GEMM, no weight gradients) and 2.5x the attention forward (recomputed P, dP, dQ,
    dK, dV); the patch embedding's backward runs only if the input itself needs a gradient."""
    return 2 * f["gemm"] + 3.5 * f["attention"] + f["embed"] * (2 if input_grad else 1)


# --------------------------------------------------------------------------- output
def write_json(path: str, payload: Dict[str, Any]) -> None:
    """Atomically (a cut-off run never leaves half a file)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, default=_jsonable)
    os.replace(tmp, path)


def _jsonable(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, (torch.dtype, torch.device)):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def describe_error(exc: BaseException) -> str:
    """One line for the JSON; the full traceback goes to the log."""
    traceback.print_exc()
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:400]


# --------------------------------------------------------------------------- cases
class Unavailable(Exception):
    """A case cannot run with what is installed (an op this torch or stop_fast lacks): a skip, not a
    failure."""


class Case:
    """One measurement: an id like ``model/ViT-B-32/fast/inference``, a function returning its record
    (a dict; ``{"skipped": why}`` when it cannot run here), a rough cost in seconds (or a function
    giving it) that run.py weighs against its time budget, and a priority within its group (lower
    runs first, so a budget cuts the least important cases)."""

    def __init__(self, id: str, run: Callable[[], Dict[str, Any]], estimate_s: Any = 10.0, priority: int = 0):
        self.id, self.run, self.estimate_s, self.priority = id, run, estimate_s, priority

    def __repr__(self) -> str:
        return f"Case({self.id!r})"


def bandwidth_record(ctx, timing: Dict[str, Any], nbytes: int, **fields: Any) -> Dict[str, Any]:
    """A memory-bound op's record: its timing, the bytes it must move at least, GB/s and the
    fraction of the copy bandwidth measured in the same run."""
    record = {**timing, **fields, "min_bytes": nbytes, "gbs": nbytes / (timing["median_ms"] / 1e3) / 1e9}
    if ctx.ceilings.get("copy_gbs"):
        record["fraction_of_copy_bandwidth"] = record["gbs"] / ctx.ceilings["copy_gbs"]
    return record


def fused_op_cases(ctx, group: str, shapes: Dict[str, Any], quick_shapes: Dict[str, Any],
                   impls, run_case: Callable[..., Dict[str, Any]]) -> List["Case"]:
    """``group/<shape>/<impl>/<forward|forward_backward>`` cases of a fused op against PyTorch
    (eager and compiled); compiled PyTorch runs last and is skipped on a CPU unless asked for."""
    out = []
    for name, shape in (quick_shapes if ctx.quick else shapes).items():
        for impl in impls:
            if impl == "pytorch_compiled" and ctx.device.type == "cpu" and (ctx.quick or not ctx.compile_on_cpu):
                continue  # a minute of CPU compile per case; the quick CPU run compiles only the model
            for step in ("forward", "forward_backward"):
                out.append(Case(f"{group}/{name}/{impl}/{step}",
                                lambda shape=shape, impl=impl, step=step: run_case(ctx, shape, impl, step),
                                estimate_s=30 if impl == "pytorch_compiled" else 5,
                                priority=1 if impl == "pytorch_compiled" else 0))
    return out
