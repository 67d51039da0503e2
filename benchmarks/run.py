"""Run the benchmark suite (or part of it) and write one JSON file.

    python benchmarks/run.py --out results.json                        # everything, on CUDA if present
    python benchmarks/run.py --quick --device cpu --out cpu.json        # the reduced CPU set (minutes)
    python benchmarks/run.py --only attention,model/ViT-B-32 --out r.json
    python benchmarks/run.py --list [--quick]                           # case ids, nothing run

Groups (one module each): ``attention`` (bench_attention.py), ``scoring`` (bench_scoring.py),
``packing`` (bench_packing.py), ``model`` (bench_model.py: whole model, baselines, MFU), ``scaling``
(bench_scaling.py). ``--only`` takes comma-separated case-id prefixes or globs
(``model/*/fast*/train``). The device's copy bandwidth and bf16 matmul rate are measured first, in the
same process, and every ratio (GB/s fraction, MFU) is taken against them. The JSON is rewritten
after every case, so a run that is cut off keeps what it finished; ``--append`` adds to an existing
file instead of replacing it. ``--budget-s`` skips cases that would not finish in time (each case
carries a cost estimate; compiled ones learn from the compile times measured so far).
Cases compared in ratios are timed together, interleaved in rounds (``common.CaseGroup``): the
variants of one model and mode, the implementations of one op and step. A group runs the members
selected, the most important first under a time budget; each record names its group and its time
ratio to every other member, median and p10 / p90 over rounds (``ratios``).
The result: ``{"runs": [provenance and ceilings of each run], "cases": {id: record}}``; a record has
``median_ms``, ``p10_ms``, ``p90_ms``, ``reps`` and its figures, or ``error`` or ``skipped``, and the
index of its run with that run's commit and ``dirty`` state.
"""
from __future__ import annotations

import argparse
import fnmatch
import gc
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

GROUPS = ("attention", "scoring", "packing", "model", "scaling", "variants")
QUICK_BATCH = {"stop-tiny": 2, "ViT-B-32": 1}  # the CPU's quick run


class Context:
    """What the cases share: device and precision, sizes, measured ceilings, a cache of built models."""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        self.device = device
        self.quick = args.quick
        self.bf16 = device.type == "cuda"
        self.batch, self.frames = args.batch, args.frames
        self.scaling_compiled = args.scaling_compiled
        self.compile_on_cpu = not args.no_compile_on_cpu
        self.profile = args.profile
        self.compile_mode = args.compile_mode
        self.ceilings: Dict[str, Any] = {}
        self.compute_ceiling: Optional[float] = None
        self.cache: Dict[Any, Any] = {}
        self.notes: Dict[str, Any] = {}
        if self.quick and device.type == "cpu":
            # a shared 2-core machine: at least 9 rounds, so that a few disturbed ones do not move a
            # ratio's median (a ViT-B/32 step takes ~1 s here: 9 repetitions each, ~1 minute a group)
            self.timing = {"warmup": 2, "min_reps": 9, "target_s": 0.5, "min_rounds": 9}
        elif self.quick:
            self.timing = {"warmup": 2, "min_reps": 5, "target_s": 0.5}
        else:
            self.timing = {"warmup": 3, "min_reps": 10, "target_s": 1.0}
        # single ops take microseconds to a millisecond: a third of a second is hundreds of repetitions
        self.op_timing = {**self.timing, "target_s": min(self.timing["target_s"], 0.3)}
        self.op_timing.pop("warmup")
        self._compile_seconds: Dict[Any, List[float]] = {}

    def quick_batch(self, name: str) -> int:
        return QUICK_BATCH.get(name, 1)

    def compile_estimate(self, variant: Optional[str] = None, mode: Optional[str] = None) -> float:
        """Seconds a compiled case may take: the longest first call seen of the same variant and mode
        (any model; else of any compiled case) + 20% + 5 s; 90 before any was measured."""
        seen = self._compile_seconds.get((variant, mode)) or [s for v in self._compile_seconds.values() for s in v]
        return 1.2 * max(seen) + 5 if seen else 90.0

    def observe(self, record: Dict[str, Any]) -> None:
        if "first_call_s" in record:
            self._compile_seconds.setdefault((record.get("variant"), record.get("mode")), []).append(record["first_call_s"])

    def current_setup(self, factory, *key):
        """One model setup (model, batch, compiled callables) alive at a time: memory stays bounded."""
        if self.cache.get("setup_key") != key:
            self.cache.pop("setup", None)
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.cache["setup"] = factory(self, *key)
            self.cache["setup_key"] = key
        return self.cache["setup"]


def default_context(device: torch.device, quick: bool = False) -> Context:
    """A Context with the command line's defaults (for the pytest-benchmark cases)."""
    args = build_parser().parse_args(["--quick"] if quick else [])
    return Context(args, device)


