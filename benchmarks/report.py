"""Turn results of benchmarks/run.py into a Markdown table and a PNG plot (for the README).

    python benchmarks/report.py RESULTS.json [MORE.json ...] --md OUT.md --png OUT.png [--json MERGED.json]

Several files (e.g. the two halves of a GPU run) are merged, later cases replacing earlier ones of the
same id; ``--json`` writes the merged file. Only measured figures appear: a case that errored, was
skipped or never ran is listed as such, never filled in.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

# The targets (H100, bf16, B = 32, T = 12): (what, model, mode, limit in ms).
TIME_TARGETS = [
    ("ViT-B/32 inference <= 9 ms", "ViT-B-32", "inference", 9.0),
    ("ViT-B/32 training step <= 19 ms", "ViT-B-32", "train", 19.0),
    ("ViT-B/16 inference <= 32 ms", "ViT-B-16", "inference", 32.0),
    ("ViT-B/16 training step <= 66 ms", "ViT-B-16", "train", 66.0),
]
VARIANT_LABELS = {
    "reference": "reference, eager",
    "fast": "fast, eager",
    "fast_compiled": "fast, compiled",
    "fast_compiled_cudagraphs": "fast, compiled, static shapes + CUDA graphs",
    "openclip_compiled": "open_clip encode_image, compiled (no prompts)",
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
        lines.append(f"Run {i}: commit `{commit_i}`, {r.get('date', '')}, {r.get('device')}"
                     + (": " + ", ".join(parts) if parts else "")
                     + ("; cuDNN autotuning on" if r.get("cudnn_benchmark") else "")
                     + (f"; torch.compile mode {r['compile_mode']}" if r.get("compile_mode", "default") != "default" else "")
                     + ".")
    return lines


def model_table(data, name: str) -> List[str]:
    recs = cases_under(data, f"model/{name}/")
    if not recs:
        return []
    some = next(iter(r for r in recs.values() if ok(r)), {})
    lines = [f"### Whole model, {name}, B = {some.get('batch', '?')}, T = {some.get('frames', '?')}, "
             f"{some.get('precision', '')}", "",
             "| variant | tokens/frame | inference ms (p10-p90) | videos/s | MFU | training step ms (p10-p90) | "
             "videos/s | MFU | peak GiB | compile s (inf / train) | run |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
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
        lines.append(f"| {label} | {tok} | {ms(inf)} | {rate(inf)} | "
                     f"{mfu(inf)} | {ms(train)} | {rate(train)} | "
                     f"{mfu(train)} | {num(mem, '{:.2f}') if mem else ''} | {compile_s if compile_s.strip(' /') else ''} | "
                     f"{' / '.join(dict.fromkeys(str(r.get('run', 0)) for r in (inf, train) if ok(r)))} |")
    lines.append("")
    lines.append("MFU: FLOPs of the real tokens over the measured time, against the matmul measured in the "
                 "same run (bf16 on a GPU, fp32 on a CPU; the data-sheet ratio is in the JSON). Padded variants "
                 "are credited the same useful FLOPs as the packed ones.")
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


def mfu(rec) -> str:
    if not ok(rec) or rec.get("mfu_vs_measured_matmul") is None:
        return ""
    return f"{100 * rec['mfu_vs_measured_matmul']:.0f}%"


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
            clip, padded = recs.get(f"openclip_compiled/{mode}"), recs.get(f"padded_sdpa_compiled/{mode}")
            if fast and ok(clip):
                ratio = (fast["median_ms"] / fast["tokens"]["total"]) / (clip["median_ms"] / clip["tokens"]["total"])
                lines.append(f"| {name} {mode}: time per token within 5% of compiled open_clip | "
                             f"{ratio:.3f}x ({variant}) | {'met' if ratio <= 1.05 else 'not met'} |")
            if fast and ok(padded):
                speedup = padded["median_ms"] / fast["median_ms"]
                token_ratio = padded["tokens"]["computed_per_frame"] / fast["tokens"]["mean_per_frame"]
                lines.append(f"| {name} {mode}: faster than padded STOP + SDPA + compile by ~ the token ratio "
                             f"({token_ratio:.2f}x) | {speedup:.2f}x ({variant}) | "
                             f"{'met' if speedup >= 0.95 * token_ratio else 'not met'} |")
    for problem in ("vit_b32", "vit_b16"):
        recs = cases_under(data, f"attention/{problem}/")
        for step in ("forward", "forward_backward"):
            ours, theirs = recs.get(f"stop_fast/{step}"), recs.get(f"torch_varlen_attn/{step}")
            if ok(ours) and ok(theirs):
                r = theirs["median_ms"] / ours["median_ms"]
                lines.append(f"| attention {problem} {step}: parity with torch varlen_attn | {r:.2f}x "
                             f"(varlen_attn time / ours) | {'met' if r >= 1.0 else 'not met'} |")
            elif ok(ours):
                lines.append(f"| attention {problem} {step}: parity with torch varlen_attn | varlen_attn "
                             f"{status(theirs) or 'not measured'} | - |")
        fwd = recs.get("stop_fast/forward")
        if ok(fwd) and fwd.get("fraction_of_copy_bandwidth") is not None:
            f = fwd["fraction_of_copy_bandwidth"]
            lines.append(f"| attention {problem} forward >= 60% of copy bandwidth | {100 * f:.0f}% | "
                         f"{'met' if f >= 0.6 else 'not met'} |")
    quick = [k.split("/")[1] for k in data["cases"] if k.startswith("model/") and k.endswith("/fast/inference")]
    for name in quick:
        recs = cases_under(data, f"model/{name}/")
        if device_type(data, recs.get("fast/inference")) != "cpu":
            continue
        for mode in ("inference", "train"):
            fast, ref = recs.get(f"fast/{mode}"), recs.get(f"reference/{mode}")
            if ok(fast) and ok(ref):
                r = ref["median_ms"] / fast["median_ms"]
                lines.append(f"| CPU {name} {mode}: fast not slower than reference | {r:.2f}x | "
                             f"{'met' if r >= 1.0 else 'not met'} |")
    return lines + ["", "Targets are aims, not tests; \"not met\" is a measured fact."]


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
    args = parser.parse_args(argv)
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
