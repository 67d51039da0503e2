"""Prompt files: STOP's trainable weights in a self-describing ``.safetensors`` file.

A prompt file holds the trainable tensors (``STOP.trainable_state_dict()``) and, in the safetensors
metadata, everything needed to tell whether they fit a model:

- ``stop_config``: the STOPConfig as JSON;
- ``backbone``: the backbone they were trained on, as JSON: ``model_name``, ``gelu`` (``quick`` or
  ``erf``), ``weights`` (the weights file's name, no folder), ``sha256`` of that file (of the original
  for a file written by ``stop-fast convert-weights``), and
  ``random_seed`` when the backbone had seeded random weights (``clip.stop_fast_source``, which
  ``load_clip`` sets).

Loading into a model with another config (any field but ``num_frames``, which STOP does not depend
on, and ``slot_init_std``, an initialisation setting), another architecture, GELU flavour or backbone
weights raises :class:`PromptFileError` naming the file and the field; ``force=True`` loads anyway
with a warning. Every unreadable file (missing, truncated, not safetensors, metadata that is not a
JSON object, integer or boolean tensors, NaN or infinite values, tensors of the wrong names or shapes)
raises :class:`PromptFileError` too, with or without ``force``.

Files are written by :func:`stop_fast.io.write_atomic` (old file or complete new one, the user's
umask, temporaries of killed saves removed by the next save into the folder), and equal contents
give equal bytes (:func:`stop_fast.io.safetensors_bytes`).

:func:`read_prompt_file` is the one reader of prompt files and their metadata: everything that
needs a file's STOPConfig or backbone (evaluation, prediction, visualisation, resuming) goes
through it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Dict, Optional, Union

import torch

from .io import safetensors_bytes, write_atomic

PathLike = Union[str, os.PathLike]

FORMAT = "stop_fast.prompts"
VERSION = "1"
# STOPConfig fields that may differ between saving and loading: STOP's function does not depend on
# the number of frames, and slot_init_std only sets the initial value of a trained parameter.
FREE_CONFIG_FIELDS = ("num_frames", "slot_init_std")


class PromptFileError(ValueError):
    """A prompt file cannot be read, or was saved for another model; the message names the file."""


@dataclasses.dataclass
class PromptFile:
    """A prompt file's content, checked for readability (not yet against a model)."""

    path: str
    tensors: Dict[str, torch.Tensor]
    config: dict  # STOPConfig fields as saved
    backbone: Optional[dict]  # None in files written before backbones were recorded


# ------------------------------------------------------------------------------------------------ save
def save_prompts(model, path: PathLike) -> None:
    """Write ``model``'s trainable weights, its config and its backbone's description to ``path``."""
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.trainable_state_dict().items()}
    source = backbone_description(model.clip, model.config.model_name)
    if source.get("weights"):
        source["weights"] = os.path.basename(str(source["weights"]))  # a name, not the saver's folders
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "stop_config": json.dumps(model.config.to_dict(), sort_keys=True),
        "backbone": json.dumps(source, sort_keys=True),
    }
    write_atomic(path, safetensors_bytes(tensors, metadata))


# ------------------------------------------------------------------------------------------------ load
def read_prompt_file(path: PathLike) -> PromptFile:
    """Read and check a prompt file on its own (no model needed): a :class:`PromptFileError` if unreadable."""
    from safetensors import safe_open

    path = str(path)
    if not os.path.exists(path):
        raise PromptFileError(f"prompt file {path} not found")
    if not os.path.isfile(path):
        raise PromptFileError(f"prompt file {path} is a folder, not a file")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # truncated, not safetensors, bad header: safetensors' own error types
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise PromptFileError(f"prompt file {path} is not a readable safetensors file ({reason})") from None
    config = _json_object(metadata, "stop_config", path)
    if config is None:
        raise PromptFileError(f"prompt file {path} has no stop_config in its metadata: not written by stop_fast")
    backbone = _json_object(metadata, "backbone", path)
    if not tensors:
        raise PromptFileError(f"prompt file {path} holds no tensors")
    for key, value in tensors.items():
        if not value.is_floating_point():
            raise PromptFileError(f"prompt file {path}: {key} holds {value.dtype} values, expected floating point")
        if not torch.isfinite(value).all():
            raise PromptFileError(f"prompt file {path}: {key} contains NaN or infinite values")
    return PromptFile(path=path, tensors=tensors, config=config, backbone=backbone)


