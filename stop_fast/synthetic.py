"""Generated videos with known motion, for the demo, smoke tests and benchmarks (no files needed)."""
from __future__ import annotations

import csv
import hashlib
import os
from typing import Optional, Tuple

import numpy as np
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD


def clip_normalise(frames: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1], channels in dim -3 -> CLIP-normalised."""
    mean = torch.tensor(OPENAI_DATASET_MEAN, dtype=frames.dtype, device=frames.device)[:, None, None]
    std = torch.tensor(OPENAI_DATASET_STD, dtype=frames.dtype, device=frames.device)[:, None, None]
    return (frames - mean) / std


def square_position(direction: int, t: int, num_frames: int, travel: int, start) -> tuple:
    """Top-left (y, x) at frame ``t`` of a square crossing ``travel`` pixels evenly over ``num_frames``
    frames: ``direction`` 0..3 is right, left, down, up; ``start`` (y, x) holds the other coordinate."""
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
    return y, x


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
    for t in range(num_frames):
        y, x = square_position(direction, t, num_frames, size - side, start)
        frames[t, :, y : y + side, x : x + side] = colour[:, None, None]
    return clip_normalise(frames)


# ---------------------------------------------------------------- the motion-direction task of the demo
#
# Two classes that differ only in the direction of motion: a bright shape crosses a dark, static,
# smooth background from left to right or from right to left. A "moving left" clip is a "moving right"
# scene played backwards, so every clip's time reversal is a clip of the other class and the two
# classes hold the same frames in distribution: anything that forgets frame order (mean pooling of
# per-frame features, the prompts-off CLIP baseline) is at chance by construction.
MOTION_CLASSES = ("moving right", "moving left")


def motion_clip(label: int, num_frames: int, size: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One clip of class ``MOTION_CLASSES[label]``: uint8 (num_frames, size, size, 3) RGB.

    The scene (background, shape size and colour, path) depends only on ``generator``; ``label`` plays
    it forwards (0, moving right) or backwards (1, moving left), so from equal generator states
    ``motion_clip(1, ...)`` is exactly ``motion_clip(0, ...)`` reversed in time. The shape moves with
    sub-pixel precision (area-weighted edges), at a speed that varies from clip to clip.
    """
    if isinstance(label, bool) or label not in (0, 1):
        raise ValueError(f"label must be 0 ({MOTION_CLASSES[0]}) or 1 ({MOTION_CLASSES[1]}), got {label!r}")
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 2:
        raise ValueError(f"num_frames must be an int >= 2 (motion needs two frames), got {num_frames!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 16:
        raise ValueError(f"size must be an int >= 16, got {size!r}")

    # a few numbers from the generator, then plain numpy: the arrays are small, and torch's thread pool
    # only adds overhead here (a lot of it on a busy machine)
    draws = torch.rand(56, generator=generator, dtype=torch.float64).numpy()
    grid = 0.35 * draws[:48].reshape(3, 4, 4)  # a static background: 4 x 4 dark colours, blended bilinearly
    side = (0.15 + 0.15 * draws[48]) * size
    colour = 0.65 + 0.35 * draws[49:52]
    room = size - side
    top = draws[52] * room
    left_end, right_end = 0.25 * draws[53] * room, room - 0.25 * draws[54] * room

    background = _bilinear(grid, size)  # (3, size, size)
    pixels = np.arange(size, dtype=np.float64)
    lefts = np.linspace(left_end, right_end, num_frames)  # the shape's left edge in each frame
    rows = _coverage(pixels, np.array([top]), side)  # (1, size)
    cols = _coverage(pixels, lefts, side)  # (T, size)
    alpha = (rows[:, :, None] * cols[:, None, :])[:, None]  # (T, 1, size, size): share of each pixel covered
    video = background * (1 - alpha) + colour[:, None, None] * alpha  # (T, 3, size, size) in [0, 1]
    if label == 1:
        video = video[::-1]
    video = np.rint(video * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    return torch.from_numpy(np.ascontiguousarray(video))


def _coverage(pixels: np.ndarray, low: np.ndarray, length: float) -> np.ndarray:
    """Share of each unit pixel [p, p + 1) covered by [low, low + length): (L,), (M,) -> (M, L)."""
    low = low[:, None]
    return np.clip(np.minimum(pixels + 1, low + length) - np.maximum(pixels, low), 0.0, 1.0)


def _bilinear(grid: np.ndarray, size: int) -> np.ndarray:
    """(C, g, g) -> (C, size, size), corners aligned."""
    g = grid.shape[-1]
    x = np.linspace(0, g - 1, size)
    i0 = np.minimum(np.floor(x).astype(int), g - 2)
    w = x - i0
    rows = grid[:, i0] * (1 - w)[None, :, None] + grid[:, i0 + 1] * w[None, :, None]  # (C, size, g)
    return rows[:, :, i0] * (1 - w) + rows[:, :, i0 + 1] * w


def write_video(path, frames: torch.Tensor, fps: int = 8) -> str:
    """uint8 (T, H, W, 3) RGB frames -> an MJPEG ``.avi`` at high quality (full-resolution chroma).

    MJPEG codes every frame on its own, so a clip written backwards decodes to exactly the reversed
    frames: the reversal symmetry of the task survives compression. PyAV and DALI's CPU decoder both
    read it, and small frames decode in well under a millisecond.
    """
    import av

    frames = frames.numpy() if isinstance(frames, torch.Tensor) else frames
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
    _, height, width, _ = frames.shape
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mjpeg", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuvj444p"
        # one fixed quantiser: every frame is coded the same way wherever it sits in the stream
        stream.codec_context.qmin = stream.codec_context.qmax = 2
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def write_motion_dataset(root, num_train: int = 192, num_val: int = 128, size: int = 112, frames: int = 8,
                         seed: int = 0) -> Tuple[str, str]:
    """Write the motion-direction task as video files plus ``train.csv`` / ``val.csv``.

    The CSVs are the ``csv`` dataset format (header ``path,label``, paths relative to ``root``, the
    label a class name of :data:`MOTION_CLASSES`); videos go to ``root/videos/<split>_NNNNN.avi``.
    Clips come in pairs: clips ``2i`` and ``2i + 1`` are one scene played forwards and backwards, so
    both splits are balanced and every clip's time reversal is in its split. Mean pooling gives the
    two clips of a pair the same feature, so it scores exactly 50% on them whatever the weights (with
    evaluation sampling symmetric in time: ``frames`` equal to, or an odd multiple of, the frames a
    model samples). Scenes differ between splits; the same arguments write the same files.
    Returns ``(train_csv, val_csv)``.
    """
    for name, value in (("num_train", num_train), ("num_val", num_val)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 2 or value % 2:
            raise ValueError(f"{name} must be an even int >= 2 (clips come in forward / backward pairs), got {value!r}")
    videos = os.path.join(root, "videos")
    os.makedirs(videos, exist_ok=True)
    generator = torch.Generator()
    tables = []
    for split_index, (split, count) in enumerate((("train", num_train), ("val", num_val))):
        rows = []
        for i in range(count):
            label = i % 2
            generator.manual_seed(_scene_seed(seed, split_index, i // 2))
            rel = f"videos/{split}_{i:05d}.avi"
            write_video(os.path.join(root, rel), motion_clip(label, frames, size, generator))
            rows.append((rel, MOTION_CLASSES[label]))
        table = os.path.join(root, f"{split}.csv")
        with open(table, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(("path", "label"))
            writer.writerows(rows)
        tables.append(table)
    return tables[0], tables[1]


def _scene_seed(seed: int, split: int, pair: int) -> int:
    """A distinct, stable seed for every (seed, split, pair): splits never share a scene."""
    return int(hashlib.sha256(f"stop-fast motion {seed} {split} {pair}".encode()).hexdigest()[:15], 16)
