"""Which frames of a video make a clip (SPEC.md "Tasks and losses": TSN in training, segment centres
in evaluation), and the size the frames are scaled to. Pure functions, testable without any video."""
from __future__ import annotations

import random
from typing import List, Optional, Tuple

MODES = ("train", "eval")


def resized_shape(height: int, width: int, size: int) -> Tuple[int, int]:
    """(height, width) of a frame whose short side is scaled to ``size``, the aspect ratio kept."""
    scale = size / min(height, width)
    return max(size, round(height * scale)), max(size, round(width * scale))


def sample_indices(num_video_frames: int, num_frames: int, mode: str = "eval",
                   rng: Optional[random.Random] = None) -> List[int]:
    """``num_frames`` frame indices of a video of ``num_video_frames`` frames, non-decreasing.

    The video is cut into ``num_frames`` equal segments. ``mode="train"`` takes one random frame in
    each segment (TSN), ``mode="eval"`` the centre frame of each. A video shorter than ``num_frames``
    has segments shorter than one frame, so neighbouring segments share a frame: frames repeat, in
    order, spread evenly over the clip.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if num_video_frames < 1:
        raise ValueError(f"num_video_frames must be >= 1, got {num_video_frames}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    segment = num_video_frames / num_frames
    if mode == "eval":
        return [min(num_video_frames - 1, int(segment * (i + 0.5))) for i in range(num_frames)]
    rng = rng or random.Random()
    out = []
    for i in range(num_frames):
        start = int(segment * i)
        end = max(start + 1, int(segment * (i + 1)))  # exclusive; at least one frame
        out.append(min(num_video_frames - 1, rng.randrange(start, end)))
    return out
