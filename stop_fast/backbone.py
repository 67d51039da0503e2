"""The frozen CLIP backbone: open_clip models by name, weights from a local file, nothing from the network.

``load_clip`` accepts the three kinds of file users actually hold:
- OpenAI's released ``.pt`` archives (TorchScript), read with ``torch.jit.load`` and converted;
- open_clip / PyTorch checkpoints (a state dict, or ``{"state_dict": ...}``, ``module.`` prefixes
  allowed), read with ``torch.load(weights_only=True)`` so an untrusted pickle cannot run code;
- ``.safetensors`` files.
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
import zipfile
from pathlib import Path
from typing import Dict, Optional, Union

import open_clip
import torch
from torch import nn

_CONFIG_DIR = Path(__file__).with_name("model_configs")
# `stop-tiny`: 3 layers, width 128, 4 heads of 32, 112 px in 16 px patches (a 7 x 7 grid like ViT-B/32
# at 224 px), small enough to train on a laptop CPU. Registered with open_clip so every open_clip API
# knows it by name.
open_clip.add_model_config(_CONFIG_DIR)

# Keys OpenAI's TorchScript archives carry beside the weights.
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")

PathLike = Union[str, os.PathLike]


class WeightsError(ValueError):
    """A weights file is missing, unreadable, or does not fit the requested architecture."""


def load_clip(
    model_name: str = "ViT-B-32",
    weights: Optional[PathLike] = None,
    *,
    device: Union[str, torch.device] = "cpu",
    quick_gelu: bool = True,
    allow_download: bool = False,
    pretrained_tag: Optional[str] = None,
) -> nn.Module:
    """Build the open_clip model ``model_name``, load ``weights``, freeze it and return it (in eval mode).

    Args:
        model_name: any open_clip model name (``ViT-B-32``, ``ViT-B-16``, ``ViT-L-14``, ...) or ``stop-tiny``.
        weights: a local weights file (OpenAI ``.pt``, open_clip checkpoint, ``.safetensors``).
            ``None`` gives random weights, with a warning saying so.
        quick_gelu: OpenAI's CLIP weights were trained with QuickGELU (the default); set False for
            checkpoints trained with nn.GELU (most LAION ones).
        allow_download: the only way this function touches the network: with ``pretrained_tag`` (e.g.
            ``"openai"``) and ``weights=None``, open_clip downloads the weights.
    """
    if model_name not in open_clip.list_models():
        raise ValueError(
            f"model_name {model_name!r} is not an open_clip model; choose one of e.g. "
            "'ViT-B-32', 'ViT-B-16', 'ViT-L-14', 'stop-tiny' (open_clip.list_models() lists all)"
        )
    if pretrained_tag is not None:
        if not allow_download:
            raise ValueError(
                f"pretrained_tag={pretrained_tag!r} downloads weights from the network; pass "
                "allow_download=True to allow it, or weights=<local file> instead"
            )
        if weights is not None:
            raise ValueError("pass either weights (a local file) or pretrained_tag, not both")
        model = open_clip.create_model(model_name, pretrained=pretrained_tag, force_quick_gelu=quick_gelu)
    else:
        with _quiet_open_clip():
            model = open_clip.create_model(model_name, pretrained=None, force_quick_gelu=quick_gelu)
        if weights is None:
            warnings.warn(
                f"load_clip: {model_name} has RANDOM weights (no weights file given); "
                "features are meaningless until you pass weights=<CLIP checkpoint>",
                stacklevel=2,
            )
        else:
            load_weights(model, weights, model_name)
    model = model.to(device)
    return freeze(model)


def freeze(model: nn.Module) -> nn.Module:
    """Make every parameter non-trainable and keep the module in eval mode for good."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def read_state_dict(path: PathLike) -> Dict[str, torch.Tensor]:
    """Read a weights file of any supported kind into a flat state dict (no model needed)."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(
            f"weights file not found: {path}. Pass a local CLIP weights file (OpenAI .pt, open_clip "
            "checkpoint or .safetensors), or weights=None for random weights"
        )
    if not path.is_file():
        raise WeightsError(f"weights must be a file, got the directory {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        elif _is_torchscript(path):
            # OpenAI's releases are TorchScript archives: torch.jit.load reads their tensors without
            # unpickling arbitrary Python objects.
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except WeightsError:
        raise
    except Exception as exc:  # corrupt file, foreign pickle, ...
        raise WeightsError(f"cannot read weights file {path}: {type(exc).__name__}: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    for key in _OPENAI_EXTRA_KEYS:
        state.pop(key, None)
    return state


def load_weights(model: nn.Module, path: PathLike, model_name: str = "") -> None:
    """Load a weights file into an open_clip model, strictly: every key must match."""
    state = read_state_dict(path)
    own = model.state_dict()
    # TorchScript archives also carry non-persistent buffers (the text tower's causal mask).
    transient = {name for name, _ in model.named_buffers()} - set(own)
    state = {k: v for k, v in state.items() if k not in transient}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if mismatched:
            k = mismatched[0]
            detail.append(f"{len(mismatched)} of another shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        raise WeightsError(
            f"weights file {path} does not fit model_name {model_name!r}: " + "; ".join(detail)
            + ". Check that model_name names the architecture the file was trained with"
        )
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


@contextlib.contextmanager
def _quiet_open_clip():
    """Hide open_clip's own "no pretrained weights" log line: load_clip says it once, as a warning."""

    def drop(record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in zf.namelist())
