"""stop_fast: STOP spatial-temporal dynamic prompting for frozen CLIP video models.

Public API: :class:`STOPConfig`, :class:`STOP`, :func:`load_clip`, :func:`build_stop`; the
subpackages ``stop_fast.kernels`` (Triton kernels) and ``stop_fast.data`` (video decoding).
Names are imported on first use (PEP 562), so the command line starts without importing torch.
"""
from ._lazy import lazy_exports

__version__ = "0.2.0"

_EXPORTS = {
    "STOPConfig": "config",
    "STOP": "model",
    "load_clip": "backbone",
    "WeightsError": "backbone",
    "build_stop": "factory",
}

__all__ = ["STOPConfig", "STOP", "load_clip", "build_stop", "WeightsError", "__version__"]


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
