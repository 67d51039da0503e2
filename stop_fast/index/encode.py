"""Encoding a list of videos for an index: the training room's evaluation loader (PyAV or DALI, as
``stop_fast.train.setup.build_loader`` picks), the run's encoder and precision, multi-view averaging
as evaluation does it, and a progress bar.

Rows are handed to ``on_chunk`` in whole batches, in the loader's order, every ``chunk_rows`` rows or
``chunk_seconds`` seconds: a build killed between two chunks resumes with the next batch exactly as
an uninterrupted build would have formed it, so both encode every video in the same batch (on a CPU:
bit-identical rows). Features stay on the device until a chunk is handed over, so the loop never
waits on the GPU between batches.

A video the loader could not decode (``valid`` False) is read again here, in this process, with the
PyAV readers (``read_video_clip`` / ``read_video_views``): if that fails its reason is recorded
(``failed``), otherwise the clip is encoded on its own (a decoder that refuses a file, e.g. DALI and a
codec NVDEC lacks, costs that video no more than a slower read).
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Callable, Dict, List, Sequence

import torch

from .sources import VideoFile
from .store import Rows

log = logging.getLogger(__name__)


@torch.no_grad()
def encode_videos(model, config, files: Sequence[VideoFile], info, device: torch.device, batch_size: int,
                  on_chunk: Callable[[Rows, List[dict]], None], chunk_rows: int, chunk_seconds: float,
                  progress: bool = True) -> Dict[str, float]:
    """Encode this rank's share of ``files`` (the loader shards them over ``info``'s ranks), handing
    rows and failures to ``on_chunk``; returns ``{"videos", "failed", "seconds"}`` of this rank."""
    from ..data import Sample, VideoDataset
    from ..train.evaluation import encode_batch
    from ..train.setup import autocast_for, build_loader, make_encoder

    dataset = VideoDataset("index", "index", [Sample(f.path) for f in files], task="retrieval")
    loader = build_loader(config, dataset, "eval", info, device, model.image_size, batch_size)
    loader.set_epoch(0)
    encoder = make_encoder(model, config.impl, config.compile)
    autocast = autocast_for(device, config.precision)
    views = config.eval_clips * config.eval_crops
    share = len(range(info.rank, len(files), info.world_size))
    bar = _Progress(share, info, progress)
    pending: List[tuple] = []  # (rows of files, features on the device)
    failed: List[dict] = []
    done = bad = 0
    tic = last_flush = time.perf_counter()

    def flush() -> None:
        nonlocal pending, failed, last_flush
        if not pending and not failed:
            return
        chosen = [files[i] for part, _ in pending for i in part]
        feats = torch.cat([f for _, f in pending]).to("cpu", torch.float16) if pending else \
            torch.zeros(0, model.visual.output_dim, dtype=torch.float16)
        rows = Rows([f.path for f in chosen], torch.tensor([f.size for f in chosen], dtype=torch.int64),
                    torch.tensor([f.mtime_ns for f in chosen], dtype=torch.int64), feats)
        on_chunk(rows, failed)
        pending, failed, last_flush = [], [], time.perf_counter()

    for batch in loader:
        feats = encode_batch(encoder, batch, device, autocast, views)
        index, valid = batch["index"].tolist(), batch["valid"].tolist()
        keep = [j for j, (i, ok) in enumerate(zip(index, valid)) if i >= 0 and ok]
        if keep:
            pending.append(([index[j] for j in keep], feats if len(keep) == len(index) else feats[keep]))
        for i, ok in zip(index, valid):
            if i >= 0 and not ok:
                alone = _encode_alone(model, config, files[i], device)
                if isinstance(alone, torch.Tensor):
                    pending.append(([i], alone))
                else:
                    failed.append(alone)
                    bad += 1
        real = sum(i >= 0 for i in index)
        done += real
        bar.update(real, done, time.perf_counter() - tic)
        entries = sum(len(p) for p, _ in pending) + len(failed)  # a chunk counts its failures too
        if entries >= chunk_rows or time.perf_counter() - last_flush >= chunk_seconds:
            flush()
    flush()
    bar.close(done, time.perf_counter() - tic)
    return {"videos": done, "failed": bad, "seconds": time.perf_counter() - tic}


def encode_file(model, config, path: str, device) -> torch.Tensor:
    """(1, E) fp32 feature of one video file with ``config``'s evaluation frames and views, decoded
    with PyAV and encoded as evaluation encodes a batch (``evaluation.encode_batch``)."""
    from ..data import read_video_clip
    from ..data.views import read_video_views
    from ..train.evaluation import encode_batch
    from ..train.setup import autocast_for, make_encoder

    views = config.eval_clips * config.eval_crops
    if views > 1:
        clip = read_video_views(path, config.eval_num_frames, model.image_size, config.eval_clips, config.eval_crops)
    else:
        clip = read_video_clip(path, config.eval_num_frames, size=model.image_size, mode="eval", backend="pyav")
    return encode_batch(make_encoder(model, config.impl, False), {"video": clip[None]}, device,
                        autocast_for(device, config.precision), views)


def _encode_alone(model, config, file: VideoFile, device):
    """The feature (1, E) of a video the loader could not decode, read here with PyAV; or its failure
    record ``{"path", "size", "mtime_ns", "reason"}`` when that fails too."""
    from ..data import VideoDecodeError

    try:
        return encode_file(model, config, file.path, device)
    except Exception as exc:  # noqa: BLE001 - whatever broke, the video is named and counted, never fatal
        reason = exc.reason if isinstance(exc, VideoDecodeError) else f"{type(exc).__name__}: {exc}"
        return {"path": file.path, "size": file.size, "mtime_ns": file.mtime_ns, "reason": " ".join(reason.split())}


class _Progress:
    """A tqdm bar on a terminal (rank 0); elsewhere (a pipe, a log file) a line every 30 s."""

    def __init__(self, total: int, info, enabled: bool):
        from tqdm import tqdm

        self.enabled = enabled and info.main
        self.terminal = self.enabled and sys.stderr.isatty()
        self.total, self.ranks, self.last_line = total, info.world_size, time.perf_counter()
        desc = "index" if info.world_size == 1 else f"index (rank 0 of {info.world_size})"
        self.bar = tqdm(total=total, unit="video", desc=desc, disable=not self.terminal, dynamic_ncols=True)

    def update(self, count: int, done: int, seconds: float) -> None:
        self.bar.update(count)
        if self.enabled and not self.terminal and time.perf_counter() - self.last_line >= 30:
            self._line(done, seconds)
            self.last_line = time.perf_counter()

    def close(self, done: int, seconds: float) -> None:
        self.bar.close()
        if self.enabled and not self.terminal and self.total:
            self._line(done, seconds)

    def _line(self, done: int, seconds: float) -> None:
        rate = done / seconds if seconds > 0 else 0.0
        scope = "" if self.ranks == 1 else f" (rank 0; {self.ranks} ranks)"
        print(f"index: {done}/{self.total} videos{scope}, {rate:.1f} videos/s", file=sys.stderr, flush=True)
