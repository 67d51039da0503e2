"""Embed a video file (or a generated clip) with STOP and print the embedding as JSON."""
from __future__ import annotations

import json

from .common import add_model_arguments, build_model, existing_file, output_file


def add_arguments(p) -> None:
    add_model_arguments(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--video", help="video file to embed (default: a generated moving-square clip)")
    src.add_argument("--generated", action="store_true", help="embed a generated clip (the default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated clip")
    p.add_argument("--out", help="also save the embedding tensor here (torch.save; load with weights_only=True)")


def run(args) -> int:
    if args.video:
        existing_file(args.video, "--video")
    if args.out:
        output_file(args.out, "--out")
    import torch

    model = build_model(args)
    if args.video:
        from ..data import read_video_clip

        clip = read_video_clip(args.video, args.frames, size=model.image_size, mode="eval")
        source = args.video
    else:
        from ..synthetic import moving_square

        clip = moving_square(args.frames, model.image_size, generator=torch.Generator().manual_seed(args.seed))
        source = f"generated clip (moving square, seed {args.seed})"
    video = clip[None].to(next(model.parameters()).device)
    with torch.no_grad():
        details, impl = explain(model, video, args.impl)  # one forward: embedding and counts together
    feature = details["feature"][0].float().cpu()
    if args.out:
        import io

        from ..prompt_file import write_atomic

        buffer = io.BytesIO()
        torch.save(feature, buffer)
        write_atomic(args.out, buffer.getvalue())
    counts = details["counts"][0].tolist()
    print(json.dumps({
        "source": source,
        "model": args.model,
        "random_weights": args.weights is None,
        "impl": impl,
        "embedding_dim": feature.numel(),
        "norm": round(float(feature.norm()), 6),
        "embedding_head": [round(float(x), 5) for x in feature[:8]],
        "temporal_tokens_per_frame": counts,
        "saved_to": args.out,
    }, indent=2))
    return 0


def explain(model, video, impl: str):
    """``model.explain(video, impl=impl)`` and the path that ran; a STOP whose ``explain`` has no
    ``impl`` argument runs the reference path, and says so."""
    import inspect
    import warnings

    if "impl" in inspect.signature(model.explain).parameters:
        return model.explain(video, impl=impl), impl
    if impl != "reference":
        warnings.warn(f"this STOP.explain has no impl argument: ran the reference path, not {impl}", stacklevel=2)
    return model.explain(video), "reference"
