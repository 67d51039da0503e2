"""Tiny datasets for the training tests: short clips written with PyAV whose content depends on the
class (a square moving in the class's direction over a clip-specific background), and CSV lists."""
from __future__ import annotations

import csv
import os
from typing import List, Optional, Sequence

import av
import numpy as np

from stop_fast.synthetic import square_position

DIRECTIONS = ("right", "left", "down", "up")
COLOURS = ((255, 60, 60), (60, 255, 60), (60, 60, 255), (255, 255, 60))  # one per class: easy to memorise


def write_clip(path: str, direction: int, seed: int, num_frames: int = 8, size: int = 48, codec: str = "mpeg4") -> str:
    """``codec``: mpeg4 (PyAV only on a CPU) or libvpx-vp9 (DALI's CPU decoder reads it too)."""
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 90, size=(size, size, 3), dtype=np.uint8)
    colour = np.asarray(COLOURS[direction], dtype=np.uint8)
    side = size // 3
    travel = size - side
    start = int(rng.integers(0, travel + 1))
    with av.open(path, mode="w") as container:
        stream = container.add_stream(codec, rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "2"} if codec == "mpeg4" else {"crf": "10", "b:v": "0", "g": "4"}
        for t in range(num_frames):
            img = background.copy()
            y, x = square_position(direction, t, num_frames, travel, (start, start))
            img[y : y + side, x : x + side] = colour
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def make_dataset(root: str, per_class: int = 2, classes: int = 2, splits: Sequence[str] = ("train", "val"),
                 task: str = "recognition", num_frames: int = 8, corrupt: Optional[str] = None,
                 codec: str = "mpeg4") -> str:
    """Clips under ``root/videos`` and ``root/<split>.csv`` for each split (the same clips in every split,
    so a model that memorises the training set scores on the evaluation split). ``corrupt``: also list
    a garbage file of that name in the training split."""
    os.makedirs(os.path.join(root, "videos"), exist_ok=True)
    rows: List[dict] = []
    for c in range(classes):
        for i in range(per_class):
            name = f"videos/{DIRECTIONS[c]}_{i}." + ("mp4" if codec == "mpeg4" else "webm")
            write_clip(os.path.join(root, name), c, seed=100 * c + i, num_frames=num_frames, codec=codec)
            if task == "recognition":
                rows.append({"path": name, "label": DIRECTIONS[c]})
            else:
                rows.append({"path": name, "caption": f"clip {c}-{i}: a square moves {DIRECTIONS[c]}"})
    for split in splits:
        split_rows = list(rows)
        if corrupt and split == "train":
            with open(os.path.join(root, corrupt), "wb") as f:
                f.write(b"this is not a video" * 10)
            split_rows.insert(1, {**rows[0], "path": corrupt})
        with open(os.path.join(root, f"{split}.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(split_rows[0]))
            writer.writeheader()
            writer.writerows(split_rows)
    return root
