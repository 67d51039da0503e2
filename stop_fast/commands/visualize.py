"""Draw what STOP sees in one or more videos: for every sampled frame the top-K patches that get an
intra-frame prompt (outlined in red), the attention map A, the temporal dynamics Dyn and the patch
score S as heatmaps over the frame, and a bar chart of the frame variation v^ and the inter-frame
prompt tokens n_t per frame. Several videos are stacked into one figure. With --checkpoint the model's
K, alpha, rho and backbone name come from the checkpoint; without it the prompts are untrained (random
weights), and the figure says so."""
from __future__ import annotations

import os

from .common import add_model_arguments, existing_file, model_from_args, output_file
from .errors import CLIError


def add_arguments(p) -> None:
    p.add_argument("videos", nargs="+", metavar="VIDEO", help="video file(s) to explain (any format FFmpeg reads)")
    p.add_argument("--out", required=True, help="figure to write (.png, .pdf, .svg, ...)")
    add_model_arguments(p)
    p.add_argument("--alpha", type=float, help="weight of dynamics in the score (default: the checkpoint's, else 0.4)")
    p.add_argument("--html", action="store_true", help="also write a page beside the figure (same name, .html) "
                   "with the figure and the numbers behind it")


def run(args) -> int:
    for video in args.videos:
        existing_file(video, "VIDEO")
    output_file(args.out, "--out")
    _check_format(args.out)
    model, config = model_from_args(args)

    from ..data import read_video_clip
    from ..visualize import VideoExplanation, clip_to_rgb, draw_explanations, explain_clip, explanation_html

    videos = []
    for path in args.videos:
        clip = read_video_clip(path, config.stop.num_frames, size=model.image_size, mode="eval")
        details = explain_clip(model, clip, impl=args.impl)
        videos.append(VideoExplanation(os.path.basename(path), clip_to_rgb(clip), details))

    subtitle = _describe(args, config)
    fig = draw_explanations(videos, model.config, subtitle=subtitle)
    fig.savefig(args.out, dpi=fig.dpi, facecolor="white")
    layout = fig.stop_fast_layout
    print(f"wrote {args.out} ({layout.width} x {layout.height} px, {len(videos)} video(s), T = {config.stop.num_frames})")
    if args.html:
        page = os.path.splitext(args.out)[0] + ".html"
        image = os.path.relpath(os.path.abspath(args.out), os.path.dirname(os.path.abspath(page)))
        with open(page, "w", encoding="utf-8") as f:
            f.write(explanation_html(image, videos, model.config, subtitle=subtitle, sources=list(args.videos)))
        print(f"wrote {page}")
    return 0


def _check_format(path: str) -> None:
    from matplotlib.figure import Figure

    suffix = os.path.splitext(path)[1].lower().lstrip(".")
    known = Figure().canvas.get_supported_filetypes()
    if suffix not in known:
        raise CLIError(f"--out {path}: unknown image format {suffix!r}; use one of .png, .pdf, .svg, .jpg")


def _describe(args, config) -> str:
    backbone = os.path.basename(config.weights) if config.weights else f"random weights, seed {config.seed}"
    checkpoint = f"checkpoint {args.checkpoint}" if args.checkpoint else "prompts: random weights (no checkpoint)"
    return f"{checkpoint}    backbone: {config.stop.model_name} ({backbone})    impl: {args.impl}"
