"""Evaluation over a loader, both tasks: ``evaluate(config, checkpoint)`` and the pieces the trainer
shares with it (``encode_loader``, ``run_evaluation``)."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Dict, Iterable, Optional

import torch
import torch.nn.functional as F

from ..io import write_json
from . import distributed
from .checkpoint import resolve_prompts
from .config import TrainConfig
from .setup import (autocast_for, build_datasets, build_loader, build_task, eval_batch_per_rank, make_encoder,
                    model_from_checkpoint, resolve_device)


@torch.no_grad()
def encode_batch(encoder: Callable, batch: Dict, device: torch.device, autocast, views: int = 1) -> torch.Tensor:
    """(B, E) fp32 features of an evaluation batch; multi-view batches (B, views, T, ...) are encoded
    view by view and averaged, then L2-normalised again."""
    from ..data.views import average_views

    video = batch["video"].to(device, non_blocking=True)
    if views > 1:
        video = video.flatten(0, 1)
    with autocast():
        feats = encoder(video).float()
    return F.normalize(average_views(feats, views), dim=-1) if views > 1 else feats


@torch.no_grad()
def encode_loader(encoder: Callable, loader, size: int, info: distributed.Dist, device: torch.device,
                  autocast, views: int = 1):
    """Features of every video of an evaluation loader, in dataset order: ((n, E) fp32, valid (n,) bool)
    (:func:`encode_batch`). Videos that failed to decode come back with ``valid`` False."""
    feats, indices, valid = [], [], []
    for batch in loader:
        feats.append(encode_batch(encoder, batch, device, autocast, views))
        indices.append(batch["index"].to(device))
        valid.append(batch["valid"].to(device))
    feats = distributed.gather_rows(torch.cat(feats), info)
    indices = distributed.gather_rows(torch.cat(indices), info)
    valid = distributed.gather_rows(torch.cat(valid).to(torch.uint8), info).bool()
    real = indices >= 0  # the loaders pad the last batches with index -1
    out = torch.zeros(size, feats.shape[1], device=device)
    ok = torch.zeros(size, dtype=torch.bool, device=device)
    out[indices[real]] = feats[real]
    ok[indices[real]] = valid[real]
    return out, ok


def run_evaluation(encoder, loader, task, val_set, labels, info, device, autocast, views) -> Dict[str, float]:
    """``val_*`` metrics of the task over every video the loader yields, with the counts of videos
    evaluated (``val_videos``) and left out because they did not decode (``val_skipped``)."""
    features, valid = encode_loader(encoder, loader, len(val_set), info, device, autocast, views)
    n_valid = int(valid.sum())
    if n_valid == 0:
        raise ValueError(f"no video of the {val_set.split} split could be decoded; is video_root right?")
    metrics = task.evaluate(features, valid, labels)
    metrics = {f"val_{k}": v for k, v in metrics.items()}
    metrics["val_videos"] = n_valid
    metrics["val_skipped"] = len(val_set) - n_valid
    return metrics


def evaluate(config: TrainConfig, checkpoint: Optional[str] = None, *, zero_shot: bool = False,
             out: Optional[str] = None, force: bool = False, keep: Iterable[str] = ()) -> Dict[str, Any]:
    """Metrics of a trained checkpoint (a prompt file, a training ``.pt`` or a run folder), or with
    ``zero_shot`` of the frozen CLIP with prompts off (k = 0, rho = 0: CLIP4Clip mean pooling), on the
    config's evaluation split. The model is the checkpoint's (``setup.model_from_checkpoint``; ``keep``
    names the settings of ``config`` that it must not replace). Writes the metrics as JSON to ``out``."""
    config.validate(require_data=True)
    if zero_shot == (checkpoint is not None):
        raise ValueError("evaluate needs either a checkpoint or zero_shot=True")
    info = distributed.setup(cuda=(config.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda"))
    try:
        device = resolve_device(config, info)
        config = config.resolved(device.type == "cuda", info.local_rank)
        config = dataclasses.replace(config, device=str(device))
        _, val_set = build_datasets(config, need_train=False)
        prompts = resolve_prompts(checkpoint) if checkpoint else None
        if zero_shot:
            config = config.with_stop(k=0, rho=0)
        model, config = model_from_checkpoint(config, prompts, device, keep=keep, force=force)
        autocast = autocast_for(device, config.precision)
        task = build_task(config, model, None, val_set, autocast, info.world_size)
        labels = task.labels_for(val_set) if task.name == "recognition" else None
        loader = build_loader(config, val_set, "eval", info, device, model.image_size,
                              eval_batch_per_rank(config.eval_batch_size, info.world_size, len(val_set)))
        loader.set_epoch(0)
        metrics = run_evaluation(make_encoder(model, config.impl, config.compile), loader, task, val_set, labels,
                                 info, device, autocast, config.eval_clips * config.eval_crops)
        result = {**metrics, "dataset": config.dataset, "split": val_set.split, "task": task.name,
                  "checkpoint": prompts, "zero_shot": zero_shot, "frames": config.eval_num_frames,
                  "views": config.eval_clips * config.eval_crops, "random_backbone": config.weights is None}
        if out and info.main:
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            write_json(out, result)
        return result
    finally:
        distributed.teardown()
