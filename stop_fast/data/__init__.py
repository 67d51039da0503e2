"""Video decoding for STOP: clip sampling, readers, transforms.

``read_video_clip(path, num_frames, size, mode, backend, seed)`` returns a CLIP-normalised clip;
every failure is a :class:`VideoDecodeError` naming the file.
"""
from .errors import VideoDecodeError
from .reader import BACKENDS, read_video_clip
from .sampling import sample_indices

__all__ = ["read_video_clip", "sample_indices", "VideoDecodeError", "BACKENDS"]
