"""The `stop-fast` command line: parse, call the library, print. Every listed subcommand works."""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import List, Optional

import torch


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="ViT-B-32", help="open_clip model name, or stop-tiny (default: %(default)s)")
    p.add_argument("--weights", help="local CLIP weights file (OpenAI .pt, open_clip checkpoint, .safetensors); "
                   "omitted: random weights, with a warning")
    p.add_argument("--prompts", help="trained STOP prompt weights (.safetensors written by stop-fast)")
    p.add_argument("--frames", type=int, default=12, help="frames per clip, T (default: %(default)s)")
    p.add_argument("--k", type=int, default=6, help="intra-frame prompts per frame, 0 switches them off")
    p.add_argument("--rho", type=int, default=12, help="most inter-frame prompt tokens per frame, 0 switches them off")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--impl", choices=["reference", "fast"], default="reference")


def _build_model(args):
    from . import STOPConfig, build_stop

    config = STOPConfig(model_name=args.model, num_frames=args.frames, k=args.k, rho=args.rho)
    model = build_stop(config, weights=args.weights, device=args.device)
    if args.prompts:
        model.load_prompts(args.prompts)
    return model.eval()


def cmd_encode(args) -> int:
    """Print (or save) the video embedding of a file or of a generated clip."""
    model = _build_model(args)
    if args.video:
        from .data import read_video_clip

        clip = read_video_clip(args.video, args.frames, size=model.image_size, mode="eval")
        source = args.video
    else:
        from .synthetic import moving_square

        clip = moving_square(args.frames, model.image_size, generator=torch.Generator().manual_seed(args.seed))
        source = f"generated clip (moving square, seed {args.seed})"
    with torch.no_grad():
        video = clip[None].to(args.device)
        feature = model.encode_video(video, impl=args.impl)[0].cpu()
        details = model.explain(video)
    if args.out:
        torch.save(feature, args.out)
    counts = details["counts"][0].tolist()
    print(json.dumps({
        "source": source,
        "model": args.model,
        "random_weights": args.weights is None,
        "embedding_dim": feature.numel(),
        "norm": round(float(feature.norm()), 6),
        "embedding_head": [round(float(x), 5) for x in feature[:8]],
        "temporal_tokens_per_frame": counts,
        "saved_to": args.out,
    }, indent=2))
    return 0


def cmd_info(args) -> int:
    """Describe a model configuration: sizes and trainable parameter counts."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _build_model(args)
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in model.trainable_modules().items()}
    print(json.dumps({
        "model": args.model,
        "image_size": model.image_size,
        "patches_per_frame": model.num_patches,
        "width": model.width,
        "heads": model.visual.transformer.resblocks[0].attn.num_heads,
        "layers": len(model.visual.transformer.resblocks),
        "config": model.config.to_dict(),
        "trainable_parameters": counts,
        "trainable_total": sum(counts.values()),
    }, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stop-fast",
        description="STOP spatial-temporal dynamic prompting for frozen CLIP video models.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("encode", help="embed a video file or a generated clip and print the embedding")
    _add_model_arguments(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--video", help="video file to embed (default: a generated moving-square clip)")
    src.add_argument("--generated", action="store_true", help="embed a generated clip (the default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated clip")
    p.add_argument("--out", help="also save the embedding tensor here (torch.save)")
    p.set_defaults(func=cmd_encode)

    from .data.prepare import add_prepare_arguments, run_prepare

    p = sub.add_parser("prepare", help="probe a dataset's videos into a manifest; optionally re-encode them")
    add_prepare_arguments(p)
    p.set_defaults(func=run_prepare)

    p = sub.add_parser("info", help="show model sizes and trainable parameter counts for a configuration")
    _add_model_arguments(p)
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from .data.errors import VideoDecodeError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, VideoDecodeError) as exc:  # bad arguments or files: a message, not a traceback
        print(f"stop-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
