"""Turn results of benchmarks/run.py into a Markdown table and a PNG plot (for the README).

    python benchmarks/report.py RESULTS.json [MORE.json ...] --md OUT.md --png OUT.png [--json MERGED.json]
    python benchmarks/report.py --compare QUIET.json LOADED.json     # the same ratios in two runs

Several files (e.g. the two halves of a GPU run) are merged, later cases replacing earlier ones of the
same id; ``--json`` writes the merged file. Only measured figures appear: a case that errored, was
skipped or never ran is listed as such, never filled in. A ratio between two cases is the median of
their per-round ratios, with p10-p90 over rounds, when they were timed interleaved (``ratios`` in the
records, run.py since issue 17); for older files, the ratio of their medians, marked "separately".
``--compare`` puts the fast-vs-reference (and fast-vs-baseline) ratios of two results files side by
side, e.g. a quiet run and one beside a second run that keeps the CPU busy.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

# Issue 17's targets (H100 or H200, bf16, B = 32, T = 12, one run): (what, model, mode, limit in ms).
TIME_TARGETS = [
    ("ViT-B/32 inference <= 8.5 ms", "ViT-B-32", "inference", 8.5),
    ("ViT-B/32 training step <= 17.5 ms", "ViT-B-32", "train", 17.5),
    ("ViT-B/16 inference <= 30 ms", "ViT-B-16", "inference", 30.0),
    ("ViT-B/16 training step <= 66 ms", "ViT-B-16", "train", 66.0),
]
# time per token against the strongest plain CLIP: at most this
PER_TOKEN_VS_TUNED = 1.0
# padded STOP + SDPA compiled over the fast path's time at ViT-B/32: at least this
PADDED_OVER_FAST = 1.05
# CPU quick runs: the fast-vs-reference ratio of a loaded run within this of a quiet run's
LOADED_TOLERANCE = 0.15
VARIANT_LABELS = {
    "reference": "reference, eager",
    "fast": "fast, eager",
    "fast_compiled": "fast, compiled",
    "fast_compiled_cudagraphs": "fast, compiled, static shapes + CUDA graphs",
    "openclip_compiled": "open_clip encode_image as shipped, compiled (no prompts)",
    "openclip_tuned_compiled": "open_clip tuned (conv1 GEMM, SDPA, CLS-only last block), compiled",
    "padded_sdpa_compiled": "padded STOP + SDPA, compiled",
    "fast_torch_varlen_attn": "fast with torch varlen_attn, eager",
    "fast_flex_attention": "fast with FlexAttention, eager",
}

# Kernel kinds of benchmarks/profile_kernels.py, in table order, with short column names.
PROFILE_KINDS = {
    "GEMM (cuBLAS / CUTLASS)": "GEMM",
    "fused Triton (inductor)": "inductor Triton",
    "eager element-wise and reductions": "eager element-wise",
    "copies and casts": "copies, casts",
    "stop_fast attention": "stop_fast attention",
    "other attention (flash, flex, SDPA)": "other attention",
    "stop_fast scoring": "scoring",
    "stop_fast packing": "packing",
    "other": "other",
}


# --------------------------------------------------------------------------- loading
def merge(paths: List[str]) -> Dict[str, Any]:
    merged: Dict[str, Any] = {"runs": [], "cases": {}}
    for path in paths:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"{path}: cannot read a results file ({exc})")
        if not isinstance(data, dict) or "cases" not in data or "runs" not in data:
            raise SystemExit(f"{path}: not a results file of benchmarks/run.py (no 'runs' / 'cases')")
        offset = len(merged["runs"])
        merged["runs"].extend(data["runs"])
        for key, rec in data["cases"].items():
            merged["cases"][key] = {**rec, "run": rec.get("run", 0) + offset}
    devices = {r.get("device") for r in merged["runs"]}
    if len(devices) > 1:
        print(f"warning: results from several devices are merged: {sorted(map(str, devices))}", file=sys.stderr)
    return merged


def cases_under(data, prefix: str) -> Dict[str, Dict[str, Any]]:
    return {k[len(prefix):]: v for k, v in data["cases"].items() if k.startswith(prefix)}


def ok(rec: Optional[Dict[str, Any]]) -> bool:
    return bool(rec) and "median_ms" in rec


def status(rec: Optional[Dict[str, Any]]) -> str:
    if rec is None:
        return "not run"
    if "skipped" in rec:
        return "skipped"
    if "error" in rec:
        return "error"
    return ""


def ms(rec) -> str:
    if not ok(rec):
        return status(rec)
    return f"{rec['median_ms']:.2f} ({rec['p10_ms']:.2f}-{rec['p90_ms']:.2f})"


def num(value, fmt="{:.1f}") -> str:
    return "" if value is None else fmt.format(value)


# --------------------------------------------------------------------------- markdown
def header(data) -> List[str]:
    run = data["runs"][0] if data["runs"] else {}
    v = run.get("versions", {})
    commit = run.get("commit") or "unknown"
    dirty = run.get("dirty")
    lines = [f"Device: **{run.get('device', '?')}** (driver {run.get('driver') or 'n/a'}); torch {v.get('torch')}, "
             f"triton {v.get('triton')}, Python {v.get('python')}; first run: commit `{commit[:12]}`"
             + (" (uncommitted changes)" if dirty else "") + f", {run.get('date', '')}."]
    for i, r in enumerate(data["runs"]):
        c = r.get("ceilings", {})
        parts = []
        if c.get("copy_gbs"):
            parts.append(f"copy {c['copy_gbs']:.0f} GB/s")
        for key, label in (("matmul_bf16_tflops", "bf16 matmul"), ("matmul_fp32_tflops", "fp32 matmul")):
            if c.get(key):
                parts.append(f"{label} {c[key]:.3g} TFLOP/s")
        if c.get("datasheet_bf16_tflops"):
            parts.append(f"data sheet {c['datasheet_bf16_tflops']:.0f} TFLOP/s ({c.get('datasheet_part')})")
        commit_i = (r.get("commit") or "unknown")[:12]
        load = r.get("loadavg_start")
        lines.append(f"Run {i}: commit `{commit_i}` ({tree_state(r.get('dirty'))}), {r.get('date', '')}, {r.get('device')}"
                     + (": " + ", ".join(parts) if parts else "")
                     + ("; cuDNN autotuning on" if r.get("cudnn_benchmark") else "")
                     + (f"; torch.compile mode {r['compile_mode']}" if r.get("compile_mode", "default") != "default" else "")
                     + (f"; load average {load[0]:.2f} at the start" if load and r.get("device_type") == "cpu" else "")
                     + (f"; note: {r['note']}" if r.get("note") else "")
                     + ".")
    return lines


def tree_state(dirty: Optional[bool]) -> str:
    return {True: "uncommitted changes", False: "clean tree"}.get(dirty, "tree state not recorded")


def model_table(data, name: str) -> List[str]:
    recs = cases_under(data, f"model/{name}/")
    if not recs:
        return []
    some = next(iter(r for r in recs.values() if ok(r)), {})
    sheet = any(ok(r) and r.get("mfu_vs_datasheet") is not None for r in recs.values())
    mfu_cols = "MFU vs matmul in run | MFU vs data sheet" if sheet else "MFU vs matmul in run"
    lines = [f"### Whole model, {name}, B = {some.get('batch', '?')}, T = {some.get('frames', '?')}, "
             f"{some.get('precision', '')}", "",
             f"| variant | tokens/frame | inference ms (p10-p90) | videos/s | {mfu_cols} | training step ms (p10-p90) | "
             f"videos/s | {mfu_cols} | peak GiB | compile s (inf / train) | SDPA backend (inf / train) | run |",
             "| " + " | ".join(["---"] + ["---:"] * (9 + 2 * sheet) + ["---", "---:"]) + " |"]
    for variant, label in VARIANT_LABELS.items():
        inf, train = recs.get(f"{variant}/inference"), recs.get(f"{variant}/train")
        if inf is None and train is None:
            continue
        tokens = (inf or {}).get("tokens") or (train or {}).get("tokens") or {}
        tok = num(tokens.get("mean_per_frame"))
        if tokens.get("layout") == "padded":
            tok += f" (padded to {tokens.get('computed_per_frame')})"
        elif tokens.get("layout") == "packed, padded to a bucket":
            tok += f" ({tokens.get('computed_per_frame'):.1f} rows: bucket)"
        mem = max([r.get("peak_memory_mib", 0) for r in (inf, train) if ok(r)] or [0]) / 1024
        compile_s = " / ".join(num(r.get("compile_s"), "{:.0f}") if ok(r) else "" for r in (inf, train))
        backends = " / ".join((r or {}).get("sdpa_backend") or "" for r in (inf, train))
        lines.append(f"| {label} | {tok} | {ms(inf)} | {rate(inf)} | {mfu(inf, sheet)} | {ms(train)} | {rate(train)} | "
                     f"{mfu(train, sheet)} | {num(mem, '{:.2f}') if mem else ''} | "
                     f"{compile_s if compile_s.strip(' /') else ''} | {backends if backends.strip(' /') else ''} | "
                     f"{' / '.join(dict.fromkeys(str(r.get('run', 0)) for r in (inf, train) if ok(r)))} |")
    lines.append("")
    lines.append("MFU: FLOPs of the real tokens over the measured time, against the matmul measured in the "
                 "same run (bf16 on a GPU, fp32 on a CPU; see the run's line above)"
                 + (" and against the data sheet's dense bf16 peak" if sheet else "")
                 + ". Padded variants are credited the same useful FLOPs as the packed ones.")
    return lines


def ratio(data, case: str, other: str) -> Optional[Dict[str, Any]]:
    """Time of ``case`` over ``other``'s: per-round median and p10 / p90 when the two were timed
    interleaved (``interleaved: True``), else the ratio of their medians (older files)."""
    a, b = data["cases"].get(case), data["cases"].get(other)
    if not (ok(a) and ok(b)):
        return None
    theirs = other.split("/")[-2]
    spread = (a.get("ratios") or {}).get(theirs)
    if spread is not None and a.get("run") == b.get("run"):
        return {**spread, "interleaved": True}
    value = a["median_ms"] / b["median_ms"]
    return {"median": value, "p10": None, "p90": None, "rounds": None, "interleaved": False}


def scaled(r: Dict[str, Any], factor: float) -> Dict[str, Any]:
    """A ratio multiplied by a constant (e.g. tokens), its spread with it."""
    return {**r, **{k: r[k] * factor for k in ("median", "p10", "p90") if r.get(k) is not None}}


def inverted(r: Dict[str, Any]) -> Dict[str, Any]:
    """b / a from a / b (the percentiles swap)."""
    return {**r, "median": 1 / r["median"], "p10": 1 / r["p90"] if r.get("p90") else None,
            "p90": 1 / r["p10"] if r.get("p10") else None}


def fmt_ratio(r: Optional[Dict[str, Any]]) -> str:
    if r is None:
        return ""
    if r["interleaved"]:
        return f"{r['median']:.3f}x ({r['p10']:.3f}-{r['p90']:.3f}, {r['rounds']} rounds)"
    return f"{r['median']:.3f}x (timed separately)"


def ratio_table(data, name: str) -> List[str]:
    """Each fast variant's time over every other variant's of the same model and mode."""
    recs = cases_under(data, f"model/{name}/")
    fast = [v for v in ("fast_compiled", "fast") if any(ok(recs.get(f"{v}/{m}")) for m in ("inference", "train"))]
    others = [v for v in VARIANT_LABELS if v not in fast and any(ok(recs.get(f"{v}/{m}")) for m in ("inference", "train"))]
    if not fast or not others:
        return []
    lines = [f"### Time ratios, {name} (below 1: the fast variant is faster)", "",
             "| case | " + " | ".join(f"/ {v}" for v in others) + " |",
             "| --- | " + " | ".join("---:" for _ in others) + " |"]
    for variant in fast:
        for mode in ("inference", "train"):
            case = f"model/{name}/{variant}/{mode}"
            if not ok(data["cases"].get(case)):
                continue
            cells = [fmt_ratio(ratio(data, case, f"model/{name}/{o}/{mode}")) for o in others]
            lines.append(f"| {variant} {mode} | " + " | ".join(cells) + " |")
    lines += ["", "Median of the per-round ratios of cases timed interleaved in one process (p10-p90 over "
                  "rounds): a change in the machine's load falls on both alike. Time, not time per token: "
                  "the targets table scales the open_clip ratios by the token counts."]
    return lines
def profile_table(data) -> List[str]:
    """Where each profiled model case's GPU time goes (run.py --profile), ms per step by kernel kind."""
    recs = {k: v for k, v in data["cases"].items() if k.startswith("model/") and "by_kind_ms" in v.get("profile", {})}
    if not recs:
        return []
    seen = {kind for r in recs.values() for kind in r["profile"]["by_kind_ms"]}
    kinds = [k for k in PROFILE_KINDS if k in seen] + sorted(seen - set(PROFILE_KINDS))
    main = [k for k in kinds if max(r["profile"]["by_kind_ms"].get(k, 0) for r in recs.values()) >= 0.1]
    lines = ["### Where the GPU time goes (torch.profiler, ms per step)", "",
             "| case | median ms | GPU busy | kernels | " + " | ".join(PROFILE_KINDS.get(k, k) for k in main) + " | rest |",
             "| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in main) + " | ---: |"]
    for key, rec in recs.items():
        prof = rec["profile"]
        by_kind = prof["by_kind_ms"]
        rest = sum(v for k, v in by_kind.items() if k not in main)
        lines.append(f"| {key[len('model/'):]} | {rec['median_ms']:.2f} | {prof['gpu_busy_ms']:.2f} | "
                     f"{prof['kernels_per_step']:.0f} | " + " | ".join(f"{by_kind.get(k, 0):.2f}" for k in main)
                     + f" | {rest:.2f} |")
    lines += ["", "GPU busy: the kernels' summed durations; below the median, the GPU waited (launches, the "
                  "host sync). Kinds by kernel name (benchmarks/profile_kernels.py); the top kernels are in the JSON."]
    return lines


def mfu(rec, sheet: bool = False) -> str:
    """MFU against the matmul measured in the run (and against the data sheet, as a second cell)."""
    cells = [rec.get("mfu_vs_measured_matmul") if ok(rec) else None]
    if sheet:
        cells.append(rec.get("mfu_vs_datasheet") if ok(rec) else None)
    return " | ".join("" if c is None else f"{100 * c:.0f}%" for c in cells)


def device_type(data, rec) -> Optional[str]:
    runs = data["runs"]
    index = (rec or {}).get("run", 0)
    return runs[index].get("device_type") if 0 <= index < len(runs) else None


def rate(rec) -> str:
    if not ok(rec):
        return ""
    v = rec["videos_per_s"]
    return f"{v:.0f}" if v >= 10 else f"{v:.2f}"


def best_fast(recs, mode) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
    found = [(v, recs.get(f"{v}/{mode}")) for v in ("fast_compiled", "fast")]
    found = [(v, r) for v, r in found if ok(r)]
    return min(found, key=lambda vr: vr[1]["median_ms"]) if found else (None, None)


def targets_table(data) -> List[str]:
    lines = ["### Targets", "", "| target | measured | status |", "| --- | --- | --- |"]
    for what, name, mode, limit in TIME_TARGETS:
        variant, rec = best_fast(cases_under(data, f"model/{name}/"), mode)
        if rec is None or device_type(data, rec) != "cuda":
            lines.append(f"| {what} | not measured on a GPU | - |")
            continue
        note = f" at B = {rec.get('batch')}" if rec.get("batch") != 32 else ""
        lines.append(f"| {what} | {rec['median_ms']:.2f} ms ({variant}{note}) | "
                     f"{'met' if rec['median_ms'] <= limit else 'not met'} |")
    for name in ("ViT-B-32", "ViT-B-16"):
        recs = cases_under(data, f"model/{name}/")
        for mode in ("inference", "train"):
            variant, fast = best_fast(recs, mode)
            if fast is None or device_type(data, fast) != "cuda":
                continue
            ours = f"model/{name}/{variant}/{mode}"
            for clip, rule in (("openclip_tuned_compiled", f"<= {PER_TOKEN_VS_TUNED:.2f}x"), ("openclip_compiled", None)):
                other = recs.get(f"{clip}/{mode}")
                r = ratio(data, ours, f"model/{name}/{clip}/{mode}")
                if r is None:
                    if rule:
                        lines.append(f"| {name} {mode}: time per token {rule} tuned compiled open_clip's | "
                                     f"{status(other) or 'not measured'} | - |")
                    continue
                per_token = scaled(r, other["tokens"]["total"] / fast["tokens"]["total"])
                if rule:
                    lines.append(f"| {name} {mode}: time per token {rule} tuned compiled open_clip's | "
                                 f"{fmt_ratio(per_token)} ({variant}) | "
                                 f"{'met' if per_token['median'] <= PER_TOKEN_VS_TUNED else 'not met'} |")
                else:
                    lines.append(f"| {name} {mode}: time per token against open_clip as shipped (no target) | "
                                 f"{fmt_ratio(per_token)} ({variant}) | - |")
            if name == "ViT-B-32":
                padded = recs.get(f"padded_sdpa_compiled/{mode}")
                r = ratio(data, ours, f"model/{name}/padded_sdpa_compiled/{mode}")
                what = f"{name} {mode}: padded STOP + SDPA compiled >= {PADDED_OVER_FAST:.2f}x the fast path's time"
                if r is None:
                    lines.append(f"| {what} | {status(padded) or 'not measured'} | - |")
                else:
                    slower = inverted(r)
                    lines.append(f"| {what} | {fmt_ratio(slower)} ({variant}) | "
                                 f"{'met' if slower['median'] >= PADDED_OVER_FAST else 'not met'} |")
    for problem in ("vit_b32", "vit_b16"):
        recs = cases_under(data, f"attention/{problem}/")
        for step in ("forward", "forward_backward"):
            ours, theirs = recs.get(f"stop_fast/{step}"), recs.get(f"torch_varlen_attn/{step}")
            if ok(ours) and ok(theirs):
                r = inverted(ratio(data, f"attention/{problem}/stop_fast/{step}", f"attention/{problem}/torch_varlen_attn/{step}"))
                lines.append(f"| attention {problem} {step}: parity with torch varlen_attn | {fmt_ratio(r)} "
                             f"(varlen_attn time / ours) | {'met' if r['median'] >= 1.0 else 'not met'} |")
            elif ok(ours):
                lines.append(f"| attention {problem} {step}: parity with torch varlen_attn | varlen_attn "
                             f"{status(theirs) or 'not measured'} | - |")
        fwd = recs.get("stop_fast/forward")
        if ok(fwd) and fwd.get("fraction_of_copy_bandwidth") is not None:
            f = fwd["fraction_of_copy_bandwidth"]
            lines.append(f"| attention {problem} forward >= 60% of copy bandwidth | {100 * f:.0f}% | "
                         f"{'met' if f >= 0.6 else 'not met'} |")
    for name, mode, r in cpu_fast_vs_reference(data):
        speedup = inverted(r)
        lines.append(f"| CPU {name} {mode}: fast not slower than reference | {fmt_ratio(speedup)} "
                     f"(reference time / fast) | {'met' if speedup['median'] >= 1.0 else 'not met'} |")
    return lines + ["", "Targets are aims, not tests; \"not met\" is a measured fact. Ratios: median of per-round "
                        "ratios of cases timed interleaved (p10-p90 over rounds)."]


def cpu_fast_vs_reference(data) -> List[Tuple[str, str, Dict[str, Any]]]:
    """(model, mode, fast's time over the reference's) of every CPU model case pair."""
    out = []
    names = [k.split("/")[1] for k in data["cases"] if k.startswith("model/") and k.endswith("/fast/inference")]
    for name in names:
        for mode in ("inference", "train"):
            fast = data["cases"].get(f"model/{name}/fast/{mode}")
            r = ratio(data, f"model/{name}/fast/{mode}", f"model/{name}/reference/{mode}")
            if r is not None and device_type(data, fast) == "cpu":
                out.append((name, mode, r))
    return out


def compare(quiet, loaded) -> List[str]:
    """The ratios of two runs side by side: every model case of a fast variant against each other
    variant both runs timed, and whether the second is within LOADED_TOLERANCE of the first."""
    lines = ["| case | over | first run | second run | second / first | within "
             f"{100 * LOADED_TOLERANCE:.0f}% |", "| --- | --- | ---: | ---: | ---: | --- |"]
    for case, rec in quiet["cases"].items():
        parts = case.split("/")
        if parts[0] != "model" or parts[2] not in ("fast", "fast_compiled") or not ok(rec):
            continue
        for other in VARIANT_LABELS:
            other_case = "/".join(parts[:2] + [other, parts[3]])
            a, b = ratio(quiet, case, other_case), ratio(loaded, case, other_case)
            if other == parts[2] or a is None or b is None:
                continue
            change = b["median"] / a["median"]
            lines.append(f"| {case} | {other} | {fmt_ratio(a)} | {fmt_ratio(b)} | {change:.3f} | "
                         f"{'yes' if abs(change - 1) <= LOADED_TOLERANCE else 'no'} |")
    return lines


def op_table(data, group: str, title: str) -> List[str]:
    recs = {k: v for k, v in data["cases"].items() if k.startswith(group + "/")}
    if not recs:
        return []
    lines = [f"### {title}", "", "| problem | implementation | forward ms (p10-p90) | GB/s | % of copy | "
             "forward+backward ms (p10-p90) | GB/s | % of copy | notes |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    keys = sorted({tuple(k.split("/")[1:3]) for k in recs}, key=lambda pi: (pi[0], list(recs).index(f"{group}/{pi[0]}/{pi[1]}/forward")
                                                                              if f"{group}/{pi[0]}/{pi[1]}/forward" in recs else 0))
    for problem, impl in keys:
        fwd, both = recs.get(f"{group}/{problem}/{impl}/forward"), recs.get(f"{group}/{problem}/{impl}/forward_backward")
        notes = []
        for r in (fwd, both):
            if r and "skipped" in r:
                notes.append(r["skipped"])
            elif r and "error" in r:
                notes.append(r["error"][:80])
        if fwd and fwd.get("correct_by_construction") is False:
            notes.append("attends to padding: a speed bound, not a correct result")
        if ok(fwd) and fwd.get("forward_max_abs_err_vs_fp32") is not None:
            notes.append(f"max err {fwd['forward_max_abs_err_vs_fp32']:.1e}")
        if ok(fwd) and fwd.get("backend") == "pytorch" and impl == "stop_fast":
            notes.append("PyTorch fallback (no Triton here)")
        lines.append(f"| {problem} | {impl} | {ms(fwd)} | {gbs(fwd)} | {pct(fwd)} | {ms(both)} | {gbs(both)} | "
                     f"{pct(both)} | {'; '.join(dict.fromkeys(notes))} |")
    return lines