def load_prompts(model, path: Union[PathLike, PromptFile], force: bool = False) -> None:
    """Load a prompt file into ``model`` after checking it was saved for the same config and backbone.

    ``path`` may also be a :class:`PromptFile` already read by :func:`read_prompt_file`. With
    ``force=True`` a mismatched config or backbone is a warning instead of an error (tensors of the
    wrong shape still cannot load).
    """
    prompts = path if isinstance(path, PromptFile) else read_prompt_file(path)
    mismatches = _mismatches(prompts, model)
    if mismatches:
        message = f"prompt file {prompts.path} was saved for another model: " + "; ".join(mismatches)
        if not force:
            raise PromptFileError(message + " (force=True / --force loads it anyway)")
        warnings.warn(message + "; loading anyway (force)", stacklevel=2)
    own = model.trainable_state_dict()
    missing = sorted(set(own) - set(prompts.tensors))
    unexpected = sorted(set(prompts.tensors) - set(own))
    if missing or unexpected:
        raise PromptFileError(
            f"prompt file {prompts.path} does not fit this model's trainable parts "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}): saved with other k / rho?"
        )
    for key, value in prompts.tensors.items():
        if value.shape != own[key].shape:
            raise PromptFileError(
                f"prompt file {prompts.path}: {key} has shape {tuple(value.shape)}, this model's is "
                f"{tuple(own[key].shape)} (saved with other widths?)"
            )
    device = next(model.clip.parameters()).device
    model.load_trainable_state_dict({k: v.to(device=device, dtype=own[k].dtype) for k, v in prompts.tensors.items()})


def backbone_description(clip, model_name: Optional[str] = None) -> dict:
    """``clip.stop_fast_source`` (set by ``load_clip``), or what can be told of a backbone built otherwise."""
    from .backbone import gelu_flavour

    source = getattr(clip, "stop_fast_source", None)
    if isinstance(source, dict):
        return dict(source)
    return {"model_name": model_name, "gelu": gelu_flavour(clip), "weights": None, "sha256": None,
            "random_seed": None, "unknown": True}


def _fingerprint(source: dict) -> Optional[str]:
    """``sha256:...`` for a weights file, ``random`` / ``random:SEED`` for random weights, None if unknown."""
    if source.get("unknown"):
        return None
    if source.get("sha256"):
        return f"sha256:{source['sha256']}"
    if source.get("weights"):  # e.g. open_clip's download by tag: no file of ours to hash
        return f"weights:{source['weights']}"
    seed = source.get("random_seed")
    return "random" if seed is None else f"random:{seed}"


def _mismatches(prompts: PromptFile, model) -> list:
    """Human-readable differences between what the file was saved for and ``model`` (empty: it fits)."""
    out = []
    ours = model.config.to_dict()
    for field in sorted(set(prompts.config) | set(ours)):
        if field in FREE_CONFIG_FIELDS:
            continue
        if field not in ours:
            out.append(f"config field {field!r} is unknown here (saved {prompts.config[field]!r})")
        elif field in prompts.config and prompts.config[field] != ours[field]:
            out.append(f"config {field}: saved {prompts.config[field]!r}, this model {ours[field]!r}")
    if prompts.backbone is None:
        warnings.warn(f"prompt file {prompts.path} records no backbone; its weights cannot be checked", stacklevel=3)
        return out
    saved, current = prompts.backbone, backbone_description(model.clip, model.config.model_name)
    for field in ("model_name", "gelu"):
        if saved.get(field) is not None and current.get(field) is not None and saved[field] != current[field]:
            out.append(f"backbone {field}: saved {saved[field]!r}, this model {current[field]!r}")
    a, b = _fingerprint(saved), _fingerprint(current)
    # Unseeded random weights cannot be told apart: only a real-vs-random or a definite difference counts.
    definite = a is not None and b is not None and not (a == "random" and b.startswith("random")) \
        and not (b == "random" and a.startswith("random"))
    if definite and a != b:
        out.append(f"backbone weights: saved {_describe(saved)}, this model {_describe(current)}")
    return out


def _describe(source: dict) -> str:
    if source.get("sha256"):
        name = os.path.basename(str(source["weights"])) if source.get("weights") else "a weights file"
        return f"{name} (sha256 {source['sha256'][:12]}...)"
    if source.get("weights"):
        return str(source["weights"])
    seed = source.get("random_seed")
    return "random weights" + (f" (seed {seed})" if seed is not None else "")


def _json_object(metadata: dict, key: str, path: str) -> Optional[dict]:
    if key not in metadata:
        return None
    try:
        value = json.loads(metadata[key])
    except (TypeError, ValueError):
        raise PromptFileError(f"prompt file {path}: metadata {key!r} is not valid JSON") from None
    if not isinstance(value, dict):
        raise PromptFileError(f"prompt file {path}: metadata {key!r} is not a JSON object")
    return value