def all_cases(ctx: Context) -> List[Any]:
    """Every Case and CaseGroup of every module, the most important first."""
    import bench_attention
    import bench_kernel_variants
    import bench_model
    import bench_packing
    import bench_scaling
    import bench_scoring

    modules = {"attention": bench_attention, "scoring": bench_scoring, "packing": bench_packing,
               "model": bench_model, "scaling": bench_scaling, "variants": bench_kernel_variants}
    # by priority (0: the essential figures, higher: costlier or secondary ones), then in group order
    # and as each module lists them (sorted is stable): a time budget cuts the least important cases
    return sorted((case for group in GROUPS for case in modules[group].cases(ctx)), key=lambda c: c.priority)


def selection(items, patterns: Optional[List[str]]):
    """(item, [(member name, Case)]) for every Case or CaseGroup with a selected case id."""
    out = []
    for item in items:
        if isinstance(item, common.CaseGroup):
            members = [(name, case) for name, case in item.members.items() if selected(case.id, patterns)]
        else:
            members = [(None, item)] if selected(item.id, patterns) else []
        if members:
            out.append((item, members))
    return out


def selected(case_id: str, patterns: Optional[List[str]]) -> bool:
    if not patterns:
        return True
    return any(case_id == p or case_id.startswith(p.rstrip("/") + "/") or fnmatch.fnmatch(case_id, p) for p in patterns)


def load_existing(path: str) -> Dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {"runs": [], "cases": {}}
    if not isinstance(data, dict) or "cases" not in data:
        raise SystemExit(f"--out {path}: exists but is not a results file of this suite; choose another path")
    data.setdefault("runs", [])
    return data


def within_budget(members, elapsed: float, budget_s: Optional[float]):
    """The members to run, most important first, while their estimates fit in ``budget_s`` after
    ``elapsed`` seconds, and a ``skipped`` record for each of the others: (runnable, {id: record})."""
    runnable, skipped = [], {}
    planned = elapsed
    for name, case in sorted(members, key=lambda m: m[1].priority):
        estimate = case.estimate_s() if callable(case.estimate_s) else case.estimate_s
        if budget_s is not None and planned + estimate > budget_s:
            skipped[case.id] = {"skipped": f"time budget: {planned:.0f} s spent or planned, ~{estimate:.0f} s "
                                           f"needed, --budget-s {budget_s:.0f}"}
        else:
            runnable.append((name, case))
            planned += estimate
    return runnable, skipped


def ratio_line(record: Dict[str, Any]) -> Optional[str]:
    """``vs X 0.62x [0.60-0.65]`` for each member interleaved with this one."""
    if not record.get("ratios"):
        return None
    return "    time / " + ", ".join(f"{other} {r['median']:.3f}x [{r['p10']:.3f}-{r['p90']:.3f}]"
                                     for other, r in record["ratios"].items()) + f"  ({record['interleaved']['rounds']} rounds)"


