"""The training loop and evaluation: ``train(config)`` and ``evaluate(config, checkpoint)``.

The loop knows the model only through ``encode_video`` (via :func:`make_encoder`), ``encode_text``
and the trainable parameters. One optimiser step:

    for each of `accumulation` micro-batches:  features = encoder(video)  (bf16 autocast on CUDA)
                                               loss = task loss (InfoNCE gathers across ranks)
                                               backward (DDP averages the trainable gradients)
    clip the gradient norm, AdamW step, scheduler step

Nothing in the step reads a value back to the host: the loss is summed on the device and read at
logging intervals only, and ``encode_video`` runs with ``check_inputs=False`` (no NaN scan).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import logging
import math
import os
import signal
import sys
import threading
import time
import warnings
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import devices
from . import checkpoint as ckpt
from . import distributed
from .config import LOGIT_SCALE, TrainConfig
from .records import MetricsLog, plot_curves, write_json

log = logging.getLogger("stop_fast.train")


# ---------------------------------------------------------------------------------------------- model
def resolve_device(config: TrainConfig, info: distributed.Dist) -> torch.device:
    """The run's device: ``config.device``, a bare ``cuda`` meaning this rank's GPU under torchrun."""
    return devices.resolve_device(config.device, local_rank=info.local_rank)


def build_model(config: TrainConfig, device: torch.device, *, k: Optional[int] = None, rho: Optional[int] = None):
    """STOP over the frozen backbone that ``config`` names, on ``device``, with frozen weights in bf16
    when the run is bf16. A random backbone (no ``weights``) is seeded with ``config.seed`` so that every
    rank, and a later evaluation, rebuilds the same one."""
    from .. import STOP, STOPConfig, load_clip

    if config.weights and not os.path.isfile(config.weights):
        raise FileNotFoundError(f"weights file not found: {config.weights}")
    stop_config = STOPConfig(model_name=config.model, num_frames=config.frames,
                             k=config.k if k is None else k, rho=config.rho if rho is None else rho,
                             alpha=config.alpha, beta=config.beta, r_intra=config.r_intra, r_inter=config.r_inter)
    torch.manual_seed(config.seed)
    extra = {}
    if config.weights is None and "seed" in inspect.signature(load_clip).parameters:
        extra["seed"] = config.seed
    clip = load_clip(config.model, config.weights, device=device, **extra)
    model = STOP(stop_config, clip).to(device)
    if config.precision == "bf16" and hasattr(model, "cast_backbone"):
        model.cast_backbone(torch.bfloat16)  # once: the frozen weights stay resident in bf16
    if config.grad_checkpointing:
        if hasattr(model, "set_grad_checkpointing"):
            model.set_grad_checkpointing(True)
        else:
            warnings.warn("grad_checkpointing: this STOP has no set_grad_checkpointing(); training without it",
                          stacklevel=2)
    return model


def make_encoder(model, impl: str, compile: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """``video (B, T, 3, S, S) -> features (B, E)``: the one place that decides how videos are encoded.

    ``compile``: torch.compile through ``stop_fast.model.compiled.compile_encoder``, which falls back to
    eager with a warning naming the reason. Eager otherwise, without the NaN/Inf scan."""
    if compile:
        try:
            from ..model.compiled import compile_encoder
        except ImportError as exc:
            warnings.warn(f"compile: torch.compile is not available for STOP here ({exc}); running eager",
                          stacklevel=2)
        else:
            return compile_encoder(model, impl=impl)
    return functools.partial(model.encode_video, impl=impl, check_inputs=False)


class _Encode(nn.Module):
    """Holds the model so that DDP sees its trainable parameters, and calls the chosen encoder."""

    def __init__(self, model: nn.Module, encode: Callable):
        super().__init__()
        self.model = model
        self.encode = encode

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.encode(video)


def autocast_for(device: torch.device, precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


# ---------------------------------------------------------------------------------------------- data
def build_datasets(config: TrainConfig, need_train: bool = True):
    """(train, val) VideoDatasets of the config's dataset (train is None when not needed)."""
    from ..data import build_dataset

    def one(split: str, annotations: Optional[str]):
        kwargs: Dict[str, Any] = {}
        if config.dataset in ("ucf101", "hmdb51"):
            kwargs["fold"] = config.fold
        if annotations:
            if not os.path.exists(annotations):
                raise FileNotFoundError(f"annotation list not found: {annotations}")
            kwargs["annotations"] = annotations
        if not os.path.isdir(config.video_root):
            raise FileNotFoundError(f"video_root is not a folder: {config.video_root}")
        return build_dataset(config.dataset, config.video_root, split, **kwargs)

    train_split, val_split = config.splits
    train_set = one(train_split, config.train_list) if need_train else None
    val_set = one(val_split, config.val_list)
    if val_set.task == "retrieval":  # a video without a caption can neither train nor be retrieved
        from .tasks import drop_captionless

        train_set = drop_captionless(train_set)[0] if train_set is not None else None
        val_set = drop_captionless(val_set)[0]
    for ds in (train_set, val_set):
        if ds is not None and not ds.samples:
            raise ValueError(f"the {config.dataset} {ds.split} split lists no videos")
    if train_set is not None and train_set.task != val_set.task:
        raise ValueError(f"the training split is a {train_set.task} set but the evaluation split a {val_set.task} set")
    return train_set, val_set


