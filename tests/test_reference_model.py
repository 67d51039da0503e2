"""The reference STOP model against open_clip and against SPEC.md's equations."""
import copy

import pytest
import torch
import torch.nn.functional as F

import stop_fast
from stop_fast.model.prompters import conv3x3x3_as_matmul, conv_logits
from stop_fast.model.reference import attention_map, top_k_stable
from stop_fast.model.steps import difference_features, patch_embedding, patch_tokens

from helpers import clip_model, make_stop, no_tf32, random_video


@pytest.fixture(autouse=True)
def _ieee_fp32():
    with no_tf32():
        yield


@pytest.mark.parametrize("name", ["stop-tiny", "ViT-B-32"])
def test_prompts_off_equals_open_clip_encode_image(name):
    model = make_stop(name, k=0, rho=0, num_frames=3)
    video = random_video(model, batch=2)
    ours = model.encode_video(video)
    frames = model.clip.encode_image(video.flatten(0, 1)).unflatten(0, (2, 3))
    expected = F.normalize(frames.mean(dim=1), dim=-1)
    torch.testing.assert_close(ours, expected, rtol=0, atol=2e-6)


def test_attention_map_is_the_first_blocks_cls_attention():
    """Step 3 against nn.MultiheadAttention's own averaged attention weights in open_clip's block 1."""
    model = make_stop()
    visual = model.visual
    z = patch_tokens(visual, random_video(model).flatten(0, 1))
    block = visual.transformer.resblocks[0]
    u = block.ln_1(visual.ln_pre(z))
    _, weights = block.attn(u, u, u, need_weights=True, average_attn_weights=True)  # (F, L, L)
    torch.testing.assert_close(attention_map(visual, z), weights[:, 0, 1:], rtol=1e-5, atol=1e-6)


def _param_count_formula(d: int, cfg: stop_fast.STOPConfig) -> int:
    conv = 2 * d * 27 + 1
    intra = (2 * d * cfg.r_intra + cfg.r_intra) + (cfg.r_intra * d + d)
    inter = 2 * (2 * d) + (2 * d * cfg.r_inter + cfg.r_inter) + (cfg.r_inter * cfg.rho * d + cfg.rho * d) + cfg.rho * d
    return (conv + intra if cfg.k else 0) + (conv + inter if cfg.rho else 0)


def test_trainable_parameter_count_matches_spec_formula():
    model = make_stop("ViT-B-32", num_frames=12)
    count = model.num_trainable_parameters()
    assert count == _param_count_formula(768, model.config)
    assert 5.5e6 < count < 6.5e6  # "about 6 M with the defaults"
    for k, rho in [(0, 12), (6, 0), (0, 0)]:
        m = make_stop("stop-tiny", k=k, rho=rho)
        assert m.num_trainable_parameters() == _param_count_formula(128, m.config)
    assert not hasattr(make_stop(k=0), "conv_intra") and not hasattr(make_stop(rho=0), "prompter_inter")


def test_last_prompter_layers_start_at_zero_so_prompts_start_as_identity_overlay():
    model = make_stop()
    for layer in (model.prompter_intra.up, model.prompter_inter.up):
        assert torch.count_nonzero(layer.weight) == 0 and torch.count_nonzero(layer.bias) == 0


def test_gradient_reaches_all_four_parts_and_none_of_the_backbone():
    model = make_stop(randomize=True)
    video = random_video(model, seed=1)
    text = model.encode_text(["a", "b"])
    loss = (model.encode_video(video) @ text.T).logsumexp(dim=-1).sum()
    loss.backward()
    for name, module in model.trainable_modules().items():
        for pname, p in module.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient in {name}.{pname}"
    assert all(p.grad is None for p in model.clip.parameters())
    assert sum(1 for p in model.parameters() if p.requires_grad) == sum(1 for _ in model.trainable_parameters())


def test_top_k_ties_go_to_the_lower_index():
    score = torch.tensor([[0.1, 0.3, 0.3, 0.2, 0.3, 0.1]])
    assert top_k_stable(score, 2).tolist() == [[1, 2]]
    assert top_k_stable(score, 4).tolist() == [[1, 2, 4, 3]]
    flat = torch.full((1, 9), 1 / 9)
    assert top_k_stable(flat, 3).tolist() == [[0, 1, 2]]