def line(case_id: str, record: Dict[str, Any]) -> str:
    if "median_ms" in record:
        extra = ""
        for key, unit in (("videos_per_s", "videos/s"), ("gbs", "GB/s"), ("tflops", "TFLOP/s")):
            if key in record:
                extra += f"  {record[key]:9.1f} {unit}"
        if "compile_s" in record:
            extra += f"  compile {record['compile_s']:.1f} s"
        return f"{case_id:60s} {record['median_ms']:9.3f} ms [{record['p10_ms']:.3f}, {record['p90_ms']:.3f}]{extra}"
    if "skipped" in record:
        return f"{case_id:60s} skipped: {record['skipped']}"
    return f"{case_id:60s} ERROR: {record.get('error')}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", help="results JSON to write (required unless --list)")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    parser.add_argument("--quick", action="store_true", help="the reduced set (small shapes, tiny models)")
    parser.add_argument("--only", help="comma-separated case-id prefixes or globs, e.g. attention,model/ViT-B-32")
    parser.add_argument("--batch", type=int, default=32, help="videos per step in the model cases (default 32)")
    parser.add_argument("--frames", type=int, default=12, help="frames per video (default 12)")
    parser.add_argument("--scaling-compiled", action="store_true", help="scaling: also the compiled fast path")
    parser.add_argument("--no-compile-on-cpu", action="store_true", help="on a CPU, skip the torch.compile cases")
    parser.add_argument("--profile", action="store_true",
                        help="model cases: also a kernel-time breakdown by kind (CUDA; profile_kernels.py)")
    parser.add_argument("--no-cudnn-benchmark", action="store_true",
                        help="keep cuDNN's heuristic algorithm choice (default on CUDA: torch.backends.cudnn.benchmark "
                             "= True for every variant, the setting a user tuning a baseline would choose)")
    parser.add_argument("--compile-mode", choices=("default", "max-autotune-no-cudagraphs"),
                        help="torch.compile mode of the compiled fast path and of the compiled baselines alike "
                             "(default: torch.compile's default). max-autotune-no-cudagraphs benchmarks GEMM "
                             "templates with fused epilogues; its first calls take minutes")
    parser.add_argument("--budget-s", type=float, help="skip cases that would end after this many seconds")
    parser.add_argument("--note", help="recorded in the run, e.g. what else ran on the machine meanwhile")
    parser.add_argument("--threads", type=int, help="torch's intra-op threads (default: 1 for --quick on a CPU, where "
                        "two threads on two busy cores moved the ViT-B/32 training ratio by 1.25x and one thread by at "
                        "most 13%%, so its verdicts hold on a shared machine; torch's own elsewhere)")
    parser.add_argument("--append", action="store_true", help="add to --out instead of replacing it")
    parser.add_argument("--list", action="store_true", help="print the selected case ids and exit")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch < 1 or args.frames < 1:
        parser.error("--batch and --frames must be positive")
    if not args.list and not args.out:
        parser.error("--out is required")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads is None and args.quick and device.type == "cpu":
        args.threads = 1
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be positive")
        torch.set_num_threads(args.threads)
    ctx = Context(args, device)
    if device.type == "cuda":
        # open_clip's conv1 (and the reference path's convolutions) under cuDNN's heuristic choice ran
        # a 3.3 ms non-tensor-core kernel at ViT-B/32, B = 32, T = 12 on an H100: a baseline measured
        # that way would be a straw man. Autotuned algorithms are what a user tuning it would run.
        torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    if device.type == "cpu" and args.no_compile_on_cpu:
        ctx.notes["compiled"] = "torch.compile cases skipped (--no-compile-on-cpu)"
    patterns = [p.strip() for p in args.only.split(",") if p.strip()] if args.only else None
    chosen = selection(all_cases(ctx), patterns)
    if args.list:
        print("\n".join(case.id for _, members in chosen for _, case in members))
        return 0
    if not chosen:
        parser.error(f"--only {args.only!r} selects no case (see --list)")

    start = time.perf_counter()
    results = load_existing(args.out) if args.append else {"runs": [], "cases": {}}
    run = {**common.provenance(device), "quick": args.quick, "batch": args.batch, "frames": args.frames,
           "only": args.only, "budget_s": args.budget_s, "note": args.note, "compile_mode": args.compile_mode or "default",
           "cudnn_benchmark": bool(torch.backends.cudnn.benchmark) if device.type == "cuda" else None}
    try:
        ctx.ceilings = common.ceilings(device, args.quick)
    except Exception as exc:  # noqa: BLE001 - the cases still run; ratios are left out
        ctx.ceilings = {"error": common.describe_error(exc)}
    ctx.compute_ceiling = common.compute_ceiling_tflops(ctx.ceilings)
    run["ceilings"] = ctx.ceilings
    run["notes"] = ctx.notes
    results["runs"].append(run)
    run_index = len(results["runs"]) - 1
    print(f"device: {run['device']}  torch {torch.__version__}  commit {run['commit']}  ceilings: "
          + ", ".join(f"{k} {v:.1f}" for k, v in ctx.ceilings.items() if isinstance(v, float)), flush=True)
    common.write_json(args.out, results)

    failures = 0
    count = 0
    for item, members in chosen:
        elapsed = time.perf_counter() - start
        runnable, records = within_budget(members, elapsed, args.budget_s)
        if runnable:
            try:
                if isinstance(item, common.CaseGroup):
                    ids = {name: case.id for name, case in runnable}
                    measured = item.run(list(ids))
                    records.update({ids[name]: measured.get(name, {"error": "the group returned no record"})
                                    for name in ids})
                else:
                    records[item.id] = item.run()
            except common.Unavailable as exc:
                records.update({case.id: {"skipped": f"unavailable: {exc}"} for _, case in runnable})
            except Exception as exc:  # noqa: BLE001 - one case failing must not lose the others
                message = common.describe_error(exc)
                records.update({case.id: {"error": message} for _, case in runnable})
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        wall = round(time.perf_counter() - start - elapsed, 2)
        for _, case in members:
            record = records[case.id]
            record.update(run=run_index, commit=run["commit"], dirty=run["dirty"])
            record["group_wall_s" if isinstance(item, common.CaseGroup) else "wall_s"] = wall
            failures += "error" in record
            count += 1
            ctx.observe(record)
            results["cases"][case.id] = record
            print(line(case.id, record), flush=True)
            ratios = ratio_line(record)
            if ratios:
                print(ratios, flush=True)
        run["notes"] = ctx.notes
        common.write_json(args.out, results)
    run["loadavg_end"] = common.load_average()
    run["wall_s"] = round(time.perf_counter() - start, 1)
    common.write_json(args.out, results)
    print(f"{count} cases, {failures} errors, {run['wall_s']} s; wrote {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
