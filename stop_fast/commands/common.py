"""Arguments and checks shared by the subcommands (standard library only at import time).

Every command that builds a model goes through :func:`model_from_args`, which checks what the user
named in this order, so that a mistake is one line before anything slow happens: files exist
(``--weights``, ``--prompts``), ``--device`` names a usable device, the configuration is valid and
fits in memory; then ``stop_fast.train.setup.model_from_checkpoint`` reads the checkpoint's prompt
file (an unreadable one fails before any model exists), builds the backbone and loads the prompts.
"""
from __future__ import annotations

import argparse
import os

from .errors import CLIError


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The model flags of commands without a dataset. Every default is None: a flag left out takes the
    checkpoint's value, else STOP's default (SPEC.md); a flag that contradicts the checkpoint is the
    prompt file's mismatch error, naming the field (``--force`` loads anyway)."""
    p.add_argument("--model", help="open_clip model name, or stop-tiny (default: the prompts', else ViT-B-32)")
    p.add_argument("--weights", help="local CLIP weights file (OpenAI .pt, open_clip checkpoint, .safetensors); "
                   "omitted: random weights (seed 0, or the prompts'), with a warning")
    p.add_argument("--gelu", choices=["quick", "erf"],
                   help="activation the weights were trained with: quick (QuickGELU: OpenAI's CLIP, the default) "
                   "or erf (nn.GELU: most LAION / open_clip-trained checkpoints)")
    p.add_argument("--trust-weights", action="store_true",
                   help="load a TorchScript --weights archive with torch.jit.load, which RUNS CODE stored in the "
                   "file; only for files you trust (without it, the archive's tensors are read without running it)")
    p.add_argument("--checkpoint", "--prompts", dest="checkpoint",
                   help="trained prompts: a run folder, a training checkpoint .pt or a prompt .safetensors file; "
                   "omitted: untrained prompters")
    p.add_argument("--force", action="store_true",
                   help="load --checkpoint even if it was saved for another backbone or config (with a warning)")
    p.add_argument("--seed", type=int,
                   help="seed of random weights: the backbone without --weights, untrained prompters (default: the "
                   "checkpoint's, else 0)")
    p.add_argument("--frames", type=int, help="frames per clip, T (default 12)")
    p.add_argument("--k", type=int, help="intra-frame prompts per frame, 0 switches them off (default 6)")
    p.add_argument("--rho", type=int, help="most inter-frame prompt tokens per frame, 0 switches them off (default 12)")
    add_device_argument(p)
    p.add_argument("--impl", choices=["reference", "fast"], default="reference",
                   help="model path (default: %(default)s)")


def add_device_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when available; default)")


def resolve_device(name: str) -> str:
    """``--device`` -> a torch device string, or a CLIError saying why it cannot be used."""
    from ..devices import resolve_device as resolve

    try:
        return str(resolve(name, what="--device"))
    except ValueError as exc:
        raise CLIError(str(exc)) from None


def existing_file(path: str, flag: str) -> str:
    """Check a file argument before any model is built, naming the flag."""
    if not os.path.exists(path):
        raise CLIError(f"{flag} {path}: no such file")
    if not os.path.isfile(path):
        raise CLIError(f"{flag} {path}: not a file")
    if not os.access(path, os.R_OK):
        raise CLIError(f"{flag} {path}: not readable (permission denied)")
    return path


