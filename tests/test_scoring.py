"""patch_scores: the fused scoring kernel (on CUDA, or the interpreter on CPU) against float64 PyTorch."""
import pytest
import torch

from stop_fast.kernels import patch_scores
from stop_fast.kernels.scoring import compile_cases, patch_scores_reference

from kernel_checks import DEVICE, assert_compiles_without_spills, assert_within_rule, scoring_inputs


def _gap_ok(score, k):
    """Top-k sets can legitimately differ at near-ties (SPEC); only compare clear-cut inputs."""
    if k == score.shape[1]:
        return True
    s = score.sort(dim=1, descending=True).values
    return bool((s[:, k - 1] - s[:, k]).min() > 1e-5)


def _compare(frames, n, width, heads, k, dtype, seed, with_w=True, alpha=0.4, beta=4.0):
    u, keys, bias, dyn, w = scoring_inputs(frames, n, width, heads, dtype, seed, with_w)
    fast = patch_scores(u, keys, bias, dyn, w, k, alpha, beta)
    truth = patch_scores_reference(u.double(), keys.double(), bias.double(), dyn.double(),
                                   w.double() if w is not None else None, k, alpha, beta)
    plain = patch_scores_reference(u, keys, bias, dyn, w, k, alpha, beta)
    assert _gap_ok(truth.score, k), "pick another seed: near-tie in the score"
    assert torch.equal(fast.topk_idx, truth.topk_idx)
    assert fast.topk_idx.dtype == torch.int64
    for name in ("attn", "dyn", "score", "gate", "variation"):
        a, p, t = getattr(fast, name), getattr(plain, name), getattr(truth, name)
        if t is None:
            assert a is None
            continue
        assert a.dtype == torch.float32
        assert_within_rule(a, p, t, name)

    dg = torch.randn(frames, k, device=DEVICE)
    dv = torch.randn(frames, device=DEVICE)
    leaves = [dyn] + ([w] if w is not None else [])

    g_fast = torch.autograd.grad((fast.gate * dg).sum() + ((fast.variation * dv).sum() if w is not None else 0), leaves)
    g_plain = torch.autograd.grad((plain.gate * dg).sum() + ((plain.variation * dv).sum() if w is not None else 0), leaves)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    t64 = patch_scores_reference(u.double(), keys.double(), bias.double(), leaves64[0],
                                 leaves64[1] if w is not None else None, k, alpha, beta)
    g_truth = torch.autograd.grad((t64.gate * dg.double()).sum() + ((t64.variation * dv.double()).sum() if w is not None else 0), leaves64)
    scale = max(t.abs().max().item() for t in g_truth)
    for name, a, p, t in zip(("d dyn_logits", "d inter_logits"), g_fast, g_plain, g_truth):
        assert_within_rule(a, p, t, name, scale=scale)


