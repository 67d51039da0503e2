"""The fast path (packed tokens through stop_fast.kernels) against the reference path.

On a CPU these run the Triton kernels through the interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so they test the kernels inside the model, not a PyTorch stand-in.
"""
import copy

import pytest
import torch

from helpers import make_stop, random_video


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
    """A random video whose top-K sets and token counts are clear of near-ties (first such seed)."""
    for attempt in range(50):
        video = random_video(model, batch=batch, seed=seed + 1000 * attempt)
        if _discrete_choices_are_stable(model, video):
            return video
    raise AssertionError("no tie-free video found in 50 seeds")


def _grads(model, video, impl):
    model.zero_grad(set_to_none=True)
    feats = model.encode_video(video, impl=impl)
    if model.num_trainable_parameters() == 0:
        return feats, {}
    weights = torch.linspace(-1, 1, feats.numel()).view_as(feats).to(feats)
    (feats * weights).sum().backward()
    return feats.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


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

    ref_feat, ref_grad = _grads(model, video, "reference")
    fast_feat, fast_grad = _grads(model, video, "fast")
    # FlashAttention's rule: fast-vs-fp64 error at most 2x reference-fp32-vs-fp64 error, plus epsilon.
    model64 = copy.deepcopy(model).double()
    truth_feat, truth_grad = _grads(model64, video.double(), "reference")
    assert _max_err(fast_feat, truth_feat) <= 2 * _max_err(ref_feat, truth_feat) + 1e-5
    assert set(fast_grad) == set(ref_grad)
    # epsilon relative to the largest gradient: some gradients are exactly zero in exact arithmetic
    # (k = 1 makes the gate constant), where either path's rounding is all that is left
    scale = max([g.abs().max().item() for g in truth_grad.values()], default=0.0)
    for name in truth_grad:
        assert _max_err(fast_grad[name], truth_grad[name]) <= 2 * _max_err(ref_grad[name], truth_grad[name]) + 1e-6 * scale, name


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
    model = make_stop(name, randomize=True, seed=1, num_frames=8).cuda()
    video = _stable_video(model, batch=4, seed=3).cuda()
    model64 = copy.deepcopy(model).double()
    truth, truth_grad = _grads(model64, video.double(), "reference")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref, ref_grad = _grads(model, video, "reference")
        fast, fast_grad = _grads(model, video, "fast")
    assert _max_err(fast, truth) <= 2 * _max_err(ref, truth) + 1e-3
    for n in truth_grad:
        assert _max_err(fast_grad[n], truth_grad[n]) <= 2 * _max_err(ref_grad[n], truth_grad[n]) + 1e-3 * truth_grad[n].abs().max().item(), n


def test_fast_path_compiles_as_one_graph():
    """torch.compile(fullgraph=True) traces the whole fast path: the kernels are custom ops, and the
    one host sync (the packed token count) becomes an unbacked size with capture_scalar_outputs."""
    import torch._dynamo

    model = make_stop(randomize=True, seed=4)
    video = _stable_video(model, batch=2, seed=6)
    eager = model.encode_video(video, impl="fast")
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        compiled = torch.compile(lambda x: model.encode_video(x, impl="fast", check_inputs=False),
                                 fullgraph=True, backend="aot_eager")
        out = compiled(video)
        out.square().sum().backward()
    torch.testing.assert_close(out, eager, rtol=0, atol=1e-6)
    assert model.prompter_inter.up.weight.grad.abs().sum() > 0


def test_fast_path_through_the_pytorch_dispatch(monkeypatch):
    """Where Triton cannot run, the same entry points run their PyTorch implementations."""
    monkeypatch.setenv("STOP_FAST_DISABLE_TRITON", "1")
    model = make_stop(randomize=True, seed=8)
    video = _stable_video(model, batch=2, seed=12)
    ref_feat, ref_grad = _grads(model, video, "reference")
    fast_feat, fast_grad = _grads(model, video, "fast")
    torch.testing.assert_close(fast_feat, ref_feat, rtol=0, atol=2e-6)
    scale = max(g.abs().max().item() for g in ref_grad.values())  # some gradients are ~0 exactly
    for name in ref_grad:
        torch.testing.assert_close(fast_grad[name], ref_grad[name], rtol=1e-4, atol=1e-6 * scale)