def gbs(rec) -> str:
    return f"{rec['gbs']:.0f}" if ok(rec) and "gbs" in rec else ""


def pct(rec) -> str:
    return f"{100 * rec['fraction_of_copy_bandwidth']:.0f}%" if ok(rec) and "fraction_of_copy_bandwidth" in rec else ""


def scaling_table(data) -> List[str]:
    recs = {k: v for k, v in data["cases"].items() if k.startswith("scaling/")}
    if not recs:
        return []
    name = next(iter(recs)).split("/")[1]
    impls = list(dict.fromkeys(k.split("/")[3] for k in recs))
    lines = [f"### Scaling, {name} (one axis moved at a time)", "",
             "| point | " + " | ".join(f"{i} {m} ms" for i in impls for m in ("inference", "train")) + " |",
             "| --- | " + " | ".join("---:" for _ in impls for _ in range(2)) + " |"]
    for point in dict.fromkeys(k.split("/")[2] for k in recs):
        cells = [ms(recs.get(f"scaling/{name}/{point}/{i}/{m}")) for i in impls for m in ("inference", "train")]
        lines.append(f"| {point} | " + " | ".join(cells) + " |")
    return lines


def problems(data) -> List[str]:
    bad = [(k, v) for k, v in data["cases"].items() if "error" in v]
    if not bad:
        return []
    return ["### Errors", ""] + [f"- `{k}`: {v['error']}" for k, v in bad]