@pytest.mark.parametrize("n, width, heads, k", [(49, 128, 4, 6), (49, 64, 2, 1), (16, 64, 2, 16), (9, 128, 4, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_forward_and_backward_against_float64(n, width, heads, k, dtype):
    """u in each dtype (bf16 too: the kernel's dot takes u upcast to fp32, also in the interpreter)."""
    _compare(frames=7, n=n, width=width, heads=heads, k=k, dtype=dtype, seed=n + k)


@pytest.mark.parametrize("triton", [True, False])
def test_bf16_autocast_leaves_the_chain_in_fp32(triton, monkeypatch):
    """SPEC "Numerics": under autocast the chain is fp32 in every path, the PyTorch implementation
    included (autocast off inside, inputs upcast): the same result as without autocast."""
    if not triton:
        monkeypatch.setenv("STOP_FAST_DISABLE_TRITON", "1")
    u, keys, bias, dyn, w = scoring_inputs(5, 49, 64, 4, torch.bfloat16, seed=11)
    plain = patch_scores(u, keys, bias, dyn, w, 6, 0.4, 4.0)
    with torch.autocast(u.device.type, dtype=torch.bfloat16):
        mixed = patch_scores(u, keys, bias, dyn, w, 6, 0.4, 4.0)
    for name in ("attn", "dyn", "score", "gate", "variation"):
        assert getattr(mixed, name).dtype == torch.float32, name
        torch.testing.assert_close(getattr(mixed, name), getattr(plain, name), rtol=0, atol=0)
    assert torch.equal(mixed.topk_idx, plain.topk_idx)


def test_without_inter_logits_and_extreme_alpha():
    _compare(frames=5, n=49, width=64, heads=2, k=6, dtype=torch.float32, seed=3, with_w=False)
    _compare(frames=5, n=16, width=64, heads=2, k=3, dtype=torch.float32, seed=4, alpha=1.0, beta=0.0)
    _compare(frames=5, n=16, width=64, heads=2, k=3, dtype=torch.float32, seed=5, alpha=0.0)


def test_exact_ties_go_to_the_lower_index():
    frames, n, width, heads, k = 3, 16, 64, 2, 5
    u = torch.randn(frames, n + 1, width, device=DEVICE)
    # zero keys make every logit equal to its head's bias, so A is exactly
    # uniform (a dot product of identical rows may round differently at different rows)
    keys, bias = torch.zeros(heads, width, device=DEVICE), torch.randn(heads, device=DEVICE)
    dyn = torch.zeros(frames, n, device=DEVICE)
    dyn[:, [3, 7, 11]] = 1.0  # three equal winners, then thirteen equal patches
    out = patch_scores(u, keys, bias, dyn, torch.randn(frames, n, device=DEVICE), k, 0.4, 4.0)
    assert out.topk_idx.tolist() == [[3, 7, 11, 0, 1]] * frames
    ref = patch_scores_reference(u, keys, bias, dyn, None, k, 0.4, 4.0)
    assert torch.equal(out.topk_idx, ref.topk_idx)


def test_gate_sums_to_k_and_attention_leaves_mass_to_cls():
    u, keys, bias, dyn, w = scoring_inputs(4, 49, 128, 4)
    out = patch_scores(u, keys, bias, dyn, w, 6, 0.4, 4.0)
    torch.testing.assert_close(out.gate.sum(dim=1), torch.full((4,), 6.0, device=DEVICE))
    assert torch.all(out.attn.sum(dim=1) < 1) and torch.all(out.attn > 0)
    torch.testing.assert_close(out.dyn.sum(dim=1), torch.ones(4, device=DEVICE))


def test_gradcheck_float64_through_the_pytorch_path():
    u, keys, bias, dyn, w = scoring_inputs(3, 9, 16, 2, dtype=torch.float64, device="cpu")
    dyn, w = dyn.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    keys, bias = keys.double(), bias.double()

    def f(d, ww):
        r = patch_scores(u, keys, bias, d, ww, 3, 0.4, 4.0)
        return r.gate, r.variation

    assert torch.autograd.gradcheck(f, (dyn, w))


def test_torch_compile_traces_it_without_graph_breaks():
    u, keys, bias, dyn, w = scoring_inputs(4, 16, 64, 2)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(dyn, w):
        r = patch_scores(u, keys, bias, dyn * 1.5, w, 3, 0.4, 4.0, check_inputs=False)
        return r.gate.square().sum() + r.variation.sum()

    f(dyn, w).backward()
    assert dyn.grad.abs().sum() > 0 and w.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(k=17), "k must be an int in 1..N = 16"),
        (dict(k=0), "k must be an int in 1..N"),
        (dict(alpha=1.5), "alpha"),
        (dict(beta=-1.0), "beta"),
        (dict(u=torch.randn(4, 16, 64)), "dyn_logits must be a float tensor \\(4, 15\\)"),
        (dict(u=torch.randn(4, 17)), "u must be a float tensor"),
        (dict(u=torch.randint(0, 3, (4, 17, 64))), "u must be a float tensor"),
        (dict(keys=torch.randn(2, 32)), "cls_keys"),
        (dict(bias=torch.randn(3)), "cls_bias"),
        (dict(dyn=torch.randn(4, 15)), "dyn_logits"),
        (dict(w=torch.randn(4, 15)), "inter_logits"),
        (dict(dyn=torch.full((4, 16), float("nan"))), "dyn_logits contains NaN"),
        (dict(u=torch.randn(4, 64, 17).transpose(1, 2)), "u must be contiguous"),
    ],
)
def test_bad_input_is_refused_before_launch(change, match):
    u, keys, bias, dyn, w = scoring_inputs(4, 16, 64, 2, device="cpu")
    args = dict(u=u, keys=keys, bias=bias, dyn=dyn, w=w, k=3, alpha=0.4, beta=4.0)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        patch_scores(args["u"], args["keys"], args["bias"], args["dyn"], args["w"], args["k"], args["alpha"], args["beta"])


def test_every_shipped_configuration_compiles_for_sm90_without_spills():
    assert_compiles_without_spills(compile_cases())


@pytest.mark.gpu
@pytest.mark.parametrize("n, heads, width", [(49, 12, 768), (196, 12, 768), (256, 16, 1024)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_on_gpu_model_shapes(n, heads, width, dtype):
    u, keys, bias, dyn, w = scoring_inputs(64, n, width, heads, dtype, device="cuda")
    fast = patch_scores(u, keys, bias, dyn, w, 6, 0.4, 4.0)
    truth = patch_scores_reference(u.double(), keys.double(), bias.double(), dyn.double(), w.double(), 6, 0.4, 4.0)
    plain = patch_scores_reference(u.float(), keys, bias, dyn, w, 6, 0.4, 4.0)
    for name in ("attn", "score", "gate", "variation"):
        assert_within_rule(getattr(fast, name), getattr(plain, name), getattr(truth, name), name)
    if _gap_ok(truth.score, 6):
        assert torch.equal(fast.topk_idx, truth.topk_idx)
