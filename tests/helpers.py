"""Shared builders for the tests: tiny random-weight models and random CLIP-normalised videos."""
from __future__ import annotations

import contextlib
import copy
import functools
import warnings

import torch

import stop_fast


@functools.lru_cache(maxsize=None)
def clip_model(name: str = "stop-tiny"):
    """A frozen open_clip model with random weights (cached: building ViT-B/32 takes seconds).

    Shared between tests: never move, cast or edit it; ``make_stop(private_backbone=True)`` gives a copy.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return stop_fast.load_clip(name)


def make_stop(name: str = "stop-tiny", randomize: bool = False, seed: int = 0, private_backbone: bool = False,
              **config) -> stop_fast.STOP:
    """STOP over a cached random backbone. ``randomize`` also fills the zero-initialised prompter layers,
    so that prompts are non-zero and every trainable part influences the output. ``private_backbone``
    builds over a deep copy of the cached backbone, for tests that move, cast or edit it."""
    config.setdefault("num_frames", 4)
    clip = copy.deepcopy(clip_model(name)) if private_backbone else clip_model(name)
    model = stop_fast.STOP(stop_fast.STOPConfig(model_name=name, **config), clip)
    if randomize:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.trainable_parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def random_video(model: stop_fast.STOP, batch: int = 2, seed: int = 0, dtype=torch.float32, frames: int = None) -> torch.Tensor:
    """A (batch, T, 3, S, S) CPU video, T = ``frames`` or the model's ``config.num_frames``."""
    gen = torch.Generator().manual_seed(seed)
    t, s = frames or model.config.num_frames, model.image_size
    return torch.randn(batch, t, 3, s, s, generator=gen).to(dtype)


@contextlib.contextmanager
def no_tf32():
    """fp32 means IEEE fp32 (SPEC.md): cuBLAS and cuDNN (conv1, the Conv3d layers) default to TF32 on
    Ampere and later GPUs, which would make fp32 comparisons on CUDA compare TF32 rounding."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def discrete_choices_differ_only_at_near_ties(model: stop_fast.STOP, a: dict, b: dict, gap: float = 1e-5) -> int:
    """Compare the R and n of two ``explain`` results frame by frame; return how many frames differ.

    Raises AssertionError if a frame differs where ``a`` shows no near-tie (SPEC.md: R may differ only
    where S's K-th and (K+1)-th values are within ``gap``, n only where rho * v^ is within ``gap`` of
    an integer, or where another R of the same video changed v).
    """
    differ = torch.zeros_like(a["counts"], dtype=torch.bool)
    video_r_differs = torch.zeros_like(differ[:, :1])
    if "selected" in a:
        r_differs = (a["selected"].sort(-1).values != b["selected"].sort(-1).values).any(-1)
        s = a["score"].double().sort(dim=-1, descending=True).values
        k = model.config.k
        near = (s[..., k - 1] - s[..., k]) < gap if k < s.shape[-1] else torch.zeros_like(r_differs)
        assert not (r_differs & ~near).any(), "the paths chose different patches where S has no near-tie"
        differ |= r_differs
        video_r_differs = r_differs.any(dim=1, keepdim=True)  # another M changes v, so v^ of the whole video
    n_differs = a["counts"] != b["counts"]
    if "variation" in a:
        scaled = model.config.rho * a["variation"].double()
        near = (scaled - scaled.round()).abs() < gap
        assert not (n_differs & ~near & ~video_r_differs).any(), \
            "the paths chose different counts where rho * v^ has no near-tie"
    else:
        assert not n_differs.any()
    return int((differ | n_differs).sum())
