"""Probe every video of a dataset into a resumable JSON-lines manifest; optionally write copies made
for training (H.264 all-intra, short side 224 by default). See stop_fast/data/README.md."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import CLIError


def add_arguments(p) -> None:
    from ..data.datasets import DATASETS
    from ..data.prepare import CODECS

    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", choices=sorted(DATASETS), help="read a dataset's split files (with --video-root, --split)")
    src.add_argument("--videos", help="probe every video file under this folder")
    p.add_argument("--video-root", help="the dataset's folder (with --dataset)")
    p.add_argument("--root", dest="legacy_root", help=argparse.SUPPRESS)  # deprecated spelling of --video-root
    p.add_argument("--split", default="train")
    p.add_argument("--manifest", required=True,
                   help="JSON-lines manifest file to write (appended; resumes; keyed by the path under the root)")
    p.add_argument("--reencode-dir", help="also write copies made for training here (a folder outside the videos' "
                                          "root); a/clip.avi becomes a/clip.avi.mp4")
    p.add_argument("--codec", choices=CODECS, default="h264",
                   help="codec of the copies (default %(default)s: NVDEC and PyAV read it; vp9 and mjpeg also "
                        "decode on DALI's CPU decoder)")
    p.add_argument("--short-side", type=int, default=224,
                   help="short side of the copies in pixels; smaller videos keep theirs (default %(default)s)")
    p.add_argument("--gop", type=int, default=1,
                   help="key frame interval of the copies (default %(default)s: every frame a key frame)")
    p.add_argument("--max-fps", type=float,
                   help="keep at most this many frames per second in the copies (default: every frame; the STOP "
                        "authors' copies keep 3)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)


def _check(args):
    """The videos' folder, after every flag is checked (one line naming the flag for each mistake)."""
    if args.short_side < 2:
        raise CLIError(f"--short-side must be at least 2 pixels, got {args.short_side}")
    if args.gop < 1:
        raise CLIError(f"--gop must be at least 1, got {args.gop}")
    if args.max_fps is not None and not args.max_fps > 0:
        raise CLIError(f"--max-fps must be positive, got {args.max_fps}")
    if args.workers < 1:
        raise CLIError(f"--workers must be at least 1, got {args.workers}")
    if os.path.isdir(args.manifest):
        raise CLIError(f"--manifest {args.manifest} is a folder; name a file, e.g. "
                       f"{os.path.join(args.manifest, 'manifest.jsonl')}")
    if args.dataset:
        if args.legacy_root and args.video_root:
            raise CLIError("--root is the old name of --video-root; give one of them")
        root = args.video_root or args.legacy_root
        if not root:
            raise CLIError("--dataset needs --video-root, the dataset's folder")
        if not os.path.isdir(root):
            raise CLIError(f"--video-root must be a folder, got {root}")
        flag = "--video-root"
    else:
        root = args.videos
        if not os.path.isdir(root):
            raise CLIError(f"--videos must be a folder, got {root}")
        flag = "--videos"
    if args.reencode_dir:
        from ..data.prepare import inside

        if inside(args.reencode_dir, root):
            raise CLIError(f"--reencode-dir {args.reencode_dir} lies inside {flag} {root}: the copies would replace "
                           "originals or be re-encoded on the next run; choose a folder outside it")
    return root


def run(args) -> int:
    root = _check(args)
    if args.legacy_root:
        print("stop-fast prepare: --root is deprecated; use --video-root", file=sys.stderr)
    from ..data import prepare as library
    from ..data.datasets import build_dataset, video_files
    from ..data.probe import import_av

    import_av()  # a missing PyAV is one line here, before the manifest is created
    settings = library.CopySettings(codec=args.codec, short_side=args.short_side, gop=args.gop, max_fps=args.max_fps)
    if args.dataset:
        paths = [s.path for s in build_dataset(args.dataset, root, args.split).samples]
    else:
        paths = video_files(root)

    import tqdm

    tqdm.tqdm.monitor_interval = 0  # no monitor thread: the workers fork from this process
    # a bar redraws its line with carriage returns: on a terminal only, never into a log file
    with tqdm.tqdm(desc="prepare", unit="video", disable=not sys.stderr.isatty()) as progress:
        result = library.prepare(paths, root, args.manifest, args.reencode_dir, settings, args.workers,
                                 on_record=lambda record: progress.update(1))
    for line in result.skipped_lines:
        print(f"manifest {args.manifest}: skipped {line}")
    for record in result.unreadable:
        print(f"unreadable: {os.path.join(os.path.abspath(root), record['path'])}: {record['error']}")
    print(json.dumps(result.summary))
    return 0
