"""pack_sequences writing a bucket's rows itself (``rows=``; the fast path's kernel variant
``pack_bucketed``): the same packed rows as the default launch, zeros to the bucket, the same gradients
from a (rows, D) gradient; against float64 by the 2x rule; in the fast path, the same features and
gradients as padding with F.pad."""
import importlib

import pytest
import torch
import torch.nn.functional as F

from stop_fast.kernels import cu_seqlens_from_counts, dispatch, pack_sequences
from stop_fast.kernels.packing import BLOCK_R, compile_cases, pack_sequences_reference

from kernel_checks import DEVICE, assert_compiles_without_spills, assert_within_rule, packing_inputs

packing = importlib.import_module("stop_fast.kernels.packing")


def _check(frames, n, width, k, rho, dtype, pad, counts="random", seed=0):
    """``rows = total + pad``: the packed rows equal the default launch's bit for bit, the rest are
    zeros; the gradients from a (rows, D) gradient equal the default's from its first total rows;
    both against float64 by the 2x rule."""
    z, c, idx, gate, intra, inter = packing_inputs(frames, n, width, k, rho, dtype, counts, seed)
    cu, total, _ = cu_seqlens_from_counts(c, n + 1)
    rows = total + pad
    out = pack_sequences(z, c, cu, total, idx, gate, intra, inter, rows=rows)
    default = pack_sequences(z, c, cu, total, idx, gate, intra, inter)
    assert out.shape == (rows, width) and out.dtype == dtype and out.is_contiguous()
    assert torch.equal(out[:total], default)
    assert not out[total:].any()

    diff = [t for t in (z, gate, intra, inter) if t is not None]
    leaves64 = [t.detach().double().requires_grad_() for t in diff]
    lookup = dict(zip([id(t) for t in diff], leaves64))
    as64 = lambda t: lookup[id(t)] if t is not None else None  # noqa: E731
    truth = pack_sequences_reference(as64(z), c, cu, total, idx, as64(gate), as64(intra), as64(inter), rows=rows)
    plain = pack_sequences_reference(z, c, cu, total, idx, gate, intra, inter, rows=rows)
    assert truth.shape == plain.shape == (rows, width)
    assert_within_rule(out, plain, truth, "packed")

    dx = torch.randn(rows, width, device=DEVICE).to(dtype)
    g_out = torch.autograd.grad(out, diff, dx)
    g_default = torch.autograd.grad(default, diff, dx[:total])
    g_plain = torch.autograd.grad(plain, diff, dx)
    g_truth = torch.autograd.grad(truth, leaves64, dx.double())
    names = ("dz", "dgate", "dintra", "dinter") if k else ("dz", "dinter")
    for name, a, b, p, t in zip(names, g_out, g_default, g_plain, g_truth):
        assert torch.equal(a, b), name
        assert_within_rule(a, p, t, name)


@pytest.mark.parametrize("n, width, k, rho", [(49, 128, 6, 12), (16, 64, 16, 4), (16, 64, 0, 4), (49, 64, 6, 0),
                                              (16, 64, 0, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_bucketed_rows_against_the_default_launch_and_float64(n, width, k, rho, dtype):
    _check(frames=5, n=n, width=width, k=k, rho=rho, dtype=dtype, pad=37, seed=n + k + rho)


@pytest.mark.parametrize("pad", [0, 1, BLOCK_R - 1, BLOCK_R, 203])
def test_padding_sizes(pad):
    """No padding, less than one row block, exactly one, and more than one frame's worth of padding
    programs (4 row blocks per frame here, cdiv(1 + N + rho, BLOCK_R): 203 rows are 13 blocks, so 4
    padding programs along the frames' axis, the last one partly idle)."""
    _check(frames=3, n=49, width=64, k=6, rho=12, dtype=torch.float32, pad=pad, seed=pad)


@pytest.mark.parametrize("counts", ["zero", "full"])
def test_all_counts_zero_and_all_counts_rho(counts):
    _check(frames=4, n=16, width=64, k=3, rho=12, dtype=torch.float16, pad=20, counts=counts)


def test_single_frame_and_unaligned_rows():
    """One frame; a width whose rows are not 16-byte multiples (the kernels' unaligned variant)."""
    _check(frames=1, n=9, width=64, k=2, rho=3, dtype=torch.float32, pad=9, seed=1)
    _check(frames=3, n=9, width=36, k=2, rho=3, dtype=torch.float16, pad=23, seed=2)


def test_no_frames():
    z, c, idx, gate, intra, inter = packing_inputs(0, 9, 64, 2, 3)
    cu, total, _ = cu_seqlens_from_counts(c, 10)
    out = pack_sequences(z, c, cu, total, idx, gate, intra, inter, rows=5)
    assert out.shape == (5, 64) and not out.any()


def test_rows_is_checked():
    z, c, idx, gate, intra, inter = packing_inputs(2, 9, 64, 2, 3, device="cpu")
    cu, total, _ = cu_seqlens_from_counts(c, 10)
    for bad in (total - 1, 30.0, True, -1):
        with pytest.raises(ValueError, match="rows must be an int >= total_tokens"):
            pack_sequences(z, c, cu, total, idx, gate, intra, inter, rows=bad)


def test_torch_compile_traces_it_without_graph_breaks():
    z, c, idx, gate, intra, inter = packing_inputs(4, 16, 64, 3, 4)
    cu, total, _ = cu_seqlens_from_counts(c, 17)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(z, gate, intra, inter):
        x = pack_sequences(z * 2, c, cu, total, idx, gate, intra, inter, check_inputs=False, rows=total + 40)
        return x.square().sum() + x.shape[0]

    f(z, gate, intra, inter).backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (z, gate, intra, inter))


def test_fast_path_with_the_variant_is_the_same_function(monkeypatch):
    """fast_forward(bucket=True) with "pack_bucketed": packing gets the bucket's row count and no
    F.pad runs; features and gradients as with F.pad, and as unbucketed."""
    from stop_fast.model.fast import bucket_rows, fast_forward

    from helpers import make_stop, random_video

    model = make_stop(randomize=True, seed=3, num_frames=4)
    video = random_video(model, batch=2, seed=7)
    seen = []
    pack = packing.pack_sequences

    def spy(*args, **kwargs):
        seen.append(kwargs.get("rows"))
        return pack(*args, **kwargs)

    monkeypatch.setattr("stop_fast.kernels.pack_sequences", spy)

    def run(variant):
        model.zero_grad(set_to_none=True)
        with dispatch.kernel_variants(*(["pack_bucketed"] if variant else [])):
            out = fast_forward(model, video, bucket=True)
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    out, grads = run(False)
    out_v, grads_v = run(True)
    with torch.no_grad():
        total = int(model.explain(video, impl="fast")["lengths"].sum())
    longest = 1 + model.num_patches + model.config.rho
    assert seen[:2] == [None, bucket_rows(total, longest, 8)]
    torch.testing.assert_close(out_v, out, rtol=0, atol=0)
    for name in grads:
        torch.testing.assert_close(grads_v[name], grads[name], rtol=0, atol=0)


def test_padded_cu_seqlens_match_pad_to_bucket():
    """The variant's offsets are pad_to_bucket's: the same helper computes both."""
    from stop_fast.model.fast import _bucket_cu_seqlens, pad_to_bucket

    gen = torch.Generator().manual_seed(0)
    for frames in (1, 47, 384):
        lengths = torch.randint(50, 63, (frames,), generator=gen)
        cu = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).to(torch.int32)])
        total = int(cu[-1])
        padded, cu_padded = pad_to_bucket(torch.zeros(total, 1), cu, 62)
        assert torch.equal(_bucket_cu_seqlens(cu, total, padded.shape[0]), cu_padded)


