"""What every benchmark shares: provenance, timing, the device's measured ceilings, FLOP counts, JSON.

Timing rules (the same for every case, so figures compare):
- warm-up calls first (compilation, autotuning, allocator growth stay out of the numbers);
- on CUDA each repetition is timed with its own pair of CUDA events, optionally after writing a
  buffer larger than L2 (so memory-bound ops are not timed out of cache); on a CPU, with
  ``time.perf_counter``;
- enough repetitions for about ``target_s`` seconds of timed work (at least ``min_reps``), reported
  as median and 10th / 90th percentiles;
- peak memory is the CUDA allocator's high-water mark over warm-up and timed calls.

Cases compared in a ratio (the fast path against its reference, against each baseline) are timed
together by ``measure_interleaved``: in one process, in rounds, each round a block of repetitions of
every case in turn, so that a change in the machine's load (another process on a shared CPU, a GPU's
clock) falls on all of them alike. Each ratio is taken per round and reported as the median with the
10th / 90th percentiles over rounds (``ratio_spread``).
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


def dirty_from_env(value: Optional[str]) -> Optional[bool]:
    """``STOP_FAST_DIRTY``: "1" / "true" (uncommitted changes), "0" / "false" (none); unset: unknown."""
    if value is None:
        return None
    if value.strip().lower() in ("1", "true", "yes"):
        return True
    if value.strip().lower() in ("0", "false", "no"):
        return False
    raise ValueError(f"STOP_FAST_DIRTY must be 1 or 0, got {value!r}")


def commit_info() -> Dict[str, Any]:
    """The commit measured: ``STOP_FAST_COMMIT`` when set (machines that get a copy of the tree
    without .git; ``STOP_FAST_DIRTY`` = 1 / 0 says whether that copy has uncommitted changes, as
    ``git status`` said where the copy was made), else ``git`` in the repository.
    ``dirty``: uncommitted changes to tracked files, None when unknown."""
    env = os.environ.get("STOP_FAST_COMMIT")
    if env:
        return {"commit": env, "dirty": dirty_from_env(os.environ.get("STOP_FAST_DIRTY")),
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
            "loadavg_start": load_average(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "argv": sys.argv}


def load_average() -> Optional[List[float]]:
    """The host's 1, 5 and 15 minute load averages (how busy a shared machine was), None where the OS
    has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


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
    out = summarize(_time_block(fn, device, reps, flush))
    if cuda:
        out["peak_memory_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        out["peak_memory_above_inputs_mib"] = round((torch.cuda.max_memory_allocated(device) - base) / 2**20, 1)
    return out


def percentile(values, q: float) -> float:
    """The ``q``-quantile of ``values`` (nearest rank: always one of the values)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summarize(times_ms) -> Dict[str, Any]:
    ordered = sorted(times_ms)
    return {"median_ms": statistics.median(ordered), "p10_ms": percentile(ordered, 0.1),
            "p90_ms": percentile(ordered, 0.9), "min_ms": ordered[0], "reps": len(ordered)}


def measure_interleaved(fns: Dict[str, Callable[[], Any]], device: torch.device, *, warmup: int = 3,
                        min_reps: int = 10, max_reps: int = 1000, target_s: float = 1.0, flush_l2: bool = False,
                        min_rounds: int = 5, max_rounds: int = 15) -> Dict[str, Dict[str, Any]]:
    """``measure`` for several functions at once, interleaved: after each one's warm-up, rounds of a
    block of repetitions of every function in turn (A B C, then C B A, and so on: none always first).
    A function gets about ``target_s`` seconds of timed calls (at least ``min_reps``) spread over the
    same number of rounds as the others: between ``min_rounds`` and ``max_rounds``, as many as the
    function with the fewest repetitions allows.

    Returns per function ``measure``'s record (median and spread over all its repetitions, peak
    memory over its warm-up) plus ``rounds_ms`` (the median of each round's block), ``rounds`` and
    ``reps_per_round``: ``ratio_spread`` of two functions' ``rounds_ms`` is their ratio under the
    same conditions, round by round."""
    if not fns:
        return {}
    cuda = device.type == "cuda"
    flush = _L2Flush(device) if (flush_l2 and cuda) else None
    out: Dict[str, Dict[str, Any]] = {name: {} for name in fns}
    total_reps = {}
    for name, fn in fns.items():
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        for _ in range(max(warmup, 1)):
            fn()
        synchronize(device)
        per_call = (time.perf_counter() - start) / max(warmup, 1)
        total_reps[name] = int(min(max_reps, max(min_reps, target_s / max(per_call, 1e-6))))
        if cuda:
            out[name]["peak_memory_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
            out[name]["peak_memory_above_inputs_mib"] = round((torch.cuda.max_memory_allocated(device) - base) / 2**20, 1)
    rounds = max(min_rounds, min(max_rounds, min(total_reps.values())))
    block = {name: max(1, -(-reps // rounds)) for name, reps in total_reps.items()}  # ceil division
    times: Dict[str, List[List[float]]] = {name: [] for name in fns}
    order = list(fns)
    for r in range(rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            times[name].append(_time_block(fns[name], device, block[name], flush))
    for name in fns:
        flat = [t for blk in times[name] for t in blk]
        out[name].update(summarize(flat))
        out[name].update({"rounds_ms": [statistics.median(blk) for blk in times[name]], "rounds": rounds,
                          "reps_per_round": block[name]})
    return out


def _time_block(fn: Callable[[], Any], device: torch.device, reps: int, flush: Optional["_L2Flush"]) -> List[float]:
    """``reps`` back-to-back calls of ``fn``, each timed on its own (ms); the device idle before and after."""
    if device.type == "cuda":
        synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for begin, end in events:
            if flush is not None:
                flush()
            begin.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [b.elapsed_time(e) for b, e in events]
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def ratio_spread(numerator_ms: List[float], denominator_ms: List[float]) -> Dict[str, Any]:
    """The ratio of two interleaved cases' times, round by round (``rounds_ms`` of the same
    ``measure_interleaved`` call): median and 10th / 90th percentiles over rounds. Below 1: the
    numerator is faster."""
    if len(numerator_ms) != len(denominator_ms) or not numerator_ms:
        raise ValueError(f"ratio_spread needs the same number of rounds on both sides, got "
                         f"{len(numerator_ms)} and {len(denominator_ms)}")
    ratios = [a / b for a, b in zip(numerator_ms, denominator_ms)]
    return {"median": statistics.median(ratios), "p10": percentile(ratios, 0.1), "p90": percentile(ratios, 0.9),
            "rounds": len(ratios)}


def interleaved_ratios(timings: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """For every function of one ``measure_interleaved`` call, its time ratio to each of the others:
    ``{a: {b: ratio_spread(a, b)}}``."""
    return {a: {b: ratio_spread(ta["rounds_ms"], tb["rounds_ms"]) for b, tb in timings.items() if b != a}
            for a, ta in timings.items()}


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


class CaseGroup:
    """Cases timed together, interleaved, in one process (``measure_interleaved``), because they are
    compared in ratios. ``members``: short name (a variant, an implementation) -> Case (its full id,
    cost estimate and priority; its ``run`` unused); ``run(names)`` measures the members named (those
    selected and within the time budget) and returns ``{name: record}``. Its priority is its most
    important member's."""

    def __init__(self, id: str, members: Dict[str, "Case"], run: Callable[[List[str]], Dict[str, Dict[str, Any]]]):
        self.id, self.members, self.run = id, members, run
        self.priority = min(m.priority for m in members.values())

    def __repr__(self) -> str:
        return f"CaseGroup({self.id!r}, {list(self.members)})"


