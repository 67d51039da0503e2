"""Which torch device a name such as ``auto``, ``cpu``, ``cuda`` or ``cuda:1`` means here, checked."""
from __future__ import annotations

from typing import Optional

import torch


def resolve_device(name: Optional[str], *, local_rank: Optional[int] = None, what: str = "device") -> torch.device:
    """``name`` -> a usable ``torch.device``, or a ValueError saying why not (``what`` names the
    argument in the message, e.g. ``--device``).

    ``auto`` (or None) is CUDA when available, else the CPU. A bare ``cuda`` under torchrun is the
    process's own GPU (``local_rank``).
    """
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"{what} {name!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{what} {name}: no CUDA device is available here; use {what} cpu")
        if device.index is None and local_rank is not None:
            device = torch.device("cuda", local_rank)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{what} {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise ValueError(f"{what} {name!r}: only cpu and cuda devices are supported")
    return device
