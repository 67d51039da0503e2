"""Evaluate trained prompts (or, with --zero-shot, the frozen CLIP with prompts off) on a dataset split.

    stop-fast eval --checkpoint runs/hmdb51
    stop-fast eval --checkpoint runs/hmdb51 --eval-clips 4 --eval-crops 3
    stop-fast eval --zero-shot --config hmdb51 --video-root /data/HMDB51 --weights ViT-B-32.pt

--checkpoint takes a run folder, a training checkpoint .pt or a prompt .safetensors file. A run's
checkpoint brings the run's settings (its config.json: dataset, video root while it exists, splits,
frames, views, backbone, weights, class texts, caption length; never the device or the workers);
--config and flags override them. The model (backbone name, k, rho, ...) is the prompt file's. Prints
a metrics table and writes the metrics as JSON (--out; default: eval.json beside the checkpoint, or
./eval-zero-shot.json).
"""
from __future__ import annotations

import os

from .common import explicit_settings, output_file, run_settings_for
from .train import add_data_arguments, config_from_args, print_metrics
from .errors import CLIError


def add_arguments(p) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="prompts .safetensors, training checkpoint .pt, or a run folder")
    src.add_argument("--zero-shot", action="store_true", help="frozen CLIP, prompts off (k = 0, rho = 0)")
    add_data_arguments(p, train=False)
    p.add_argument("--batch-size", type=int, dest="eval_batch_size", help="videos per evaluation batch")
    p.add_argument("--force", action="store_true", help="load prompts saved for another backbone anyway (warns)")
    p.add_argument("--out", dest="json_out", help="write the metrics JSON here")


def run(args) -> int:
    if args.checkpoint and not os.path.exists(args.checkpoint):
        raise CLIError(f"--checkpoint {args.checkpoint}: no such file or folder")
    if args.json_out:
        output_file(args.json_out, "--out")
    config = config_from_args(args, base=run_settings_for(args.checkpoint) if args.checkpoint else None)
    from ..train import evaluate

    if args.json_out:
        out = args.json_out
    elif args.checkpoint:
        base = args.checkpoint if os.path.isdir(args.checkpoint) else os.path.dirname(os.path.abspath(args.checkpoint))
        out = os.path.join(base, "eval.json")
    else:
        out = "eval-zero-shot.json"
    result = evaluate(config, args.checkpoint, zero_shot=args.zero_shot, out=out, force=args.force,
                      keep=explicit_settings(args))
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    what = "zero-shot CLIP (prompts off)" if args.zero_shot else result["checkpoint"]
    print(f"{result['dataset']} {result['split']} ({result['task']}), {what}"
          + (", RANDOM backbone" if result["random_backbone"] else ""))
    print_metrics(result)
    print(f"metrics: {out}")
    return 0
