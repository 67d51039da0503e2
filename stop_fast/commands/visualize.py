"""Draw what STOP sees in one or more videos: for every sampled frame the top-K patches that get an
intra-frame prompt (outlined in red), the attention map A, the temporal dynamics Dyn and the patch
score S as heatmaps over the frame, and a bar chart of the frame variation v^ and the inter-frame
prompt tokens n_t per frame. Several videos are stacked into one figure. With --checkpoint the model's
K, alpha, rho and backbone name come from the checkpoint; without it the prompts are untrained (random
weights), and the figure says so."""
from __future__ import annotations

import json
import os

from .common import add_device_argument, existing_file, output_file, resolve_device

from .errors import CLIError

PROMPTS_FILE = "prompts.safetensors"  # the prompt weights inside a training-checkpoint folder


def add_arguments(p) -> None:
    p.add_argument("videos", nargs="+", metavar="VIDEO", help="video file(s) to explain (any format FFmpeg reads)")
    p.add_argument("--out", required=True, help="figure to write (.png, .pdf, .svg, ...)")
    p.add_argument("--checkpoint", help="trained prompts: a training-checkpoint folder (holding "
                   f"{PROMPTS_FILE}) or a prompt .safetensors file; omitted: random prompt weights")
    p.add_argument("--weights", help="local CLIP weights file for the frozen backbone; omitted: random weights")
    p.add_argument("--model", help="open_clip model name (default: the checkpoint's, else ViT-B-32)")
    p.add_argument("--frames", type=int, help="frames sampled per video, T (default: the checkpoint's, else 12)")
    p.add_argument("--k", type=int, help="intra-frame prompts per frame K, without --checkpoint (default 6)")
    p.add_argument("--rho", type=int, help="most inter-frame tokens per frame, without --checkpoint (default 12)")
    p.add_argument("--alpha", type=float, help="weight of dynamics in the score, without --checkpoint (default 0.4)")
    p.add_argument("--impl", choices=["reference", "fast"], default="reference", help="model path (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights, when some are random (default 0)")
    p.add_argument("--html", action="store_true", help="also write a page beside the figure (same name, .html) "
                   "with the figure and the numbers behind it")
    add_device_argument(p)


def run(args) -> int:

    for video in args.videos:
        existing_file(video, "VIDEO")
    output_file(args.out, "--out")
    if args.weights:
        existing_file(args.weights, "--weights")
    if args.frames is not None and args.frames < 1:
        raise CLIError(f"--frames must be >= 1, got {args.frames}")
    prompts, stored, backbone = resolve_checkpoint(args.checkpoint) if args.checkpoint else (None, {}, {})
    config = _config(args, stored)
    _check_format(args.out)
    device = resolve_device(args.device)

    import torch

    from .. import build_stop
    from ..data import read_video_clip
    from ..visualize import VideoExplanation, clip_to_rgb, draw_explanations, explain_clip, explanation_html

    torch.manual_seed(args.seed)  # random prompt (and backbone) weights: the same figure every run
    clip_kwargs = _backbone_arguments(args, backbone)
    model = build_stop(config, weights=args.weights, device=device, **clip_kwargs)
    if prompts:
        try:
            model.load_prompts(prompts)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CLIError(f"--checkpoint {prompts}: {_first_line(exc)}") from None
    model.eval()

    videos = []
    for path in args.videos:
        clip = read_video_clip(path, config.num_frames, size=model.image_size, mode="eval")
        details = explain_clip(model, clip, impl=args.impl)
        videos.append(VideoExplanation(os.path.basename(path), clip_to_rgb(clip), details))

    subtitle = _describe(args, prompts, config, clip_kwargs.get("seed"))
    fig = draw_explanations(videos, config, subtitle=subtitle)
    fig.savefig(args.out, dpi=fig.dpi, facecolor="white")
    layout = fig.stop_fast_layout
    print(f"wrote {args.out} ({layout.width} x {layout.height} px, {len(videos)} video(s), T = {config.num_frames})")
    if args.html:
        page = os.path.splitext(args.out)[0] + ".html"
        image = os.path.relpath(os.path.abspath(args.out), os.path.dirname(os.path.abspath(page)))
        with open(page, "w", encoding="utf-8") as f:
            f.write(explanation_html(image, videos, config, subtitle=subtitle, sources=list(args.videos)))
        print(f"wrote {page}")
    return 0