def test_bucket_rows_without_the_model_are_the_models():
    """The GPU tests and the benchmark compute the bucket without importing the model (no open_clip on
    a bare GPU machine): the same rounding as fast.bucket_rows."""
    import importlib.util
    import pathlib

    from stop_fast.model.fast import bucket_rows

    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "bench_kernel_variants.py"
    spec = importlib.util.spec_from_file_location("bench_kernel_variants", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for frames in (1, 47, 48, 100, 384, 1000):
        for total in (frames * 50, frames * 56 + 7, frames * 62):
            assert bench.bucket_rows_without_model(total, 62, frames) == bucket_rows(total, 62, frames)
            assert bench.bucket_rows_without_model(total, 209, frames) == bucket_rows(total, 209, frames)
    for total in (384 * 50, 384 * 56 + 7, 384 * 62):
        assert _vit_b32_bucket(total) == bucket_rows(total, 62, 384)


def test_pad_configurations_compile_for_sm90_without_spills():
    cases = [c for c in compile_cases() if c.name.endswith("_pad")]
    assert len(cases) == len([c for c in compile_cases() if c.name.startswith("pack_fwd_") and not c.name.endswith("_pad")])
    assert_compiles_without_spills(cases)


def _vit_b32_bucket(total: int) -> int:
    """The bucket of 384 ViT-B/32 frames (``fast.bucket_rows``: multiples of 8 frames of 62 rows),
    without importing the model (open_clip is not on a bare GPU machine)."""
    return -(-total // (8 * 62)) * 8 * 62


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_on_gpu_vit_b32_shapes(dtype):
    z, c, idx, gate, intra, inter = packing_inputs(384, 49, 768, 6, 12, dtype, device="cuda")
    cu, total, _ = cu_seqlens_from_counts(c, 50)
    rows = _vit_b32_bucket(total)
    out = pack_sequences(z, c, cu, total, idx, gate, intra, inter, rows=rows)
    padded = F.pad(pack_sequences(z, c, cu, total, idx, gate, intra, inter), (0, 0, 0, rows - total))
    assert torch.equal(out, padded)
    dx = torch.randn(rows, 768, device="cuda", dtype=dtype)
    a = torch.autograd.grad(out, [z, gate, intra, inter], dx)
    b = torch.autograd.grad(padded, [z, gate, intra, inter], dx)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.gpu
def test_on_gpu_bucketed_packing_is_faster():
    """The point of the variant: forward + backward of packing into the bucket beats pack + F.pad."""
    from triton.testing import do_bench

    z, c, idx, gate, intra, inter = packing_inputs(384, 49, 768, 6, 12, torch.bfloat16, device="cuda")
    cu, total, _ = cu_seqlens_from_counts(c, 50)
    rows = _vit_b32_bucket(total)
    dx = torch.randn(rows, 768, device="cuda", dtype=torch.bfloat16)
    leaves = [z, gate, intra, inter]

    def padded():
        x = F.pad(pack_sequences(z, c, cu, total, idx, gate, intra, inter, check_inputs=False), (0, 0, 0, rows - total))
        torch.autograd.grad(x, leaves, dx)

    def bucketed():
        x = pack_sequences(z, c, cu, total, idx, gate, intra, inter, check_inputs=False, rows=rows)
        torch.autograd.grad(x, leaves, dx)

    ms = {"pad": do_bench(padded), "bucketed": do_bench(bucketed)}
    assert ms["bucketed"] < ms["pad"], ms
