"""patch_scores' split forward (kernel variant ``scoring_split``): against float64 PyTorch by the 2x rule,
against the one-pass kernel, forward and backward, and at the edges (one frame, k = N, frame
boundaries inside a row block, exact ties, no frames)."""
import importlib
import random

import pytest
import torch

from stop_fast.kernels import dispatch, patch_scores
from stop_fast.kernels.scoring import compile_cases, patch_scores_reference

from kernel_checks import DEVICE, assert_compiles_without_spills, assert_within_rule, scoring_inputs

scoring = importlib.import_module("stop_fast.kernels.scoring")
FIELDS = ("attn", "dyn", "score", "gate", "variation")


def _clear_cut(score, k):
    """R may differ where S's K-th and (K+1)-th values are within 1e-5 (SPEC): compare clear-cut draws."""
    if k == score.shape[1] or score.shape[0] == 0:
        return True
    s = score.sort(dim=1, descending=True).values
    return bool((s[:, k - 1] - s[:, k]).min() > 1e-5)


def _loss(r, dg, dv):
    return (r.gate * dg).sum() + ((r.variation * dv).sum() if r.variation is not None else 0)


def _check(frames, n, width, heads, k, dtype, seed, with_w=True, alpha=0.4, beta=4.0):
    """The split forward and the shared backward against float64 (2x rule) and against the one-pass
    kernel (same R, values equal to rounding), on the same fresh random inputs."""
    u, keys, bias, dyn, w = scoring_inputs(frames, n, width, heads, dtype, seed, with_w)
    split = patch_scores(u, keys, bias, dyn, w, k, alpha, beta, split=True)
    one_pass = patch_scores(u, keys, bias, dyn, w, k, alpha, beta, split=False)
    truth = patch_scores_reference(u.double(), keys.double(), bias.double(), dyn.double(),
                                   w.double() if w is not None else None, k, alpha, beta)
    plain = patch_scores_reference(u, keys, bias, dyn, w, k, alpha, beta)
    assert _clear_cut(truth.score, k), "pick another seed: near-tie in the score"
    assert split.topk_idx.dtype == torch.int64 and split.topk_idx.shape == (frames, k)
    assert torch.equal(split.topk_idx, truth.topk_idx)
    assert torch.equal(split.topk_idx, one_pass.topk_idx)
    for name in FIELDS:
        a, b, p, t = (getattr(r, name) for r in (split, one_pass, plain, truth))
        if t is None:
            assert a is None
            continue
        assert a.dtype == torch.float32 and a.shape == t.shape
        assert_within_rule(a, p, t, name)
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6, msg=name)

    dg = torch.randn(frames, k, device=DEVICE)
    dv = torch.randn(frames, device=DEVICE)
    leaves = [dyn] + ([w] if w is not None else [])
    g_split = torch.autograd.grad(_loss(split, dg, dv), leaves)
    g_one = torch.autograd.grad(_loss(one_pass, dg, dv), leaves)
    g_plain = torch.autograd.grad(_loss(plain, dg, dv), leaves)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    t64 = patch_scores_reference(u.double(), keys.double(), bias.double(), leaves64[0],
                                 leaves64[1] if w is not None else None, k, alpha, beta)
    g_truth = torch.autograd.grad(_loss(t64, dg.double(), dv.double()), leaves64)
    scale = max(t.abs().max().item() for t in g_truth)
    for name, a, b, p, t in zip(("d dyn_logits", "d inter_logits"), g_split, g_one, g_plain, g_truth):
        assert a.dtype == leaves[0].dtype
        assert_within_rule(a, p, t, name, scale=scale)
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6 * scale, msg=name)


