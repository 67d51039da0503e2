"""Tests of the benchmark suite's own code (CPU), and pytest-benchmark cases of the ops (CUDA).

    TRITON_INTERPRET=1 python -m pytest -q benchmarks/test_bench.py          # the CPU tests (~3 min)
    pytest benchmarks/test_bench.py --benchmark-enable [-k attention|scores|pack|model_step]   # on a GPU

The CPU tests check the interleaved timing and its ratios (on a fake clock whose load changes between
rounds), the budget and selection of case groups, the provenance fields, the report's ratios (new
files and old ones), the baselines' arithmetic against open_clip and the reference path, and one
run.py call that measures the new baselines with stop-tiny. The CUDA cases time the same problems and
implementations as run.py's (imported from the bench_* modules) with pytest-benchmark's own loop and
check what each returns; run.py's JSON is the suite's record, these cases are for pytest-benchmark's
comparisons between runs (``--benchmark-autosave``, ``--benchmark-compare``).
"""
from __future__ import annotations

import json
import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_attention  # noqa: E402
import bench_model  # noqa: E402
import bench_packing  # noqa: E402
import bench_scoring  # noqa: E402
import common  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402
from common import Case, CaseGroup, Unavailable  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# --------------------------------------------------------------------------- interleaved timing (CPU)
class LoadedClock:
    """A fake ``time.perf_counter``: each call of a timed function advances it by the function's cost
    times the machine's load, and the load changes from one round to the next (1x, 6x, 1x, ...)."""

    def __init__(self, warmup_calls: int, calls_per_round: int):
        self.now = 0.0
        self.calls = 0
        self.warmup_calls, self.calls_per_round = warmup_calls, calls_per_round

    def perf_counter(self) -> float:
        return self.now

    def work(self, cost_s: float):
        def fn():
            round_index = max(self.calls - self.warmup_calls, 0) // self.calls_per_round
            self.now += cost_s * (6.0 if round_index % 2 else 1.0)
            self.calls += 1
        return fn


def test_interleaved_ratio_holds_under_changing_load(monkeypatch):
    clock = LoadedClock(warmup_calls=2, calls_per_round=2)
    monkeypatch.setattr(common.time, "perf_counter", clock.perf_counter)
    fns = {"fast": clock.work(0.001), "reference": clock.work(0.003)}
    timings = common.measure_interleaved(fns, CPU, warmup=1, min_reps=6, target_s=0.0)
    fast, ref = timings["fast"], timings["reference"]
    assert fast["rounds"] == ref["rounds"] == 6 and fast["reps_per_round"] == ref["reps_per_round"] == 1
    assert len(fast["rounds_ms"]) == 6 and fast["reps"] == 6
    # every round saw one load for both: the per-round ratio is exact, whatever the load did
    spread = common.ratio_spread(fast["rounds_ms"], ref["rounds_ms"])
    assert spread["median"] == pytest.approx(1 / 3) and spread["p10"] == pytest.approx(1 / 3)
    assert spread["p90"] == pytest.approx(1 / 3) and spread["rounds"] == 6
    # while the times themselves moved with the load (1 ms in quiet rounds, 6 ms in loaded ones)
    assert sorted(set(round(t, 6) for t in fast["rounds_ms"])) == [1.0, 6.0]


def test_interleaved_rounds_alternate_order_and_respect_bounds():
    order = []
    fns = {name: (lambda name=name: order.append(name)) for name in ("a", "b", "c")}
    timings = common.measure_interleaved(fns, CPU, warmup=1, min_reps=2, max_reps=1000, target_s=0.0,
                                         min_rounds=5, max_rounds=15)
    timed = order[3:]  # after one warm-up call each
    assert timed[:6] == ["a", "b", "c", "c", "b", "a"]  # A B C, then C B A: none always first
    assert all(t["rounds"] == 5 for t in timings.values())  # min_reps 2 < min_rounds 5: 5 rounds of 1
    assert len(timed) == 15


