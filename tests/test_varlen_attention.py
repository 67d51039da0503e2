"""varlen_attention: Triton (interpreter on CPU) against float64 and plain PyTorch, forward and backward."""
import random

import pytest
import torch

from stop_fast.kernels import varlen_attention
from stop_fast.kernels.varlen_attention import compile_cases, varlen_attention_reference

from kernel_checks import assert_compiles_without_spills, assert_within_rule

va_module = __import__("stop_fast.kernels.varlen_attention", fromlist=["x"])


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def _check(lengths, heads, head_dim, dtype, device="cpu", scale=None):
    cu = _cu(lengths).to(device)
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
    scale = max(t.abs().max().item() for t in truth_grads)
    for name, g, p, t in zip("qkv", grads, plain_grads, truth_grads):
        assert_within_rule(g, p, t, f"d{name}", scale=scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_lengths_and_head_dims(dtype, seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 120) for _ in range(3)] + [1, 0, 2]
    rng.shuffle(lengths)
    _check(lengths, heads=2, head_dim=rng.choice([32, 64, 128]), dtype=dtype)


def test_long_sequence_spans_several_blocks():
    _check([300], heads=1, head_dim=32, dtype=torch.float32)


def test_single_sequence_of_one_token_and_custom_scale():
    _check([1], heads=3, head_dim=16, dtype=torch.float32, scale=0.3)


def test_vit_frame_lengths():
    """STOP's ragged frames: 50 + n_t tokens with n_t in 0..12, all n_t = 0 and all n_t = rho."""
    for lengths in ([50 + n for n in (0, 12, 5, 7, 0, 3)], [50] * 4, [62] * 4):
        _check(lengths, heads=2, head_dim=64, dtype=torch.float16)


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
    qkv = torch.randn(13, 3, 2, 32)
    q, k, v = qkv.unbind(1)  # non-contiguous views, last dim contiguous
    out = varlen_attention(q, k, v, cu, 9)
    ref = varlen_attention_reference(q.contiguous(), k.contiguous(), v.contiguous(), cu)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_gradcheck_float64_through_the_pytorch_dispatch(monkeypatch):
    monkeypatch.setenv("STOP_FAST_DISABLE_TRITON", "1")
    cu = _cu([3, 1, 4])
    q, k, v = [torch.randn(8, 2, 16, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    # float64 is not a Triton dtype here; the PyTorch implementation behind the same op is what runs
    monkeypatch.setattr(va_module, "DTYPES", va_module.DTYPES + (torch.float64,))
    assert torch.autograd.gradcheck(lambda a, b, c: varlen_attention(a, b, c, cu, 4), (q, k, v))


def test_pytorch_fallback_equals_the_kernel(monkeypatch):
    cu = _cu([17, 1, 30])
    q, k, v = [torch.randn(48, 2, 32) for _ in range(3)]
    kernel = varlen_attention(q, k, v, cu, 30)
    monkeypatch.setenv("STOP_FAST_DISABLE_TRITON", "1")
    fallback = varlen_attention(q, k, v, cu, 30)
    torch.testing.assert_close(kernel, fallback, rtol=1e-5, atol=1e-6)


def test_torch_compile_traces_it_without_graph_breaks():
    cu = _cu([6, 3])
    q, k, v = [torch.randn(9, 2, 32, requires_grad=True) for _ in range(3)]

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(q, k, v):
        return varlen_attention(q * 2, k, v, cu, 6, check_inputs=False).sum()

    f(q, k, v).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


def _inputs(total=10, heads=2, d=32, dtype=torch.float32):
    return [torch.randn(total, heads, d, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: a.update(cu=a["cu"].long()), "cu_seqlens must be int32"),
        (lambda a: a.update(cu=torch.tensor([1, 5, 10], dtype=torch.int32)), "start at 0"),
        (lambda a: a.update(cu=torch.tensor([0, 6, 5, 10], dtype=torch.int32)), "non-decreasing"),
        (lambda a: a.update(cu=torch.tensor([0, 5, 9], dtype=torch.int32)), "end at total_tokens = 10"),
        (lambda a: a.update(cu=torch.tensor([[0, 5, 10]], dtype=torch.int32)), "1-D"),
        (lambda a: a.update(max_seqlen=4), "max_seqlen = 4"),
        (lambda a: a.update(k=a["k"][:, :1]), "one shape"),
        (lambda a: a.update(v=a["v"].half()), "one dtype"),
        (lambda a: a.update(q=a["q"].int()), "float32, float16 or bfloat16"),
        (lambda a: a.update(q=torch.randn(10, 2, 48), k=torch.randn(10, 2, 48), v=torch.randn(10, 2, 48)), "head_dim"),
        (lambda a: a.update(q=torch.randn(10, 64, 2).transpose(1, 2)), "contiguous last dimension"),
        (lambda a: a.update(q=a["q"][None]), "total_tokens, heads, head_dim"),
        (lambda a: a.update(max_seqlen=5.0), "max_seqlen must be a non-negative int"),
    ],
)
def test_bad_input_is_refused_before_launch(mutate, match):
    q, k, v = _inputs()
    args = dict(q=q, k=k, v=v, cu=torch.tensor([0, 5, 10], dtype=torch.int32), max_seqlen=5)
    mutate(args)
    with pytest.raises(ValueError, match=match):
        varlen_attention(args["q"], args["k"], args["v"], args["cu"], args["max_seqlen"])


def test_every_shipped_configuration_compiles_for_sm90_without_spills():
    assert_compiles_without_spills(compile_cases())


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_on_gpu_vit_shapes(head_dim, dtype):
    rng = random.Random(head_dim)
    lengths = [rng.randint(50, 62) for _ in range(64)] + [1, 257, 269]
    _check(lengths, heads=4, head_dim=head_dim, dtype=dtype, device="cuda")
