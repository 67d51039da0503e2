"""Multi-view evaluation (mmaction2's ``num_clips`` x ``three_crop``): several clips and crops of each
video, predictions averaged over the views."""
from __future__ import annotations

import os
from typing import List, Optional, Union

import numpy as np
import torch

from .errors import VideoDecodeError
from .probe import VideoProbe, cached_probe
from .pyav_reader import decode_frames
from .transforms import resize_crop_normalise


def view_indices(num_video_frames: int, num_frames: int, num_clips: int) -> List[List[int]]:
    """Frame indices of ``num_clips`` evaluation clips: T segment centres, the clips shifted by equal
    fractions of a segment so that together they cover the video evenly (one clip = the centres)."""
    segment = num_video_frames / num_frames
    return [[min(num_video_frames - 1, int(segment * (i + (c + 0.5) / num_clips))) for i in range(num_frames)]
            for c in range(num_clips)]


def crop_positions(height: int, width: int, num_crops: int) -> List[tuple]:
    """1 crop: the centre. 3 crops: both ends and the centre of the long side."""
    if num_crops == 1:
        return [(0.5, 0.5)]
    if width >= height:
        return [(0.5, 0.0), (0.5, 0.5), (0.5, 1.0)]
    return [(0.0, 0.5), (0.5, 0.5), (1.0, 0.5)]


def read_video_views(path: Union[str, os.PathLike], num_frames: int, size: int = 224, num_clips: int = 1,
                     num_crops: int = 1, probe: Optional[VideoProbe] = None) -> torch.Tensor:
    """All views of one video: float32 (num_clips * num_crops, T, 3, size, size), CLIP-normalised;
    the crops of a clip are adjacent. ``probe``: the file's frame index (None: probed once per
    process)."""
    if num_crops not in (1, 3):
        raise ValueError(f"num_crops must be 1 or 3, got {num_crops}")
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")
    path = os.fspath(path)
    total = (probe or cached_probe(path)).frames
    clips = view_indices(total, num_frames, num_clips)
    wanted = sorted({i for clip in clips for i in clip})
    frames, _ = decode_frames(path, wanted, size, probe)  # one common size, scaled while still uint8
    if len(frames) < len(wanted):
        raise VideoDecodeError(path, "some frames of the evaluation views did not decode")
    by_index = dict(zip(wanted, frames))
    views = []
    for clip in clips:
        stacked = torch.from_numpy(np.stack([by_index[i] for i in clip]))
        for position in crop_positions(stacked.shape[1], stacked.shape[2], num_crops):
            views.append(resize_crop_normalise(stacked, size, "eval", position=position))
    return torch.stack(views)


def average_views(outputs: torch.Tensor, num_views: int) -> torch.Tensor:
    """(B * views, ...) features or logits, the views of a video adjacent -> (B, ...) averaged."""
    if outputs.shape[0] % num_views:
        raise ValueError(f"outputs hold {outputs.shape[0]} rows, not a multiple of num_views = {num_views}")
    return outputs.unflatten(0, (-1, num_views)).mean(dim=1)
