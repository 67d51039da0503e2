"""Video decoding for STOP: clip sampling, readers, transforms.

``read_video_clip(path, num_frames, size, mode, backend, seed)`` returns a CLIP-normalised clip;
every failure is a :class:`VideoDecodeError` naming the file. ``build_dataset(name, root, split)``
reads the official split files of UCF101, HMDB51, SSv2, Kinetics-400, MSR-VTT, VATEX, DiDeMo,
ActivityNet Captions or a generic CSV (an unreadable line is an ``AnnotationError`` naming the file and line).
``VideoLoader`` (PyAV in DataLoader workers) and ``dali_loader.DaliVideoLoader`` (NVDEC or DALI's CPU
decoder) batch clips; given the ``manifest=`` that ``stop-fast prepare`` writes, they read its copies
made for training with its frame indexes. One probe of a file (``probe.probe_file``) serves every
reader; the PyAV reader seeks to the key frame before each sampled frame. PyAV and DALI are
optional: a backend that is missing says what to install.

Names are imported on first use (PEP 562), so ``import stop_fast.data.datasets`` costs no torch import.
"""
from .._lazy import lazy_exports

_EXPORTS = {
    "build_dataset": "datasets", "DATASETS": "datasets", "VideoDataset": "datasets", "Sample": "datasets",
    "AnnotationError": "datasets", "VIDEO_SUFFIXES": "datasets", "video_files": "datasets",
    "VideoDecodeError": "errors",
    "ShardedSampler": "loader", "VideoLoader": "loader",
    "BACKENDS": "reader", "read_video_clip": "reader",
    "sample_indices": "sampling",
    "average_views": "views", "read_video_views": "views",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