def _dali_available() -> bool:
    try:
        from ..data.dali_reader import import_dali

        import_dali()
        return True
    except ImportError:
        return False


def build_loader(config: TrainConfig, dataset, mode: str, info: distributed.Dist, device: torch.device,
                 image_size: int, batch_size: int):
    """VideoLoader (PyAV) or DaliVideoLoader per ``config.decoder``; multi-view evaluation uses PyAV."""
    from ..data import VideoLoader

    frames = config.frames if mode == "train" else config.eval_frames
    views = (config.eval_clips, config.eval_crops) if mode == "eval" else (1, 1)
    decoder = config.decoder
    if decoder == "auto":
        decoder = "dali" if device.type == "cuda" and _dali_available() else "pyav"
    if decoder == "dali" and views != (1, 1):
        if config.decoder == "dali":
            log.info("multi-view evaluation decodes with PyAV (the DALI loader reads one view per video)")
        decoder = "pyav"
    flip = config.use_flip if mode == "train" else False
    if decoder == "dali":
        from ..data.dali_loader import DaliVideoLoader

        return DaliVideoLoader(dataset, frames, batch_size, size=image_size, mode=mode, seed=config.seed,
                               rank=info.rank, world_size=info.world_size,
                               device="gpu" if device.type == "cuda" else "cpu",
                               dtype=torch.bfloat16 if config.precision == "bf16" else torch.float32,
                               flip=flip, num_threads=max(1, config.workers))
    # bf16 clips halve the host-to-device copy of a bf16 run
    return VideoLoader(dataset, frames, batch_size, size=image_size, mode=mode, seed=config.seed, rank=info.rank,
                       world_size=info.world_size, num_workers=config.workers, flip=flip,
                       dtype=torch.bfloat16 if config.precision == "bf16" else torch.float32,
                       num_clips=views[0], num_crops=views[1])


def eval_batch_per_rank(global_batch: int, world_size: int, size: Optional[int] = None) -> int:
    """The evaluation loaders pad each rank's share to whole batches, so a batch larger than that
    share would only encode padding."""
    per_rank = math.ceil(global_batch / world_size)
    return per_rank if size is None else max(1, min(per_rank, math.ceil(size / world_size)))


def build_task(config: TrainConfig, model, train_set, val_set, autocast, world_size: int):
    from .tasks import RecognitionTask, RetrievalTask, class_list

    if val_set.task == "recognition":
        classes = class_list(train_set.classes if train_set is not None else [], val_set.classes)
        return RecognitionTask(model, classes, config.class_template, autocast)
    return RetrievalTask(model, train_set, val_set, config.text_tokens, autocast, world_size)


# ---------------------------------------------------------------------------------------------- the step
def micro_step(forward: Callable, task, batch: Dict, autocast, info: distributed.Dist,
               accumulation: int = 1) -> torch.Tensor:
    """Forward and backward of one micro-batch (``batch["video"]`` and ``batch["target"]`` on the
    device); returns the detached loss, left on the device (no host sync)."""
    with autocast():
        features = forward(batch["video"])
    loss = task.loss(features.float(), batch, info)
    (loss * (task.loss_scale / accumulation)).backward()
    return loss.detach()


