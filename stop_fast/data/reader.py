"""``read_video_clip``: one clip of one video, decoded, sampled and transformed, ready for STOP."""
from __future__ import annotations

import os
import random
from typing import Optional, Union

import torch

from .dali_reader import dali_available, import_dali, read_clip_dali
from .errors import VideoDecodeError
from .probe import VideoProbe
from .pyav_reader import read_clip_pyav
from .sampling import MODES
from .transforms import resize_crop_normalise

BACKENDS = ("auto", "pyav", "dali")


def read_video_clip(
    path: Union[str, os.PathLike],
    num_frames: int,
    size: int = 224,
    mode: str = "eval",
    backend: str = "auto",
    seed: Optional[int] = None,
    flip: bool = False,
    probe: Optional[VideoProbe] = None,
) -> torch.Tensor:
    """Decode ``num_frames`` frames of ``path`` -> float32 (num_frames, 3, size, size), CLIP-normalised.

    Sampling follows SPEC.md: ``mode="train"`` takes one random frame per segment (TSN) and a random
    crop (and a horizontal flip when ``flip``); ``mode="eval"`` the segment centres and the centre
    crop. Frames are picked by decoded-frame index, so variable frame rate needs no timestamps;
    rotation metadata is applied (frames come out upright); grayscale becomes RGB; any size is
    resized. ``seed`` makes training sampling repeatable. ``backend``: ``"pyav"`` (FFmpeg on the CPU,
    any codec), ``"dali"`` (NVIDIA DALI: NVDEC where there is a GPU, DALI's CPU decoder for VP8 / VP9
    / MJPEG otherwise), ``"auto"`` (DALI on a GPU when DALI is installed, falling back to PyAV for
    what NVDEC cannot read; PyAV elsewhere). ``probe``: the file's frame index (a ``prepare``
    manifest's, :meth:`VideoProbe.from_record`); None probes the file once per process. Any failure
    raises :class:`VideoDecodeError` naming the file.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be an int >= 1, got {num_frames!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be an int >= 1, got {size!r}")
    rng = random.Random(seed)
    frames = None
    if backend == "dali":
        import_dali()  # a missing package is named before any file is touched
        frames = read_clip_dali(os.fspath(path), num_frames, mode, rng, probe=probe)
    elif backend == "auto" and torch.cuda.is_available() and dali_available():
        try:
            frames = read_clip_dali(os.fspath(path), num_frames, mode, rng, probe=probe)
        except VideoDecodeError:  # a codec NVDEC lacks (MPEG-4 Part 2, ...): FFmpeg reads it, same draws
            rng = random.Random(seed)
    if frames is None:
        frames = read_clip_pyav(path, num_frames, mode, rng, size=size, probe=probe)  # scaled while still uint8
    try:
        return resize_crop_normalise(frames, size, mode, rng, flip=flip and mode == "train")
    except ValueError as exc:
        raise VideoDecodeError(path, str(exc)) from exc
