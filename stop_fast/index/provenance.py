"""What made an index: its fingerprint (rows of two builds belong in one index only when these are
equal) and the settings that rebuild its model, so that ``search`` needs nothing but the index.

``fingerprint`` (compared field by field, in this order; a difference is refused naming the field):

- ``prompts_sha256``: sha256 of the prompt file's bytes (equal prompts give equal bytes), None for
  zero-shot (prompts off);
- ``backbone``: ``sha256:<hex>`` of the weights (``stop_fast.backbone.weights_fingerprint``), or
  ``random:<seed>`` for seeded random weights;
- ``model_name``, ``gelu``; ``stop_config``: the STOPConfig without the fields STOP's function does
  not depend on (``prompt_file.FREE_CONFIG_FIELDS``: T, an initialisation scale);
- ``frames`` (T of each clip), ``views`` (``[clips, crops]``, averaged), ``caption_tokens``.

``model`` (how to rebuild it): the STOPConfig in full, the weights file's absolute path (None:
random), GELU, seed, the checkpoint the prompts came from (for the record) and the name of their
copy inside the index (``prompts.safetensors``; None for zero-shot).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Tuple

FINGERPRINT_FIELDS = ("prompts_sha256", "backbone", "model_name", "gelu", "stop_config", "frames", "views",
                      "caption_tokens")


class IndexMismatchError(ValueError):
    """Rows made by another model or other settings than the index's; the message names the field."""


def describe(model, config, prompts: Optional[str], checkpoint: Optional[str]) -> Dict[str, Any]:
    """``{"fingerprint": ..., "model": ...}`` of ``model`` built from ``config`` (resolved) with the
    prompt file ``prompts`` (None: zero-shot); ``checkpoint``: what the user named, for the record."""
    from ..backbone import file_sha256
    from ..prompt_file import FREE_CONFIG_FIELDS, backbone_description
    from .store import PROMPTS

    source = backbone_description(model.clip, config.stop.model_name)
    if source.get("sha256"):
        backbone = f"sha256:{source['sha256']}"
    elif source.get("random_seed") is not None:
        backbone = f"random:{source['random_seed']}"
    else:
        raise ValueError("the backbone's weights are neither a local file nor seeded random weights; an index "
                         "needs one of them to be rebuilt by search")
    stop = config.stop.to_dict()
    fingerprint = {
        "prompts_sha256": file_sha256(prompts) if prompts else None,
        "backbone": backbone,
        "model_name": stop["model_name"],
        "gelu": source.get("gelu") or config.gelu,
        "stop_config": {k: v for k, v in stop.items() if k not in FREE_CONFIG_FIELDS},
        "frames": config.eval_num_frames,
        "views": [config.eval_clips, config.eval_crops],
        "caption_tokens": config.text_tokens,
    }
    record = {
        "stop_config": stop,
        "weights": os.path.abspath(config.weights) if config.weights else None,
        "gelu": config.gelu,
        "seed": config.seed,
        "checkpoint": os.path.abspath(checkpoint) if checkpoint else None,
        "prompts": PROMPTS if prompts else None,
    }
    return json.loads(json.dumps({"fingerprint": fingerprint, "model": record}))  # as a manifest holds it


def check_same(saved: Dict[str, Any], current: Dict[str, Any], where: str, advice: str) -> None:
    """Raise :class:`IndexMismatchError` naming the first fingerprint field that differs."""
    for field in FINGERPRINT_FIELDS:
        if saved.get(field) != current.get(field):
            raise IndexMismatchError(f"{where} was made with {field} {_show(saved.get(field))}, this model has "
                                     f"{_show(current.get(field))}; {advice}")


def _show(value) -> str:
    if isinstance(value, str) and value.startswith("sha256:"):
        return value[:19] + "..."
    if isinstance(value, str) and len(value) == 64:
        return value[:12] + "..."
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return repr(value)


def config_from_record(provenance: Dict[str, Any], weights: Optional[str] = None, **settings):
    """The TrainConfig of an index's model (``provenance`` from its manifest); ``weights`` replaces a
    weights file that moved, ``settings`` are TrainConfig fields of how to run it (device, impl, ...)."""
    from ..train.config import TrainConfig

    record, fingerprint = provenance["model"], provenance["fingerprint"]
    clips, crops = fingerprint["views"]
    return TrainConfig(stop=dict(record["stop_config"]), weights=weights or record["weights"], gelu=record["gelu"],
                       seed=record["seed"], eval_frames=fingerprint["frames"], eval_clips=clips, eval_crops=crops,
                       caption_tokens=fingerprint["caption_tokens"], **settings)


def model_from_record(folder: str, provenance: Dict[str, Any], config, device) -> Tuple[Any, Any]:
    """``(model, config)``: the model the index in ``folder`` was made with, rebuilt from ``config``
    (:func:`config_from_record`, resolved) and the prompts' copy in the index, then checked against
    the fingerprint (a weights file that changed since is refused, naming ``backbone``)."""
    from ..train.setup import model_from_checkpoint

    record = provenance["model"]
    if record["weights"] and not os.path.isfile(config.weights):
        raise FileNotFoundError(f"index {folder} was made with the weights file {record['weights']}, which is not "
                                "there any more; name it with --weights")
    prompts = os.path.join(folder, record["prompts"]) if record["prompts"] else None
    if prompts and not os.path.isfile(prompts):
        raise FileNotFoundError(f"index {folder}: its copy of the prompts, {prompts}, is missing")
    model, config = model_from_checkpoint(config, prompts, device)
    current = describe(model, config, prompts, record["checkpoint"])
    check_same(provenance["fingerprint"], current["fingerprint"], f"index {folder}",
               "the files it records have changed since it was made")
    return model, config
