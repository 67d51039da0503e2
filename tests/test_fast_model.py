"""The fast path (packed tokens through stop_fast.kernels) against the reference path.

On a CPU these run the Triton kernels through the interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so they test the kernels inside the model, not a PyTorch stand-in.
"""
import contextlib
import copy
import warnings

import pytest
import torch

from stop_fast import kernels
from stop_fast.model.compiled import compile_encoder
from stop_fast.model.fast import (
    BUCKET_SEQUENCES,
    FRAMES_PER_STEP,
    PackedSizes,
    bucket_rows,
    cls_block,
    cls_keys,
    fast_forward,
    folded_cls_keys,
    packed_block,
    pad_to_bucket,
)

from helpers import discrete_choices_differ_only_at_near_ties, make_stop, no_tf32, random_video


@pytest.fixture(autouse=True)
def _ieee_fp32():
    with no_tf32():
        yield


def _discrete_choices_are_stable(model, video) -> bool:
    """SPEC: R and n may legitimately differ between paths at near-ties; such inputs are not compared."""
    d = model.explain(video)
    if "score" in d:
        s = d["score"].sort(dim=-1, descending=True).values
        k = model.config.k
        if k < s.shape[-1] and (s[..., k - 1] - s[..., k]).min() < 1e-5:
            return False
    if "variation" in d:
        # the per-video minimum and maximum map to 0 and just below rho in both paths; only interior
        # values can round to different counts
        v_hat = d["variation"].double()
        interior = (v_hat > 0) & (v_hat < v_hat.max(dim=1, keepdim=True).values)
        scaled = model.config.rho * v_hat
        if ((scaled - scaled.round()).abs()[interior] < 1e-5).any():
            return False
    return True


def _stable_video(model, batch, seed):
    """A random video on the model's device whose top-K sets and token counts are clear of near-ties
    (first such seed)."""
    device = model.logit_scale.device
    for attempt in range(50):
        video = random_video(model, batch=batch, seed=seed + 1000 * attempt).to(device)
        if _discrete_choices_are_stable(model, video):
            return video
    raise AssertionError("no tie-free video found in 50 seeds")


def _grads(model, video, impl, **overrides):
    model.zero_grad(set_to_none=True)
    feats = model.encode_video(video, impl=impl, **overrides)
    if model.num_trainable_parameters() == 0:
        return feats, {}
    weights = torch.linspace(-1, 1, feats.numel()).view_as(feats).to(feats)
    (feats * weights).sum().backward()
    return feats.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _global_scale(grads):
    """Epsilon relative to the largest gradient: some gradients are exactly zero in exact arithmetic
    (Conv3d_intra's bias shifts every logit of a softmax; k = 1 makes the gate constant), where either
    path's rounding is all that is left."""
    return max([g.abs().max().item() for g in grads.values()], default=0.0)


def _assert_fast_as_accurate(model, video, ref, fast, check_features=True):
    """FlashAttention's rule against a float64 run of the reference path: the fast path's error at
    most 2x the fp32 reference's, plus epsilon. ``ref`` / ``fast``: ``(features, grads)`` of ``_grads``."""
    model64 = copy.deepcopy(model).double()
    truth_feat, truth_grad = _grads(model64, video.double(), "reference")
    if check_features:
        assert _max_err(fast[0], truth_feat) <= 2 * _max_err(ref[0], truth_feat) + 1e-5
    assert set(fast[1]) == set(ref[1]) == set(truth_grad)
    scale = _global_scale(truth_grad)
    for name in truth_grad:
        assert _max_err(fast[1][name], truth_grad[name]) <= 2 * _max_err(ref[1][name], truth_grad[name]) + 1e-6 * scale, name


def _fp32_attention(q, k, v, cu_seqlens, max_seqlen):
    """stop_fast's kernel in fp32 whatever the inputs: Triton's interpreter cannot run bf16 dots."""
    return kernels.varlen_attention(q.float(), k.float(), v.float(), cu_seqlens, max_seqlen, check_inputs=False).to(q.dtype)


