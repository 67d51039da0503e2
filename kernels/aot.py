"""Ahead-of-time compilation of the Triton kernels for a given GPU architecture, without a GPU.

Triton's real compiler runs on any machine: it lowers a kernel to PTX for, say, sm_90, and Triton's
bundled ``ptxas`` reports registers, stack frame and spill bytes. CI uses this to prove that every
kernel compiles at every configuration it ships (the interpreter accepts programs the compiler
refuses), and ``python -m stop_fast.kernels.compile_report`` prints the report.

Each kernel module lists its shipped configurations in a ``compile_cases()`` function returning
:class:`CompileCase` objects, each with the ``num_warps`` / ``num_stages`` it is launched with and the
specialisation Triton gives a canonical launch: at run time Triton marks every pointer argument that
is 16-byte aligned and every int argument that is a multiple of 16 (``tt.divisibility = 16``), which
lets the compiler vectorise loads. That changes register counts a lot (the 16-bit attention forward
at 64 x 64 over 4 warps: 248 registers unspecialised, 135 specialised), so a report without it
describes a kernel that never runs.
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tempfile
from typing import Any, Callable, Dict, List, Tuple

ARCHS = (90, 80)


@dataclasses.dataclass(frozen=True)
class CompileCase:
    """One kernel at one shipped configuration."""

    name: str
    kernel: Callable  # a @triton.jit function
    signature: Dict[str, str]  # argument name -> triton type ("*fp32", "i32", "constexpr", ...)
    constexprs: Dict[str, Any]
    num_warps: int = 4
    num_stages: int = 2
    # arguments a canonical launch passes 16-byte aligned (pointers) or as multiples of 16 (ints)
    aligned: Tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class CompileReport:
    name: str
    arch: int
    registers: int
    spill_stores: int
    spill_loads: int
    stack_frame: int
    shared_memory: int

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


def compile_case(case: CompileCase, arch: int = 90) -> CompileReport:
    """Compile ``case`` for ``sm_<arch>`` and read registers and spills off ptxas."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas

    names = list(case.signature)
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in case.aligned}
    src = triton.compiler.ASTSource(fn=case.kernel, signature=case.signature, constexprs=case.constexprs, attrs=attrs)
    compiled = triton.compile(
        src,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": case.num_warps, "num_stages": case.num_stages},
    )
    ptxas = get_ptxas(arch).path
    arch_flag = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        out = subprocess.run(
            [ptxas, "-v", f"-arch={arch_flag}", ptx, "-o", os.path.join(tmp, "kernel.o")],
            capture_output=True, text=True, check=True,
        )
    log = out.stdout + out.stderr

    def grab(pattern: str) -> int:
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0

    return CompileReport(
        name=case.name,
        arch=arch,
        registers=grab(r"Used (\d+) registers"),
        spill_stores=grab(r"(\d+) bytes spill stores"),
        spill_loads=grab(r"(\d+) bytes spill loads"),
        stack_frame=grab(r"(\d+) bytes stack frame"),
        shared_memory=int(getattr(compiled.metadata, "shared", 0) or 0),
    )


def pointers(signature: Dict[str, str]) -> Tuple[str, ...]:
    """The pointer arguments of a signature (what a launch with fresh tensors passes aligned)."""
    return tuple(name for name, kind in signature.items() if kind.startswith("*"))


def all_cases() -> List[CompileCase]:
    """Every shipped configuration of every kernel module."""
    import importlib

    cases: List[CompileCase] = []
    for name in ("attention", "scoring", "packing"):
        cases.extend(importlib.import_module(f"{__package__}.{name}").compile_cases())
    return cases
