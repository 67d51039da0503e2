"""Describe a model configuration: sizes, trainable parameter counts and where the backbone's weights come from."""
from __future__ import annotations

import json

from .common import add_model_arguments, model_from_args


def add_arguments(p) -> None:
    add_model_arguments(p)


def run(args) -> int:
    model, config = model_from_args(args, quiet_random_weights=True)  # sizes do not depend on the weights
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in model.trainable_modules().items()}
    print(json.dumps({
        "model": config.stop.model_name,
        "image_size": model.image_size,
        "patches_per_frame": model.num_patches,
        "width": model.width,
        "heads": model.visual.transformer.resblocks[0].attn.num_heads,
        "layers": len(model.visual.transformer.resblocks),
        "backbone": model.clip.stop_fast_source,
        "config": model.config.to_dict(),
        "trainable_parameters": counts,
        "trainable_total": sum(counts.values()),
    }, indent=2))
    return 0