CONFIGS = [
    dict(),  # defaults of the tiny model: k = 6, rho = 12
    dict(k=0),
    dict(rho=0),
    dict(k=0, rho=0),
    dict(k=1, rho=3),
    dict(k=49, rho=2),  # K = N
    dict(num_frames=1),  # no temporal tokens at all
    dict(num_frames=3, rho=5),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_fast_matches_reference_features_and_gradients(cfg):
    model = make_stop(randomize=True, seed=7, **cfg)
    video = _stable_video(model, batch=2, seed=11)

    _assert_fast_as_accurate(model, video, _grads(model, video, "reference"), _grads(model, video, "fast"))


def test_fast_path_uses_the_same_token_counts():
    model = make_stop(randomize=True, seed=3, num_frames=6)
    video = _stable_video(model, batch=3, seed=5)
    counts = model.explain(video)["counts"]
    assert counts.max() > 0  # the comparison below covers ragged sequences
    torch.testing.assert_close(model.encode_video(video, impl="fast"), model.encode_video(video), rtol=0, atol=1e-5)


def test_fast_path_batch_invariance():
    model = make_stop(randomize=True, seed=2)
    video = random_video(model, batch=3, seed=9)
    together = model.encode_video(video, impl="fast")
    alone = model.encode_video(video[1:2], impl="fast")
    torch.testing.assert_close(alone[0], together[1], rtol=0, atol=2e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["stop-tiny", "ViT-B-32"])
def test_fast_matches_reference_under_bf16_autocast(name):
    """bf16 on CUDA with the real kernels: both paths get the same R and n (the override), so the
    comparison with the float64 truth (same R and n) is exact instead of gap-guarded."""
    model = make_stop(name, randomize=True, seed=1, num_frames=8, private_backbone=True).cuda()
    video = random_video(model, batch=4, seed=3).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        d = model.explain(video)
    fixed = dict(selection=d["selected"], counts=d["counts"])
    model64 = copy.deepcopy(model).double()
    truth, truth_grad = _grads(model64, video.double(), "reference", **fixed)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref, ref_grad = _grads(model, video, "reference", **fixed)
        fast, fast_grad = _grads(model, video, "fast", **fixed)
    assert _max_err(fast, truth) <= 2 * _max_err(ref, truth) + 1e-3
    # a global scale: some gradients are exactly zero in exact arithmetic (Conv3d_intra's bias shifts
    # every logit of a softmax), where both paths compare rounding noise
    scale = _global_scale(truth_grad)
    for n in truth_grad:
        assert _max_err(fast_grad[n], truth_grad[n]) <= 2 * _max_err(ref_grad[n], truth_grad[n]) + 1e-3 * scale, n


@pytest.mark.gpu
def test_fast_matches_reference_on_cuda_in_fp32():
    """The real Triton kernels on CUDA tensors in IEEE fp32 (TF32 off: see the autouse fixture)."""
    model = make_stop("stop-tiny", randomize=True, seed=5, num_frames=6, private_backbone=True).cuda()
    video = _stable_video(model, batch=3, seed=4)
    _assert_fast_as_accurate(model, video, _grads(model, video, "reference"), _grads(model, video, "fast"))


def test_fast_path_through_the_pytorch_dispatch(monkeypatch):
    """Where Triton cannot run, the same entry points run their PyTorch implementations."""
    monkeypatch.setenv("STOP_FAST_DISABLE_TRITON", "1")
    model = make_stop(randomize=True, seed=8)
    video = _stable_video(model, batch=2, seed=12)
    ref, fast = _grads(model, video, "reference"), _grads(model, video, "fast")
    torch.testing.assert_close(fast[0], ref[0], rtol=0, atol=2e-6)
    # gradients: the fast path sums the Conv3d terms in another order (one GEMM, then the 27 shifted
    # terms), so against the float64 truth
    _assert_fast_as_accurate(model, video, ref, fast, check_features=False)


# --------------------------------------------------------------------------- explain and overrides
def test_explain_fast_reports_the_fast_paths_own_values():
    model = make_stop(randomize=True, seed=3, num_frames=5)
    video = _stable_video(model, batch=2, seed=8)
    ref, fast = model.explain(video), model.explain(video, impl="fast")
    assert set(fast) == set(ref)
    for key in ("selected", "counts", "lengths"):
        assert torch.equal(fast[key], ref[key]) and fast[key].dtype == ref[key].dtype, key  # equal() ignores dtype
    truth = copy.deepcopy(model).double().explain(video.double())  # same R and n (checked below)
    for key in ("selected", "counts"):
        assert torch.equal(truth[key], ref[key]), key
    for key in ("attention", "dynamics", "score", "variation", "frame_features", "feature"):
        assert fast[key].shape == ref[key].shape and fast[key].dtype == ref[key].dtype, key
        # FlashAttention's rule against float64 (the paths sum the Conv3d terms in different orders)
        assert _max_err(fast[key], truth[key]) <= 2 * _max_err(ref[key], truth[key]) + 1e-6, key


def test_overrides_give_both_paths_the_same_choices():
    """A given R and n (not the model's own) flow through the fast path's gate, variation and packing
    exactly as through the reference path, forward and backward."""
    model = make_stop(randomize=True, seed=6, num_frames=4, k=3, rho=5)
    video = random_video(model, batch=2, seed=2)
    gen = torch.Generator().manual_seed(3)
    fixed = dict(selection=torch.stack([torch.randperm(49, generator=gen)[:3] for _ in range(8)]).view(2, 4, 3),
                 counts=torch.randint(0, 6, (2, 4), generator=gen))
    ref_feat, ref_grad = _grads(model, video, "reference", **fixed)
    fast_feat, fast_grad = _grads(model, video, "fast", **fixed)
    truth_feat, truth_grad = _grads(copy.deepcopy(model).double(), video.double(), "reference", **fixed)
    assert _max_err(fast_feat, truth_feat) <= 2 * _max_err(ref_feat, truth_feat) + 1e-5
    scale = _global_scale(truth_grad)
    for name in truth_grad:
        assert _max_err(fast_grad[name], truth_grad[name]) <= 2 * _max_err(ref_grad[name], truth_grad[name]) + 1e-6 * scale, name
    d = model.explain(video, impl="fast", **fixed)
    assert torch.equal(d["selected"], fixed["selection"]) and torch.equal(d["counts"].long(), fixed["counts"])


@pytest.mark.parametrize("dispatch", ["kernels", "pytorch"])
def test_paths_choose_the_same_R_and_n_under_bf16_autocast(dispatch, monkeypatch):
    """SPEC: both paths compute the scoring chain in fp32 from the same bf16 tokens, so under the same
    autocast they choose the same R and n for essentially every frame (differences only at near-ties)."""
    if dispatch == "pytorch":
        monkeypatch.setenv("STOP_FAST_DISABLE_TRITON", "1")
    model = make_stop(randomize=True, seed=7, num_frames=6)
    video = random_video(model, batch=4, seed=21)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model.explain(video)
        _, fast = fast_forward(model, video, record=True, attention=_fp32_attention)
    assert discrete_choices_differ_only_at_near_ties(model, ref, fast) == 0
    if dispatch == "pytorch":  # the whole bf16 fast path, with the reference's R and n: the 2x rule
        fixed = dict(selection=ref["selected"], counts=ref["counts"])
        truth = copy.deepcopy(model).double().encode_video(video.double(), **fixed)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref_feat = model.encode_video(video, **fixed)
            fast_feat = model.encode_video(video, impl="fast", **fixed)
        assert _max_err(fast_feat, truth) <= 2 * _max_err(ref_feat, truth) + 1e-3


def test_fast_path_any_number_of_frames():
    model = make_stop(randomize=True, seed=9, num_frames=4, rho=3)
    for frames in (2, 5):
        video = random_video(model, batch=1, seed=frames, frames=frames)
        d = model.explain(video)
        fixed = dict(selection=d["selected"], counts=d["counts"])
        torch.testing.assert_close(model.encode_video(video, impl="fast", **fixed), d["feature"], rtol=0, atol=2e-6)


# --------------------------------------------------------------------------- the pieces of the fast path
def test_cls_block_equals_the_full_block_on_the_cls_rows():
    model = make_stop()
    block = model.visual.transformer.resblocks[-1]
    counts = torch.tensor([0, 5, 12, 1], dtype=torch.int32)
    cu, total, longest = kernels.cu_seqlens_from_counts(counts, 50)
    x = torch.randn(total, 128, generator=torch.Generator().manual_seed(0), requires_grad=True)
    starts = cu[:-1].long()
    full = packed_block(block, x, cu, longest)[starts]
    (full_grad,) = torch.autograd.grad(full.square().sum(), x)
    ours = cls_block(block, x, starts, counts.long() + 50, 62)
    (ours_grad,) = torch.autograd.grad(ours.square().sum(), x)
    torch.testing.assert_close(ours, full, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours_grad, full_grad, rtol=0, atol=1e-5)


def test_packed_sizes_match_cu_seqlens_from_counts():
    counts = torch.tensor([3, 0, 7, 2], dtype=torch.int32)
    cu, total, longest = PackedSizes(counts, 50).wait()
    expected = kernels.cu_seqlens_from_counts(counts, 50)
    assert torch.equal(cu, expected[0]) and cu.dtype == torch.int32 and (total, longest) == expected[1:]


def test_folded_cls_keys_are_cached_until_the_backbone_changes():
    model = make_stop(private_backbone=True)
    keys, bias = cls_keys(model, torch.float32)
    assert cls_keys(model, torch.float32)[0] is keys  # computed once
    assert cls_keys(model, torch.bfloat16)[0] is not keys  # the CLS token is rounded like the tokens
    with torch.no_grad():
        model.visual.transformer.resblocks[0].attn.in_proj_weight.mul_(1.5)  # edited in place
    edited = cls_keys(model, torch.float32)[0]
    assert edited is not keys and not torch.allclose(edited, keys)
    model.double()  # .to() forgets the cached keys (a storage could come back at the same address)
    doubled = cls_keys(model, torch.float64)[0]
    assert doubled.dtype == torch.float64 and torch.allclose(doubled.float(), edited, rtol=1e-5, atol=1e-6)
    model.float().cast_backbone(torch.bfloat16)
    rounded = cls_keys(model, torch.bfloat16)[0]
    assert rounded.dtype == torch.float32  # the chain stays fp32
    model.cast_backbone(torch.float32)  # back to fp32, but bf16-rounded: the keys follow the rounded weights
    torch.testing.assert_close(cls_keys(model, torch.float32)[0],
                               folded_cls_keys(model.visual, torch.float32)[0], rtol=0, atol=0)


def test_pluggable_attention_gets_strided_views():
    model = make_stop(randomize=True, seed=2, num_frames=3)
    video = random_video(model, batch=2, seed=1)
    calls = []

    def attention(q, k, v, cu_seqlens, max_seqlen):
        calls.append(not q.is_contiguous() and q.stride(-1) == 1 and q.shape == k.shape == v.shape)
        return kernels.varlen_attention(q, k, v, cu_seqlens, max_seqlen, check_inputs=True)

    with torch.no_grad():
        plugged = fast_forward(model, video, attention=attention)
        default = fast_forward(model, video)
    assert calls == [True] * (len(model.visual.transformer.resblocks) - 1)  # the last block: CLS rows only
    torch.testing.assert_close(plugged, default, rtol=0, atol=1e-6)


def test_fast_path_grad_checkpointing_gives_the_same_results():
    model = make_stop(randomize=True, seed=4, num_frames=3)
    video = random_video(model, batch=1, seed=5)
    out, grads = _grads(model, video, "fast")
    model.set_grad_checkpointing(True)
    out_ckpt, grads_ckpt = _grads(model, video, "fast")
    model.set_grad_checkpointing(False)
    torch.testing.assert_close(out_ckpt, out, rtol=0, atol=0)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=0, atol=0)


