"""Predictions for a few video files: the most likely classes, or the videos ranked for a caption."""
from __future__ import annotations

from typing import List, Sequence

import torch

from ..config import LOGIT_SCALE
from .config import TrainConfig
from .setup import autocast_for, make_encoder
from .tasks import class_texts, encode_texts


@torch.no_grad()
def video_features(model, config: TrainConfig, device, paths: Sequence[str]) -> torch.Tensor:
    """(len(paths), E) normalised features of the centre clips (``config.eval_num_frames`` frames)."""
    from ..data import read_video_clip

    encoder = make_encoder(model, config.impl, False)
    autocast = autocast_for(device, config.precision)
    out = []
    for path in paths:
        clip = read_video_clip(path, config.eval_num_frames, size=model.image_size, mode="eval")
        with autocast():
            out.append(encoder(clip[None].to(device)).float())
    return torch.cat(out)


@torch.no_grad()
def classify(model, config: TrainConfig, features: torch.Tensor, classes: List[str]) -> torch.Tensor:
    """(V, C) class probabilities: softmax of 100 * cos(video, "a video of a person doing {class}")
    (the class names as words when ``config.class_names`` says so)."""
    texts = class_texts(classes, config.class_template, config.class_names or "raw")
    text = encode_texts(model, texts, None, autocast_for(features.device, config.precision))
    return torch.softmax(LOGIT_SCALE * features @ text.T, dim=-1)


@torch.no_grad()
def similarity_to_text(model, config: TrainConfig, features: torch.Tensor, query: str) -> torch.Tensor:
    """(V,) cosine similarity of each video to the caption ``query``."""
    text = encode_texts(model, [query], config.text_tokens, autocast_for(features.device, config.precision))
    return (features @ text.T)[:, 0]
