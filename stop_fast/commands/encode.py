"""Embed a video file (or a generated clip) with STOP and print the embedding as JSON."""
from __future__ import annotations

import json

from .common import add_model_arguments, existing_file, model_from_args, output_file


def add_arguments(p) -> None:
    add_model_arguments(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--video", help="video file to embed (default: a generated moving-square clip)")
    src.add_argument("--generated", action="store_true", help="embed a generated clip (the default)")
    p.add_argument("--out", help="also save the embedding tensor here (torch.save; load with weights_only=True)")


def run(args) -> int:
    if args.video:
        existing_file(args.video, "--video")
    if args.out:
        output_file(args.out, "--out")
    import torch

    model, config = model_from_args(args)
    frames = config.stop.num_frames
    if args.video:
        from ..data import read_video_clip

        clip = read_video_clip(args.video, frames, size=model.image_size, mode="eval")
        source = args.video
    else:
        from ..synthetic import moving_square

        seed = args.seed or 0
        clip = moving_square(frames, model.image_size, generator=torch.Generator().manual_seed(seed))
        source = f"generated clip (moving square, seed {seed})"
    video = clip[None].to(next(model.parameters()).device)
    with torch.no_grad():
        details = model.explain(video, impl=args.impl)  # one forward: embedding and counts together
    feature = details["feature"][0].float().cpu()
    if args.out:
        import io

        from ..io import write_atomic

        buffer = io.BytesIO()
        torch.save(feature, buffer)
        write_atomic(args.out, buffer.getvalue())
    print(json.dumps({
        "source": source,
        "model": config.stop.model_name,
        "random_weights": config.weights is None,
        "impl": args.impl,
        "embedding_dim": feature.numel(),
        "norm": round(float(feature.norm()), 6),
        "embedding_head": [round(float(x), 5) for x in feature[:8]],
        "temporal_tokens_per_frame": details["counts"][0].tolist(),
        "saved_to": args.out,
    }, indent=2, allow_nan=False))
    return 0
