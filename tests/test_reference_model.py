"""The reference STOP model against open_clip and against SPEC.md's equations."""
import math

import pytest
import torch
import torch.nn.functional as F

import stop_fast
from stop_fast.model.reference import attention_map, top_k_stable
from stop_fast.model.steps import patch_tokens

from helpers import clip_model, make_stop, random_video


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
