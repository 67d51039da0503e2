"""pytest-benchmark cases of the ops the suite measures (CUDA only; skipped without a device).

    pytest benchmarks/test_bench.py --benchmark-enable [-k attention|scores|pack|model]

The same problems and implementations as run.py's cases (imported from the bench_* modules), timed by
pytest-benchmark's own loop with a synchronisation per round. run.py's JSON is the suite's record;
these cases are for pytest-benchmark's comparisons between runs (``--benchmark-autosave``,
``--benchmark-compare``).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_attention  # noqa: E402
import bench_model  # noqa: E402
import bench_packing  # noqa: E402
import bench_scoring  # noqa: E402
from common import Unavailable  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def timed(fn):
    def run():
        fn()
        torch.cuda.synchronize()
    return run


@pytest.fixture(scope="module")
def attention_problem():
    return bench_attention.make_problem(torch.device("cuda"), *bench_attention.PROBLEMS["vit_b32"])


@pytest.mark.parametrize("impl", bench_attention.candidates_names())
@pytest.mark.parametrize("step", ["forward", "forward_backward"])
def test_attention(benchmark, attention_problem, impl, step):
    try:
        c = bench_attention.candidates(attention_problem)[impl]()
    except Unavailable as exc:
        pytest.skip(str(exc))
    c.forward_backward()  # compile, autotune, warm up
    benchmark(timed(c.inference if step == "forward" else c.forward_backward))


@pytest.mark.parametrize("impl", bench_scoring.IMPLS)
def test_patch_scores_forward(benchmark, impl):
    u, keys, bias, dyn, w, _, _ = bench_scoring.make_inputs(torch.device("cuda"), *bench_scoring.SHAPES["vit_b32"])
    fn = bench_scoring.scoring_function(impl)

    def forward():
        with torch.no_grad():
            fn(u, keys, bias, dyn, w, bench_scoring.K, bench_scoring.ALPHA, bench_scoring.BETA)

    forward()
    benchmark(timed(forward))


@pytest.mark.parametrize("impl", bench_packing.IMPLS)
def test_pack_sequences_forward(benchmark, impl):
    z, counts, cu, total, idx, gate, intra, inter, _ = bench_packing.make_inputs(torch.device("cuda"), *bench_packing.SHAPES["vit_b32"])
    fn = bench_packing.packing_function(impl)

    def forward():
        with torch.no_grad():
            fn(z, counts, cu, total, idx, gate, intra, inter)

    forward()
    benchmark(timed(forward))


@pytest.mark.parametrize("variant", ["reference", "fast", "fast_compiled"])
@pytest.mark.parametrize("mode", bench_model.MODES)
def test_model_step(benchmark, variant, mode):
    """ViT-B/32, B = 32, T = 12, bf16: one inference or training step per round."""
    import run

    ctx = run.default_context(torch.device("cuda"))
    setup = ctx.current_setup(bench_model.Setup, "ViT-B-32", ctx.batch, ctx.frames, 12)
    try:
        fn = bench_model.step_function(setup, variant, mode)
    except Unavailable as exc:
        pytest.skip(str(exc))
    fn()  # compile, autotune, warm up
    benchmark(timed(fn))