def test_interleaved_reps_split_over_rounds(monkeypatch):
    clock = LoadedClock(warmup_calls=10 ** 9, calls_per_round=1)  # no load change
    monkeypatch.setattr(common.time, "perf_counter", clock.perf_counter)
    fns = {"quick": clock.work(0.001), "slow": clock.work(0.1)}
    timings = common.measure_interleaved(fns, CPU, warmup=1, min_reps=10, target_s=1.0, min_rounds=5, max_rounds=15)
    # quick wants 1000 repetitions, slow 10: 10 rounds (the fewer), 100 and 1 per round
    assert timings["quick"]["rounds"] == timings["slow"]["rounds"] == 10
    assert timings["quick"]["reps_per_round"] == 100 and timings["slow"]["reps_per_round"] == 1
    assert timings["quick"]["median_ms"] == pytest.approx(1.0) and timings["slow"]["median_ms"] == pytest.approx(100.0)


def test_ratio_spread_median_and_percentiles():
    r = common.ratio_spread([1.0, 2.0, 4.0, 3.0, 10.0], [2.0, 2.0, 2.0, 3.0, 1.0])
    assert r == {"median": 1.0, "p10": 0.5, "p90": 10.0, "rounds": 5}
    with pytest.raises(ValueError):
        common.ratio_spread([1.0, 2.0], [1.0])


def test_run_group_records_skips_errors_and_ratios():
    def build(name):
        if name == "skipped_here":
            return {"skipped": "not on this device"}
        if name == "missing_op":
            raise Unavailable("no such op")
        if name == "broken":
            raise RuntimeError("boom")
        return (lambda: sum(range(100)), lambda timing, name=name: {**timing, "name": name})

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        records = common.run_group("g", ["a", "skipped_here", "missing_op", "broken", "b"], build, CPU,
                                   {"warmup": 1, "min_reps": 5, "target_s": 0.0})
    assert list(records) == ["a", "skipped_here", "missing_op", "broken", "b"]
    assert records["skipped_here"] == {"skipped": "not on this device"}
    assert records["missing_op"]["skipped"] == "unavailable: no such op"
    assert records["broken"]["error"] == "RuntimeError: boom"
    assert records["a"]["name"] == "a" and set(records["a"]["ratios"]) == {"b"}
    assert records["b"]["interleaved"] == {"group": "g", "members": ["a", "b"], "rounds": 5, "reps_per_round": 1}
    a_over_b, b_over_a = records["a"]["ratios"]["b"], records["b"]["ratios"]["a"]
    assert a_over_b["median"] * b_over_a["median"] == pytest.approx(1.0, rel=0.5)  # inverse up to the median's pairing


# --------------------------------------------------------------------------- run.py: selection, budget, provenance
def _group():
    members = {"x": Case("model/m/x/train", None, estimate_s=10, priority=0),
               "y": Case("model/m/y/train", None, estimate_s=lambda: 50, priority=3),
               "z": Case("model/m/z/train", None, estimate_s=20, priority=1)}
    return CaseGroup("model/m/train", members, lambda names: {n: {"median_ms": 1.0} for n in names})


def test_selection_picks_group_members_by_pattern():
    group, single = _group(), Case("attention/p/s/forward", lambda: {}, priority=0)
    chosen = run.selection([group, single], ["model/*/x/*", "model/m/z"])
    assert len(chosen) == 1 and chosen[0][0] is group
    assert [name for name, _ in chosen[0][1]] == ["x", "z"]
    assert [item for item, _ in run.selection([group, single], None)] == [group, single]
    assert group.priority == 0


def test_budget_keeps_the_most_important_members():
    group = _group()
    members = list(group.members.items())
    runnable, skipped = run.within_budget(members, elapsed=5.0, budget_s=40.0)
    assert [name for name, _ in runnable] == ["x", "z"]  # priorities 0 and 1: 5 + 10 + 20 <= 40
    assert list(skipped) == ["model/m/y/train"] and "time budget" in skipped["model/m/y/train"]["skipped"]
    runnable, skipped = run.within_budget(members, elapsed=5.0, budget_s=None)
    assert len(runnable) == 3 and not skipped


def test_commit_and_dirty_from_the_environment(monkeypatch):
    monkeypatch.setenv("STOP_FAST_COMMIT", "abc123")
    monkeypatch.setenv("STOP_FAST_DIRTY", "1")
    assert common.commit_info() == {"commit": "abc123", "dirty": True, "commit_source": "STOP_FAST_COMMIT"}
    monkeypatch.setenv("STOP_FAST_DIRTY", "0")
    assert common.commit_info()["dirty"] is False
    monkeypatch.delenv("STOP_FAST_DIRTY")
    assert common.commit_info()["dirty"] is None
    monkeypatch.setenv("STOP_FAST_DIRTY", "perhaps")
    with pytest.raises(ValueError):
        common.commit_info()


