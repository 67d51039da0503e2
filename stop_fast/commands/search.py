"""Search an index made by `stop-fast index`: the videos that best match a caption (or a video), best first.

    stop-fast search clips.idx "a dog catches a ball"
    stop-fast search clips.idx "a dog catches a ball" --top 20 --json
    stop-fast search clips.idx --video query.mp4

The caption goes through the index's own text tower (cut to its caption length), --video through its
video encoder with its frames and views; every indexed video is ranked by exact cosine similarity
(on the GPU when there is one), equal scores in path order. The index is all it needs, and the
backbone's weights file it records (--weights names it if it moved).
"""
from __future__ import annotations

import json
import os

from .common import existing_file, resolve_device
from .errors import CLIError


def add_arguments(p) -> None:
    p.add_argument("index", metavar="INDEX", help="an index folder (stop-fast index --out)")
    p.add_argument("caption", nargs="?", help="the caption to search for")
    p.add_argument("--video", help="search for videos like this video file instead of a caption")
    p.add_argument("--top", type=int, default=10, help="how many videos to show (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a list")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when available; default)")
    p.add_argument("--weights", help="the backbone's weights file, if it moved since the index was made")


def run(args) -> int:
    if not os.path.isdir(args.index):
        raise CLIError(f"INDEX {args.index}: no such folder")
    if (args.caption is None) == (args.video is None):
        raise CLIError("give a caption or --video, not both" if args.video else "give a caption (or --video FILE)")
    if args.caption is not None and not args.caption.strip():
        raise CLIError("the caption is empty")
    if args.video:
        existing_file(args.video, "--video")
    if args.weights:
        existing_file(args.weights, "--weights")
    if args.top < 1:
        raise CLIError(f"--top must be >= 1, got {args.top}")
    device = resolve_device(args.device)
    from ..index import VideoIndex

    index = VideoIndex.open(args.index, device=device, weights=args.weights)
    hits = index.search_video(args.video, args.top) if args.video else index.search_text(args.caption, args.top)
    query = {"video": os.path.abspath(args.video)} if args.video else {"text": args.caption}
    if args.json:
        print(json.dumps({"index": args.index, "query": query, "videos": len(index),
                          "results": [{"rank": r + 1, "path": h.path, "score": round(h.score, 6)}
                                      for r, h in enumerate(hits)]}, indent=2))
        return 0
    what = f'"{args.caption}"' if args.caption is not None else f"videos like {args.video}"
    print(f"top {len(hits)} of {len(index)} videos for {what}")
    for r, h in enumerate(hits):
        print(f"  {r + 1:3d}. {h.score:+.4f}  {h.path}")
    return 0