def optimiser_step(params, optimizer, scheduler, grad_clip: float) -> None:
    """Clip the gradient norm (unless ``grad_clip`` is 0), step AdamW and the schedule, clear gradients."""
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def encode_loader(encoder: Callable, loader, size: int, info: distributed.Dist, device: torch.device,
                  autocast, views: int = 1):
    """Features of every video of an evaluation loader, in dataset order: ((n, E) fp32, valid (n,) bool).

    Multi-view batches (B, views, T, ...) are encoded view by view and averaged (then L2-normalised).
    Videos that failed to decode come back with ``valid`` False."""
    feats, indices, valid = [], [], []
    for batch in loader:
        video = batch["video"].to(device, non_blocking=True)
        if views > 1:
            video = video.flatten(0, 1)
        with autocast():
            f = encoder(video).float()
        if views > 1:
            from ..data.views import average_views

            f = F.normalize(average_views(f, views), dim=-1)
        feats.append(f)
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
    features, valid = encode_loader(encoder, loader, len(val_set), info, device, autocast, views)
    n_valid = int(valid.sum())
    if n_valid == 0:
        raise ValueError(f"no video of the {val_set.split} split could be decoded; is video_root right?")
    metrics = task.evaluate(features, valid, labels)
    metrics = {f"val_{k}": v for k, v in metrics.items()}
    metrics["val_videos"] = n_valid
    metrics["val_skipped"] = len(val_set) - n_valid
    return metrics


