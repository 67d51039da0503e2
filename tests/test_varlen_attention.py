"""varlen_attention: Triton (interpreter on CPU) against float64 and plain PyTorch, forward and backward."""
import importlib
import math
import random

import pytest
import torch

from stop_fast.kernels import varlen_attention
from stop_fast.kernels.attention import compile_cases, varlen_attention_reference

from kernel_checks import assert_compiles_without_spills, assert_within_rule

va_module = importlib.import_module("stop_fast.kernels.attention")


def _cu(lengths, device="cpu"):
    return torch.tensor([0] + torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist(), dtype=torch.int32,
                        device=device)


def _check(lengths, heads, head_dim, dtype, device="cpu", scale=None):
    """Forward and dq, dk, dv of the kernel against float64, with the tolerance rule."""
    cu = _cu(lengths, device)
    total = int(cu[-1])
    q, k, v = [(torch.randn(total, heads, head_dim, device=device) * 1.5).to(dtype).requires_grad_() for _ in range(3)]
    do = torch.randn(total, heads, head_dim, device=device).to(dtype)
    out = varlen_attention(q, k, v, cu, max(lengths), softmax_scale=scale)
    grads = torch.autograd.grad(out, (q, k, v), do)

    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    truth = varlen_attention_reference(*leaves64, cu, scale)
    truth_grads = torch.autograd.grad(truth, leaves64, do.double())
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    plain = varlen_attention_reference(*leaves, cu, scale)
    plain_grads = torch.autograd.grad(plain, leaves, do)

    assert out.dtype == dtype and out.shape == q.shape
    assert_within_rule(out, plain, truth, "out")
    # one scale for the three gradients: a length-1 sequence has dq = 0 exactly
    grad_scale = max(t.abs().max().item() for t in truth_grads)
    for name, g, p, t in zip("qkv", grads, plain_grads, truth_grads):
        assert g.dtype == dtype
        assert_within_rule(g, p, t, f"d{name}", scale=grad_scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_lengths_and_head_dims(dtype, seed):
    """Lengths 1..300 (several blocks), a length-1 and an empty sequence, a random head dim."""
    rng = random.Random(seed)
    lengths = [rng.randint(1, 300), rng.randint(1, 120), rng.randint(1, 64), 1, 0, 2]
    rng.shuffle(lengths)
    _check(lengths, heads=2, head_dim=rng.choice([32, 64, 128]), dtype=dtype)


def test_single_long_sequence_spans_several_blocks():
    _check([300], heads=1, head_dim=32, dtype=torch.float32)


def test_single_sequence_of_one_token_and_custom_scale():
    _check([1], heads=3, head_dim=16, dtype=torch.float32, scale=0.3)


def test_vit_frame_lengths():
    """STOP's ragged frames: 50 + n_t tokens with n_t in 0..12, all n_t = 0 and all n_t = rho."""
    for lengths in ([50 + n for n in (0, 12, 5, 7, 0, 3)], [50] * 4, [62] * 4):
        _check(lengths, heads=2, head_dim=64, dtype=torch.float16)


def test_empty_batch_and_only_empty_sequences():
    for lengths in ([], [0, 0]):
        cu = _cu(lengths)
        q, k, v = [torch.randn(0, 2, 32, requires_grad=True) for _ in range(3)]
        out = varlen_attention(q, k, v, cu, 0)
        assert out.shape == (0, 2, 32)
        out.sum().backward()
        assert q.grad.shape == q.shape


def test_logsumexp_of_the_forward_op():
    """The op's second output, saved for backward: logsumexp of the scaled scores, in log2 units."""
    cu = _cu([7, 1, 20])
    q, k, v = [torch.randn(28, 2, 32) for _ in range(3)]
    out, lse = torch.ops.stop_fast.varlen_attention(q, k, v, cu, 20, 0.25)
    assert lse.dtype == torch.float32 and lse.shape == (28, 2)
    truth = torch.empty(28, 2, dtype=torch.float64)
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        s = torch.einsum("ihd,jhd->ihj", q[a:b].double(), k[a:b].double()) * 0.25
        truth[a:b] = s.logsumexp(-1)
    torch.testing.assert_close(lse.double() * math.log(2), truth, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, varlen_attention_reference(q, k, v, cu, 0.25), rtol=1e-5, atol=1e-5)


def test_no_attention_across_sequences():
    cu = _cu([5, 7])
    q, k, v = [torch.randn(12, 2, 32) for _ in range(3)]
    out = varlen_attention(q, k, v, cu, 7)
    v2 = v.clone()
    v2[5:] = torch.randn(7, 2, 32)  # change the second sequence only
    k2 = k.clone()
    k2[5:] = torch.randn(7, 2, 32)
    out2 = varlen_attention(q, k2, v2, cu, 7)
    torch.testing.assert_close(out2[:5], out[:5], rtol=0, atol=0)
    assert (out2[5:] - out[5:]).abs().max() > 1e-3


def test_strided_views_of_a_fused_qkv_projection():
    cu = _cu([9, 4])
    qkv = torch.randn(13, 3, 2, 32, requires_grad=True)
    q, k, v = qkv.unbind(1)  # non-contiguous views, last dim contiguous
    do = torch.randn(13, 2, 32)
    out = varlen_attention(q, k, v, cu, 9)
    (grad,) = torch.autograd.grad(out, qkv, do)
    leaf = qkv.detach().requires_grad_()
    ref = varlen_attention_reference(*(t.contiguous() for t in leaf.unbind(1)), cu)
    (ref_grad,) = torch.autograd.grad(ref, leaf, do)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5)