def test_compile_estimate_learns_per_variant_and_mode():
    ctx = run.default_context(CPU, quick=True)
    assert ctx.compile_estimate("fast_compiled", "train") == 90.0
    ctx.observe({"variant": "fast_compiled", "mode": "train", "first_call_s": 20.0})
    ctx.observe({"variant": "openclip_compiled", "mode": "train", "first_call_s": 50.0})
    assert ctx.compile_estimate("fast_compiled", "train") == pytest.approx(29.0)
    assert ctx.compile_estimate("padded_sdpa_compiled", "inference") == pytest.approx(65.0)  # any seen


# --------------------------------------------------------------------------- report.py
def _results(interleaved: bool, fast_ms=10.0, ref_ms=20.0, device_type="cpu"):
    def rec(variant, value, other, other_value):
        r = {"median_ms": value, "p10_ms": value, "p90_ms": value, "reps": 9, "run": 0, "batch": 2, "frames": 12,
             "tokens": {"total": 1000 if "openclip" not in variant else 900, "mean_per_frame": 50.0,
                        "computed_per_frame": 50.0, "layout": "packed"}, "videos_per_s": 1.0}
        if interleaved:
            r["ratios"] = {other: {"median": value / other_value, "p10": 0.9 * value / other_value,
                                   "p90": 1.1 * value / other_value, "rounds": 9}}
            r["interleaved"] = {"group": "g", "members": [variant, other], "rounds": 9}
        return r

    cases = {}
    for mode in ("inference", "train"):
        cases[f"model/stop-tiny/fast/{mode}"] = rec("fast", fast_ms, "reference", ref_ms)
        cases[f"model/stop-tiny/reference/{mode}"] = rec("reference", ref_ms, "fast", fast_ms)
    return {"runs": [{"device": "cpu (x86_64)", "device_type": device_type, "commit": "abc", "dirty": True,
                      "loadavg_start": [1.0, 1.0, 1.0], "ceilings": {}}], "cases": cases}


def test_report_ratio_uses_the_interleaved_rounds():
    data = _results(interleaved=True)
    r = report.ratio(data, "model/stop-tiny/fast/train", "model/stop-tiny/reference/train")
    assert r["interleaved"] and r["median"] == pytest.approx(0.5) and r["rounds"] == 9
    assert report.fmt_ratio(r) == "0.500x (0.450-0.550, 9 rounds)"
    inv = report.inverted(r)
    assert inv["median"] == pytest.approx(2.0) and inv["p10"] == pytest.approx(1 / 0.55) and inv["p90"] == pytest.approx(1 / 0.45)
    old = report.ratio(_results(interleaved=False), "model/stop-tiny/fast/train", "model/stop-tiny/reference/train")
    assert not old["interleaved"] and old["median"] == pytest.approx(0.5) and "separately" in report.fmt_ratio(old)
    text = report.markdown(data)
    assert "| CPU stop-tiny train: fast not slower than reference | 2.000x (1.818-2.222, 9 rounds)" in text
    assert "uncommitted changes" in text


def test_report_compare_flags_ratios_that_moved():
    quiet, loaded = _results(True, fast_ms=10.0), _results(True, fast_ms=12.0)
    rows = report.compare(quiet, loaded)
    assert len(rows) == 2 + 2  # header, separator, inference and train
    assert all(row.endswith("| 1.200 | no |") for row in rows[2:])
    assert all(row.endswith("| 1.000 | yes |") for row in report.compare(quiet, quiet)[2:])