def test_explain_selects_the_top_k_of_the_score():
    model = make_stop(randomize=True, k=5)
    d = model.explain(random_video(model))
    assert d["selected"].shape == (2, 4, 5)
    kth = d["score"].gather(-1, d["selected"]).min(dim=-1).values
    outside = d["score"].scatter(-1, d["selected"], -1.0).max(dim=-1).values
    assert torch.all(kth >= outside)
    a, dyn = d["attention"], d["dynamics"]
    torch.testing.assert_close(dyn.sum(-1), torch.ones(2, 4))
    assert torch.all(a.sum(-1) < 1) and torch.all(a > 0)  # the CLS key keeps the rest of the mass
    torch.testing.assert_close(d["score"], 0.6 * a + 0.4 * dyn)


def test_token_counts_range_first_frame_and_sequence_lengths():
    model = make_stop(randomize=True, num_frames=6, rho=7)
    d = model.explain(random_video(model, batch=3, seed=2))
    n, v = d["counts"], d["variation"]
    assert n.dtype == torch.int32 and torch.all(n[:, 0] == 0) and torch.all(v[:, 0] == 0)
    assert torch.all((n >= 0) & (n <= 7))
    # per video the most dynamic transition gets rho tokens, the least dynamic none
    assert torch.all(n[:, 1:].max(dim=1).values == 7) and torch.all(n[:, 1:].min(dim=1).values == 0)
    torch.testing.assert_close(n, torch.ceil(7 * v).int())
    assert torch.equal(d["lengths"], 1 + model.num_patches + n)


@pytest.mark.parametrize("frames", [1, 2])
def test_short_clips_insert_no_temporal_tokens(frames):
    model = make_stop(randomize=True, num_frames=frames)
    d = model.explain(random_video(model))
    assert torch.all(d["counts"] == 0) and torch.all(d["variation"] == 0)
    assert torch.isfinite(d["feature"]).all()


def test_a_frame_depends_only_on_its_temporal_neighbours():
    """With rho = 0, frame t sees frames t-2..t+1 (difference features, then a 3-wide Conv3d)."""
    model = make_stop(randomize=True, num_frames=7, rho=0)
    video = random_video(model, batch=1)
    base = model.encode_frames(video)
    changed = video.clone()
    changed[0, 1] = torch.randn_like(changed[0, 1])
    out = model.encode_frames(changed)
    moved = [(out[0, t] - base[0, t]).abs().max().item() > 1e-4 for t in range(7)]
    assert moved[:4] == [True, True, True, True]
    assert moved[4:] == [False, False, False]
    torch.testing.assert_close(out[0, 4:], base[0, 4:], rtol=0, atol=1e-6)
    # without prompts a frame depends on itself alone
    plain = make_stop(k=0, rho=0, num_frames=7)
    diff = (plain.encode_frames(changed) - plain.encode_frames(video)).abs().amax(dim=-1)[0]
    assert diff[1] > 1e-4 and torch.all(diff[[0, 2, 3, 4, 5, 6]] <= 1e-6)


def test_batch_invariance():
    model = make_stop(randomize=True)
    video = random_video(model, batch=3, seed=3)
    together = model.encode_video(video)
    for i in range(3):
        alone = model.encode_video(video[i : i + 1])
        torch.testing.assert_close(alone[0], together[i], rtol=0, atol=2e-6)


def test_prompts_change_the_feature_when_trained():
    plain = make_stop(k=0, rho=0)
    model = make_stop(randomize=True)
    video = random_video(model)
    assert (model.encode_video(video) - plain.encode_video(video)).abs().max() > 1e-3


def test_trainable_state_round_trip(tmp_path):
    model = make_stop(randomize=True, seed=4)
    path = tmp_path / "prompts.safetensors"
    model.save_prompts(path)
    other = make_stop()
    other.load_prompts(path)
    video = random_video(model)
    torch.testing.assert_close(other.encode_video(video), model.encode_video(video), rtol=0, atol=0)
    with pytest.raises(ValueError, match="rho"):
        make_stop(rho=3).load_prompts(path)


def test_encode_text_is_normalised_and_truncates():
    model = make_stop()
    feats = model.encode_text(["a video of a person doing archery", "x"])
    assert feats.shape == (2, 64)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(2))
    ids = model.tokenize(["word " * 60], max_tokens=32)
    assert ids.shape == (1, 77) and ids[0, 31] == ids.max() and torch.all(ids[0, 32:] == 0)


@pytest.mark.parametrize(
    "video, match",
    [
        (torch.randn(4, 3, 112, 112), "rank"),
        (torch.randn(1, 4, 1, 112, 112), "3 channels"),
        (torch.randn(1, 0, 3, 112, 112), "at least one frame"),
        (torch.randn(1, 4, 3, 96, 96), "112 x 112"),
        (torch.randint(0, 255, (1, 4, 3, 112, 112), dtype=torch.uint8), "float"),
        ("not a tensor", "torch.Tensor"),
    ],
)
def test_bad_video_is_refused(video, match):
    with pytest.raises(ValueError, match=match):
        make_stop().encode_video(video)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_video_is_refused(bad):
    model = make_stop()
    video = random_video(model)
    video[0, 1, 2, 3, 4] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        model.encode_video(video)


