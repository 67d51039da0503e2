"""Arguments and helpers shared by the subcommands (standard library only at import time)."""
from __future__ import annotations

import argparse
import os


def add_model_arguments(p: argparse.ArgumentParser, frames_default: int = 12) -> None:
    p.add_argument("--model", default="ViT-B-32", help="open_clip model name, or stop-tiny (default: %(default)s)")
    p.add_argument("--weights", help="local CLIP weights file (OpenAI .pt, open_clip checkpoint, .safetensors); "
                   "omitted: random weights, with a warning")
    p.add_argument("--prompts", help="trained STOP prompt weights (.safetensors written by stop-fast)")
    p.add_argument("--frames", type=int, default=frames_default, help="frames per clip, T (default: %(default)s)")
    p.add_argument("--k", type=int, default=6, help="intra-frame prompts per frame, 0 switches them off")
    p.add_argument("--rho", type=int, default=12, help="most inter-frame prompt tokens per frame, 0 switches them off")
    add_device_argument(p)
    p.add_argument("--impl", choices=["reference", "fast"], default="reference")


def add_device_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when available; default)")


def resolve_device(name: str) -> str:
    """``--device`` -> a torch device string, or a CLIError saying why it cannot be used."""
    from ..cli import CLIError

    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {name}: no CUDA device is available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CLIError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise CLIError(f"--device {name!r}: only cpu and cuda devices are supported")
    return str(device)


def existing_file(path: str, flag: str) -> str:
    """Check a file argument before any model is built, naming the flag."""
    from ..cli import CLIError

    if not os.path.exists(path):
        raise CLIError(f"{flag} {path}: no such file")
    if not os.path.isfile(path):
        raise CLIError(f"{flag} {path}: not a file")
    return path


def output_file(path: str, flag: str) -> str:
    """Check that ``path`` can be written (its folder exists), naming the flag."""
    from ..cli import CLIError

    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CLIError(f"{flag} {path}: the folder {folder} does not exist")
    if os.path.isdir(path):
        raise CLIError(f"{flag} {path} is a folder; give a file name")
    return path


def build_model(args):
    """STOP from the model arguments: paths checked first, then the backbone, then the prompts."""
    import warnings

    from .. import STOPConfig, build_stop

    if args.weights:
        existing_file(args.weights, "--weights")
    if args.prompts:
        existing_file(args.prompts, "--prompts")
    device = resolve_device(args.device)
    config = STOPConfig(model_name=args.model, num_frames=args.frames, k=args.k, rho=args.rho)
    with warnings.catch_warnings():
        if getattr(args, "quiet_random_weights", False):
            warnings.simplefilter("ignore")
        model = build_stop(config, weights=args.weights, device=device)
    if args.prompts:
        model.load_prompts(args.prompts)
    return model.eval()
