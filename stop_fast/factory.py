"""build_stop: a STOP model over a loaded backbone, in one call."""
from __future__ import annotations

from .backbone import load_clip
from .config import STOPConfig
from .model import STOP


def build_stop(config: STOPConfig = None, weights=None, device="cpu", **clip_kwargs) -> STOP:
    """``STOP(config, load_clip(config.model_name, weights))`` on ``device``, in one call."""
    config = config or STOPConfig()
    clip = load_clip(config.model_name, weights, device=device, **clip_kwargs)
    return STOP(config, clip).to(device)