def test_unknown_impl_is_refused():
    model = make_stop()
    with pytest.raises(ValueError, match="impl"):
        model.encode_video(random_video(model), impl="magic")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"alpha": 1.5}, "alpha"),
        ({"alpha": -0.1}, "alpha"),
        ({"rho": -1}, "rho"),
        ({"k": -2}, "k must"),
        ({"beta": -1.0}, "beta"),
        ({"num_frames": 0}, "num_frames"),
        ({"k": 2.5}, "k must be an int"),
    ],
)
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        stop_fast.STOPConfig(**kwargs)


def test_k_larger_than_patch_count_is_refused():
    with pytest.raises(ValueError, match="k must be at most N = 49"):
        stop_fast.STOP(stop_fast.STOPConfig(model_name="stop-tiny", k=50), clip_model("stop-tiny"))
    make_stop(k=49)  # K = N is allowed


# --------------------------------------------------------------------------- numerics (SPEC.md "Numerics")
def test_scoring_chain_is_fp32_under_bf16_autocast():
    """Under autocast the chain is computed in fp32 from the bf16 tokens: A and Dyn equal a float64
    computation from the same bf16 tokens to fp32 accuracy (a bf16 computation misses by ~1e-3)."""
    model = make_stop(randomize=True, seed=3)
    video = random_video(model, seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = model.explain(video)
        z = patch_tokens(model.visual, video.flatten(0, 1))
    assert z.dtype == torch.bfloat16
    for key in ("attention", "dynamics", "score", "variation"):
        assert d[key].dtype == torch.float32, key
    visual64 = copy.deepcopy(model.visual).double()
    truth = attention_map(visual64, z.double()).unflatten(0, (2, 4))
    assert (d["attention"].double() - truth).abs().max() < 1e-6
    # Dyn from the same H, which is built in fp32 from the bf16 tokens
    h = difference_features(z[:, 1:].unflatten(0, (2, 4)))
    assert h.dtype == torch.float32 and torch.equal(h[:, 0, :, 128:], torch.zeros_like(h[:, 0, :, 128:]))
    conv64 = copy.deepcopy(model.conv_intra).double()
    dyn64 = torch.softmax(conv64(h.double()), dim=-1)
    assert (d["dynamics"].double() - dyn64).abs().max() < 1e-5  # a sum of 54 D = 6912 fp32 products


def test_stacked_conv3d_equals_each_layer_alone():
    model = make_stop(randomize=True, seed=5)
    layers = [copy.deepcopy(model.conv_intra).double(), copy.deepcopy(model.conv_inter).double()]
    h = difference_features(torch.randn(2, 3, 49, 128, dtype=torch.float64))
    for got, layer in zip(conv_logits(layers, h), layers):
        x = h.permute(0, 3, 1, 2).reshape(2, 256, 3, 7, 7)  # SPEC: (B, 2D, T, g, g)
        expected = F.conv3d(x, layer.conv.weight, layer.conv.bias, padding=1).reshape(2, 3, 49)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(2, 12, 7, 64, 2), (1, 1, 3, 8, 1), (3, 2, 14, 16, 2), (1, 5, 1, 4, 3)])
