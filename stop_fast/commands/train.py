"""Train STOP's prompts on a video dataset (action recognition or text-video retrieval).

    stop-fast train --config hmdb51 --video-root /data/HMDB51 --weights ViT-B-32.pt --out runs/hmdb51
    torchrun --nproc_per_node 8 -m stop_fast.cli train --config msrvtt --video-root /data/MSRVTT ...

Settings come from --config (a TOML file of TrainConfig fields, see configs/) and flags; flags win.
A run writes OUT/metrics.jsonl, OUT/config.json, OUT/curves.png, TensorBoard events, checkpoints in
OUT/checkpoints (--resume auto continues the newest) and the final prompts OUT/prompts.safetensors.
SIGTERM or Ctrl-C saves a checkpoint before exiting. See docs/TRAINING.md.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict

from ..config import IMPLS
from ..train.config import CLASS_NAMES, DATASETS, DECODERS, GELUS, PRECISIONS, TRAIN_CAPTIONS
from .common import flag_message, resolve_device, stop_settings
from .errors import CLIError

# flag dest -> help; each dest is a TrainConfig field
_DATA_FLAGS = {
    "train_list": "training annotations: a CSV / list file, or the folder of split files (default: under --video-root)",
    "val_list": "evaluation annotations, as --train-list",
    "train_split": "split name of the training set (default: the dataset's)",
    "val_split": "split name of the evaluation set (default: the dataset's)",
}


def add_data_arguments(p: argparse.ArgumentParser, train: bool = True) -> None:
    """Flags shared by train and eval; every default is None so that the config file's values stand."""
    p.add_argument("--config", help="TOML file of settings, or an installed config by name (ucf101, hmdb51, ssv2, "
                   "kinetics400, msrvtt, vatex, didemo, activitynet); flags override it")
    p.add_argument("--dataset", choices=DATASETS, help="dataset adapter (csv: a CSV with path,label or path,caption)")
    p.add_argument("--video-root", help="the dataset's root folder")
    for dest, text in _DATA_FLAGS.items():
        if train or dest.startswith("val"):
            p.add_argument("--" + dest.replace("_", "-"), help=text)
    p.add_argument("--fold", type=int, help="UCF101 / HMDB51 split number (default 1)")
    p.add_argument("--model", help="open_clip model name or stop-tiny (default ViT-B-32)")
    p.add_argument("--weights", help="local CLIP weights file; omitted: random weights, with a warning")
    p.add_argument("--gelu", choices=GELUS, help="activation the weights were trained with: quick (OpenAI's CLIP, "
                   "the default) or erf (most LAION / open_clip-trained checkpoints)")
    frames = ("--eval-frames",) if train else ("--eval-frames", "--frames")  # eval's only frames are evaluation's
    p.add_argument(*frames, dest="eval_frames", type=int,
                   help="frames per evaluation clip (default: the run's, else --frames, else 12)")
    p.add_argument("--eval-clips", type=int, help="evaluation clips per video, averaged (default 1)")
    p.add_argument("--eval-crops", type=int, choices=[1, 3], help="evaluation crops per clip, averaged (default 1)")
    p.add_argument("--eval-batch-size", type=int, help="global evaluation batch (default: --batch-size)")
    p.add_argument("--caption-tokens", type=int, help="caption length in tokens (default 32 MSR-VTT/VATEX, 64 else)")
    p.add_argument("--manifest", help="a `stop-fast prepare` manifest: read its training copies with their frame "
                   "indexes (one manifest may hold every split)")
    p.add_argument("--decoder", choices=DECODERS, help="video decoder (default auto: DALI on a GPU where NVDEC "
                   "decodes and DALI is installed, else PyAV)")
    p.add_argument("--workers", type=int, help="decoding workers (default: 4, at most the usable cores)")
    p.add_argument("--class-names", choices=CLASS_NAMES, help="class names in the class texts: as given (raw) or as "
                   "words (ApplyEyeMakeup, brush_hair -> apply eye makeup, brush hair); default: words for the "
                   "paper's datasets, raw for csv")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--precision", choices=PRECISIONS, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--impl", choices=IMPLS, help="default: fast on CUDA, reference on CPU")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the encoder (default: on with CUDA)")
    p.add_argument("--seed", type=int, help="seed of sampling, initialisation and a random backbone (default 0)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_data_arguments(p)
    p.add_argument("--frames", type=int, help="frames per training clip, T (default 12)")
    p.add_argument("--k", type=int, help="intra-frame prompts per frame; 0 switches them off (default 6)")
    p.add_argument("--rho", type=int, help="most inter-frame prompt tokens per frame; 0 switches them off (default 12)")
    p.add_argument("--alpha", type=float, help="weight of temporal dynamics in the patch score (default 0.4)")
    p.add_argument("--beta", type=float, help="extra weight of chosen patches in frame variation (default 4)")
    p.add_argument("--epochs", type=int, help="default 5")
    p.add_argument("--batch-size", type=int, help="global videos per optimiser step (default 128)")
    p.add_argument("--lr", type=float, help="peak learning rate of AdamW (default 1e-3)")
    p.add_argument("--weight-decay", type=float, help="default 0.2")
    p.add_argument("--eps", type=float, help="AdamW epsilon (default 1e-6)")
    p.add_argument("--warmup", type=float, help="fraction of steps with linear warm-up (default 0.1)")
    p.add_argument("--grad-clip", type=float, help="max gradient norm, 0 = off (default 1.0)")
    p.add_argument("--accumulation", type=int, help="micro-batches per optimiser step (default 1; for retrieval "
                   "each micro-batch is its own contrastive batch)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="horizontal flips in training (default: on for UCF101/HMDB51/K400, off otherwise)")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="activation checkpointing of the frozen blocks (long clips)")
    p.add_argument("--out", help="output folder (default runs/stop)")
    p.add_argument("--resume", help="'auto' (newest checkpoint in --out, if any) or a checkpoint .pt file")
    p.add_argument("--log-every", type=int, help="optimiser steps between log lines (default 10)")
    p.add_argument("--eval-every", type=int, help="epochs between evaluations, 0 = at the end only (default 1)")
    p.add_argument("--save-every", type=int, help="steps between checkpoints, 0 = each epoch's end (default 0)")
    p.add_argument("--stop-after-steps", type=int, help="end this run after it has taken so many steps, with a "
                   "checkpoint (--resume auto continues)")
    p.add_argument("--train-captions", choices=TRAIN_CAPTIONS, help="retrieval training pairs: one caption per video "
                   "per epoch, or every caption a pair (default: all for msrvtt, as the paper's code; one elsewhere)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar (default on)")


def config_from_args(args, base: Dict = None):
    """TrainConfig from ``base`` (a run's settings), --config and the flags (flags win); errors name
    the flag or the file."""
    from ..train.config import TrainConfig, config_path, load_config

    fields = set(TrainConfig.__dataclass_fields__)
    overrides = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if overrides.get("device") == "auto":
        del overrides["device"]
    overrides["stop"] = stop_settings(args)
    path = None
    if args.config:
        try:
            path = config_path(args.config)
        except FileNotFoundError as exc:
            raise CLIError(f"--{exc}") from None
        print(f"config: {path}", file=sys.stderr)
    try:
        config = load_config(path, base=base, **overrides)
        config.validate(require_data=True)
    except ValueError as exc:
        raise CLIError(_flag_message(str(exc), {**overrides, **overrides["stop"]}, path)) from None
    for name in ("weights", "train_list", "val_list", "manifest"):
        value = getattr(config, name)
        if value and not os.path.exists(value):
            raise CLIError(f"--{name.replace('_', '-')} {value}: no such file")
    if not os.path.isdir(config.video_root):
        raise CLIError(f"--video-root {config.video_root}: no such folder")
    if config.device:
        resolve_device(config.device)
    return config


def _flag_message(message: str, flags: Dict, config_file) -> str:
    """'batch_size must be >= 1' -> '--batch-size: batch_size must be >= 1' when a flag set the field."""
    if config_file and message.startswith(f"{config_file}: "):
        body = message[len(config_file) + 2 :]
        named = flag_message(body, flags)
        return named if named != body else message
    return flag_message(message, flags)


def print_metrics(metrics: Dict, file=None) -> None:
    file = file or sys.stdout
    rows = [(k[4:], v) for k, v in metrics.items() if k.startswith("val_")]
    if not rows:
        return
    width = max(len(k) for k, _ in rows)
    print(f"{'metric':<{width}}  value", file=file)
    for k, v in rows:
        print(f"{k:<{width}}  {v:.2f}" if isinstance(v, float) else f"{k:<{width}}  {v}", file=file)


def run(args) -> int:
    import signal

    config = config_from_args(args)
    try:
        os.makedirs(config.out, exist_ok=True)
    except OSError as exc:
        raise CLIError(f"--out {config.out}: {exc.strerror or exc}") from None
    from ..train import train

    result = train(config)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print_metrics(result)
    if result["interrupted"] and result["interrupted"] != "stop_after_steps":
        print(f"stopped by {result['interrupted']} at step {result['steps']}; checkpoint {result['training_checkpoint']}; "
              f"continue with --resume auto", file=sys.stderr)
        return 128 + int(getattr(signal, result["interrupted"]))
    if result["checkpoint"]:
        print(f"prompts: {result['checkpoint']}")
    print(f"outputs: {result['out']} (metrics.jsonl, curves.png, config.json)")
    return 0