def test_bf16_resident_backbone_in_both_paths(monkeypatch):
    monkeypatch.setenv("STOP_FAST_DISABLE_TRITON", "1")
    model = make_stop(randomize=True, seed=5, num_frames=4, private_backbone=True).cast_backbone(torch.bfloat16)
    video = random_video(model, batch=2, seed=6)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        d = model.explain(video)
        fast = model.explain(video, impl="fast", selection=d["selected"], counts=d["counts"])
    assert torch.equal(fast["counts"], d["counts"])
    assert (fast["feature"] - d["feature"]).abs().max() < 2e-2
    with torch.no_grad():  # no autocast: the backbone in bf16, the chain and the prompters in fp32
        plain = model.encode_video(video, impl="fast")
    assert plain.dtype == torch.float32 and torch.isfinite(plain).all()


# --------------------------------------------------------------------------- compile_encoder
def test_fast_path_compiles_as_two_static_graphs():
    """compile_encoder compiles the fast path as two whole graphs (fullgraph=True) around its one host
    sync: the prompt stage and the encode stage, whose packed rows are padded to a bucket so that no
    size is symbolic. Forward and backward equal eager mode's; another batch of the same bucket reuses
    both graphs."""
    import torch._dynamo

    graphs = []

    def recording(gm, example_inputs):
        graphs.append([tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)])
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    model = make_stop(randomize=True, seed=4)
    video = _stable_video(model, batch=2, seed=6)
    eager, eager_grad = _grads(model, video, "fast")
    encode = compile_encoder(model, backend=recording, fullgraph=True)
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = encode(video)
    assert encode.compiled and encode.fallback_reason is None
    assert not [w for w in caught if "compile_encoder" in str(w.message)]
    assert len(graphs) == 2
    assert not [d for shapes in graphs for shape in shapes for d in shape if isinstance(d, torch.SymInt)]
    longest = 1 + model.num_patches + model.config.rho
    frames = video.shape[0] * video.shape[1]
    with torch.no_grad():
        total = int(model.explain(video, impl="fast")["lengths"].sum())
    assert (bucket_rows(total, longest, frames), model.width) in graphs[1]  # the encode stage saw the bucketed rows
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    torch.testing.assert_close(out, eager, rtol=0, atol=1e-6)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, eager_grad[name], rtol=1e-5, atol=1e-7)
    other = _stable_video(model, batch=2, seed=7)
    with torch.no_grad():
        other_total = int(model.explain(other, impl="fast")["lengths"].sum())
        assert bucket_rows(other_total, longest, frames) == bucket_rows(total, longest, frames)
        expected = model.encode_video(other, impl="fast")
    torch.testing.assert_close(encode(other), expected, rtol=0, atol=1e-6)  # grad mode as before
    assert len(graphs) == 2  # same bucket: no new graph
    with pytest.raises(ValueError, match="3 channels"):  # a user's mistake is not a compile failure
        encode(video[:, :, :1])
    assert encode.compiled


