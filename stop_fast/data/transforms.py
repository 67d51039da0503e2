"""Frame transforms shared by every decoder: resize the short side, crop, CLIP-normalise."""
from __future__ import annotations

import random
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..synthetic import clip_normalise
from .sampling import resized_shape


def resize_crop_normalise(frames: torch.Tensor, size: int, mode: str = "eval",
                          rng: Optional[random.Random] = None, flip: bool = False,
                          position: Optional[Tuple[float, float]] = None) -> torch.Tensor:
    """``frames`` uint8 (T, H, W, 3) -> float32 (T, 3, size, size), CLIP-normalised.

    The short side is resized to ``size`` (bilinear, antialiased), then a ``size`` x ``size`` crop is
    taken: the centre in evaluation, a random position in training (one position for the whole clip,
    so motion is preserved). ``flip`` mirrors the clip horizontally (training augmentation; off for
    datasets whose classes name directions, e.g. Something-Something V2). ``position`` fixes the crop
    instead: fractions (0 = top / left, 1 = bottom / right) of the free room along height and width.
    """
    if frames.dim() != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (T, H, W, 3), got {tuple(frames.shape)}")
    h, w = frames.shape[1:3]
    new_h, new_w = resized_shape(h, w, size)
    if position is not None:
        top, left = round((new_h - size) * position[0]), round((new_w - size) * position[1])
    elif mode == "train":
        rng = rng or random.Random()
        top, left = rng.randint(0, new_h - size), rng.randint(0, new_w - size)
    else:
        top, left = (new_h - size) // 2, (new_w - size) // 2
    if (new_h, new_w) != (h, w):
        x = frames.permute(0, 3, 1, 2).float().div_(255.0)  # (T, 3, H, W)
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
        x = x[..., top : top + size, left : left + size].clamp_(0.0, 1.0)  # antialiasing overshoots
    else:  # the readers scale to `size` while decoding: crop the uint8 frames, convert only the crop
        x = frames[:, top : top + size, left : left + size].permute(0, 3, 1, 2).float().div_(255.0)
    if flip:
        x = x.flip(-1)
    return clip_normalise(x).contiguous()
