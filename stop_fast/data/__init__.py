"""Video decoding for STOP: clip sampling, readers, transforms.

``read_video_clip(path, num_frames, size, mode, backend, seed)`` returns a CLIP-normalised clip;
every failure is a :class:`VideoDecodeError` naming the file. ``build_dataset(name, root, split)``
reads the official split files of UCF101, HMDB51, SSv2, Kinetics-400, MSR-VTT or a generic CSV.
``VideoLoader`` (PyAV in DataLoader workers) and ``dali_loader.DaliVideoLoader`` (NVDEC or DALI's CPU
decoder) batch clips. PyAV and DALI are optional: a backend that is missing says what to install.
"""
from .datasets import DATASETS, Sample, VideoDataset, build_dataset
from .errors import VideoDecodeError
from .loader import ShardedSampler, VideoLoader
from .reader import BACKENDS, read_video_clip
from .sampling import sample_indices
from .views import average_views, read_video_views

__all__ = ["read_video_clip", "sample_indices", "VideoDecodeError", "BACKENDS",
           "build_dataset", "DATASETS", "VideoDataset", "Sample", "VideoLoader", "ShardedSampler",
           "read_video_views", "average_views"]
