"""pack_sequences: the packed sequence build (on CUDA, or the interpreter on CPU) against float64 PyTorch."""
import pytest
import torch

from stop_fast.kernels import cu_seqlens_from_counts, pack_sequences
from stop_fast.kernels.packing import compile_cases, pack_sequences_reference

from kernel_checks import DEVICE, assert_compiles_without_spills, assert_within_rule, packing_inputs


def _compare(frames, n, width, k, rho, dtype, counts="random", seed=0):
    z, c, idx, gate, intra, inter = packing_inputs(frames, n, width, k, rho, dtype, counts, seed)
    cu, total, max_seqlen = cu_seqlens_from_counts(c, n + 1)
    assert total == frames * (n + 1) + int(c.sum()) and max_seqlen == n + 1 + (int(c.max()) if frames else 0)
    out = pack_sequences(z, c, cu, total, idx, gate, intra, inter)
    assert out.shape == (total, width) and out.dtype == dtype

    diff = [t for t in (z, gate, intra, inter) if t is not None]
    leaves64 = [t.detach().double().requires_grad_() for t in diff]
    lookup = dict(zip([id(t) for t in diff], leaves64))
    as64 = lambda t: lookup[id(t)] if t is not None else None  # noqa: E731
    truth = pack_sequences_reference(as64(z), c, cu, total, idx, as64(gate), as64(intra), as64(inter))
    plain = pack_sequences_reference(z, c, cu, total, idx, gate, intra, inter)
    assert_within_rule(out, plain, truth, "packed")

    dx = torch.randn(total, width, device=DEVICE).to(dtype)
    g_fast = torch.autograd.grad(out, diff, dx)
    g_plain = torch.autograd.grad(plain, diff, dx)
    g_truth = torch.autograd.grad(truth, leaves64, dx.double())
    for name, a, p, t in zip(("dz", "dgate", "dintra", "dinter") if k else ("dz", "dinter"), g_fast, g_plain, g_truth):
        assert a.dtype == p.dtype
        assert_within_rule(a, p, t, name)


