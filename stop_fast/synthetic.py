"""Generated videos with known motion, for the demo, smoke tests and benchmarks (no files needed)."""
from __future__ import annotations

from typing import Optional

import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD


def clip_normalise(frames: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1], channels in dim -3 -> CLIP-normalised."""
    mean = torch.tensor(OPENAI_DATASET_MEAN, dtype=frames.dtype, device=frames.device)[:, None, None]
    std = torch.tensor(OPENAI_DATASET_STD, dtype=frames.dtype, device=frames.device)[:, None, None]
    return (frames - mean) / std


def moving_square(
    num_frames: int,
    size: int,
    direction: int = 0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """A bright square crossing a noisy background: (num_frames, 3, size, size), CLIP-normalised.

    ``direction`` 0..3 moves it right, left, down or up, so clips differ only in how they change over
    time (a task that needs temporal modelling).
    """
    side = max(2, size // 5)
    start = torch.randint(0, size - side + 1, (2,), generator=generator).tolist()
    colour = torch.rand(3, generator=generator) * 0.5 + 0.5
    frames = torch.rand(num_frames, 3, size, size, generator=generator) * 0.3
    travel = size - side
    for t in range(num_frames):
        step = round(travel * t / max(1, num_frames - 1))
        y, x = start
        if direction == 0:
            x = step
        elif direction == 1:
            x = travel - step
        elif direction == 2:
            y = step
        else:
            y = travel - step
        frames[t, :, y : y + side, x : x + side] = colour[:, None, None]
    return clip_normalise(frames)
