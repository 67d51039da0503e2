"""The short multi-block attention backward (kernel variant ``attn_bwd_short``): one program per
(sequence, head) for sequences longer than one block and up to the short kernel's limit (ViT-B/16
frames, 197-209 tokens), against float64 by the 2x rule and against the default backward (delta,
dK dV and dQ kernels), through both entries, at every head dim and dtype, and at the routes' edges."""
import importlib
import random

import pytest
import torch

from stop_fast.kernels import dispatch, varlen_attention, varlen_attention_qkvpacked
from stop_fast.kernels.attention import compile_cases, varlen_attention_reference

from kernel_checks import DEVICE, assert_compiles_without_spills, assert_within_rule

attention = importlib.import_module("stop_fast.kernels.attention")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # bf16 too: the interpreter's dots upcast


def _cu(lengths, device=DEVICE):
    return torch.tensor([0] + torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist(), dtype=torch.int32,
                        device=device)


def _run(qkv, cu, max_len, do, short, packed=False, scale=None):
    if packed:
        qkv = qkv.detach().requires_grad_()
        out = varlen_attention_qkvpacked(qkv, cu, max_len, softmax_scale=scale, short_backward=short)
        (dqkv,) = torch.autograd.grad(out, qkv, do)
        assert dqkv.shape == qkv.shape and dqkv.is_contiguous()
        return out, dqkv.unbind(1)
    q, k, v = (t.detach().requires_grad_() for t in qkv.unbind(1))
    out = varlen_attention(q, k, v, cu, max_len, softmax_scale=scale, short_backward=short)
    return out, torch.autograd.grad(out, (q, k, v), do)


def _check(lengths, heads, head_dim, dtype, packed=False, strict=False, scale=None, seed=0):
    """Forward and dq, dk, dv with the variant on: the 2x rule against float64 (``strict``: with
    flash-attention's epsilon where smaller) and agreement with the default backward; returns the
    largest difference to the default gradients, relative to the largest true gradient."""
    g = torch.Generator().manual_seed(seed)
    cu = _cu(lengths)
    total = int(cu[-1])
    qkv = (torch.randn(total, 3, heads, head_dim, generator=g) * 1.5).to(DEVICE, dtype)
    do = torch.randn(total, heads, head_dim, generator=g).to(DEVICE, dtype)
    max_len = max(lengths, default=0)
    out, grads = _run(qkv, cu, max_len, do, short=True, packed=packed, scale=scale)
    out_default, grads_default = _run(qkv, cu, max_len, do, short=False, packed=packed, scale=scale)
    assert torch.equal(out, out_default)  # the variant changes the backward only

    leaves64 = [t.detach().double().requires_grad_() for t in qkv.unbind(1)]
    truth = varlen_attention_reference(*leaves64, cu, scale)
    truth_grads = torch.autograd.grad(truth, leaves64, do.double())
    leaves = [t.detach().requires_grad_() for t in qkv.unbind(1)]
    plain = varlen_attention_reference(*leaves, cu, scale)
    plain_grads = torch.autograd.grad(plain, leaves, do)
    assert_within_rule(out, plain, truth, "out")
    grad_scale = max((t.abs().max().item() for t in truth_grads if t.numel()), default=0.0)
    worst = 0.0
    for name, a, b, p, t in zip("qkv", grads, grads_default, plain_grads, truth_grads):
        assert a.dtype == dtype and a.shape == t.shape
        assert torch.isfinite(a).all()
        assert_within_rule(a, p, t, f"d{name}", scale=grad_scale, strict=strict)
        if a.numel():
            worst = max(worst, (a.double() - b.double()).abs().max().item() / max(grad_scale, 1e-30))
    return worst


def _short_range(dtype, head_dim):
    """(single-pass limit, short kernel limit): the variant's kernel takes lengths in between."""
    return attention._fused_limit(dtype, head_dim), attention._short_limit(dtype, head_dim)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_vit_b16_frame_lengths(dtype):
    """STOP's ViT-B/16 frames, 197 + n_t tokens with n_t in 0..12 (a 256-row query tile), head dim 64,
    with flash-attention's epsilon. (fp32's short limit is 64 tokens at head dim 64: there such frames
    keep the blockwise kernels.)"""
    worst = _check([197 + n for n in (12, 0, 5)], heads=2, head_dim=64, dtype=dtype, strict=True)
    assert worst < {torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]