def test_report_renders_the_committed_results():
    """Old files (no interleaving, no tuned baseline) still render; every committed CPU file too."""
    paths = [os.path.join(HERE, "results", "h100", "results.json")]
    paths += [os.path.join(HERE, "results", "cpu-2core", f) for f in sorted(os.listdir(os.path.join(HERE, "results", "cpu-2core")))
              if f.startswith("quick") and f.endswith(".json")]
    for path in paths:
        text = report.markdown(report.merge([path]))
        assert "### Targets" in text and "### Whole model" in text, path
    h100 = report.markdown(report.merge(paths[:1]))
    assert "| ViT-B/32 inference <= 8.5 ms | 9.85 ms (fast_compiled) | not met |" in h100
    assert "MFU vs matmul in run | MFU vs data sheet" in h100


# --------------------------------------------------------------------------- the baselines' arithmetic (CPU, stop-tiny)
@pytest.fixture(scope="module")
def tiny():
    ctx = run.default_context(CPU, quick=True)
    ctx.compute_ceiling = None
    return ctx.current_setup(bench_model.Setup, "stop-tiny", 2, 4, 12)


def test_tuned_clip_computes_open_clips_features(tiny):
    visual = tiny.model.visual
    b, t = tiny.video.shape[:2]
    with torch.no_grad():
        ours = bench_model.tuned_clip_features(visual, tiny.clip_prompt, tiny.video)
        theirs = tiny.model.clip.encode_image(tiny.video.flatten(0, 1)).float().unflatten(0, (b, t))
    torch.testing.assert_close(ours, torch.nn.functional.normalize(theirs.mean(dim=1), dim=-1), atol=2e-5, rtol=1e-4)


def test_tuned_clip_training_step_trains_only_the_token_prompt(tiny):
    step = bench_model.step_function(tiny, "openclip_tuned_compiled", "train")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step()
    assert step.params == [tiny.clip_prompt]
    grad = tiny.clip_prompt.grad
    assert grad is not None and grad.shape == tiny.clip_prompt.shape and grad.abs().sum() > 0
    assert not tiny.video.requires_grad  # nothing flows into the pixels
    assert all(p.grad is None for p in tiny.model.visual.parameters())  # nor into the frozen tower (conv1)


def test_padded_sdpa_encode_computes_the_reference(tiny):
    from stop_fast.model.fast import fast_forward
    from stop_fast.model.steps import video_feature

    with torch.no_grad():
        padded = video_feature(fast_forward(tiny.model, tiny.video, static_shapes=True,
                                            encode=bench_model.padded_sdpa_encode))
        reference = tiny.model.encode_video(tiny.video, impl="reference")
    torch.testing.assert_close(padded, reference, atol=1e-5, rtol=1e-4)


def test_cls_only_block_equals_the_full_blocks_cls_row(tiny):
    block = tiny.model.visual.transformer.resblocks[-1]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 20, block.attn.embed_dim, generator=g)
    keep = (torch.arange(20)[None, :] < torch.tensor([20, 15, 9])[:, None])[:, None, None, :]
    with torch.no_grad():
        full = bench_model.sdpa_attention_block(block, x, keep)[:, 0]
        cls = bench_model.sdpa_cls_block(block, x, keep)
    torch.testing.assert_close(cls, full, atol=1e-5, rtol=1e-5)


def test_fastest_sdpa_backend_times_what_runs_and_names_what_does_not(tiny):
    choice = bench_model.fastest_sdpa_backend(tiny.ctx, 6, 2, 20, 16, torch.tensor([20, 19, 18, 12, 5, 20]), True)
    timed = {k: v for k, v in choice["ms"].items() if isinstance(v, float)}
    assert choice["backend"] in timed and timed[choice["backend"]] == min(timed.values())
    assert "math" in timed  # the math backend takes any input
    assert set(choice["ms"]) == {"flash", "efficient", "cudnn", "math"}
    assert all(v.startswith("not available") for k, v in choice["ms"].items() if k not in timed)