def test_conv3d_as_matmul_is_the_convolution(shape):
    """The fast path's Conv3d (one GEMM, then 27 shifted sums), forward and backward, in float64."""
    b, t, g, c, o = shape
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(b, t, g, g, c, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(o, c, 3, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(o, generator=gen, dtype=torch.float64, requires_grad=True)
    weight_out = torch.randn(b, o, t, g, g, generator=gen, dtype=torch.float64)
    got = conv3x3x3_as_matmul(x, w, bias)
    grads = torch.autograd.grad((got * weight_out).sum(), (x, w, bias))
    expected = F.conv3d(x.permute(0, 4, 1, 2, 3), w, bias, padding=1)
    expected_grads = torch.autograd.grad((expected * weight_out).sum(), (x, w, bias))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for a, e in zip(grads, expected_grads):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("patch,size,bias", [(32, 224, False), (16, 224, False), (14, 30, True), (4, 16, True)])
def test_patch_embedding_as_matmul_is_conv1(patch, size, bias):
    """conv1 as one GEMM of the patches (the fast path's step 1), in float64; sizes that are not a
    multiple of the patch drop the remainder like the convolution."""
    gen = torch.Generator().manual_seed(patch + size)
    conv = torch.nn.Conv2d(3, 24, patch, stride=patch, bias=bias).double()
    frames = torch.randn(3, 3, size, size, generator=gen, dtype=torch.float64)
    expected = conv(frames).flatten(2).transpose(1, 2)
    torch.testing.assert_close(patch_embedding(conv, frames), expected, rtol=1e-12, atol=1e-12)
    overlapping = torch.nn.Conv2d(3, 24, patch, stride=patch // 2, bias=bias).double()  # not a patchify: conv
    torch.testing.assert_close(patch_embedding(overlapping, frames), overlapping(frames).flatten(2).transpose(1, 2),
                               rtol=0, atol=0)


# --------------------------------------------------------------------------- true initialisation
@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_true_initialisation_gradients(impl):
    """SPEC: with the prompters' last layers at zero, step 1 moves only those layers and e (every other
    gradient is exactly zero); after one AdamW step every trainable part receives gradient."""
    model = make_stop(seed=2, num_frames=3)  # T = 3: the smallest clip with temporal tokens
    video = random_video(model, seed=6)
    text = model.encode_text(["a", "b", "c"])
    optimiser = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)

    def step():
        optimiser.zero_grad(set_to_none=True)
        logits = model.logit_scale * model.encode_video(video, impl=impl) @ text.T
        F.cross_entropy(logits, torch.tensor([0, 2])).backward()
        return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}

    grads = step()
    moving = {"prompter_intra.up.weight", "prompter_intra.up.bias", "prompter_inter.up.weight",
              "prompter_inter.up.bias", "prompter_inter.slots"}
    for name, g in grads.items():
        if name in moving:
            assert g is not None and g.abs().sum() > 0, f"{name} should move at step 1"
        else:
            assert g is None or torch.count_nonzero(g) == 0, f"{name} must have exactly zero gradient at step 1"
    optimiser.step()
    for name, g in step().items():
        # Conv3d_intra's bias shifts every logit of a softmax: its gradient is zero by shift invariance
        if name != "conv_intra.conv.bias":
            assert g is not None and g.abs().sum() > 0, f"{name} receives no gradient at step 2"


# --------------------------------------------------------------------------- overrides
def test_selection_and_counts_overrides():
    model = make_stop(randomize=True, seed=8, num_frames=5, k=3, rho=4)
    video = random_video(model, seed=9)
    own = model.explain(video)
    same = model.explain(video, selection=own["selected"], counts=own["counts"])
    torch.testing.assert_close(same["feature"], own["feature"], rtol=0, atol=0)
    # another R: the gate follows SPEC step 7 on the given R, n the given counts
    selection = torch.stack([torch.randperm(49, generator=torch.Generator().manual_seed(i))[:3] for i in range(10)])
    selection = selection.view(2, 5, 3)
    counts = torch.randint(0, 5, (2, 5), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    d = model.explain(video, selection=selection, counts=counts)
    assert torch.equal(d["selected"], selection) and torch.equal(d["counts"], counts)
    assert torch.equal(d["lengths"], 1 + 49 + counts)
    assert (d["feature"] - own["feature"]).abs().max() > 1e-4
    forward = model.encode_video(video, selection=selection.int(), counts=counts.long())
    torch.testing.assert_close(forward, d["feature"], rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(selection=torch.zeros(2, 4, 6)), "integer tensor"),
        (dict(selection=torch.zeros(2, 4, 5, dtype=torch.int64)), r"\(B, T, K\) = \(2, 4, 6\)"),
        (dict(selection=torch.full((2, 4, 6), 49)), "0..N-1"),
        (dict(selection=torch.zeros(2, 4, 6, dtype=torch.int64)), "distinct"),
        (dict(counts=torch.zeros(2, 3, dtype=torch.int32)), r"\(B, T\) = \(2, 4\)"),
        (dict(counts=torch.full((2, 4), 13)), "0..rho"),
        (dict(counts=[[0] * 4] * 2), "integer tensor"),
    ],
)
def test_bad_overrides_are_refused(kwargs, match):
    model = make_stop()
    for impl in ("reference", "fast"):
        with pytest.raises(ValueError, match=match):
            model.encode_video(random_video(model), impl=impl, **kwargs)