@pytest.mark.parametrize("n, width, heads, k", [(196, 64, 12, 6), (49, 128, 4, 6), (16, 64, 2, 16), (9, 32, 3, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_split_forward_and_backward_against_float64_and_the_one_pass_kernel(n, width, heads, k, dtype):
    """ViT-B/16's N = 196 with its 12 heads (narrow rows keep the interpreter quick), ViT-B/32's 49,
    k = N, k = 1; u in each dtype (the dot takes u upcast to fp32, in the interpreter too)."""
    _check(frames=3, n=n, width=width, heads=heads, k=k, dtype=dtype, seed=100 + n + k)


def test_random_shapes():
    """Random N, width, heads, k and frame counts; row blocks of pass 1 straddle frames."""
    rng = random.Random(17)
    for i in range(4):
        n = rng.randint(1, 80)
        _check(frames=rng.randint(1, 9), n=n, width=rng.choice([16, 48, 64, 96]), heads=rng.randint(1, 16),
               k=rng.randint(1, n), dtype=torch.float32, seed=200 + i, with_w=bool(i % 2))


def test_single_frame_without_w_and_extreme_alpha_beta():
    _check(frames=1, n=196, width=32, heads=12, k=6, dtype=torch.float32, seed=7, with_w=False)
    _check(frames=2, n=49, width=64, heads=2, k=6, dtype=torch.float32, seed=8, alpha=1.0, beta=0.0)
    _check(frames=2, n=49, width=64, heads=2, k=6, dtype=torch.float32, seed=9, alpha=0.0)


def test_many_heads_and_one_patch():
    """64 heads (the most patch_scores accepts: a 64-wide head tile) and N = 1 (k = 1 picks it)."""
    _check(frames=3, n=20, width=64, heads=64, k=4, dtype=torch.float32, seed=10)
    _check(frames=4, n=1, width=16, heads=2, k=1, dtype=torch.float32, seed=11)


def test_exact_ties_go_to_the_lower_index():
    frames, n, width, heads, k = 3, 196, 64, 2, 5
    u = torch.randn(frames, n + 1, width, device=DEVICE)
    keys, bias = torch.zeros(heads, width, device=DEVICE), torch.randn(heads, device=DEVICE)  # uniform A
    dyn = torch.zeros(frames, n, device=DEVICE)
    dyn[:, [3, 150, 11]] = 1.0  # three equal winners, then 193 equal patches
    w = torch.randn(frames, n, device=DEVICE)
    out = patch_scores(u, keys, bias, dyn, w, k, 0.4, 4.0, split=True)
    assert out.topk_idx.tolist() == [[3, 11, 150, 0, 1]] * frames
    one_pass = patch_scores(u, keys, bias, dyn, w, k, 0.4, 4.0, split=False)
    assert torch.equal(out.topk_idx, one_pass.topk_idx)
    assert torch.equal(out.topk_idx, patch_scores_reference(u, keys, bias, dyn, None, k, 0.4, 4.0).topk_idx)


def test_no_frames():
    u, keys, bias, dyn, w = scoring_inputs(0, 49, 64, 4)
    out = patch_scores(u, keys, bias, dyn, w, 6, 0.4, 4.0, split=True)
    assert out.topk_idx.shape == (0, 6) and out.score.shape == (0, 49) and out.variation.shape == (0,)
    grads = torch.autograd.grad(out.gate.sum() + out.variation.sum(), [dyn, w], allow_unused=True)
    assert all(g is None or g.shape == (0, 49) for g in grads)


def test_the_switch_chooses_the_launch(monkeypatch):
    """split=None follows STOP_FAST_KERNEL_VARIANTS (off by default); the keyword wins over it."""
    seen = []
    launch = scoring._launch_forward

    def spy(*args):
        seen.append(args[-1])
        return launch(*args)

    monkeypatch.setattr(scoring, "_launch_forward", spy)
    u, keys, bias, dyn, w = scoring_inputs(2, 9, 16, 2)
    monkeypatch.delenv(dispatch.VARIANTS_ENV, raising=False)
    patch_scores(u, keys, bias, dyn, w, 3, 0.4, 4.0)
    with dispatch.kernel_variants("scoring_split"):
        patch_scores(u, keys, bias, dyn, w, 3, 0.4, 4.0)
        patch_scores(u, keys, bias, dyn, w, 3, 0.4, 4.0, split=False)
    with dispatch.kernel_variants("all"):
        patch_scores(u, keys, bias, dyn, w, 3, 0.4, 4.0)
    patch_scores(u, keys, bias, dyn, w, 3, 0.4, 4.0, split=True)
    assert seen == [False, True, False, True, True]


def test_torch_compile_traces_the_split_forward_without_graph_breaks():
    u, keys, bias, dyn, w = scoring_inputs(4, 16, 64, 2)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(dyn, w):
        r = patch_scores(u, keys, bias, dyn * 1.5, w, 3, 0.4, 4.0, check_inputs=False, split=True)
        return r.gate.square().sum() + r.variation.sum()

    f(dyn, w).backward()
    assert dyn.grad.abs().sum() > 0 and w.grad.abs().sum() > 0


def test_split_configurations_compile_for_sm90_without_spills():
    cases = [c for c in compile_cases() if c.name.startswith("scores_split_")]
    assert {c.name for c in cases} >= {"scores_split_logits_bf16_h16", "scores_split_select_b16_w1"}
    assert_compiles_without_spills(cases)


@pytest.mark.gpu
@pytest.mark.parametrize("n, heads, width", [(49, 12, 768), (196, 12, 768), (256, 16, 1024)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_on_gpu_model_shapes(n, heads, width, dtype):
    u, keys, bias, dyn, w = scoring_inputs(384, n, width, heads, dtype, device="cuda")
    split = patch_scores(u, keys, bias, dyn, w, 6, 0.4, 4.0, split=True)
    one_pass = patch_scores(u, keys, bias, dyn, w, 6, 0.4, 4.0, split=False)
    truth = patch_scores_reference(u.double(), keys.double(), bias.double(), dyn.double(), w.double(), 6, 0.4, 4.0)
    plain = patch_scores_reference(u.float(), keys, bias, dyn, w, 6, 0.4, 4.0)
    for name in FIELDS:
        assert_within_rule(getattr(split, name), getattr(plain, name), getattr(truth, name), name)
        torch.testing.assert_close(getattr(split, name), getattr(one_pass, name), rtol=2e-5, atol=1e-6)
    if _clear_cut(truth.score, 6):
        assert torch.equal(split.topk_idx, truth.topk_idx)


@pytest.mark.gpu
def test_on_gpu_split_is_faster_at_vit_b16():
    """The point of the variant: at N = 196 (384 frames, bf16) the split forward beats the one-pass one."""
    from triton.testing import do_bench

    u, keys, bias, dyn, w = scoring_inputs(384, 196, 768, 12, torch.bfloat16, device="cuda")
    with torch.no_grad():
        ms = {split: do_bench(lambda: patch_scores(u, keys, bias, dyn, w, 6, 0.4, 4.0, check_inputs=False, split=split))
              for split in (False, True)}
    assert ms[True] < ms[False], f"split {ms[True]:.3f} ms, one pass {ms[False]:.3f} ms"
