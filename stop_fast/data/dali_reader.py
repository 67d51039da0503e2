"""NVIDIA DALI decoding: NVDEC on a GPU ("mixed" backend), DALI's CPU decoder elsewhere.

DALI's CPU video decoder handles VP8, VP9 and MJPEG only (H.264 and MPEG-4 need the GPU); on a
machine without CUDA other codecs are refused with a :class:`VideoDecodeError` that says to use
PyAV or to re-encode with ``stop-fast prepare``. Frame counts and codecs come from a PyAV probe of
the container (demuxing only), so a file DALI would choke on is reported before DALI sees it.
DALI ignores rotation metadata; single clips are turned upright after decoding (the batched loader
refuses rotated files instead: ``stop-fast prepare --reencode-dir`` writes upright copies).
"""
from __future__ import annotations

import functools
import random
from typing import Optional, Sequence

import numpy as np
import torch

from .errors import VideoDecodeError
from .pyav_reader import _open, probe_stream
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


def video_codec(path: str) -> str:
    container = _open(path)
    try:
        return container.streams.video[0].codec_context.name
    finally:
        container.close()


def check_codec(path: str, codec: str, on_gpu: bool) -> None:
    """Refuse, before DALI sees it, a codec DALI's CPU decoder cannot read."""
    if not on_gpu and codec not in CPU_CODECS:
        raise VideoDecodeError(path, f"DALI's CPU decoder reads {', '.join(CPU_CODECS)}, not {codec}; use backend='pyav' "
                                     "or re-encode with `stop-fast prepare --reencode-dir ... --codec vp9`")


def check_decodable(path: str, on_gpu: bool) -> None:
    if not on_gpu:
        check_codec(path, video_codec(path), on_gpu)


@functools.lru_cache(maxsize=4)
def _frame_pipeline(device_id: Optional[int]):
    """A batch-1 pipeline decoding the frames ``idx`` of the encoded bytes ``enc`` (uint8 FHWC)."""
    fn, types, pipeline_def = import_dali()

    @pipeline_def(batch_size=1, num_threads=2, device_id=device_id, prefetch_queue_depth=1)
    def pipe():
        enc = fn.external_source(name="enc", dtype=types.UINT8, ndim=1)
        idx = fn.external_source(name="idx", dtype=types.INT32, ndim=1)
        return fn.decoders.video(enc, device="mixed" if device_id is not None else "cpu", frames=idx)

    p = pipe()
    p.build()
    return p


def decode_frames_dali(path: str, indices: Sequence[int], use_gpu: Optional[bool] = None) -> torch.Tensor:
    """Frames ``indices`` of ``path`` as uint8 (T, H, W, 3) on the CPU, decoded by DALI."""
    use_gpu = torch.cuda.is_available() if use_gpu is None else use_gpu
    check_decodable(path, use_gpu)
    pipe = _frame_pipeline(torch.cuda.current_device() if use_gpu else None)
    try:
        pipe.feed_input("enc", [np.fromfile(path, dtype=np.uint8)])
        pipe.feed_input("idx", [np.asarray(indices, dtype=np.int32)])
        (out,) = pipe.run()
        if use_gpu:
            out = out.as_cpu()
        return torch.from_numpy(np.array(out[0]))
    except Exception as exc:
        raise VideoDecodeError(path, f"DALI could not decode it ({str(exc).splitlines()[0]})") from exc


def read_clip_dali(path: str, num_frames: int, mode: str, rng: random.Random, use_gpu: Optional[bool] = None) -> torch.Tensor:
    codec, total, rotation = probe_stream(path)
    if total == 0:
        raise VideoDecodeError(path, "the video stream holds no frames")
    check_codec(path, codec, torch.cuda.is_available() if use_gpu is None else use_gpu)
    frames = decode_frames_dali(path, sample_indices(total, num_frames, mode, rng), use_gpu)
    quarter = int(round(rotation / 90.0)) % 4  # counter-clockwise, FFmpeg's convention, as in the PyAV path
    return torch.rot90(frames, quarter, dims=(1, 2)).contiguous() if quarter else frames