def test_selection_needs_intra_prompts_and_counts_need_rho():
    model = make_stop(k=0, rho=0)
    video = random_video(model)
    with pytest.raises(ValueError, match="k = 0"):
        model.encode_video(video, selection=torch.zeros(2, 4, 1, dtype=torch.int64))
    with pytest.raises(ValueError, match="0..rho = 0..0"):
        model.encode_video(video, counts=torch.ones(2, 4, dtype=torch.int32))
    model.encode_video(video, counts=torch.zeros(2, 4, dtype=torch.int32))  # n = 0 is what rho = 0 means


# --------------------------------------------------------------------------- API corners
@pytest.mark.parametrize("frames", [1, 2, 3, 9])
def test_any_number_of_frames(frames):
    """Nothing depends on T: a model configured for 4 frames encodes clips of any length."""
    model = make_stop(randomize=True, num_frames=4)
    d = model.explain(random_video(model, frames=frames))
    assert d["frame_features"].shape == (2, frames, 64) and torch.isfinite(d["feature"]).all()
    assert (d["counts"].max() > 0) == (frames >= 3)  # only T >= 3 inserts temporal tokens


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_video_is_cast_to_the_backbone_dtype(dtype):
    model = make_stop(randomize=True)
    video = random_video(model, dtype=dtype)
    torch.testing.assert_close(model.encode_video(video), model.encode_video(video.float()), rtol=0, atol=0)


def test_cast_backbone_keeps_the_backbone_resident_and_the_prompts_fp32():
    model = make_stop(randomize=True, seed=3, private_backbone=True)
    video = random_video(model, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = model.encode_video(video)
    model.cast_backbone(torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.clip.parameters())
    assert all(p.dtype == torch.float32 for p in model.trainable_parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        after = model.encode_video(video)
    # the same computation, except LayerNorm affine and the scoring chain's weights now rounded to bf16
    assert (after - before).abs().max() < 2e-2
    plain = model.encode_video(video)  # no autocast: the backbone computes in bf16, the chain in fp32
    assert plain.dtype == torch.float32 and (plain - before).abs().max() < 5e-2
    with pytest.raises(ValueError, match="dtype"):
        model.cast_backbone(torch.int8)


def test_grad_checkpointing_gives_the_same_results():
    model = make_stop(randomize=True, seed=4, num_frames=3)
    video = random_video(model, seed=5)

    def run():
        model.zero_grad(set_to_none=True)
        out = model.encode_video(video)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in model.trainable_parameters()]

    out, grads = run()
    model.set_grad_checkpointing(True)
    out_ckpt, grads_ckpt = run()
    model.set_grad_checkpointing(False)
    torch.testing.assert_close(out_ckpt, out, rtol=0, atol=0)
    for g, gc in zip(grads, grads_ckpt):
        torch.testing.assert_close(gc, g, rtol=0, atol=0)


def test_logit_scale_is_exactly_100():
    model = make_stop()
    assert abs(model.clip.logit_scale.exp().item() - 100) > 50  # random open_clip weights store 1/0.07
    assert model.logit_scale.item() == 100.0 and model.logit_scale.dtype == torch.float32
    assert "_logit_scale" not in model.state_dict()


def test_trainable_parameters_is_a_list():
    model = make_stop()
    params = model.trainable_parameters()
    assert isinstance(params, list) and len(params) == len(list(model.trainable_parameters())) > 0


def test_encode_text_of_a_generator_and_bad_max_tokens():
    model = make_stop()
    texts = ["a video of a person doing archery", "x"]
    torch.testing.assert_close(model.encode_text(t for t in texts), model.encode_text(texts), rtol=0, atol=0)
    for bad in (0, -3, 1, 2.5, True, "32"):
        with pytest.raises(ValueError, match="max_tokens"):
            model.encode_text(texts, max_tokens=bad)
    for bad in ("one string", [1, 2], 7):
        with pytest.raises(ValueError, match="texts"):
            model.tokenize(bad)


def test_backbone_must_be_the_named_architecture():
    with pytest.raises(ValueError, match=r"not the ViT-B-32 architecture.*width 128 \(expected 768\)"):
        stop_fast.STOP(stop_fast.STOPConfig(model_name="ViT-B-32"), clip_model("stop-tiny"))
    with pytest.raises(ValueError, match="not an open_clip model"):
        stop_fast.STOP(stop_fast.STOPConfig(model_name="ViT-Q-99"), clip_model("stop-tiny"))


def test_prompter_inter_must_fit_on_a_gpu():
    with pytest.raises(ValueError, match=r"r_inter \* rho \* D = 288,358,400"):
        stop_fast.STOP(stop_fast.STOPConfig(model_name="stop-tiny", rho=1100, r_inter=2048), clip_model("stop-tiny"))