def test_quick_run_measures_the_new_baselines_interleaved(tmp_path, monkeypatch):
    """run.py --quick on the CPU: the tuned open_clip and padded baselines beside the fast path, one
    interleaved group, each record with its ratios, commit, tree state and inputs."""
    monkeypatch.setenv("STOP_FAST_COMMIT", "test-commit")
    monkeypatch.setenv("STOP_FAST_DIRTY", "1")
    out = tmp_path / "r.json"
    only = ",".join(f"model/stop-tiny/{v}/inference" for v in ("fast", "openclip_tuned_compiled", "padded_sdpa_compiled"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert run.main(["--quick", "--device", "cpu", "--only", only, "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["runs"][0]["commit"] == "test-commit" and data["runs"][0]["dirty"] is True
    recs = {k.split("/")[2]: v for k, v in data["cases"].items()}
    assert set(recs) == {"fast", "openclip_tuned_compiled", "padded_sdpa_compiled"}
    for variant, rec in recs.items():
        assert rec["median_ms"] > 0 and rec["commit"] == "test-commit" and rec["dirty"] is True, variant
        assert rec["clips"] == [] and "random" in rec["input"]
        assert set(rec["ratios"]) == set(recs) - {variant} and rec["interleaved"]["rounds"] >= 5
    assert recs["openclip_tuned_compiled"]["max_abs_diff_vs_openclip"] < 1e-4
    assert recs["padded_sdpa_compiled"]["max_abs_diff_vs_reference"] < 1e-4
    assert recs["padded_sdpa_compiled"]["sdpa_backend"] in ("flash", "math")
    assert recs["openclip_tuned_compiled"]["tokens"]["mean_per_frame"] == 1 + tiny_patches()
    assert "first_call_s" in recs["padded_sdpa_compiled"] and "first_call_s" not in recs["fast"]


def tiny_patches() -> int:
    import open_clip

    cfg = open_clip.get_model_config("stop-tiny")["vision_cfg"]
    return (cfg["image_size"] // cfg["patch_size"]) ** 2


# --------------------------------------------------------------------------- pytest-benchmark cases (CUDA)
def timed(fn):
    def call():
        out = fn()
        torch.cuda.synchronize()
        return out
    return call


@pytest.fixture(scope="module")
def attention_problem():
    return bench_attention.make_problem(torch.device("cuda"), *bench_attention.PROBLEMS["vit_b32"])


@needs_cuda
@pytest.mark.parametrize("impl", bench_attention.candidates_names())
@pytest.mark.parametrize("step", ["forward", "forward_backward"])
def test_attention(benchmark, attention_problem, impl, step):
    try:
        c = bench_attention.candidates(attention_problem)[impl]()
    except Unavailable as exc:
        pytest.skip(str(exc))
    c.forward_backward()  # compile, autotune, warm up
    if step == "forward":
        out = benchmark(timed(c.inference))
        assert torch.isfinite(out).all()
    else:
        benchmark(timed(c.forward_backward))
        assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in c.leaves)


@needs_cuda
@pytest.mark.parametrize("impl", bench_scoring.IMPLS)
def test_patch_scores_forward(benchmark, impl):
    fn, _, _ = bench_scoring.prepare(run.default_context(torch.device("cuda")), bench_scoring.SHAPES["vit_b32"], impl, "forward")
    fn()
    out = benchmark(timed(fn))
    assert torch.isfinite(out.gate).all() and torch.isfinite(out.variation).all()


@needs_cuda
@pytest.mark.parametrize("impl", bench_packing.IMPLS)
def test_pack_sequences_forward(benchmark, impl):
    fn, _, fields = bench_packing.prepare(run.default_context(torch.device("cuda")), bench_packing.SHAPES["vit_b32"], impl, "forward")
    fn()
    out = benchmark(timed(fn))
    assert out.shape[0] == fields["total_tokens"] and torch.isfinite(out).all()


@needs_cuda
@pytest.mark.parametrize("variant", ["reference", "fast", "fast_compiled", "openclip_compiled", "openclip_tuned_compiled",
                                     "padded_sdpa_compiled"])
@pytest.mark.parametrize("mode", bench_model.MODES)
def test_model_step(benchmark, variant, mode):
    """ViT-B/32, B = 32, T = 12, bf16: one inference or training step per round."""
    ctx = run.default_context(torch.device("cuda"))
    setup = ctx.current_setup(bench_model.Setup, "ViT-B-32", ctx.batch, ctx.frames, 12)
    fn = bench_model.step_function(setup, variant, mode)
    fn()  # compile, autotune, warm up
    out = benchmark(timed(fn))
    if mode == "inference":
        assert out.shape == (ctx.batch, setup.model.clip.visual.output_dim) and torch.isfinite(out).all()
    else:
        assert fn.params and all(p.grad is not None and torch.isfinite(p.grad).all() for p in fn.params)
