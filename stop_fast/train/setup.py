"""Everything a run is built from, given its TrainConfig: the model, the encoder, the datasets, the
loaders and the task; and :func:`model_from_checkpoint`, the one way train, eval, predict, visualize
and encode rebuild a model from a prompt file (its STOPConfig, its backbone's GELU and random seed).

Nothing here trains: the trainer (``loop.py``) and evaluation (``evaluate.py``) call these in order.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import warnings
from typing import Any, Callable, Dict, Iterable, Optional

import torch

from .. import devices
from ..prompt_file import FREE_CONFIG_FIELDS, PromptFile, PromptFileError, load_prompts, read_prompt_file
from . import checkpoint as ckpt
from . import distributed
from .config import TrainConfig

log = logging.getLogger("stop_fast.train")


# ---------------------------------------------------------------------------------------------- device
def resolve_device(config: TrainConfig, info: distributed.Dist) -> torch.device:
    """The run's device: ``config.device``, a bare ``cuda`` meaning this rank's GPU under torchrun."""
    return devices.resolve_device(config.device, local_rank=info.local_rank)


def autocast_for(device: torch.device, precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


# ---------------------------------------------------------------------------------------------- model
def build_model(config: TrainConfig, device: torch.device, *, trust_torchscript: bool = False):
    """STOP (``config.stop``) over the frozen backbone ``config`` names, on ``device``: the frozen
    weights in bf16 when the run is bf16, gradient checkpointing when asked. The prompters are
    initialised from ``config.seed``; a random backbone (no ``weights``) is drawn from it too, so
    every rank, and a later evaluation, rebuilds the same one."""
    from .. import build_stop

    if config.weights and not os.path.isfile(config.weights):
        raise FileNotFoundError(f"weights file not found: {config.weights}")
    torch.manual_seed(config.seed)
    model = build_stop(config.stop, config.weights, device=device, quick_gelu=config.gelu == "quick",
                       seed=config.seed, trust_torchscript=trust_torchscript)
    if config.precision == "bf16":
        model.cast_backbone(torch.bfloat16)  # once: the frozen weights stay resident in bf16
    model.set_grad_checkpointing(config.grad_checkpointing)
    return model


def config_for_prompts(config: TrainConfig, prompts: PromptFile, *, keep: Iterable[str] = (),
                       force: bool = False) -> TrainConfig:
    """``config`` with the model the prompts were trained with: their STOPConfig (T included: the
    run's clip length, which evaluation keeps unless told otherwise), their backbone's GELU, and for
    a random backbone the seed it was drawn from; settings named in ``keep`` stay ``config``'s.
    Prompts trained on a weights file need ``config.weights`` (unless ``force``)."""
    keep = set(keep)
    asked = config.stop.to_dict()
    conflicts = [f"config {k}: saved {v!r}, this model {asked[k]!r}" for k, v in sorted(prompts.config.items())
                 if k in keep and k in asked and k not in FREE_CONFIG_FIELDS and v != asked[k]]
    if conflicts and not force:  # before building anything: a wrong --model would cost a whole backbone
        raise PromptFileError(f"prompt file {prompts.path} was saved for another model: " + "; ".join(conflicts)
                              + " (force=True / --force loads it anyway)")
    try:
        stop = dataclasses.replace(config.stop, **{k: v for k, v in prompts.config.items() if k not in keep})
    except (TypeError, ValueError) as exc:
        raise PromptFileError(f"prompt file {prompts.path}: its stop_config is not a STOPConfig here ({exc})") from None
    backbone = prompts.backbone or {}
    updates: Dict[str, Any] = {"stop": stop}
    if backbone.get("gelu") in ("quick", "erf") and "gelu" not in keep:
        updates["gelu"] = backbone["gelu"]
    seed = backbone.get("random_seed")
    if config.weights is None:
        if backbone.get("weights") and not force:
            raise PromptFileError(f"prompt file {prompts.path} was trained on the backbone weights "
                                  f"{backbone['weights']}; pass that file with --weights")
        if isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0 and "seed" not in keep:
            updates["seed"] = seed
        elif seed is None and backbone and not backbone.get("weights") and not backbone.get("unknown"):
            warnings.warn(f"prompt file {prompts.path} was trained on unseeded random backbone weights, which cannot "
                          f"be rebuilt: they run here over random weights of seed {config.seed}", stacklevel=3)
    return dataclasses.replace(config, **updates)


def model_from_checkpoint(config: TrainConfig, checkpoint: Optional[str], device: torch.device, *,
                          keep: Iterable[str] = (), force: bool = False, trust_torchscript: bool = False):
    """``(model, config)``: STOP rebuilt for ``checkpoint`` (a run folder, a ``.pt`` checkpoint or a
    prompt file; :func:`checkpoint.resolve_prompts`) with its prompts loaded and checked, in eval
    mode, and the config it was built from; with ``checkpoint=None`` the model ``config`` describes,
    prompters freshly initialised (``config.with_stop(k=0, rho=0)``: the frozen CLIP, prompts off).
    ``keep``: settings the user gave explicitly (TrainConfig or STOPConfig field names); they are not
    taken from the prompt file, so a difference is the prompt file's mismatch error, naming the field.
    ``force`` loads prompts saved for another config or backbone anyway, with a warning."""
    if checkpoint is None:
        return build_model(config, device, trust_torchscript=trust_torchscript).eval(), config
    prompts = read_prompt_file(ckpt.resolve_prompts(checkpoint))  # unreadable: fails before any model exists
    config = config_for_prompts(config, prompts, keep=keep, force=force)
    model = build_model(config, device, trust_torchscript=trust_torchscript)
    load_prompts(model, prompts, force=force)
    return model.eval(), config


def make_encoder(model, impl: str, compile: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """``video (B, T, 3, S, S) -> features (B, E)``: the one place that decides how videos are encoded.

    ``compile``: ``compile_encoder`` (torch.compile; eager with a warning naming the reason if it
    cannot compile). Eager otherwise, without the NaN/Inf scan (no host sync)."""
    if compile:
        from ..model.compiled import compile_encoder

        return compile_encoder(model, impl=impl)
    return functools.partial(model.encode_video, impl=impl, check_inputs=False)


# ---------------------------------------------------------------------------------------------- data
def build_datasets(config: TrainConfig, need_train: bool = True):
    """(train, val) VideoDatasets of the config's dataset (train is None when not needed)."""
    from ..data import build_dataset
    from .tasks import caption_pairs, drop_captionless

    if not os.path.isdir(config.video_root):
        raise FileNotFoundError(f"video_root is not a folder: {config.video_root}")

    def one(split: str, annotations: Optional[str]):
        kwargs: Dict[str, Any] = {}
        if config.dataset in ("ucf101", "hmdb51"):
            kwargs["fold"] = config.fold
        if annotations:
            if not os.path.exists(annotations):
                raise FileNotFoundError(f"annotation list not found: {annotations}")
            kwargs["annotations"] = annotations
        return build_dataset(config.dataset, config.video_root, split, **kwargs)

    train_split, val_split = config.splits
    train_set = one(train_split, config.train_list) if need_train else None
    val_set = one(val_split, config.val_list)
    if val_set.task == "retrieval":  # a video without a caption can neither train nor be retrieved
        train_set = drop_captionless(train_set)[0] if train_set is not None else None
        if train_set is not None and config.train_captions == "all":
            train_set = caption_pairs(train_set)
        val_set = drop_captionless(val_set)[0]
    for ds in (train_set, val_set):
        if ds is not None and not ds.samples:
            raise ValueError(f"the {config.dataset} {ds.split} split lists no videos")
    if train_set is not None and train_set.task != val_set.task:
        raise ValueError(f"the training split is a {train_set.task} set but the evaluation split a {val_set.task} set")
    return train_set, val_set


def build_loader(config: TrainConfig, dataset, mode: str, info: distributed.Dist, device: torch.device,
                 image_size: int, batch_size: int):
    """VideoLoader (PyAV) or DaliVideoLoader per ``config.decoder`` (``auto``: DALI where NVDEC decodes
    and DALI is installed; DALI's CPU decoder cannot read H.264, the codec of `prepare`'s copies, so a
    CPU gets PyAV); multi-view evaluation uses PyAV. Both read ``config.manifest``'s copies and indexes."""
    from ..data import VideoLoader
    from ..data.dali_reader import dali_available
    from ..data.nvdec import nvdec_usable

    frames = config.stop.num_frames if mode == "train" else config.eval_num_frames
    views = (config.eval_clips, config.eval_crops) if mode == "eval" else (1, 1)
    decoder = config.decoder
    if decoder == "auto":
        decoder = "dali" if device.type == "cuda" and dali_available() and nvdec_usable(device.index or 0) else "pyav"
    if decoder == "dali" and views != (1, 1):
        if config.decoder == "dali":
            log.info("multi-view evaluation decodes with PyAV (the DALI loader reads one view per video)")
        decoder = "pyav"
    flip = config.use_flip if mode == "train" else False
    # bf16 clips halve the host-to-device copy of a bf16 run
    dtype = torch.bfloat16 if config.precision == "bf16" else torch.float32
    if decoder == "dali":
        from ..data.dali_loader import DaliVideoLoader

        return DaliVideoLoader(dataset, frames, batch_size, size=image_size, mode=mode, seed=config.seed,
                               rank=info.rank, world_size=info.world_size,
                               device="gpu" if device.type == "cuda" else "cpu", dtype=dtype, flip=flip,
                               num_threads=max(1, config.workers), manifest=config.manifest)
    return VideoLoader(dataset, frames, batch_size, size=image_size, mode=mode, seed=config.seed, rank=info.rank,
                       world_size=info.world_size, num_workers=config.workers, flip=flip, dtype=dtype,
                       num_clips=views[0], num_crops=views[1], manifest=config.manifest)


def eval_batch_per_rank(global_batch: int, world_size: int, size: Optional[int] = None) -> int:
    """The evaluation loaders pad each rank's share to whole batches, so a batch larger than that
    share would only encode padding."""
    per_rank = math.ceil(global_batch / world_size)
    return per_rank if size is None else max(1, min(per_rank, math.ceil(size / world_size)))


def build_task(config: TrainConfig, model, train_set, val_set, autocast, world_size: int):
    from .tasks import RecognitionTask, RetrievalTask, class_list

    if val_set.task == "recognition":
        classes = class_list(train_set.classes if train_set is not None else [], val_set.classes)
        return RecognitionTask(model, classes, config.class_template, autocast, config.class_names or "raw")
    return RetrievalTask(model, train_set, val_set, config.text_tokens, autocast, world_size)
