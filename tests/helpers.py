"""Shared builders for the tests: tiny random-weight models and random CLIP-normalised videos."""
from __future__ import annotations

import functools
import warnings

import torch

import stop_fast


@functools.lru_cache(maxsize=None)
def clip_model(name: str = "stop-tiny"):
    """A frozen open_clip model with random weights (cached: building ViT-B/32 takes seconds)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return stop_fast.load_clip(name)


def make_stop(name: str = "stop-tiny", randomize: bool = False, seed: int = 0, **config) -> stop_fast.STOP:
    """STOP over a cached random backbone. ``randomize`` also fills the zero-initialised prompter layers,
    so that prompts are non-zero and every trainable part influences the output."""
    config.setdefault("num_frames", 4)
    model = stop_fast.STOP(stop_fast.STOPConfig(model_name=name, **config), clip_model(name))
    if randomize:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.trainable_parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def random_video(model: stop_fast.STOP, batch: int = 2, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    t, s = model.config.num_frames, model.image_size
    return torch.randn(batch, t, 3, s, s, generator=gen).to(dtype)