def test_compiled_encoder_with_grad_checkpointing():
    """The encode stage checkpoints its blocks inside the compiled graph: same gradients as eager."""
    model = make_stop(randomize=True, seed=4, num_frames=3)
    video = _stable_video(model, batch=1, seed=5)
    eager, eager_grad = _grads(model, video, "fast")
    model.set_grad_checkpointing(True)
    try:
        encode = compile_encoder(model, backend="aot_eager", fullgraph=True)
        model.zero_grad(set_to_none=True)
        out = encode(video)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    finally:
        model.set_grad_checkpointing(False)
    assert encode.compiled, encode.fallback_reason
    torch.testing.assert_close(out, eager, rtol=0, atol=1e-6)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, eager_grad[name], rtol=1e-5, atol=1e-7)


def test_compile_encoder_past_the_recompile_limit(monkeypatch):
    """fullgraph=True makes dynamo raise once its recompile limit is reached: that call runs eagerly
    with one warning, and the shapes compiled before stay compiled."""
    import torch._dynamo

    from stop_fast.model import compiled

    real = compiled._compiler_config
    name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"

    def one_graph_each():
        stack = contextlib.ExitStack()
        stack.enter_context(real())
        stack.enter_context(torch._dynamo.config.patch(**{name: 1}))
        return stack

    monkeypatch.setattr(compiled, "_compiler_config", one_graph_each)
    torch._dynamo.reset()  # the functions' graphs from other tests count against the limit
    try:
        model = make_stop(randomize=True, seed=4, num_frames=3)
        encode = compile_encoder(model, backend="aot_eager", fullgraph=True)
        one, two = random_video(model, batch=1, seed=1), random_video(model, batch=2, seed=2)
        with torch.no_grad():
            out_one = encode(one)
            with pytest.warns(RuntimeWarning, match="recompile limit") as caught:
                out_two = encode(two)  # a new batch shape: one graph more than allowed
                again = encode(two)
            assert len([w for w in caught if "recompile limit" in str(w.message)]) == 1
            assert encode.compiled and encode.fallback_reason is None
            torch.testing.assert_close(out_one, model.encode_video(one, impl="fast"), rtol=0, atol=1e-6)
            torch.testing.assert_close(out_two, model.encode_video(two, impl="fast"), rtol=0, atol=1e-6)
            torch.testing.assert_close(again, out_two, rtol=0, atol=0)
    finally:
        torch._dynamo.reset()