def resolve_checkpoint(path: str):
    """``--checkpoint`` -> (prompt weights file, the STOPConfig fields stored in it, the description of
    the backbone it was trained on, ``{}`` for files that do not record one)."""

    if os.path.isdir(path):
        file = os.path.join(path, PROMPTS_FILE)
        if not os.path.isfile(file):
            raise CLIError(f"--checkpoint {path}: this folder holds no {PROMPTS_FILE} (the prompt weights of a "
                           "training checkpoint)")
    elif os.path.isfile(path):
        file = path
    else:
        raise CLIError(f"--checkpoint {path}: no such file or folder")
    try:
        from safetensors import safe_open

        with safe_open(file, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - safetensors' errors name no file; ours does
        raise CLIError(f"--checkpoint {file}: not a prompt weights file (.safetensors written by stop-fast): "
                       f"{_first_line(exc)}") from None
    if "stop_config" not in meta:
        raise CLIError(f"--checkpoint {file}: no STOP configuration in its metadata; not written by "
                       "STOP.save_prompts")
    try:
        stored = json.loads(meta["stop_config"])
        if not isinstance(stored, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        raise CLIError(f"--checkpoint {file}: unreadable STOP configuration in its metadata ({exc})") from None
    try:
        backbone = json.loads(meta.get("backbone", "{}"))
    except ValueError:
        backbone = None
    if not isinstance(backbone, dict):
        raise CLIError(f"--checkpoint {file}: unreadable backbone description in its metadata")
    return file, stored, backbone


def _backbone_arguments(args, backbone: dict) -> dict:
    """``load_clip`` keywords that rebuild the backbone a checkpoint was trained on (GELU flavour, and
    the seed of random weights); a checkpoint trained on a weights file needs that file."""
    import inspect
    import warnings

    from ..backbone import load_clip

    kwargs = {}
    if backbone.get("gelu") in ("quick", "erf"):
        kwargs["quick_gelu"] = backbone["gelu"] == "quick"
    if backbone.get("weights") and not args.weights:
        raise CLIError(f"--checkpoint {args.checkpoint} was trained on the backbone weights {backbone['weights']}; "
                       "pass that file with --weights")
    seed = backbone.get("random_seed")
    if not args.weights and "seed" in inspect.signature(load_clip).parameters:
        kwargs["seed"] = seed if isinstance(seed, int) else args.seed
    if backbone and not args.weights and not backbone.get("weights") and seed is None and not backbone.get("unknown"):
        warnings.warn(f"--checkpoint {args.checkpoint} was trained on unseeded random backbone weights, which "
                      "cannot be rebuilt: the figure shows the prompts over other random weights", stacklevel=2)
    return kwargs


def _config(args, stored: dict):
    """The STOPConfig: the checkpoint's fields, the flags where no checkpoint says otherwise, T from --frames."""
    from ..config import STOPConfig

    fields = dict(stored)
    for flag, name, value in (("--model", "model_name", args.model), ("--k", "k", args.k),
                              ("--rho", "rho", args.rho), ("--alpha", "alpha", args.alpha)):
        if value is None:
            continue
        if name in fields and fields[name] != value:
            raise CLIError(f"{flag} {value} differs from the checkpoint's {name} = {fields[name]!r}; "
                           f"leave {flag} out to use the checkpoint's")
        fields[name] = value
    if args.frames is not None:
        fields["num_frames"] = args.frames
    try:
        return STOPConfig.from_dict(fields)
    except ValueError as exc:
        source = f"--checkpoint {args.checkpoint}" if stored else "arguments"
        raise CLIError(f"{source}: {_first_line(exc)}") from None


def _check_format(path: str) -> None:

    from matplotlib.figure import Figure

    suffix = os.path.splitext(path)[1].lower().lstrip(".")
    known = Figure().canvas.get_supported_filetypes()
    if suffix not in known:
        raise CLIError(f"--out {path}: unknown image format {suffix!r}; use one of .png, .pdf, .svg, .jpg")


def _describe(args, prompts, config, seed) -> str:
    if args.weights:
        backbone = os.path.basename(args.weights)
    else:
        backbone = "random weights" + (f", seed {seed}" if seed is not None else "")
    checkpoint = f"checkpoint {args.checkpoint}" if prompts else "prompts: random weights (no checkpoint)"
    return f"{checkpoint}    backbone: {config.model_name} ({backbone})    impl: {args.impl}"


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