def test_gradcheck_float64_through_the_pytorch_dispatch(monkeypatch):
    monkeypatch.setenv("STOP_FAST_DISABLE_TRITON", "1")
    cu = _cu([3, 1, 0, 4])
    q, k, v = [torch.randn(8, 2, 16, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    assert torch.autograd.gradcheck(lambda a, b, c: varlen_attention(a, b, c, cu, 4), (q, k, v))


def test_pytorch_fallback_equals_the_kernel(monkeypatch):
    cu = _cu([17, 1, 0, 30])
    q, k, v = [torch.randn(48, 2, 32, requires_grad=True) for _ in range(3)]
    do = torch.randn(48, 2, 32)
    kernel = varlen_attention(q, k, v, cu, 30)
    kernel_grads = torch.autograd.grad(kernel, (q, k, v), do)
    monkeypatch.setenv("STOP_FAST_DISABLE_TRITON", "1")
    fallback = varlen_attention(q, k, v, cu, 30)
    fallback_grads = torch.autograd.grad(fallback, (q, k, v), do)
    torch.testing.assert_close(kernel, fallback, rtol=1e-5, atol=1e-6)
    for a, b in zip(kernel_grads, fallback_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_torch_compile_traces_it_without_graph_breaks():
    cu = _cu([6, 3])
    q, k, v = [torch.randn(9, 2, 32, requires_grad=True) for _ in range(3)]

    def f(q, k, v):
        return (varlen_attention(q * 2, k, v, cu, 6, check_inputs=False) ** 2).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    eager_loss = f(q, k, v)
    eager_grads = torch.autograd.grad(eager_loss, (q, k, v))
    torch.testing.assert_close(loss, eager_loss)
    for a, b in zip(grads, eager_grads):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b)


def test_unchecked_cu_seqlens_are_clamped_to_the_tensors():
    """check_inputs=False skips the value checks (no host sync); bounds past total_tokens must still
    not send the kernels outside q, k, v: they are clamped, here to rows 5:10."""
    q, k, v = [torch.randn(10, 2, 32) for _ in range(3)]
    out = varlen_attention(q, k, v, torch.tensor([0, 5, 1000], dtype=torch.int32), 995, check_inputs=False)
    torch.testing.assert_close(out, varlen_attention_reference(q, k, v, _cu([5, 5])), rtol=1e-5, atol=1e-6)


def _inputs(total=10, heads=2, d=32, dtype=torch.float32):
    return [torch.randn(total, heads, d, dtype=dtype) for _ in range(3)]


BAD_INPUTS = [
    (lambda a: a.update(cu=a["cu"].long()), "cu_seqlens must be int32"),
    (lambda a: a.update(cu=a["cu"].to("meta")), "cu_seqlens is on meta"),
    (lambda a: a.update(cu=torch.tensor([1, 5, 10], dtype=torch.int32)), "cu_seqlens must start at 0"),
    (lambda a: a.update(cu=torch.tensor([0, 6, 5, 10], dtype=torch.int32)), "cu_seqlens must be non-decreasing"),
    (lambda a: a.update(cu=torch.tensor([0, 5, 9], dtype=torch.int32)), "cu_seqlens must end at total_tokens = 10"),
    (lambda a: a.update(cu=torch.tensor([[0, 5, 10]], dtype=torch.int32)), "cu_seqlens must be a 1-D"),
    (lambda a: a.update(cu=torch.zeros(0, dtype=torch.int32)), "cu_seqlens must be a 1-D"),
    (lambda a: a.update(cu=torch.tensor([0, 0, 5, 0, 10], dtype=torch.int32)[::2]), "cu_seqlens must be contiguous"),
    (lambda a: a.update(max_seqlen=4), "max_seqlen = 4"),
    (lambda a: a.update(max_seqlen=5.0), "max_seqlen must be a non-negative int"),
    (lambda a: a.update(max_seqlen=-1), "max_seqlen must be a non-negative int"),
    (lambda a: a.update(k=a["k"][:, :1]), "q, k and v must have one shape"),
    (lambda a: a.update(v=a["v"].half()), "q, k and v must have one dtype"),
    (lambda a: a.update(k=a["k"].to("meta")), "q, k and v must be on one device"),
    (lambda a: a.update(q=a["q"].int()), "q must be float32, float16 or bfloat16"),
    (lambda a: a.update(q=torch.randn(10, 2, 48), k=torch.randn(10, 2, 48), v=torch.randn(10, 2, 48)), "head_dim"),
    (lambda a: a.update(q=torch.randn(10, 64, 2).transpose(1, 2)), "q must have a contiguous last dimension"),
    (lambda a: a.update(v=torch.randn(10, 32, 2).transpose(1, 2)), "v must have a contiguous last dimension"),
    (lambda a: a.update(q=a["q"][None]), "q must be a tensor \\(total_tokens, heads, head_dim\\)"),
    (lambda a: a.update(scale=float("nan")), "softmax_scale must be a finite number"),
]


@pytest.mark.parametrize("mutate, match", BAD_INPUTS)
def test_bad_input_is_refused_before_launch(mutate, match, monkeypatch):
    def launched(*args, **kwargs):
        raise AssertionError("launched on bad input")

    monkeypatch.setattr(va_module, "_attn_op", launched)
    monkeypatch.setattr(va_module, "_attention_torch", launched)
    q, k, v = _inputs()
    args = dict(q=q, k=k, v=v, cu=torch.tensor([0, 5, 10], dtype=torch.int32), max_seqlen=5, scale=None)
    mutate(args)
    with pytest.raises(ValueError, match=match):
        varlen_attention(args["q"], args["k"], args["v"], args["cu"], args["max_seqlen"], args["scale"])


def test_unchecked_values_skip_only_the_value_checks():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="cu_seqlens must be int32"):  # no host sync needed: still checked
        varlen_attention(q, k, v, torch.tensor([0, 5, 10]), 5, check_inputs=False)
    # a wrong bound of max_seqlen is the caller's promise now: no error
    varlen_attention(q, k, v, torch.tensor([0, 5, 10], dtype=torch.int32), 4, check_inputs=False)


def test_autotune_sets_collapse_to_one_config_under_the_interpreter():
    for kernel in ("fwd", "bwd_dkdv", "bwd_dq"):
        assert len(va_module._tuned(kernel, torch.float16, 64).configs) == 1
        assert len(va_module._gpu_candidates(kernel, torch.float16, 64)) > 1


def test_compile_cases_cover_every_autotune_config():
    names = {case.name for case in compile_cases()}
    for head_dim in va_module.HEAD_DIMS:
        for dtype, t in ((torch.float32, "fp32"), (torch.float16, "fp16"), (torch.bfloat16, "bf16")):
            assert f"attn_bwd_delta_d{head_dim}_{t}" in names
            for kernel in ("fwd", "bwd_dkdv", "bwd_dq"):
                for bm, bn, w, s in va_module._gpu_candidates(kernel, dtype, head_dim):
                    assert f"attn_{kernel}_d{head_dim}_{t}_m{bm}n{bn}w{w}s{s}" in names


def test_every_shipped_configuration_compiles_for_sm90_without_spills():
    assert_compiles_without_spills(compile_cases())


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_on_gpu_vit_shapes(head_dim, dtype):
    rng = random.Random(head_dim)
    lengths = [rng.randint(50, 62) for _ in range(64)] + [1, 0, 257, 269]
    _check(lengths, heads=4, head_dim=head_dim, dtype=dtype, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_on_gpu_random_lengths_up_to_300(dtype):
    rng = random.Random(7)
    lengths = [rng.randint(0, 300) for _ in range(200)] + [1, 0]
    _check(lengths, heads=12, head_dim=64, dtype=dtype, device="cuda")