@pytest.mark.parametrize("n, width, k, rho", [(49, 128, 6, 12), (16, 64, 1, 4), (16, 64, 16, 4), (49, 64, 6, 0), (16, 128, 0, 12), (16, 64, 0, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_forward_and_backward_against_float64(n, width, k, rho, dtype):
    _compare(frames=6, n=n, width=width, k=k, rho=rho, dtype=dtype, seed=n + k + rho)


@pytest.mark.parametrize("counts", ["zero", "full"])
def test_all_counts_zero_and_all_counts_rho(counts):
    _compare(frames=5, n=16, width=64, k=3, rho=12, dtype=torch.float32, counts=counts)


def test_single_frame_and_layout():
    z, c, idx, gate, intra, inter = packing_inputs(2, 4, 64, 2, 3, counts="random", seed=1)
    c = torch.tensor([3, 1], dtype=torch.int32, device=DEVICE)
    cu, total, _ = cu_seqlens_from_counts(c, 5)
    assert cu.tolist() == [0, 8, 14] and total == 14
    out = pack_sequences(z, c, cu, total, idx, gate, intra, inter)
    torch.testing.assert_close(out[0], z[0, 0])  # CLS first
    torch.testing.assert_close(out[5:8], inter[0].detach())  # then the frame's n_t temporal tokens
    torch.testing.assert_close(out[13], inter[1, 0].detach())
    j = int(idx[1, 0])
    torch.testing.assert_close(out[8 + 1 + j], (z[1, 1 + j] + gate[1, 0] * intra[1, 0]).detach())


def test_gradcheck_float64_through_the_pytorch_path():
    z, c, idx, gate, intra, inter = packing_inputs(3, 5, 4, 2, 3, device="cpu")
    leaves = [t.detach().double().requires_grad_() for t in (z, gate, intra, inter)]
    cu, total, _ = cu_seqlens_from_counts(c, 6)
    assert torch.autograd.gradcheck(lambda a, b, d, e: pack_sequences(a, c, cu, total, idx, b, d, e), leaves)


def test_torch_compile_traces_it_without_graph_breaks():
    z, c, idx, gate, intra, inter = packing_inputs(4, 16, 64, 3, 4)
    cu, total, _ = cu_seqlens_from_counts(c, 17)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(z, gate, intra, inter):
        return pack_sequences(z * 2, c, cu, total, idx, gate, intra, inter, check_inputs=False).square().sum()

    f(z, gate, intra, inter).backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (z, gate, intra, inter))


def test_unchecked_bad_counts_stay_in_bounds():
    """check_inputs=False with counts above rho: the kernel clamps, never reads past `inter`."""
    z, c, idx, gate, intra, inter = packing_inputs(3, 8, 64, 2, 2)
    bad = torch.tensor([5, 0, 2], dtype=torch.int32, device=DEVICE)  # the kernel clamps: Triton, not PyTorch
    cu, total, _ = cu_seqlens_from_counts(bad, 9)
    out = pack_sequences(z, bad, cu, total, idx, gate, intra, inter, check_inputs=False)
    assert out.shape == (total, 64)
    torch.testing.assert_close(out[9:11], inter[0].detach())


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(counts=torch.tensor([1, 2, 9, 0], dtype=torch.int32)), "counts must lie in 0..4"),
        (dict(counts=torch.zeros(4)), "counts must be an integer tensor"),
        (dict(cu=torch.zeros(5, dtype=torch.int64)), "cu_seqlens must be an int32"),
        (dict(cu=torch.arange(5, dtype=torch.int32)), "cu_seqlens does not match counts"),
        (dict(total=3), "total_tokens"),
        (dict(idx=torch.full((4, 2), 16)), "topk_idx values must lie in 0..15"),
        (dict(idx=torch.zeros(4, 2, dtype=torch.int64)), "must not repeat"),
        (dict(idx=torch.zeros(4, 2, dtype=torch.int32)), "topk_idx must be int64"),
        (dict(gate=None), "given together"),
        (dict(intra=torch.randn(4, 2, 32)), "intra must be a float tensor"),
        (dict(inter=torch.randn(4, 4, 32)), "inter must be a float tensor"),
        (dict(z=torch.randn(4, 17)), "z must be a float tensor"),
        (dict(z=torch.randn(4, 64, 17).transpose(1, 2)), "z must be contiguous"),
    ],
)
def test_bad_input_is_refused_before_launch(change, match):
    z, c, idx, gate, intra, inter = packing_inputs(4, 16, 64, 2, 4, device="cpu")
    cu, total, _ = cu_seqlens_from_counts(c, 17)
    args = dict(z=z, counts=c, cu=cu, total=total, idx=idx, gate=gate, intra=intra, inter=inter)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        pack_sequences(args["z"], args["counts"], args["cu"], args["total"], args["idx"], args["gate"], args["intra"], args["inter"])


def test_every_shipped_configuration_compiles_for_sm90_without_spills():
    assert_compiles_without_spills(compile_cases())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_on_gpu_vit_b32_shapes(dtype):
    z, c, idx, gate, intra, inter = packing_inputs(384, 49, 768, 6, 12, dtype, device="cuda")
    z, c, idx, gate, intra, inter = [t.detach() for t in (z, c, idx, gate, intra, inter)]
    cu, total, _ = cu_seqlens_from_counts(c, 50)
    out = pack_sequences(z, c, cu, total, idx, gate, intra, inter)
    truth = pack_sequences_reference(z.double(), c, cu, total, idx, gate.double(), intra.double(), inter.double())
    plain = pack_sequences_reference(z, c, cu, total, idx, gate, intra, inter)
    assert_within_rule(out, plain, truth, "packed")