Built = Any  # (timed callable, finish(timing) -> record), or a record when the member cannot run here


def run_group(group: str, names: List[str], build: Callable[[str], Built], device: torch.device,
              timing: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """Measure the members ``names`` of one group interleaved and return ``{name: record}``.

    ``build(name)`` prepares a member (compiles it, checks it) and returns its timed callable with a
    ``finish(timing) -> record`` that turns its timing into the record, or a record (``{"skipped":
    why}``) when it cannot run here; one that raises is recorded as skipped (``Unavailable``) or as an
    error, and the others still run. Every timed record gets ``interleaved`` (the group, its members,
    the rounds) and ``ratios``: its time over each other member's, per round (``ratio_spread``)."""
    records: Dict[str, Dict[str, Any]] = {}
    fns: Dict[str, Callable[[], Any]] = {}
    finishers: Dict[str, Callable[[Dict[str, Any]], Dict[str, Any]]] = {}
    for name in names:
        try:
            built = build(name)
        except Unavailable as exc:
            records[name] = {"skipped": f"unavailable: {exc}"}
            continue
        except Exception as exc:  # noqa: BLE001 - one member failing must not lose the others
            records[name] = {"error": describe_error(exc)}
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        if isinstance(built, dict):
            records[name] = built
        else:
            fns[name], finishers[name] = built
    timings = measure_interleaved(fns, device, **timing)
    for name, t in timings.items():
        try:
            records[name] = finishers[name](t)
        except Exception as exc:  # noqa: BLE001
            records[name] = {"error": describe_error(exc)}
    ratios = interleaved_ratios(timings)
    for name in timings:
        if "error" not in records[name]:
            records[name]["interleaved"] = {"group": group, "members": list(timings), "rounds": timings[name]["rounds"],
                                            "reps_per_round": timings[name]["reps_per_round"]}
            records[name]["ratios"] = ratios[name]
    return {name: records[name] for name in names}


def bandwidth_record(ctx, timing: Dict[str, Any], nbytes: int, **fields: Any) -> Dict[str, Any]:
    """A memory-bound op's record: its timing, the bytes it must move at least, GB/s and the
    fraction of the copy bandwidth measured in the same run."""
    record = {**timing, **fields, "min_bytes": nbytes, "gbs": nbytes / (timing["median_ms"] / 1e3) / 1e9}
    if ctx.ceilings.get("copy_gbs"):
        record["fraction_of_copy_bandwidth"] = record["gbs"] / ctx.ceilings["copy_gbs"]
    return record


def fused_op_cases(ctx, group: str, shapes: Dict[str, Any], quick_shapes: Dict[str, Any],
                   impls, prepare: Callable[..., Any]) -> List[CaseGroup]:
    """``group/<shape>/<impl>/<forward|forward_backward>`` cases of a fused op against PyTorch (eager
    and compiled): one interleaved group per shape and step, the L2 flushed between repetitions.
    ``prepare(ctx, shape, impl, step)`` returns (the timed callable, bytes moved at least, the
    record's other fields). Compiled PyTorch is the least important member and is left out on a CPU
    unless asked for."""
    out = []
    for name, shape in (quick_shapes if ctx.quick else shapes).items():
        for step in ("forward", "forward_backward"):
            members = {}
            for impl in impls:
                if impl == "pytorch_compiled" and ctx.device.type == "cpu" and (ctx.quick or not ctx.compile_on_cpu):
                    continue  # a minute of CPU compile per case; the quick CPU run compiles only the model
                members[impl] = Case(f"{group}/{name}/{impl}/{step}", None,
                                     estimate_s=30 if impl == "pytorch_compiled" else 5,
                                     priority=1 if impl == "pytorch_compiled" else 0)

            def build(impl, shape=shape, step=step):
                fn, nbytes, fields = prepare(ctx, shape, impl, step)
                return fn, lambda timing: bandwidth_record(ctx, timing, nbytes, **fields)

            out.append(CaseGroup(f"{group}/{name}/{step}", members,
                                 lambda names, build=build, gid=f"{group}/{name}/{step}":
                                 run_group(gid, names, build, ctx.device, {**ctx.op_timing, "flush_l2": True})))
    return out