@pytest.mark.parametrize("head_dim", [16, 32, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_head_dim_across_the_three_routes(head_dim, dtype):
    """Lengths at each route's edges: single pass (<= one block, empty and 1 included), the short
    kernel (one block + 1 .. its limit, the limit itself) and the blockwise kernels past it."""
    lo, hi = _short_range(dtype, head_dim)
    if hi == 0:  # fp32 at head dim 128: no short tile fits without spills; the variant changes nothing
        hi = lo
    lengths = [0, 1, lo, lo + 1, hi, hi + 1, (lo + hi) // 2 + 3]
    random.Random(head_dim).shuffle(lengths)
    _check(lengths, heads=1, head_dim=head_dim, dtype=dtype, seed=head_dim)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_qkvpacked_entry(dtype):
    _check([130, 2, 0, 209, 64, 65], heads=2, head_dim=32, dtype=dtype, packed=True, seed=3)


def test_random_lengths_and_custom_scale():
    rng = random.Random(5)
    for i, dtype in enumerate(DTYPES):
        head_dim = rng.choice([16, 32, 64])
        lo, hi = _short_range(dtype, head_dim)
        lengths = [rng.randint(lo + 1, hi) for _ in range(2)] + [rng.randint(0, hi + 40)]
        _check(lengths, heads=2, head_dim=head_dim, dtype=dtype, scale=0.2, seed=10 + i)


def test_one_sequence_of_the_longest_length():
    """A single sequence exactly at the short kernel's limit (the whole query tile used)."""
    _check([256], heads=1, head_dim=64, dtype=torch.float16, strict=True, seed=4)


def test_without_multi_block_sequences_the_variant_changes_nothing():
    """Every sequence up to one block: the single-pass kernel alone, bit for bit the same gradients;
    an empty batch and one of only empty sequences run too."""
    cu = _cu([50, 62, 0, 1])
    qkv = torch.randn(113, 3, 2, 64, device=DEVICE).to(torch.float16)
    do = torch.randn(113, 2, 64, device=DEVICE).to(torch.float16)
    a = _run(qkv, cu, 62, do, short=True)[1]
    b = _run(qkv, cu, 62, do, short=False)[1]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    for lengths in ([], [0, 0]):
        cu = _cu(lengths)
        qkv = torch.randn(0, 3, 2, 32, device=DEVICE, requires_grad=True)
        out = varlen_attention_qkvpacked(qkv, cu, 0, short_backward=True)
        out.sum().backward()
        assert qkv.grad.shape == qkv.shape


def test_fp32_head_dim_128_keeps_the_blockwise_kernels(monkeypatch):
    assert attention._short_limit(torch.float32, 128) == 0
    launched = []
    tuned = attention._tuned

    def spy(kernel, *args):
        launched.append(kernel)
        return tuned(kernel, *args)

    monkeypatch.setattr(attention, "_tuned", spy)
    cu = _cu([40, 9])
    qkv = torch.randn(49, 3, 1, 128, device=DEVICE, requires_grad=True)
    varlen_attention_qkvpacked(qkv, cu, 40, short_backward=True).sum().backward()
    assert "bwd_short" not in launched and "bwd_dkdv" in launched


def test_unchecked_cu_seqlens_are_clamped_in_the_short_kernel():
    """check_inputs=False: a bound past total_tokens is read as total_tokens; the clamped 80-token
    sequence is the short kernel's and must come out as attention over rows 70:150."""
    qkv = torch.randn(150, 3, 2, 32, device=DEVICE, dtype=torch.float16, requires_grad=True)
    bad = torch.tensor([0, 70, 1000], dtype=torch.int32, device=DEVICE)
    do = torch.randn(150, 2, 32, device=DEVICE, dtype=torch.float16)
    out = varlen_attention_qkvpacked(qkv, bad, 930, check_inputs=False, short_backward=True)
    (grad,) = torch.autograd.grad(out, qkv, do)
    good = varlen_attention_qkvpacked(qkv, _cu([70, 80]), 80, short_backward=False)
    (grad_good,) = torch.autograd.grad(good, qkv, do)
    torch.testing.assert_close(out, good, rtol=0, atol=0)
    torch.testing.assert_close(grad, grad_good, rtol=2e-3, atol=2e-3)


def test_the_switch_reaches_the_backward(monkeypatch):
    """short_backward=None follows STOP_FAST_KERNEL_VARIANTS (off by default); the keyword wins; the
    choice made at the forward call is the one its backward uses."""
    seen = []
    launch = attention._launch_backward

    def spy(*args):
        seen.append(args[-1])
        return launch(*args)

    monkeypatch.setattr(attention, "_launch_backward", spy)
    monkeypatch.delenv(dispatch.VARIANTS_ENV, raising=False)
    cu = _cu([70, 5])
    qkv = torch.randn(75, 3, 1, 16, device=DEVICE, dtype=torch.float16, requires_grad=True)

    def step(**kw):
        varlen_attention_qkvpacked(qkv, cu, 70, **kw).sum().backward()
        varlen_attention(*qkv.unbind(1), cu, 70, **kw).sum().backward()

    step()
    with dispatch.kernel_variants("attn_bwd_short"):
        step()
        step(short_backward=False)
        out = varlen_attention(*qkv.unbind(1), cu, 70)  # forward under the variant ...
    out.sum().backward()  # ... backward after it: still the variant's
    step(short_backward=True)
    assert seen == [False, False, True, True, False, False, True, True, True]


def test_torch_compile_traces_it_without_graph_breaks():
    cu = _cu([70, 3])
    qkv = torch.randn(73, 3, 2, 16, device=DEVICE, requires_grad=True)

    def f(qkv, short):
        return (varlen_attention_qkvpacked(qkv * 2, cu, 70, check_inputs=False, short_backward=short) ** 2).sum()

    compiled = torch.compile(lambda x: f(x, True), fullgraph=True, backend="aot_eager")
    (grad,) = torch.autograd.grad(compiled(qkv), qkv)
    (eager,) = torch.autograd.grad(f(qkv, False), qkv)
    torch.testing.assert_close(grad, eager, rtol=1e-4, atol=1e-5)


def test_compile_cases_cover_every_short_config():
    names = {case.name for case in compile_cases()}
    for head_dim in attention.HEAD_DIMS:
        for dtype, t in ((torch.float32, "fp32"), (torch.float16, "fp16"), (torch.bfloat16, "bf16")):
            seqs = attention._short_seqs(dtype, head_dim)
            assert (dtype != torch.float32 or head_dim < 128) == bool(seqs)
            if dtype != torch.float32:
                assert max(seqs) >= (256 if head_dim <= 64 else 128)  # ViT-B/16's 197-209 tokens at d <= 64
            for seq in seqs:
                assert seq > attention._fused_limit(dtype, head_dim)
                for bn, w, s in attention._gpu_short_candidates(dtype, head_dim, seq):
                    assert f"attn_bwd_short_d{head_dim}_{t}_s{seq}n{bn}w{w}s{s}" in names


def test_short_configurations_compile_for_sm90_without_spills():
    assert_compiles_without_spills([c for c in compile_cases() if c.name.startswith("attn_bwd_short_")])


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim, dtype", [(16, torch.bfloat16), (32, torch.bfloat16), (64, torch.bfloat16),
                                             (128, torch.bfloat16), (64, torch.float16), (128, torch.float16),
                                             (64, torch.float32), (32, torch.float32)])
def test_on_gpu_vit_b16_shapes(head_dim, dtype):
    """Real tensor cores (bf16 dots the interpreter only emulates), each head dim, and the model's
    ViT-B/16 lengths among short, one-block and past-the-limit sequences (each autotuned once)."""
    rng = random.Random(head_dim)
    lengths = [rng.randint(197, 209) for _ in range(64)] + [1, 0, 50, 100, 257, 300]
    _check(lengths, heads=4, head_dim=head_dim, dtype=dtype)
    _check(lengths[:64], heads=4, head_dim=head_dim, dtype=dtype, packed=True)


@pytest.mark.gpu
def test_on_gpu_short_backward_is_faster_at_vit_b16():
    """The point of the variant: a ViT-B/16 batch (384 frames of 197-209 tokens, 12 heads x 64, bf16)."""
    from triton.testing import do_bench

    rng = random.Random(16)
    cu = _cu([rng.randint(197, 209) for _ in range(384)], device="cuda")
    total = int(cu[-1])
    qkv = torch.randn(total, 3, 12, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    do = torch.randn(total, 12, 64, device="cuda", dtype=torch.bfloat16)
    ms = {}
    for short in (False, True):
        out = varlen_attention_qkvpacked(qkv, cu, 209, check_inputs=False, short_backward=short)
        ms[short] = do_bench(lambda: torch.autograd.grad(out, qkv, do, retain_graph=True))
    assert ms[True] < ms[False], f"short {ms[True]:.3f} ms, default {ms[False]:.3f} ms"
