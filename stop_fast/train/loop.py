"""The trainer: ``train(config)``. Steps, accumulation, signals, checkpoints and resume; nothing else.

The trainer knows the model only through the encoder (``setup.make_encoder``: ``encode_video``),
``encode_text`` (inside the task) and the trainable parameters. One optimiser step:

    for each of `accumulation` micro-batches:  features = encoder(video)  (bf16 autocast on CUDA)
                                               loss = task loss (InfoNCE gathers across ranks)
                                               backward (DDP averages the trainable gradients)
    clip the gradient norm, AdamW step, scheduler step

Nothing in the step reads a value back to the host: the loss is summed on the device and read at
logging intervals only, and ``encode_video`` runs with ``check_inputs=False`` (no NaN scan). A
non-finite loss is noticed at the next logging step or checkpoint, whichever comes first, and ends
the run with an error before anything is saved.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import sys
import time
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

from ..config import LOGIT_SCALE
from ..io import write_json
from ..prompt_file import read_prompt_file
from . import checkpoint as ckpt
from . import distributed
from .config import RUN_FORMAT, TrainConfig, read_run_record
from .evaluation import run_evaluation
from .lock import hold_run_folder
from .optim import build_optimizer, build_scheduler
from .records import MetricsLog, plot_curves, run_logging
from .setup import (autocast_for, build_datasets, build_loader, build_model, build_task, eval_batch_per_rank,
                    make_encoder, resolve_device)
from .signals import StopRequest

log = logging.getLogger("stop_fast.train")


class NonFiniteLossError(ValueError):
    """The training loss became NaN or infinite: the run stops before saving anything more."""


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


def optimiser_step(params, optimizer, scheduler, grad_clip: float) -> Optional[torch.Tensor]:
    """Clip the gradient norm (unless ``grad_clip`` is 0), step AdamW and the schedule, clear gradients.
    Returns the gradient norm before clipping (None without clipping), left on the device."""
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip) if grad_clip > 0 else None
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


class EncodeModule(nn.Module):
    """Holds the model so that DDP sees its trainable parameters, and calls the chosen encoder."""

    def __init__(self, model: nn.Module, encode: Callable):
        super().__init__()
        self.model = model
        self.encode = encode

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.encode(video)


# ---------------------------------------------------------------------------------------------- training
def train(config: TrainConfig) -> Dict[str, Any]:
    """Train STOP as ``config`` says; returns the final metrics (``val_top1``, ``val_t2v_r1``, ...) with
    ``checkpoint`` (the final prompts file), ``out`` (the output folder), ``steps`` and ``interrupted``
    (None, or the signal name that stopped the run; it was checkpointed and resumes with ``resume="auto"``).
    The run owns ``config.out`` while it lasts (``lock.RunLock``): a second run there is an error."""
    config.validate(require_data=True)
    info = distributed.setup(cuda=(config.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda"))
    try:
        trainer = Trainer(config, info)
        with hold_run_folder(trainer.config.out, "train", info, trainer.device):
            return trainer.run()
    finally:
        distributed.teardown()


class Trainer:
    def __init__(self, config: TrainConfig, info: distributed.Dist):
        self.info = info
        self.device = resolve_device(config, info)
        self.config = dataclasses.replace(config.resolved(self.device.type == "cuda", info.local_rank),
                                          device=str(self.device))
        c = self.config
        per_step = info.world_size * c.accumulation
        if c.batch_size % per_step:
            raise ValueError(f"batch_size {c.batch_size} must be a multiple of world size x accumulation "
                             f"({info.world_size} x {c.accumulation})")
        self.micro_batch = c.batch_size // per_step
        if c.resume not in (None, "auto") and not os.path.isfile(c.resume):
            raise FileNotFoundError(f"resume: checkpoint not found: {c.resume}")
        os.makedirs(c.out, exist_ok=True)
        self.ckpt_dir = os.path.join(c.out, ckpt.CHECKPOINTS_DIR)

    # ------------------------------------------------------------------ set-up
    def run(self) -> Dict[str, Any]:
        c, info = self.config, self.info
        earlier = ckpt.list_checkpoints(self.ckpt_dir) if c.resume is None else []
        if earlier:  # a fresh start here would prune them and mix two runs' records (checked holding the folder)
            raise ValueError(f"--out {c.out} holds the checkpoints of an earlier run (step {earlier[-1]}): continue "
                             "it with --resume auto, or choose another --out")
        with run_logging(c.out, "[rank %d] " % info.rank if info.enabled else ""):
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
            self.steps_per_epoch = self.total_steps = 0
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

    def _run_record(self) -> Dict[str, Any]:
        """``OUT/config.json``: the resolved config (``TrainConfig.to_dict``) and what the run derived."""
        import stop_fast

        return {**self.config.to_dict(), "format": RUN_FORMAT, "eval_frames": self.config.eval_num_frames,
                "task": self.task.name, "world_size": self.info.world_size, "micro_batch_per_rank": self.micro_batch,
                "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps, "logit_scale": LOGIT_SCALE,
                "trainable_parameters": self.model.num_trainable_parameters(),
                "train_videos": len(self.train_set), "val_videos": len(self.val_set),
                "stop_fast": stop_fast.__version__, "torch": torch.__version__}

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
            write_json(os.path.join(c.out, "config.json"), self._run_record())
            metrics_log.write({"epoch": 0, "step": 0, "lr": 0.0, **metrics})
            write_json(os.path.join(c.out, "metrics.json"), metrics)
            plot_curves(metrics_log.records, os.path.join(c.out, "curves.png"))
            metrics_log.close()
        # no weights to save: `stop-fast eval --zero-shot` evaluates this model again
        return {**metrics, "checkpoint": None, "out": c.out, "steps": 0, "interrupted": None}

    # ------------------------------------------------------------------ the loop
    def _train(self) -> Dict[str, Any]:
        c, info = self.config, self.info
        self.params = list(self.model.trainable_parameters())
        self.optimizer = build_optimizer(self.params, c)
        self.scheduler = build_scheduler(self.optimizer, self.total_steps, c.warmup)
        self.step, epoch, start_micro = 0, 0, 0
        self.running = torch.zeros((), device=self.device)  # loss summed over steps since the last log
        self.running_steps = 0
        self.finite = torch.ones((), dtype=torch.bool, device=self.device)  # every loss so far was finite
        self.metrics: Dict[str, float] = {}
        resumed = self._resume()
        if resumed is not None:
            epoch, start_micro = resumed
        self.start_step = self.step  # stop_after_steps counts this run's steps
        metrics_log = MetricsLog(c.out, resume_step=self.step if resumed else None) if info.main else None
        if info.main:
            write_json(os.path.join(c.out, "config.json"), self._run_record())
        module = EncodeModule(self.model, self.encoder)
        self.forward = distributed.wrap_ddp(module, info, self.device) if info.enabled else module
        from tqdm import tqdm

        # a bar redraws one line with carriage returns: on a terminal only; elsewhere (a log file) its
        # figures go out as one log line per logging step
        self.bar_shown = info.main and c.progress and sys.stderr.isatty()
        stop = StopRequest()
        interrupted = None
        with stop:
            while epoch < c.epochs:
                self.train_loader.set_epoch(epoch, start_batch=start_micro)
                bar = tqdm(total=self.steps_per_epoch, initial=start_micro // c.accumulation, unit="step",
                           desc=f"epoch {epoch + 1}/{c.epochs}", disable=not self.bar_shown, dynamic_ncols=True,
                           leave=False)
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
        prompts = os.path.join(c.out, ckpt.PROMPTS_FILE)
        if info.main:
            if interrupted is None:
                self.model.save_prompts(prompts)
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
        boundary = (self.running.clone(), self.running_steps)  # the loss record at the last optimiser step
        iterator = iter(self.train_loader)
        while micro < limit:
            try:
                batch = next(iterator)
            except StopIteration:
                break
            except Exception:
                if stop.requested:  # a signal that also reached the loader's workers: keep what we have,
                    # up to the last optimiser step (an unfinished step's micro-batches run again on resume)
                    self.running, self.running_steps = boundary
                    self._save(epoch, micro - micro % c.accumulation, collective=False)
                    return "stop"
                raise
            last_micro = (micro + 1) % c.accumulation == 0
            sync = contextlib.nullcontext() if (last_micro or not info.enabled) else self.forward.no_sync()
            with sync:
                loss = self._micro_step(batch, epoch)
            self.running += loss / c.accumulation
            self.finite &= torch.isfinite(loss)
            micro += 1
            videos += batch["video"].shape[0] * info.world_size
            if not last_micro:
                continue
            norm = optimiser_step(self.params, self.optimizer, self.scheduler, c.grad_clip)
            if norm is not None:  # an infinite gradient of a finite loss: clipping makes the weights NaN
                self.finite &= torch.isfinite(norm)
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
                    if c.progress and not self.bar_shown:
                        log.info("epoch %d/%d, step %d/%d: loss %.4f, lr %.2e, %.1f videos/s", epoch + 1, c.epochs,
                                 self.step, self.total_steps, record["loss"], record["lr"], record["videos_per_s"])
            boundary = (self.running.clone(), self.running_steps)
            if c.save_every and self.step % c.save_every == 0:
                self._save(epoch, micro)
            # a stop is agreed by every rank, at logging steps when there are several ranks
            check = not info.enabled or self.step % c.log_every == 0
            stop_now = distributed.any_rank(stop.requested, info, self.device) if check else False
            ran = self.step - self.start_step
            if stop_now or (c.stop_after_steps and c.stop_after_steps <= ran and self.step < self.total_steps):
                self._save(epoch, micro)
                return "stop"
        return None

    def _micro_step(self, batch: Dict, epoch: int) -> torch.Tensor:
        batch["video"] = batch["video"].to(self.device, non_blocking=True)
        batch["target"] = self.task.targets(batch, self.train_labels, epoch, self.config.seed).to(
            self.device, non_blocking=True)
        return micro_step(self.forward, self.task, batch, self.autocast, self.info, self.config.accumulation)

    def _log_record(self, epoch: int, videos: int, tic: float) -> Dict[str, Any]:
        """The record of a logging step; ``videos`` went through since ``tic`` (perf_counter)."""
        loss = distributed.average(self.running, self.info) / max(1, self.running_steps)
        loss = float(loss)  # the one host sync of the interval: the clock stops after the queued work
        self._check_finite(loss_seen=loss)
        record = {"epoch": epoch + 1, "step": self.step, "loss": loss, "lr": self.scheduler.get_last_lr()[0],
                  "videos_per_s": round(videos / (time.perf_counter() - tic), 3)}
        if self.device.type == "cuda":  # the allocator's high-water mark (host-side bookkeeping, no sync)
            record["max_memory_gb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
        self.running.zero_()
        self.running_steps = 0
        return record

    def _check_finite(self, loss_seen: Optional[float] = None, collective: bool = True, weights: bool = False) -> None:
        """End the run (on every rank, when ``collective``) if a loss or a clipped gradient norm since the
        start was NaN or infinite (``weights``: or a trainable weight is, which unclipped runs check)."""
        bad = not bool(self.finite) or (loss_seen is not None and not math.isfinite(loss_seen))
        if weights and not bad:
            bad = not all(bool(torch.isfinite(p).all()) for p in self.params)
        if distributed.any_rank(bad, self.info, self.device) if collective else bad:
            last = ckpt.latest(self.ckpt_dir)
            raise NonFiniteLossError(
                f"the training loss or gradients became NaN or infinite at or before step {self.step}; the run "
                "stops without saving, " + (f"its newest checkpoint is {last}" if last else "no checkpoint was written")
                + ". Lower --lr, check --weights and the data, or train in fp32 (--precision fp32)")

    # ------------------------------------------------------------------ checkpoints
    def _resume(self):
        """Load the checkpoint ``resume`` names (``auto``: the newest readable one in ``out``); returns
        (epoch, micro-batch) to continue from, or None for a fresh start."""
        c = self.config
        if c.resume is None:
            return None
        if c.resume == "auto":
            found = ckpt.newest_readable(self.ckpt_dir, check=lambda state: read_prompt_file(state["prompts_path"]))
            if found is None:
                log.info("resume auto: no checkpoint in %s, starting from scratch", self.ckpt_dir)
                return None
            path, state = found
        else:
            path, state = c.resume, ckpt.load(c.resume)
        return self._load(path, state)

    def _save(self, epoch: int, micro: int, collective: bool = True) -> None:
        self._check_finite(collective=collective, weights=self.config.grad_clip == 0)
        if not self.info.main:
            return
        state = {
            "epoch": epoch, "micro_batch": micro,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "rng": ckpt.rng_state(), "running_loss": self.running.detach().cpu(), "running_steps": self.running_steps,
            "metrics": dict(self.metrics), "config": {**self.config.to_dict(), "format": RUN_FORMAT},
            "world_size": self.info.world_size,
        }
        path = ckpt.save(self.ckpt_dir, self.step, self.model, state, self.config.keep_checkpoints)
        log.info("saved %s", path)

    def _load(self, path: str, state: Dict[str, Any]):
        self.model.load_prompts(state["prompts_path"])
        try:
            saved = read_run_record(state["config"], source=path).to_dict()
        except (KeyError, ValueError):  # a record this version cannot compare: nothing to warn about
            saved = {}
        current = self.config.to_dict()
        changed = {k: (saved.get(k), current[k]) for k in ("batch_size", "accumulation", "epochs", "lr", "seed",
                                                           "stop", "dataset", "warmup")
                   if k in saved and saved[k] != current[k]}
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
        if int(state["epoch"]) >= self.config.epochs:
            log.info("%s: the run finished its %d epoch(s) at step %d; nothing is left to train", path,
                     self.config.epochs, self.step)
        else:
            log.info("resumed from %s (step %d, epoch %d of %d)", path, self.step, int(state["epoch"]) + 1,
                     self.config.epochs)
        return int(state["epoch"]), int(state["micro_batch"])


def _summary(metrics: Dict[str, float]) -> str:
    return ", ".join(f"{k[4:]} {v:.2f}" if isinstance(v, float) else f"{k[4:]} {v}" for k, v in metrics.items())