def markdown(data) -> str:
    sections = [header(data), targets_table(data)]
    for name in ("ViT-B-32", "ViT-B-16", "stop-tiny"):
        sections.append(model_table(data, name))
        sections.append(ratio_table(data, name))
    sections.append(profile_table(data))
    sections += [op_table(data, "attention", "Attention alone"),
                 op_table(data, "scoring", "Patch scoring + top-K"),
                 op_table(data, "packing", "Sequence packing"),
                 scaling_table(data), problems(data)]
    return "\n\n".join("\n".join(s) for s in sections if s) + "\n"


# --------------------------------------------------------------------------- plot
def plot(data, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [n for n in ("ViT-B-32", "ViT-B-16", "stop-tiny") if cases_under(data, f"model/{n}/")]
    attention = list(dict.fromkeys(k.split("/")[1] for k in data["cases"] if k.startswith("attention/")))
    scaling = [k for k in data["cases"] if k.startswith("scaling/")]
    axes_scaling = [a for a in ("frames", "rho", "batch") if any(k.split("/")[2].startswith(a + "=") for k in scaling)]
    panels = len(models) + len(attention) + len(axes_scaling)
    if not panels:
        raise SystemExit("nothing to plot: no model, attention or scaling case in the results")
    cols = min(panels, 3)
    rows = (panels + cols - 1) // cols
    fig, grid = plt.subplots(rows, cols, figsize=(6 * cols, 4.2 * rows), squeeze=False)
    axes = [ax for row in grid for ax in row]
    for ax in axes[panels:]:
        ax.axis("off")
    for name in models:
        ax = axes.pop(0)
        recs = cases_under(data, f"model/{name}/")
        variants = [v for v in VARIANT_LABELS if any(ok(recs.get(f"{v}/{m}")) for m in ("inference", "train"))]
        for j, mode in enumerate(("inference", "train")):
            values = [recs.get(f"{v}/{mode}", {}).get("videos_per_s", 0) if ok(recs.get(f"{v}/{mode}")) else 0 for v in variants]
            ax.barh([i + 0.4 * j for i in range(len(variants))], values, height=0.4, label=mode)
        ax.set_yticks([i + 0.2 for i in range(len(variants))], [VARIANT_LABELS[v] for v in variants], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("videos / s (higher is better)")
        ax.set_title(f"{name}, whole model", fontsize=9)
        ax.legend(fontsize=7)
    for problem in attention:
        ax = axes.pop(0)
        recs = cases_under(data, f"attention/{problem}/")
        impls = list(dict.fromkeys(k.split("/")[0] for k in recs if ok(recs[k])))
        for j, step in enumerate(("forward", "forward_backward")):
            values = [recs[f"{i}/{step}"]["gbs"] if ok(recs.get(f"{i}/{step}")) else 0 for i in impls]
            ax.barh([i + 0.4 * j for i in range(len(impls))], values, height=0.4, label=step)
        copy = data["runs"][0].get("ceilings", {}).get("copy_gbs") if data["runs"] else None
        if copy:
            ax.axvline(copy, color="k", ls="--", lw=1, label="copy bandwidth")
        ax.set_yticks([i + 0.2 for i in range(len(impls))], impls, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("GB/s of the bytes the op must move")
        ax.set_title(f"attention alone, {problem}", fontsize=9)
        ax.legend(fontsize=7)
    recs = {k: v for k, v in data["cases"].items() if k.startswith("scaling/") and ok(v)}
    for axis in axes_scaling:
        ax = axes.pop(0)
        for impl in dict.fromkeys(k.split("/")[3] for k in recs):
            for mode, style in (("inference", "--"), ("train", "-")):
                pts = sorted((int(k.split("/")[2].split("=")[1]), v["median_ms"]) for k, v in recs.items()
                             if k.split("/")[2].startswith(axis + "=") and k.split("/")[3] == impl and k.endswith("/" + mode))
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=f"{impl} {mode}")
        ax.set_xlabel(axis)
        ax.set_ylabel("ms per step")
        ax.set_title(f"scaling with {axis}", fontsize=9)
        ax.legend(fontsize=7)
    run = data["runs"][0] if data["runs"] else {}
    commits = ", ".join(dict.fromkeys(str(r.get("commit"))[:12] for r in data["runs"]))
    fig.suptitle(f"stop_fast on {run.get('device', '?')} (commit {commits}; see the table for each row's run)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="JSON files written by benchmarks/run.py")
    parser.add_argument("--md", help="write the Markdown tables here (default: print them)")
    parser.add_argument("--png", help="write the plot here")
    parser.add_argument("--json", help="write the merged results here")
    parser.add_argument("--compare", action="store_true",
                        help="two files: print their ratios side by side (e.g. a quiet and a loaded CPU run)")
    args = parser.parse_args(argv)
    if args.compare:
        if len(args.results) != 2:
            parser.error("--compare takes exactly two results files")
        first, second = merge(args.results[:1]), merge(args.results[1:])
        runs = [f"{label} {args.results[i]}: {line}" for i, (label, data) in enumerate((("First", first), ("Second", second)))
                for line in header(data)[1:]]
        print("\n".join(runs + [""] + compare(first, second)))
        return 0
    data = merge(args.results)
    text = markdown(data)
    if args.md:
        os.makedirs(os.path.dirname(os.path.abspath(args.md)), exist_ok=True)
        with open(args.md, "w") as f:
            f.write(text)
        print(f"wrote {args.md}")
    else:
        print(text)
    if args.png:
        plot(data, args.png)
        print(f"wrote {args.png}")
    if args.json:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from common import write_json

        write_json(args.json, data)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
