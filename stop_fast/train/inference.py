"""Predictions for a few video files: the most likely classes, or the videos ranked for a caption."""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence

import torch

from .config import LOGIT_SCALE, TrainConfig
from .loop import load_prompt_file, autocast_for, build_model, config_for_checkpoint, make_encoder, resolve_device
from . import checkpoint as ckpt
from . import distributed


def load_model(config: TrainConfig, checkpoint: Optional[str], force: bool = False):
    """(model, resolved config, device): STOP with the checkpoint's prompts, or prompts off when None."""
    device = resolve_device(config, distributed.Dist())
    prompts = ckpt.resolve_prompts(checkpoint) if checkpoint else None
    config = config_for_checkpoint(config, prompts) if prompts else dataclasses.replace(config, k=0, rho=0)
    config = config.resolved(device.type == "cuda")
    config.device = str(device)
    model = build_model(config, device)
    if prompts:
        load_prompt_file(model, prompts, force)
    return model.eval(), config, device


@torch.no_grad()
def video_features(model, config: TrainConfig, device, paths: Sequence[str]) -> torch.Tensor:
    """(len(paths), E) normalised features of the centre clips (``config.eval_frames`` frames)."""
    from ..data import read_video_clip

    encoder = make_encoder(model, config.impl, False)
    autocast = autocast_for(device, config.precision)
    out = []
    for path in paths:
        clip = read_video_clip(path, config.eval_frames, size=model.image_size, mode="eval")
        with autocast():
            out.append(encoder(clip[None].to(device)).float())
    return torch.cat(out)


@torch.no_grad()
def classify(model, config: TrainConfig, features: torch.Tensor, classes: List[str]) -> torch.Tensor:
    """(V, C) class probabilities: softmax of 100 * cos(video, "a video of a person doing {class}")."""
    from .tasks import encode_texts

    texts = [config.class_template.format(c) for c in classes]
    text = encode_texts(model, texts, None, autocast_for(features.device, config.precision))
    return torch.softmax(LOGIT_SCALE * features @ text.T, dim=-1)


@torch.no_grad()
def similarity_to_text(model, config: TrainConfig, features: torch.Tensor, query: str) -> torch.Tensor:
    """(V,) cosine similarity of each video to the caption ``query``."""
    from .tasks import encode_texts

    text = encode_texts(model, [query], config.text_tokens, autocast_for(features.device, config.precision))
    return (features @ text.T)[:, 0]
