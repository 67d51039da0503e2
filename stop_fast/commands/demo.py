"""Train STOP on a generated motion-direction task (clips and their time reversals in opposite
classes) and print it beside the intra-only, inter-only and prompts-off rows. Random backbone
weights unless --weights is given; about two minutes on two CPU cores."""
from __future__ import annotations

from .common import add_device_argument, existing_file

from .errors import CLIError


def add_arguments(p) -> None:
    p.add_argument("--out", default="stop-fast-demo",
                   help="folder for the videos, runs, demo.json and curves.png; new, empty or an earlier demo's "
                        "(default: %(default)s)")
    p.add_argument("--weights", help="CLIP weights file for the stop-tiny architecture (default: random weights)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and of every run (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="a tiny smoke run of every step (accuracies mean nothing)")
    p.add_argument("--workers", type=int, default=0,
                   help="video decoding worker processes; 0 decodes in the training process (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; one is fastest for this tiny model on a busy two-core machine, "
                        "0 keeps torch's default (default: %(default)s)")
    add_device_argument(p)


def run(args) -> int:

    if args.weights:
        existing_file(args.weights, "--weights")
    if args.workers < 0:
        raise CLIError(f"--workers must be >= 0, got {args.workers}")
    if args.threads < 0:
        raise CLIError(f"--threads must be >= 0, got {args.threads}")
    from .common import resolve_device

    device = resolve_device(args.device)
    from ..demo import run_demo

    run_demo(args.out, weights=args.weights, seed=args.seed, quick=args.quick, device=device, workers=args.workers,
             threads=args.threads or None)
    return 0
