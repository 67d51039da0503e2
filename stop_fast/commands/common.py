"""Arguments and helpers shared by the subcommands (standard library only at import time).

Every command that builds a model goes through :func:`build_model`, which checks what the user named
in this order, so that a mistake is one line before anything slow happens: files exist (``--weights``,
``--prompts``), the prompt file is readable, ``--device`` names a usable device, the configuration is
valid and fits in memory; only then the backbone is built and the prompts loaded.
"""
from __future__ import annotations

import argparse
import os

from .errors import CLIError


def add_model_arguments(p: argparse.ArgumentParser, frames_default: int = 12) -> None:
    p.add_argument("--model", default="ViT-B-32", help="open_clip model name, or stop-tiny (default: %(default)s)")
    p.add_argument("--weights", help="local CLIP weights file (OpenAI .pt, open_clip checkpoint, .safetensors); "
                   "omitted: random weights, with a warning")
    p.add_argument("--gelu", choices=["quick", "erf"], default="quick",
                   help="activation the weights were trained with: quick (QuickGELU: OpenAI's CLIP, the default) "
                   "or erf (nn.GELU: most LAION / open_clip-trained checkpoints)")
    p.add_argument("--trust-weights", action="store_true",
                   help="load a TorchScript --weights archive with torch.jit.load, which RUNS CODE stored in the "
                   "file; only for files you trust (without it, the archive's tensors are read without running it)")
    p.add_argument("--prompts", help="trained STOP prompt weights (.safetensors written by stop-fast)")
    p.add_argument("--force", action="store_true",
                   help="load --prompts even if they were saved for another backbone or config (with a warning)")
    p.add_argument("--frames", type=int, default=frames_default, help="frames per clip, T (default: %(default)s)")
    p.add_argument("--k", type=int, default=6, help="intra-frame prompts per frame, 0 switches them off")
    p.add_argument("--rho", type=int, default=12, help="most inter-frame prompt tokens per frame, 0 switches them off")
    add_device_argument(p)
    p.add_argument("--impl", choices=["reference", "fast"], default="reference")


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


def check_memory(config, device: str) -> None:
    """Refuse, before anything is allocated, a configuration that cannot fit in ``device``'s memory.

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


def build_model(args):
    """STOP from the model arguments: paths and the prompt file checked first, then the device and the
    configuration, then the backbone is built and the prompts loaded."""
    import warnings

    if args.weights:
        existing_file(args.weights, "--weights")
    if getattr(args, "prompts", None):
        existing_file(args.prompts, "--prompts")

    from .. import STOPConfig, build_stop
    from ..prompt_file import load_prompts, read_prompt_file

    prompts = None
    if getattr(args, "prompts", None):
        prompts = read_prompt_file(args.prompts)  # an unreadable file fails here, before any model exists
    device = resolve_device(args.device)
    config = STOPConfig(model_name=args.model, num_frames=args.frames, k=args.k, rho=args.rho)
    check_memory(config, device)
    with warnings.catch_warnings():
        if getattr(args, "quiet_random_weights", False):
            warnings.simplefilter("ignore")
        model = build_stop(
            config, weights=args.weights, device=device,
            quick_gelu=getattr(args, "gelu", "quick") == "quick",
            trust_torchscript=getattr(args, "trust_weights", False),
        )
    if prompts is not None:
        load_prompts(model, prompts, force=getattr(args, "force", False))
    return model.eval()
