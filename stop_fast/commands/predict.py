"""Classify video files, or rank them for a caption, with trained prompts.

    stop-fast predict clip1.mp4 clip2.mp4 --checkpoint runs/hmdb51 --weights ViT-B-32.pt --classes classes.txt
    stop-fast predict a.mp4 b.mp4 c.mp4 --checkpoint runs/msrvtt --weights ViT-B-32.pt --text "a dog catches a ball"

--classes is a file with one class name a line, or a comma-separated list ("run,jump,swim"); each
video gets its top classes with probabilities (softmax of 100 x cosine to "a video of a person doing
{class}"). --text ranks the videos by cosine similarity to the caption.
"""
from __future__ import annotations

import json
import os
from typing import List

from .common import existing_file, explicit_settings, flag_message, resolve_device, run_settings_for, stop_settings
from .errors import CLIError


def add_arguments(p) -> None:
    p.add_argument("videos", nargs="+", metavar="VIDEO", help="video files")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="prompts .safetensors, training checkpoint .pt, or a run folder")
    src.add_argument("--zero-shot", action="store_true", help="frozen CLIP with prompts off")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--classes", help="class names: a file (one a line) or 'a,b,c'")
    what.add_argument("--text", help="a caption: rank the videos for it")
    p.add_argument("--weights", help="local CLIP weights file the prompts were trained on (default: the run's, else "
                   "random weights)")
    p.add_argument("--model", help="open_clip model name for --zero-shot (default ViT-B-32; a checkpoint names its own)")
    p.add_argument("--frames", type=int, help="frames per clip (default: the run's evaluation frames, else 12)")
    p.add_argument("--top", type=int, default=5, help="classes shown per video (default %(default)s)")
    p.add_argument("--template", help="class text template with {} (default: the run's, else 'a video of a person "
                   "doing {}')")
    p.add_argument("--class-names", choices=["raw", "words"], help="class names in the class texts as given (raw) or "
                   "as words (ApplyEyeMakeup -> apply eye makeup); default: the run's, else raw")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--impl", choices=["reference", "fast"], help="default: fast on CUDA, reference on CPU")
    p.add_argument("--seed", type=int, help="seed of a random backbone (default: the checkpoint's, else 0)")
    p.add_argument("--force", action="store_true", help="load prompts saved for another backbone anyway (warns)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def parse_classes(value: str) -> List[str]:

    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
        source = value
    elif os.sep in value or value.endswith((".txt", ".csv")):
        raise CLIError(f"--classes {value}: no such file")
    else:
        names = [n.strip() for n in value.split(",") if n.strip()]
        source = "--classes"
    if len(names) < 2:
        raise CLIError(f"--classes: {source} names {len(names)} class(es); give at least two")
    if len(set(names)) != len(names):
        raise CLIError(f"--classes: {source} names a class twice")
    return names


def run(args) -> int:
    for v in args.videos:
        existing_file(v, "VIDEO")
    if args.checkpoint and not os.path.exists(args.checkpoint):
        raise CLIError(f"--checkpoint {args.checkpoint}: no such file or folder")
    if args.weights:
        existing_file(args.weights, "--weights")
    if args.top < 1:
        raise CLIError(f"--top must be >= 1, got {args.top}")
    classes = parse_classes(args.classes) if args.classes else None
    if args.text is not None and not args.text.strip():
        raise CLIError("--text: the caption is empty")
    import torch

    from ..train.config import load_config
    from ..train.inference import classify, similarity_to_text, video_features
    from ..train.setup import model_from_checkpoint

    explicit = stop_settings(args)
    device = resolve_device(args.device or "auto")
    base = run_settings_for(args.checkpoint) if args.checkpoint else {}
    try:
        config = load_config(None, base=base, stop=explicit, weights=args.weights, impl=args.impl, seed=args.seed,
                             class_template=args.template, class_names=args.class_names, eval_frames=args.frames,
                             device=device).resolved(device.startswith("cuda"))
    except ValueError as exc:
        raise CLIError(flag_message(str(exc), {k: v for k, v in vars(args).items() if v is not None})) from None
    keep = explicit_settings(args)
    model, config = model_from_checkpoint(config.with_stop(k=0, rho=0) if args.zero_shot else config,
                                          args.checkpoint, torch.device(device), keep=keep, force=args.force)
    features = video_features(model, config, torch.device(device), args.videos)
    if classes:
        probs = classify(model, config, features, classes)
        top = probs.topk(min(args.top, len(classes)), dim=-1)  # display order only; ties are immaterial here
        result = [{"video": v, "classes": [{"class": classes[i], "probability": round(float(p), 4)}
                                           for p, i in zip(top.values[n], top.indices[n])]}
                  for n, v in enumerate(args.videos)]
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            for item in result:
                print(item["video"])
                for entry in item["classes"]:
                    print(f"  {entry['probability']:7.2%}  {entry['class']}")
        return 0
    sims = similarity_to_text(model, config, features, args.text)
    order = sorted(range(len(args.videos)), key=lambda i: -float(sims[i]))
    result = [{"rank": r + 1, "video": args.videos[i], "similarity": round(float(sims[i]), 4)} for r, i in enumerate(order)]
    if args.json:
        print(json.dumps({"text": args.text, "ranking": result}, indent=2))
    else:
        print(f"videos ranked for: {args.text}")
        for item in result:
            print(f"  {item['rank']:3d}. {item['similarity']:+.4f}  {item['video']}")
    return 0
