"""Encode a video library once into an index folder, for `stop-fast search`.

    stop-fast index /data/clips --checkpoint runs/msrvtt --out clips.idx
    stop-fast index /data/clips --out clips.idx          (later: encodes only new or changed files)
    stop-fast index --dataset msrvtt --video-root /data/MSRVTT --checkpoint runs/msrvtt --out msrvtt.idx
    stop-fast index list.csv --zero-shot --model ViT-B-32 --weights ViT-B-32.safetensors --out clips.idx
    torchrun --nproc_per_node 8 -m stop_fast.cli index /data/clips --checkpoint runs/msrvtt --out clips.idx

VIDEOS is a folder (every video file under it, any depth) or a CSV with a `path` column (paths
relative to the CSV's folder); --dataset with --video-root indexes a dataset's training and
evaluation splits (or --split). The model is the run's (--checkpoint: its prompts and, from its
config.json, frames, views, backbone, weights, caption length; flags override them) or the frozen
CLIP with prompts off (--zero-shot); an index that exists already brings its own.

Each video is encoded once, in path order, with the loaders of training (DALI or PyAV) and, on a
GPU, the compiled fast path. A killed build resumes where it stopped (run the same command again);
on a grown folder only new or changed files (path, size, mtime) are encoded and removed files drop
out; a video that cannot be decoded is named and counted, and not retried while it is unchanged.
The new index replaces the old one all at once: a search meanwhile sees one or the other.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from ..config import IMPLS
from ..train.config import DATASETS, DECODERS, GELUS, PRECISIONS
from .common import existing_file, explicit_settings, flag_message, resolve_device, run_settings_for, stop_settings
from .errors import CLIError

# flags that describe the model or its settings: an existing index keeps its own
_MODEL_FLAGS = ("model", "gelu", "seed", "eval_frames", "eval_clips", "eval_crops", "caption_tokens")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("videos", nargs="?", metavar="VIDEOS", help="a folder of videos, or a CSV with a path column")
    p.add_argument("--dataset", choices=DATASETS, help="index a dataset's videos instead (with --video-root)")
    p.add_argument("--video-root", help="the dataset's root folder")
    p.add_argument("--split", help="only this split of --dataset (default: its training and evaluation splits)")
    p.add_argument("--out", required=True, help="the index folder (created; an index there is updated)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="trained prompts: a run folder, a training checkpoint .pt or a prompt file")
    src.add_argument("--zero-shot", action="store_true", help="the frozen CLIP with prompts off (k = 0, rho = 0)")
    p.add_argument("--model", help="open_clip model name for --zero-shot (default ViT-B-32; a checkpoint names its own)")
    p.add_argument("--weights", help="local CLIP weights file (default: the run's, or the index's)")
    p.add_argument("--gelu", choices=GELUS, help="activation the weights were trained with (default quick)")
    p.add_argument("--trust-weights", action="store_true",
                   help="load a TorchScript --weights archive with torch.jit.load, which RUNS CODE stored in the file")
    p.add_argument("--seed", type=int, help="seed of a random backbone (default: the checkpoint's, else 0)")
    p.add_argument("--frames", dest="eval_frames", type=int, metavar="T",
                   help="frames per clip (default: the run's evaluation frames, else 12)")
    p.add_argument("--eval-clips", type=int, help="clips per video, averaged (default: the run's, else 1)")
    p.add_argument("--eval-crops", type=int, choices=[1, 3], help="crops per clip, averaged (default: the run's, else 1)")
    p.add_argument("--caption-tokens", type=int, help="caption length of searches (default: the run's, else 64)")
    p.add_argument("--batch-size", type=int, default=32, help="videos per batch on each GPU (default %(default)s)")
    p.add_argument("--workers", type=int, help="decoding workers (default: 4, at most the usable cores)")
    p.add_argument("--decoder", choices=DECODERS, help="video decoder (default auto: DALI on a GPU if installed)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--impl", choices=IMPLS, help="default: fast on CUDA, reference on CPU")
    p.add_argument("--precision", choices=PRECISIONS, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the encoder (default: on with CUDA)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar (default on)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def list_videos(args) -> list:
    """The videos VIDEOS or --dataset names (absolute paths, sorted); errors name the argument."""
    from ..data.datasets import AnnotationError
    from ..data.datasets import VIDEO_SUFFIXES
    from ..index.sources import videos_in_csv, videos_in_dataset, videos_in_folder

    if (args.videos is None) == (args.dataset is None):
        raise CLIError("give VIDEOS (a folder or a CSV) or --dataset with --video-root, not both" if args.videos
                       else "name the videos: VIDEOS (a folder or a CSV), or --dataset with --video-root")
    if args.split and not args.dataset:
        raise CLIError("--split applies to --dataset only")
    if args.dataset:
        if not args.video_root:
            raise CLIError("--dataset needs --video-root, the dataset's folder")
        if not os.path.isdir(args.video_root):
            raise CLIError(f"--video-root {args.video_root}: no such folder")
        try:
            paths = videos_in_dataset(args.dataset, args.video_root, args.split)
        except (FileNotFoundError, ValueError) as exc:
            raise CLIError(f"--dataset {args.dataset}: {exc}") from None
        where = f"--dataset {args.dataset}"
    elif os.path.isdir(args.videos):
        paths, where = videos_in_folder(args.videos), f"VIDEOS {args.videos}"
        if not paths:
            raise CLIError(f"VIDEOS {args.videos}: no video files in this folder (suffixes "
                           f"{', '.join(sorted(VIDEO_SUFFIXES))})")
    elif os.path.isfile(args.videos):
        try:
            paths = videos_in_csv(args.videos)
        except (AnnotationError, UnicodeDecodeError) as exc:
            raise CLIError(f"VIDEOS {args.videos}: not a CSV of paths ({exc})") from None
        where = f"VIDEOS {args.videos}"
    else:
        raise CLIError(f"VIDEOS {args.videos}: no such file or folder")
    if not paths:
        raise CLIError(f"{where}: lists no videos")
    return paths


def config_from_args(args):
    """The TrainConfig of the build: the run's settings under the flags (a new index), or only how to
    run (an update that takes the index's own model)."""
    from ..index.store import has_manifest
    from ..train.config import load_config

    run = {"device": args.device, "impl": args.impl, "precision": args.precision, "compile": args.compile,
           "decoder": args.decoder, "workers": args.workers, "weights": args.weights}
    if args.device:
        resolve_device(args.device)
    if not (args.checkpoint or args.zero_shot):
        if not has_manifest(args.out):
            raise CLIError(f"--out {args.out} holds no index yet: name the model, --checkpoint RUN or --zero-shot")
        given = [name for name in _MODEL_FLAGS if getattr(args, name) is not None]
        if given:
            flag = "--frames" if given[0] == "eval_frames" else "--" + given[0].replace("_", "-")
            raise CLIError(f"{flag}: the index in {args.out} keeps the settings it was made with; build another "
                           "index (--out) for other ones")
        return load_config(None, **run)
    explicit = stop_settings(args)
    base = run_settings_for(args.checkpoint) if args.checkpoint else {}
    try:
        return load_config(None, base=base, stop=explicit, gelu=args.gelu, seed=args.seed, eval_frames=args.eval_frames,
                           eval_clips=args.eval_clips, eval_crops=args.eval_crops, caption_tokens=args.caption_tokens,
                           **run)
    except ValueError as exc:
        raise CLIError(flag_message(str(exc), explicit)) from None


def run(args) -> int:
    if args.checkpoint and not os.path.exists(args.checkpoint):
        raise CLIError(f"--checkpoint {args.checkpoint}: no such file or folder")
    if args.weights:
        existing_file(args.weights, "--weights")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise CLIError(f"--out {args.out} is a file; name a folder for the index")
    for flag, value in (("--batch-size", args.batch_size), ("--workers", args.workers)):
        if value is not None and value < (1 if flag == "--batch-size" else 0):
            raise CLIError(f"{flag} must be >= {1 if flag == '--batch-size' else 0}, got {value}")
    paths = list_videos(args)
    config = config_from_args(args)
    from ..index import build_index

    keep = explicit_settings(args)
    result = build_index(args.out, paths, config, args.checkpoint, zero_shot=args.zero_shot, keep=keep,
                         batch_size=args.batch_size, progress=args.progress, trust_torchscript=args.trust_weights)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"index {result['index']}: {result['videos']} videos ({result['encoded']} new, {result['reused']} "
          f"unchanged, {result['removed']} removed), {len(result['failed'])} failed to decode")
    for failure in result["failed"]:
        print(f"  failed: {failure['path']}: {failure['reason']}")
    print(f'search it: stop-fast search {result["index"]} "a caption"', file=sys.stderr)
    return 0
