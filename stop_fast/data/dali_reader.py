"""NVIDIA DALI decoding: NVDEC on a GPU ("mixed" backend), DALI's CPU decoder elsewhere.

DALI's CPU video decoder handles VP8, VP9 and MJPEG only (H.264 and MPEG-4 need the GPU); on a
machine without CUDA other codecs are refused with a :class:`VideoDecodeError` that says to use
PyAV. Frame counts, codecs and rotation come from the one probe of the file (:mod:`.probe`: a
``prepare`` manifest's record, or a demux once per process), so a file DALI would choke on is
reported before DALI sees it. DALI ignores rotation metadata; single clips are turned upright after
decoding (the batched loader refuses rotated files instead: ``prepare``'s copies are upright).
"""
from __future__ import annotations

import functools
import random
from typing import Optional, Sequence

import numpy as np
import torch

from .errors import VideoDecodeError
from .probe import VideoProbe, cached_probe, quarter_turns
from .sampling import sample_indices

CPU_CODECS = ("vp8", "vp9", "mjpeg")


def import_dali():
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as exc:
        raise ImportError("the DALI backend needs NVIDIA DALI: pip install nvidia-dali-cuda130 (stop_fast[dali])") from exc
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    return fn, types, pipeline_def


def dali_available() -> bool:
    try:
        import_dali()
        return True
    except ImportError:
        return False


def check_codec(path: str, codec: str, on_gpu: bool) -> None:
    """Refuse, before DALI sees it, a codec DALI's CPU decoder cannot read."""
    if not on_gpu and codec not in CPU_CODECS:
        raise VideoDecodeError(path, f"DALI's CPU decoder reads {', '.join(CPU_CODECS)}, not {codec}; use backend='pyav' "
                                     "(or the PyAV VideoLoader)")


@functools.lru_cache(maxsize=4)
def frame_pipeline(device_id: Optional[int]):
    """A batch-1 pipeline decoding the frames ``idx`` of the encoded bytes ``enc`` (uint8 FHWC): single
    clips, and the loader's search for the file that broke a batch."""
    fn, types, pipeline_def = import_dali()

    @pipeline_def(batch_size=1, num_threads=2, device_id=device_id, prefetch_queue_depth=1)
    def pipe():
        enc = fn.external_source(name="enc", dtype=types.UINT8, ndim=1)
        idx = fn.external_source(name="idx", dtype=types.INT32, ndim=1)
        return fn.decoders.video(enc, device="mixed" if device_id is not None else "cpu", frames=idx)

    p = pipe()
    p.build()
    return p


def decode_encoded(data: np.ndarray, indices: Sequence[int], use_gpu: bool) -> torch.Tensor:
    """Frames ``indices`` of an encoded file's bytes as uint8 (T, H, W, 3) on the CPU, decoded by DALI
    (any DALI error is raised as it comes)."""
    pipe = frame_pipeline(torch.cuda.current_device() if use_gpu else None)
    pipe.feed_input("enc", [data])
    pipe.feed_input("idx", [np.asarray(indices, dtype=np.int32)])
    (out,) = pipe.run()
    if use_gpu:
        out = out.as_cpu()
    return torch.from_numpy(np.array(out[0]))


def decode_frames_dali(path: str, indices: Sequence[int], use_gpu: Optional[bool] = None,
                       probe: Optional[VideoProbe] = None) -> torch.Tensor:
    """Frames ``indices`` of ``path`` as uint8 (T, H, W, 3) on the CPU, decoded by DALI."""
    use_gpu = torch.cuda.is_available() if use_gpu is None else use_gpu
    check_codec(path, (probe or cached_probe(path)).codec, use_gpu)
    try:
        return decode_encoded(np.fromfile(path, dtype=np.uint8), indices, use_gpu)
    except Exception as exc:
        raise VideoDecodeError(path, f"DALI could not decode it ({str(exc).splitlines()[0]})") from exc


def read_clip_dali(path: str, num_frames: int, mode: str, rng: random.Random, use_gpu: Optional[bool] = None,
                   probe: Optional[VideoProbe] = None) -> torch.Tensor:
    probe = probe or cached_probe(path)
    use_gpu = torch.cuda.is_available() if use_gpu is None else use_gpu
    frames = decode_frames_dali(path, sample_indices(probe.frames, num_frames, mode, rng), use_gpu, probe)
    quarter = quarter_turns(probe.rotation)  # counter-clockwise, FFmpeg's convention, as in the PyAV path
    return torch.rot90(frames, quarter, dims=(1, 2)).contiguous() if quarter else frames
