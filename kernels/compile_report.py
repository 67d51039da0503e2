"""Compile every shipped Triton kernel configuration for sm_90 / sm_80 and print registers and spills.

    python -m stop_fast.kernels.compile_report [--arch 90] [--json report.json]

Runs without a GPU (Triton's compiler and its bundled ptxas). See ``stop_fast.kernels.aot``.
"""
from __future__ import annotations

import dataclasses
import os

from .aot import ARCHS, CompileReport, all_cases, compile_case


def _compile_nth(job) -> CompileReport:
    index, arch = job
    return compile_case(all_cases()[index], arch)


def main() -> None:  # pragma: no cover - a report, exercised by CI through the tests
    import argparse
    import json
    from concurrent.futures import ProcessPoolExecutor

    parser = argparse.ArgumentParser(description="Compile every Triton kernel for a GPU arch and report registers/spills.")
    parser.add_argument("--arch", type=int, action="append", help="SM version(s), default 90 and 80")
    parser.add_argument("--json", help="also write the report to this file")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiler processes")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: the interpreter replaces the kernels this report compiles")
    jobs = [(i, arch) for arch in args.arch or ARCHS for i in range(len(all_cases()))]
    rows = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for r in pool.map(_compile_nth, jobs):
            rows.append(dataclasses.asdict(r))
            flag = "  <- SPILLS" if r.spills else ""
            print(f"sm_{r.arch}  {r.name:44s} regs {r.registers:4d}  spill {r.spills:5d} B  smem {r.shared_memory:6d} B{flag}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":  # pragma: no cover
    main()