def output_file(path: str, flag: str) -> str:
    """Check that ``path`` can be written (its folder exists and is writable), naming the flag."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CLIError(f"{flag} {path}: the folder {folder} does not exist")
    if os.path.isdir(path):
        raise CLIError(f"{flag} {path} is a folder; give a file name")
    if not os.access(folder, os.W_OK):
        raise CLIError(f"{flag} {path}: the folder {folder} is not writable")
    return path


def stop_settings(args) -> dict:
    """STOPConfig fields the user set with model flags (``--model``, ``--frames``, ``--k``, ...)."""
    from ..train.config import FLAT_MODEL_KEYS

    values = vars(args)
    return {field: values[flag] for flag, field in FLAT_MODEL_KEYS.items() if values.get(flag) is not None}


def explicit_settings(args) -> set:
    """The settings the user gave flags for that a checkpoint must not replace (its STOPConfig fields,
    the backbone's GELU and random seed): ``model_from_checkpoint(keep=...)``. A flag that contradicts
    the prompt file is then its mismatch error, naming the field."""
    values = vars(args)
    return set(stop_settings(args)) | {name for name in ("gelu", "seed") if values.get(name) is not None}


def flag_message(message: str, given) -> str:
    """A config error ('k must be >= 0', 'stop: num_frames must be ...') prefixed with the flag that set
    the field, when one did (``given``: the fields the flags set): '--frames: num_frames must be ...'."""
    from ..train.config import FLAT_MODEL_KEYS

    body = message[len("stop: "):] if message.startswith("stop: ") else message
    field = body.split(" ", 1)[0]
    if field not in given:
        return message
    flag = {f: name for name, f in FLAT_MODEL_KEYS.items()}.get(field, field)
    return f"--{flag.replace('_', '-')}: {body}"


def check_memory(config, device: str) -> None:
    """Refuse, before anything is allocated, a STOPConfig that cannot fit in ``device``'s memory.

    Counts the inter-frame prompter's weights (``r_inter x rho x D``, the part that grows with
    ``--rho``) and one layer's attention scores over one clip (``T x heads x L^2`` with
    ``L = 1 + N + rho``); an absurd ``--rho`` or ``--frames`` otherwise ends in the OOM killer or an
    allocator traceback.
    """
    import open_clip

    vision = (open_clip.get_model_config(config.model_name) or {}).get("vision_cfg", {})
    width, patch, image = vision.get("width"), vision.get("patch_size"), vision.get("image_size")
    if isinstance(image, (list, tuple)):
        image = max(image)
    if not all(isinstance(v, int) and v > 0 for v in (width, patch, image)):
        return  # not a plain ViT config (STOP refuses those with its own message)
    heads = max(1, width // vision.get("head_width", 64))
    num_patches = (image // patch) ** 2
    params = 0
    if config.rho:
        params += (config.r_inter + 1) * config.rho * width + 2 * width * config.r_inter
    if config.k:
        params += 2 * width * config.r_intra + config.r_intra * width
    tokens = 1 + num_patches + config.rho
    need = 4 * (params + config.num_frames * heads * tokens * tokens)
    available = _memory_bytes(device)
    if available and need > available:
        raise CLIError(
            f"--rho {config.rho} and --frames {config.num_frames} with --model {config.model_name} need about "
            f"{need / 2**30:,.0f} GiB for the prompter and one layer's attention, more than the "
            f"{available / 2**30:,.0f} GiB of memory of {device}; STOP's defaults are rho=12, frames=12"
        )


def _memory_bytes(device: str) -> int:
    """Total memory of ``device`` in bytes (0 if it cannot be told)."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def run_settings_for(checkpoint: str) -> dict:
    """The settings a ``--checkpoint`` inherits from its run (``train.config.run_settings``: model,
    weights, data, evaluation; never the device or the workers), ``{}`` for a prompt file on its own;
    names on stderr the file it read them from."""
    import sys

    from ..train.checkpoint import resolve_prompts, run_folder
    from ..train.config import run_settings

    folder = run_folder(resolve_prompts(checkpoint))
    if folder is None:
        return {}
    print(f"settings of the run: {os.path.join(folder, 'config.json')} (flags override them)", file=sys.stderr)
    return run_settings(folder)


def model_from_args(args, *, quiet_random_weights: bool = False):
    """``(model, TrainConfig)`` from the model flags (:func:`add_model_arguments`) over the settings of
    the checkpoint's run: paths and the device checked first, then the configuration, then
    ``model_from_checkpoint`` (``--checkpoint``)."""
    import warnings

    if args.weights:
        existing_file(args.weights, "--weights")
    if args.checkpoint and not os.path.exists(args.checkpoint):
        raise CLIError(f"--checkpoint {args.checkpoint}: no such file or folder")
    if args.seed is not None and args.seed < 0:
        raise CLIError(f"--seed must be >= 0, got {args.seed}")
    device = resolve_device(args.device)

    import torch

    from ..train.config import load_config
    from ..train.setup import model_from_checkpoint

    explicit = stop_settings(args)
    base = run_settings_for(args.checkpoint) if args.checkpoint else {}
    try:
        config = load_config(None, base=base, stop=explicit, weights=args.weights, gelu=args.gelu, seed=args.seed,
                             device=device, precision="fp32", impl=args.impl, compile=False)
    except ValueError as exc:
        raise CLIError(flag_message(str(exc), explicit)) from None
    check_memory(config.stop, device)
    keep = explicit_settings(args)
    with warnings.catch_warnings():
        if quiet_random_weights:
            warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
        return model_from_checkpoint(config, args.checkpoint, torch.device(device), keep=keep, force=args.force,
                                     trust_torchscript=args.trust_weights)
