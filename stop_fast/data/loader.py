"""Batched clip loading on the CPU: torch DataLoader workers decoding with PyAV.

Deterministic given a seed, reshuffled every epoch (``set_epoch``), sharded for DDP ranks with equal
batch counts per rank, and robust to bad files: in training a file that fails (a
``VideoDecodeError`` or any other exception while reading it) is logged by name, counted, and
replaced by another sample; in evaluation it comes back as a zero clip with ``valid=False`` (as do
the padding entries of the last, partial batch), so no epoch dies on one video.

With a ``prepare`` manifest (``manifest=``), each sample is read from its prepared copy when the
manifest holds a current one, with the manifest's frame index (no probe of the file), and a video
the manifest marks unreadable fails at once (logged, counted) without being opened.
"""
from __future__ import annotations

import logging
import math
import random
import os
from typing import Dict, Iterator, List, Optional, Union

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .datasets import VideoDataset
from .errors import VideoDecodeError
from .manifest import Manifest, Source, sources
from .reader import read_video_clip
from .views import read_video_views

log = logging.getLogger(__name__)

PADDING = -1  # sampler index of a padding entry (evaluation only)


class ClipDataset(Dataset):
    """Item ``i`` of a :class:`VideoDataset` as a decoded clip; ``PADDING`` gives an invalid zero clip."""

    def __init__(self, dataset: VideoDataset, num_frames: int, size: int = 224, mode: str = "eval",
                 seed: int = 0, flip: Optional[bool] = None, max_replacements: int = 10, num_clips: int = 1,
                 num_crops: int = 1, sources: Optional[Dict[str, Source]] = None):
        if (num_clips, num_crops) != (1, 1) and mode != "eval":
            raise ValueError("num_clips / num_crops (multi-view) apply to mode='eval' only")
        if num_clips < 1 or num_crops not in (1, 3):
            raise ValueError(f"num_clips must be >= 1 and num_crops 1 or 3, got {num_clips}, {num_crops}")
        self.num_clips, self.num_crops = num_clips, num_crops
        self.dataset = dataset
        self.num_frames, self.size, self.mode, self.seed = num_frames, size, mode, seed
        self.flip = dataset.allow_flip if flip is None else flip
        self.max_replacements = max_replacements
        self.sources = sources or {}  # sample path -> what to read (a manifest's copy and frame index)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def _item(self, index: int, clip: torch.Tensor, valid: bool, failures: int) -> Dict:
        sample = self.dataset.samples[index] if index >= 0 else None
        return {"video": clip, "label": sample.label if sample else -1, "index": index, "valid": valid,
                "failures": failures}

    def __getitem__(self, index: int) -> Dict:
        views = self.num_clips * self.num_crops
        empty = torch.zeros(*((views,) if views > 1 else ()), self.num_frames, 3, self.size, self.size)
        if index == PADDING:
            return self._item(PADDING, empty, False, 0)
        rng = random.Random(hash((self.seed, self.epoch, index)))
        failures = 0
        current = index
        while True:
            sample = self.dataset.samples[current]
            flip = self.mode == "train" and self.flip and rng.random() < 0.5
            source = self.sources.get(sample.path) or Source(sample.path)
            try:
                if source.error:
                    raise VideoDecodeError(sample.path, source.error)
                if views > 1:
                    clip = read_video_views(source.path, self.num_frames, self.size, self.num_clips, self.num_crops,
                                            probe=source.probe)
                else:
                    clip = read_video_clip(source.path, self.num_frames, self.size, self.mode,
                                           seed=rng.randrange(2**31), flip=flip, probe=source.probe)
                return self._item(current, clip, True, failures)
            except Exception as exc:  # noqa: BLE001 - one sample, whatever broke, never ends the epoch
                failures += 1
                log_failure(log, source.path, exc)
                if self.mode != "train":
                    return self._item(current, empty, False, failures)
                if failures > self.max_replacements:
                    raise VideoDecodeError(sample.path, f"{failures} videos in a row failed to decode; is the dataset readable?") from exc
                current = rng.randrange(len(self.dataset))


def log_failure(logger: logging.Logger, path: str, exc: BaseException) -> str:
    """Log a sample that could not be read, by name; an unexpected error (not a
    :class:`VideoDecodeError`) also gets its traceback at debug level. Returns the reason."""
    if isinstance(exc, VideoDecodeError):
        reason = exc.reason
    else:
        reason = f"unexpected {type(exc).__name__}: {exc}"
        logger.debug("reading %s failed", path, exc_info=exc)
    logger.warning("skipping %s (%s)", path, reason)
    return reason


