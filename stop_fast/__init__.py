"""stop_fast: STOP spatial-temporal dynamic prompting for frozen CLIP video models.

Public API: :class:`STOPConfig`, :class:`STOP`, :func:`load_clip`, :func:`build_stop`; the
subpackages ``stop_fast.kernels`` (Triton kernels) and ``stop_fast.data`` (video decoding).
"""
from .backbone import WeightsError, load_clip
from .config import STOPConfig
from .model import STOP

__version__ = "0.1.0"


def build_stop(config: STOPConfig = None, weights=None, device="cpu", **clip_kwargs) -> STOP:
    """``STOP(config, load_clip(config.model_name, weights))`` on ``device``, in one call."""
    config = config or STOPConfig()
    clip = load_clip(config.model_name, weights, device=device, **clip_kwargs)
    return STOP(config, clip).to(device)


__all__ = ["STOPConfig", "STOP", "load_clip", "build_stop", "WeightsError", "__version__"]
