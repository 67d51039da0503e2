"""Probe every video of a dataset into a resumable JSON-lines manifest; optionally write
decode-friendly copies (see stop_fast/data/README.md)."""
from __future__ import annotations

import os


def add_arguments(p) -> None:
    from ..data.datasets import DATASETS
    from ..data.prepare import CODECS

    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", choices=sorted(DATASETS), help="read a dataset's split files (with --root, --split)")
    src.add_argument("--videos", help="probe every video file under this folder")
    p.add_argument("--root", help="dataset root (with --dataset)")
    p.add_argument("--split", default="train")
    p.add_argument("--manifest", required=True,
                   help="JSON-lines manifest file to write (appended; resumes; keyed by the path under the root)")
    p.add_argument("--reencode-dir", help="also write decode-friendly copies here (a folder outside the videos' root); "
                                          "a/clip.mp4 becomes a/clip.mp4.webm")
    p.add_argument("--codec", choices=sorted(CODECS), default="vp9", help="codec of the copies (default %(default)s)")
    p.add_argument("--short-side", type=int, default=256, help="short side of the copies in pixels (default %(default)s)")
    p.add_argument("--gop", type=int, default=8, help="key frame interval of the copies")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)


def run(args) -> int:
    from ..data.prepare import run_prepare

    return run_prepare(args)