class ShardedSampler(Sampler[int]):
    """Indices for one rank: every rank gets the same number of batches.

    Training: a permutation seeded by (seed, epoch), wrapped around so it splits evenly over the
    ranks; each rank takes a strided share. Evaluation: the dataset in order, each rank's share padded
    with ``PADDING`` up to whole batches, so every sample is seen exactly once over all ranks.
    """

    def __init__(self, size: int, batch_size: int, mode: str = "eval", rank: int = 0, world_size: int = 1,
                 seed: int = 0, drop_last: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in 0..{world_size - 1}, got {rank}")
        if size < 1 or batch_size < 1:
            raise ValueError(f"need a non-empty dataset and batch_size >= 1, got size {size}, batch_size {batch_size}")
        self.size, self.batch_size, self.mode = size, batch_size, mode
        self.rank, self.world_size, self.seed, self.drop_last = rank, world_size, seed, drop_last
        self.epoch = 0
        self.start = 0  # entries of this epoch already consumed (a resumed run starts mid-epoch)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _indices(self) -> List[int]:
        if self.mode == "train":
            order = list(range(self.size))
            random.Random(hash((self.seed, self.epoch))).shuffle(order)
            per_rank = math.ceil(self.size / self.world_size)
            order = (order * math.ceil(per_rank * self.world_size / self.size))[: per_rank * self.world_size]
            mine = order[self.rank :: self.world_size]
            if self.drop_last:
                mine = mine[: len(mine) // self.batch_size * self.batch_size] or mine
            return mine
        per_rank = math.ceil(self.size / self.world_size)
        per_rank = math.ceil(per_rank / self.batch_size) * self.batch_size
        mine = list(range(self.size))[self.rank :: self.world_size]
        return mine + [PADDING] * (per_rank - len(mine))

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start :])

    def __len__(self) -> int:
        return max(0, len(self._indices()) - self.start)


class VideoLoader:
    """Batches ``{"video": (B, T, 3, S, S), "label": (B,), "index": (B,), "valid": (B,) bool}``.

    Multi-view evaluation (``num_clips`` clips x ``num_crops`` crops, see :mod:`.views`) makes the
    video ``(B, views, T, 3, S, S)``; run the model on ``video.flatten(0, 1)`` and average with
    ``views.average_views(outputs, views)``.

    ``stats`` counts clips decoded and files that failed (each failure is also logged by name).

    ``manifest``: a ``stop-fast prepare`` manifest (path or :class:`~.manifest.Manifest`): samples
    are read from their prepared copies (``use_prepared``) with the manifest's frame indexes, and the
    videos it marks unreadable fail without being opened. Records of files that changed since they
    were written are ignored (those files are probed at run time).
    """

    def __init__(self, dataset: VideoDataset, num_frames: int, batch_size: int, size: int = 224,
                 mode: str = "eval", seed: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 2,
                 flip: Optional[bool] = None, dtype: torch.dtype = torch.float32, num_clips: int = 1,
                 num_crops: int = 1, manifest: Optional[Union[str, os.PathLike, Manifest]] = None,
                 use_prepared: bool = True):
        known = sources(dataset, manifest, use_prepared) if manifest is not None else None
        self.clips = ClipDataset(dataset, num_frames, size, mode, seed, flip, num_clips=num_clips, num_crops=num_crops,
                                 sources=known)
        self.sampler = ShardedSampler(len(dataset), batch_size, mode, rank, world_size, seed)
        self.dtype = dtype
        self.loader = DataLoader(self.clips, batch_size=batch_size, sampler=self.sampler, num_workers=num_workers,
                                 collate_fn=_collate, persistent_workers=False)
        self.stats = {"clips": 0, "failures": 0}

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """``start_batch``: skip this epoch's first batches (resuming a run where it stopped)."""
        self.clips.epoch = epoch
        self.sampler.set_epoch(epoch, start_batch * self.sampler.batch_size)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.stats["clips"] += int(batch["valid"].sum())
            self.stats["failures"] += int(batch.pop("failures").sum())
            batch["video"] = batch["video"].to(self.dtype)
            yield batch


def _collate(items: List[Dict]) -> Dict[str, torch.Tensor]:
    return {
        "video": torch.stack([it["video"] for it in items]),
        "label": torch.tensor([it["label"] for it in items], dtype=torch.long),
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
        "valid": torch.tensor([it["valid"] for it in items], dtype=torch.bool),
        "failures": torch.tensor([it["failures"] for it in items], dtype=torch.long),
    }