def test_bucketed_packing_is_the_same_function():
    """Rows padded to a bucket, as ``BUCKET_SEQUENCES`` sequences of at most one frame each, change
    neither the features nor the gradients."""
    model = make_stop(randomize=True, seed=3, num_frames=4)
    video = random_video(model, batch=2, seed=7)

    def run(bucket):
        model.zero_grad(set_to_none=True)
        out = fast_forward(model, video, bucket=bucket)
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    out, grads = run(False)
    out_b, grads_b = run(True)
    torch.testing.assert_close(out_b, out, rtol=0, atol=1e-6)
    scale = _global_scale(grads)
    for name in grads:
        torch.testing.assert_close(grads_b[name], grads[name], rtol=1e-5, atol=1e-7 * scale)

    n, rho = model.num_patches, model.config.rho
    longest = 1 + n + rho
    gen = torch.Generator().manual_seed(0)
    for frames in (1, 12, 47, 48, 100, 384, 1000):
        lengths = torch.randint(1 + n, longest + 1, (frames,), generator=gen)
        cu = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).to(torch.int32)])
        total = int(cu[-1])
        x = torch.randn(total, 8, generator=gen)
        padded, cu_padded = pad_to_bucket(x, cu, longest)
        step = min(max(frames // FRAMES_PER_STEP, 1), BUCKET_SEQUENCES) * longest
        rows = padded.shape[0]
        assert rows == bucket_rows(total, longest, frames) and rows % step == 0 and total <= rows < total + step
        assert rows - total <= 0.03 * total + longest  # a few percent at any batch size
        assert torch.equal(padded[:total], x) and not padded[total:].any()
        assert cu_padded.dtype == torch.int32 and cu_padded.shape == (frames + 1 + BUCKET_SEQUENCES,)
        assert torch.equal(cu_padded[: frames + 1], cu) and cu_padded[-1] == rows
        pieces = cu_padded[frames:].diff()
        assert (pieces >= 0).all() and (pieces <= longest).all() and pieces.max() - pieces.min() <= 1


def test_compile_encoder_falls_back_to_eager_with_one_warning():
    model = make_stop(randomize=True, seed=4)
    video = random_video(model, batch=1, seed=6)

    def broken_backend(graph, example_inputs):
        raise RuntimeError("no compiler here")

    encode = compile_encoder(model, impl="reference", backend=broken_backend)
    with pytest.warns(RuntimeWarning, match="torch.compile failed.*no compiler here") as caught:
        out = encode(video)
        again = encode(video)
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    assert not encode.compiled and "no compiler here" in encode.fallback_reason
    expected = model.encode_video(video)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(again, expected, rtol=0, atol=0)
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        failed_early = compile_encoder(model, mode="no-such-mode")
    torch.testing.assert_close(failed_early(video), model.encode_video(video, impl="fast"), rtol=0, atol=0)
    with pytest.raises(ValueError, match="impl"):
        compile_encoder(model, impl="magic")


@pytest.mark.slow
def test_compile_encoder_with_inductor():
    """The default backend: inductor generates the code around the custom ops (inference, to stay small)."""
    model = make_stop(randomize=True, seed=4, num_frames=3)
    video = random_video(model, batch=1, seed=6)
    encode = compile_encoder(model, fullgraph=True)
    with torch.no_grad():
        out = encode(video)
        eager = model.encode_video(video, impl="fast")
    assert encode.compiled, encode.fallback_reason
    torch.testing.assert_close(out, eager, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- static shapes
def test_static_shapes_give_the_same_features_and_gradients():
    """Every frame padded to 1 + N + rho rows (its padding a sequence of its own): same function."""
    model = make_stop(randomize=True, seed=3, num_frames=4)
    video = random_video(model, batch=2, seed=7)

    def run(static):
        model.zero_grad(set_to_none=True)
        out, details = fast_forward(model, video, record=True, static_shapes=static)
        out.square().sum().backward()
        return out.detach(), details, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    out, details, grads = run(False)
    assert details["counts"].max() > 0 and details["counts"].min() < model.config.rho  # real padding
    out_static, details_static, grads_static = run(True)
    torch.testing.assert_close(out_static, out, rtol=0, atol=2e-6)
    for key in ("selected", "counts", "lengths"):
        assert torch.equal(details_static[key], details[key]) and details_static[key].dtype == details[key].dtype, key
    scale = _global_scale(grads)
    for name in grads:
        torch.testing.assert_close(grads_static[name], grads[name], rtol=1e-4, atol=1e-6 * scale)


def test_static_shapes_compile_without_data_dependent_sizes():
    """fullgraph=True with capture_scalar_outputs off: any host sync or data-dependent size would break
    the graph, so this passing means CUDA graphs can capture it."""
    import torch._dynamo

    model = make_stop(randomize=True, seed=3, num_frames=3)
    video = random_video(model, batch=1, seed=7)
    with torch.no_grad():
        eager = fast_forward(model, video, static_shapes=True)
        with torch._dynamo.config.patch(capture_scalar_outputs=False, capture_dynamic_output_shape_ops=False):
            compiled = torch.compile(lambda v: fast_forward(model, v, static_shapes=True), fullgraph=True,
                                     backend="aot_eager", dynamic=False)
            out = compiled(video)
    torch.testing.assert_close(out, eager, rtol=0, atol=1e-6)


@pytest.mark.gpu
def test_static_shapes_with_cuda_graphs():
    model = make_stop(randomize=True, seed=3, num_frames=6, private_backbone=True).cuda().cast_backbone(torch.bfloat16)
    video = random_video(model, batch=2, seed=7).cuda()
    encode = compile_encoder(model, static_shapes=True, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        d = model.explain(video, impl="fast")
        for _ in range(3):  # warm-up runs, then the recorded graph replays
            out = encode(video).clone()
    assert encode.compiled, encode.fallback_reason
    assert (out - d["feature"]).abs().max() < 2e-2