# ---------------------------------------------------------------------------------------------- signals
class StopRequest:
    """SIGTERM / SIGINT set a flag; the loop saves a checkpoint at the next step boundary and returns.
    A second signal interrupts at once. Handlers are installed only in the main thread."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("received %s: saving a checkpoint after the current step", signal.Signals(signum).name)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    @property
    def requested(self) -> bool:
        return self.signum is not None


# ---------------------------------------------------------------------------------------------- logging set-up
@contextlib.contextmanager
def _run_logging(out: str, info: distributed.Dist):
    """Warnings of stop_fast (skipped videos by name, stop requests) to stderr and OUT/train.log."""
    logger = logging.getLogger("stop_fast")
    fmt = logging.Formatter(("[rank %d] " % info.rank if info.enabled else "") + "%(asctime)s %(levelname)s %(message)s")
    handlers = [logging.FileHandler(os.path.join(out, "train.log")), _TqdmHandler()]
    for h in handlers:
        h.setFormatter(fmt)
        h.setLevel(logging.INFO)
        logger.addHandler(h)
    old_level, old_propagate = logger.level, logger.propagate
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.propagate = False  # printed once, above the progress bar, whatever the root logger holds
    try:
        yield
    finally:
        for h in handlers:
            logger.removeHandler(h)
            h.close()
        logger.setLevel(old_level)
        logger.propagate = old_propagate


class _TqdmHandler(logging.StreamHandler):
    """Log lines printed above the progress bar instead of through it."""

    def emit(self, record):
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never break the run
            self.handleError(record)


# ---------------------------------------------------------------------------------------------- training
def train(config: TrainConfig) -> Dict[str, Any]:
    """Train STOP as ``config`` says; returns the final metrics (``val_top1``, ``val_t2v_r1``, ...) with
    ``checkpoint`` (the final prompts file), ``out`` (the output folder), ``steps`` and ``interrupted``
    (None, or the signal name that stopped the run; it was checkpointed and resumes with ``resume="auto"``)."""
    config.validate(require_data=True)
    info = distributed.setup(cuda=(config.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda"))
    try:
        return _Trainer(config, info).run()
    finally:
        distributed.teardown()


class _Trainer:
    def __init__(self, config: TrainConfig, info: distributed.Dist):
        self.info = info
        self.device = resolve_device(config, info)
        self.config = config.resolved(self.device.type == "cuda", info.local_rank)
        self.config.device = str(self.device)
        c = self.config
        per_step = info.world_size * c.accumulation
        if c.batch_size % per_step:
            raise ValueError(f"batch_size {c.batch_size} must be a multiple of world size x accumulation "
                             f"({info.world_size} x {c.accumulation})")
        self.micro_batch = c.batch_size // per_step
        if c.resume not in (None, "auto") and not os.path.isfile(c.resume):
            raise FileNotFoundError(f"resume: checkpoint not found: {c.resume}")
        os.makedirs(c.out, exist_ok=True)
        self.ckpt_dir = os.path.join(c.out, "checkpoints")

    # ------------------------------------------------------------------ set-up
    def run(self) -> Dict[str, Any]:
        c, info = self.config, self.info
        with _run_logging(c.out, info):
            torch.manual_seed(c.seed)
            self.autocast = autocast_for(self.device, c.precision)
            train_set, val_set = build_datasets(c)
            self.train_set, self.val_set = train_set, val_set
            self.model = build_model(c, self.device)
            self.model.eval()  # no dropout anywhere; the backbone is frozen
            self.task = build_task(c, self.model, train_set, val_set, self.autocast, info.world_size)
            self.train_labels = self.task.labels_for(train_set) if self.task.name == "recognition" else None
            self.val_labels = self.task.labels_for(val_set) if self.task.name == "recognition" else None
            self.encoder = make_encoder(self.model, c.impl, c.compile)
            size = self.model.image_size
            self.eval_batch = eval_batch_per_rank(c.eval_batch_size, info.world_size, len(val_set))
            self.val_loader = build_loader(c, val_set, "eval", info, self.device, size, self.eval_batch)
            self.views = c.eval_clips * c.eval_crops
            if not c.trains_anything:
                return self._evaluate_only()
            if math.ceil(len(train_set) / info.world_size) < self.micro_batch:  # the loader would shorten batches
                raise ValueError(f"batch_size {c.batch_size}: the training split has {len(train_set)} videos, "
                                 f"fewer than one batch of {self.micro_batch} per rank needs; lower batch_size")
            self.train_loader = build_loader(c, train_set, "train", info, self.device, size, self.micro_batch)
            self.steps_per_epoch = len(self.train_loader) // c.accumulation
            if self.steps_per_epoch == 0:
                raise ValueError(f"batch_size {c.batch_size}: the training split has {len(train_set)} videos, "
                                 "fewer than one optimiser step needs")
            self.total_steps = self.steps_per_epoch * c.epochs
            return self._train()

    def _config_record(self) -> Dict[str, Any]:
        import stop_fast

        c = self.config
        record = c.to_dict()
        record.update({
            "task": self.task.name, "world_size": self.info.world_size, "micro_batch_per_rank": self.micro_batch,
            "steps_per_epoch": getattr(self, "steps_per_epoch", 0), "total_steps": getattr(self, "total_steps", 0),
            "logit_scale": LOGIT_SCALE, "stop_config": self.model.config.to_dict(),
            "trainable_parameters": sum(p.numel() for p in self.model.trainable_parameters()),
            "train_videos": len(self.train_set), "val_videos": len(self.val_set),
            "stop_fast": stop_fast.__version__, "torch": torch.__version__,
        })
        return record

    def _evaluate(self) -> Dict[str, float]:
        self.val_loader.set_epoch(0)
        return run_evaluation(self.encoder, self.val_loader, self.task, self.val_set, self.val_labels, self.info,
                              self.device, self.autocast, self.views)

    def _evaluate_only(self) -> Dict[str, Any]:
        """k = 0 and rho = 0: nothing to train (Table 4's first row). Evaluate and log like any run."""
        c = self.config
        log.info("k = 0 and rho = 0: no trainable parameters, so the run only evaluates")
        metrics_log = MetricsLog(c.out) if self.info.main else None
        metrics = self._evaluate()
        if self.info.main:
            write_json(os.path.join(c.out, "config.json"), self._config_record())
            metrics_log.write({"epoch": 0, "step": 0, "lr": 0.0, **metrics})
            write_json(os.path.join(c.out, "metrics.json"), metrics)
            plot_curves(metrics_log.records, os.path.join(c.out, "curves.png"))
            metrics_log.close()
        # no weights to save: `stop-fast eval --zero-shot` evaluates this model again
        return {**metrics, "checkpoint": None, "out": c.out, "steps": 0, "interrupted": None}

    # ------------------------------------------------------------------ the loop
    def _train(self) -> Dict[str, Any]:
        c, info = self.config, self.info
        params = list(self.model.trainable_parameters())
        from .optim import build_optimizer, build_scheduler

        self.optimizer = build_optimizer(params, c)
        self.scheduler = build_scheduler(self.optimizer, self.total_steps, c.warmup)
        self.params = params
        self.step, epoch, start_micro = 0, 0, 0
        self.running = torch.zeros((), device=self.device)  # loss summed over steps since the last log
        self.running_steps = 0
        self.metrics: Dict[str, float] = {}
        resume = self._resume_path()
        if resume:
            epoch, start_micro = self._load(resume)
        metrics_log = MetricsLog(c.out, resume_step=self.step if resume else None) if info.main else None
        if info.main:
            write_json(os.path.join(c.out, "config.json"), self._config_record())
        module = _Encode(self.model, self.encoder)
        self.forward = distributed.wrap_ddp(module, info, self.device) if info.enabled else module
        from tqdm import tqdm

        stop = StopRequest()
        interrupted = None
        with stop:
            while epoch < c.epochs:
                self.train_loader.set_epoch(epoch, start_batch=start_micro)
                bar = tqdm(total=self.steps_per_epoch, initial=start_micro // c.accumulation, unit="step",
                           desc=f"epoch {epoch + 1}/{c.epochs}", disable=not (info.main and c.progress),
                           dynamic_ncols=True, leave=False)
                done = self._epoch(epoch, start_micro, bar, metrics_log, stop)
                bar.close()
                if done == "stop":
                    interrupted = signal.Signals(stop.signum).name if stop.signum is not None else "stop_after_steps"
                    break
                epoch, start_micro = epoch + 1, 0
                last = epoch == c.epochs
                if last or (c.eval_every and epoch % c.eval_every == 0):
                    self.metrics = self._evaluate()
                    if info.main:
                        metrics_log.write({"epoch": epoch, "step": self.step, **self.metrics})
                        log.info("epoch %d: %s", epoch, _summary(self.metrics))
                self._save(epoch, 0)
        prompts = os.path.join(c.out, "prompts.safetensors")
        if info.main:
            if interrupted is None:
                with ckpt.atomic_path(prompts) as tmp:
                    self.model.save_prompts(tmp)
                write_json(os.path.join(c.out, "metrics.json"), self.metrics)
            plot_curves(metrics_log.records, os.path.join(c.out, "curves.png"))
            metrics_log.close()
        failures = self.train_loader.stats["failures"] + self.val_loader.stats["failures"]
        if failures:
            log.warning("%d video file(s) could not be decoded and were skipped (named in %s)", failures,
                        os.path.join(c.out, "train.log"))
        latest = ckpt.latest(self.ckpt_dir)
        if interrupted is not None:
            prompts = ckpt.paths_for(self.ckpt_dir, self.step)["prompts"]
            log.log(logging.INFO if interrupted == "stop_after_steps" else logging.WARNING,
                    "stopped (%s) at step %d; continue with resume='auto' (--resume auto)", interrupted, self.step)
        return {**self.metrics, "checkpoint": prompts,
                "training_checkpoint": latest, "out": c.out, "steps": self.step, "interrupted": interrupted,
                "skipped_videos": failures}

    def _epoch(self, epoch: int, micro: int, bar, metrics_log, stop: StopRequest) -> Optional[str]:
        c, info = self.config, self.info
        limit = self.steps_per_epoch * c.accumulation  # micro-batches that make whole optimiser steps
        tic, videos = time.perf_counter(), 0
        iterator = iter(self.train_loader)
        while micro < limit:
            try:
                batch = next(iterator)
            except StopIteration:
                break
            except Exception:
                if stop.requested:  # a signal that also reached the loader's workers: keep what we have
                    self._save(epoch, micro)
                    return "stop"
                raise
            last_micro = (micro + 1) % c.accumulation == 0
            sync = contextlib.nullcontext() if (last_micro or not info.enabled) else self.forward.no_sync()
            with sync:
                loss = self._micro_step(batch, epoch)
            self.running += loss / c.accumulation
            micro += 1
            videos += batch["video"].shape[0] * info.world_size
            if not last_micro:
                continue
            self._optimiser_step()
            self.step += 1
            self.running_steps += 1
            bar.update(1)
            if self.step % c.log_every == 0:
                record = self._log_record(epoch, videos, tic)
                tic, videos = time.perf_counter(), 0
                if info.main:
                    metrics_log.write(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                    videos_s=f"{record['videos_per_s']:.1f}")
            if c.save_every and self.step % c.save_every == 0:
                self._save(epoch, micro)
            # a stop is agreed by every rank, at logging steps when there are several ranks
            check = not info.enabled or self.step % c.log_every == 0
            stop_now = distributed.any_rank(stop.requested, info, self.device) if check else False
            if stop_now or (c.stop_after_steps and c.stop_after_steps <= self.step < self.total_steps):
                self._save(epoch, micro)
                return "stop"
        return None

    def _micro_step(self, batch: Dict, epoch: int) -> torch.Tensor:
        batch["video"] = batch["video"].to(self.device, non_blocking=True)
        batch["target"] = self.task.targets(batch, self.train_labels, epoch, self.config.seed).to(
            self.device, non_blocking=True)
        return micro_step(self.forward, self.task, batch, self.autocast, self.info, self.config.accumulation)

    def _optimiser_step(self) -> None:
        optimiser_step(self.params, self.optimizer, self.scheduler, self.config.grad_clip)

    def _log_record(self, epoch: int, videos: int, tic: float) -> Dict[str, Any]:
        """The record of a logging step; ``videos`` went through since ``tic`` (perf_counter)."""
        loss = distributed.average(self.running, self.info) / max(1, self.running_steps)
        loss = float(loss)  # the one host sync of the interval: the clock stops after the queued work
        record = {"epoch": epoch + 1, "step": self.step, "loss": loss, "lr": self.scheduler.get_last_lr()[0],
                  "videos_per_s": round(videos / (time.perf_counter() - tic), 3)}
        if self.device.type == "cuda":  # the allocator's high-water mark (host-side bookkeeping, no sync)
            record["max_memory_gb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
        self.running.zero_()
        self.running_steps = 0
        return record

    # ------------------------------------------------------------------ checkpoints
    def _resume_path(self) -> Optional[str]:
        c = self.config
        if c.resume is None:
            return None
        if c.resume == "auto":
            path = ckpt.latest(self.ckpt_dir)
            if path is None:
                log.info("resume auto: no checkpoint in %s, starting from scratch", self.ckpt_dir)
            return path
        return c.resume

    def _save(self, epoch: int, micro: int) -> None:
        if not self.info.main:
            return
        state = {
            "epoch": epoch, "micro_batch": micro,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "rng": ckpt.rng_state(), "running_loss": self.running.detach().cpu(), "running_steps": self.running_steps,
            "metrics": dict(self.metrics), "config": self.config.to_dict(), "world_size": self.info.world_size,
        }
        path = ckpt.save(self.ckpt_dir, self.step, self.model, state, self.config.keep_checkpoints)
        log.info("saved %s", path)

    def _load(self, path: str):
        c = self.config
        state = ckpt.load(path)  # on the CPU: RNG states must stay there; the optimiser moves its own state
        load_prompt_file(self.model, state["prompts_path"], force=False)
        saved = state.get("config", {})
        changed = {k: (saved.get(k), v) for k, v in c.to_dict().items()
                   if k in ("batch_size", "accumulation", "epochs", "lr", "seed", "frames", "dataset", "warmup")
                   and saved.get(k) != v}
        if changed:
            log.warning("resuming %s with changed settings (saved, now): %s; losses will not match an "
                        "uninterrupted run", path, changed)
        if state.get("world_size") not in (None, self.info.world_size):
            log.warning("resuming with %d ranks, saved with %s: the data order differs", self.info.world_size,
                        state.get("world_size"))
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise ValueError(f"{path}: the optimiser state does not fit this model ({exc})") from None
        ckpt.set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.running = state["running_loss"].to(self.device)
        self.running_steps = int(state["running_steps"])
        self.metrics = dict(state.get("metrics", {}))
        log.info("resumed from %s (step %d, epoch %d)", path, self.step, state["epoch"] + 1)
        return int(state["epoch"]), int(state["micro_batch"])


def _summary(metrics: Dict[str, float]) -> str:
    return ", ".join(f"{k[4:]} {v:.2f}" if isinstance(v, float) else f"{k[4:]} {v}" for k, v in metrics.items())


# ---------------------------------------------------------------------------------------------- evaluate
def read_prompt_metadata(path: str, key: str) -> Dict[str, Any]:
    """A JSON object stored under ``key`` in a prompts file's metadata ({} when absent):
    ``stop_config`` (the STOPConfig) or ``backbone`` (name, GELU, weights fingerprint, random seed)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - any failure to parse means a corrupt or foreign file
        raise ValueError(f"{path} is not a readable prompts file ({' '.join(str(exc).split()) or type(exc).__name__})") from None
    stored = meta.get(key)
    if not stored:
        return {}
    try:
        value = json.loads(stored)
    except json.JSONDecodeError:
        raise ValueError(f"{path}: its {key} metadata is not valid JSON") from None
    return value if isinstance(value, dict) else {}


def config_for_checkpoint(config: TrainConfig, prompts: str) -> TrainConfig:
    """``config`` with the model fields (backbone name, k, rho, alpha, beta, widths) the prompts were
    trained with, and, for a random backbone, the seed it was drawn from."""
    stored = read_prompt_metadata(prompts, "stop_config")
    mapping = {"model_name": "model", "k": "k", "rho": "rho", "alpha": "alpha", "beta": "beta",
               "r_intra": "r_intra", "r_inter": "r_inter"}
    updates = {ours: stored[theirs] for theirs, ours in mapping.items() if theirs in stored}
    seed = read_prompt_metadata(prompts, "backbone").get("random_seed")
    if config.weights is None and isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0:
        updates["seed"] = seed
    return dataclasses.replace(config, **updates)


def evaluate(config: TrainConfig, checkpoint: Optional[str] = None, *, zero_shot: bool = False,
             out: Optional[str] = None, force: bool = False) -> Dict[str, Any]:
    """Metrics of a trained checkpoint (a prompts file, a training ``.pt`` or a run folder), or with
    ``zero_shot`` of the frozen CLIP with prompts off (k = 0, rho = 0: CLIP4Clip mean pooling), on the
    config's evaluation split. Writes the metrics as JSON to ``out`` when given."""
    config.validate(require_data=True)
    if zero_shot == (checkpoint is not None):
        raise ValueError("evaluate needs either a checkpoint or zero_shot=True")
    info = distributed.setup(cuda=(config.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda"))
    try:
        device = resolve_device(config, info)
        prompts = ckpt.resolve_prompts(checkpoint) if checkpoint else None
        if prompts:
            config = config_for_checkpoint(config, prompts)
        else:
            config = dataclasses.replace(config, k=0, rho=0)
        config = config.resolved(device.type == "cuda", info.local_rank)
        config.device = str(device)
        autocast = autocast_for(device, config.precision)
        _, val_set = build_datasets(config, need_train=False)
        model = build_model(config, device)
        if prompts:
            load_prompt_file(model, prompts, force)
        model.eval()
        task = build_task(config, model, None, val_set, autocast, info.world_size)
        labels = task.labels_for(val_set) if task.name == "recognition" else None
        encoder = make_encoder(model, config.impl, config.compile)
        loader = build_loader(config, val_set, "eval", info, device, model.image_size,
                              eval_batch_per_rank(config.eval_batch_size, info.world_size, len(val_set)))
        loader.set_epoch(0)
        metrics = run_evaluation(encoder, loader, task, val_set, labels, info, device, autocast,
                                 config.eval_clips * config.eval_crops)
        result = {**metrics, "dataset": config.dataset, "split": val_set.split, "task": task.name,
                  "checkpoint": prompts, "zero_shot": zero_shot, "frames": config.eval_frames,
                  "views": config.eval_clips * config.eval_crops, "random_backbone": config.weights is None}
        if out and info.main:
            folder = os.path.dirname(os.path.abspath(out))
            os.makedirs(folder, exist_ok=True)
            write_json(out, result)
        return result
    finally:
        distributed.teardown()


def load_prompt_file(model, path: str, force: bool) -> None:
    """``model.load_prompts`` (with ``force`` where the prompts file API has it); errors name the file."""
    try:
        if "force" in inspect.signature(model.load_prompts).parameters:
            model.load_prompts(path, force=force)
        else:
            model.load_prompts(path)
    except ValueError as exc:
        if path in str(exc):
            raise
        raise ValueError(f"{path}: {exc}") from None
