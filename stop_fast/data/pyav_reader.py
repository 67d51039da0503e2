"""Decoding a clip on the CPU with PyAV (FFmpeg): any codec FFmpeg knows."""
from __future__ import annotations

import os
import random
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .errors import VideoDecodeError
from .sampling import sample_indices


def _import_av():
    try:
        import av
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("decoding videos on the CPU needs PyAV: pip install av (or stop_fast[video])") from exc
    return av


def _open(path: str):
    av = _import_av()
    if not os.path.isfile(path):
        raise VideoDecodeError(path, "file not found")
    try:
        container = av.open(path)
    except Exception as exc:  # FFmpeg's errors differ by version; the reason is in the message
        raise VideoDecodeError(path, f"not a readable video container ({type(exc).__name__}: {exc})") from exc
    if not container.streams.video:
        container.close()
        raise VideoDecodeError(path, "no video stream (audio-only or data file)")
    return container


def count_frames(path: str) -> int:
    """Frames of the first video stream, counted by demuxing (no decoding)."""
    container = _open(path)
    try:
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size)
    except Exception as exc:
        raise VideoDecodeError(path, f"corrupt stream while counting frames ({exc})") from exc
    finally:
        container.close()


def probe_stream(path: str) -> Tuple[str, int, int]:
    """(codec, frames, rotation) of the first video stream: frames counted by demuxing, the display
    rotation (degrees counter-clockwise) read from the first decoded frame. PyAV exposes rotation only
    on frames, and decoders that ignore it (DALI's) need to know before they decode."""
    container = _open(path)
    try:
        stream = container.streams.video[0]
        codec = stream.codec_context.name
        frames, rotation, seen = 0, 0, False
        for packet in container.demux(stream):
            if not seen:
                try:
                    for frame in packet.decode():
                        rotation, seen = int(round(getattr(frame, "rotation", 0) or 0)), True
                        break
                except Exception:  # a damaged first packet: the frame count still decides
                    pass
            if packet.size:
                frames += 1
        return codec, frames, rotation
    except VideoDecodeError:
        raise
    except Exception as exc:
        raise VideoDecodeError(path, f"corrupt stream while probing ({exc})") from exc
    finally:
        container.close()


def decode_frames(path: str, indices: Sequence[int]) -> Tuple[List[np.ndarray], int]:
    """Decode the frames at ``indices`` (non-decreasing) as RGB uint8 (H, W, 3) arrays.

    Returns the frames and the number of frames decoded. Stops early at a corrupt or truncated tail;
    the caller sees fewer frames than it asked for and can resample over what did decode.
    Rotation metadata is applied, so frames come out upright.
    """
    wanted = set(indices)
    last = max(wanted)
    found = {}
    decoded = 0
    container = _open(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for frame in container.decode(stream):
                if decoded in wanted:
                    found[decoded] = _upright(frame.to_ndarray(format="rgb24"), getattr(frame, "rotation", 0))
                decoded += 1
                if decoded > last:
                    break
        except Exception:  # a truncated or corrupt tail: keep what decoded
            pass
    finally:
        container.close()
    return [found[i] for i in indices if i in found], decoded


def _upright(rgb: np.ndarray, rotation) -> np.ndarray:
    """Apply a display rotation (degrees counter-clockwise, FFmpeg's convention) to an (H, W, 3) frame."""
    quarter = int(round((rotation or 0) / 90.0)) % 4
    return np.ascontiguousarray(np.rot90(rgb, k=quarter)) if quarter else rgb


def read_clip_pyav(path: Union[str, os.PathLike], num_frames: int, mode: str = "eval",
                   rng: Optional[random.Random] = None) -> torch.Tensor:
    """The sampled frames of a clip as uint8 (num_frames, H, W, 3)."""
    path = os.fspath(path)
    total = count_frames(path)
    if total == 0:
        raise VideoDecodeError(path, "the video stream holds no frames")
    for _ in range(2):
        indices = sample_indices(total, num_frames, mode, rng)
        frames, decoded = decode_frames(path, indices)
        if len(frames) == num_frames:
            return torch.from_numpy(np.stack(frames))
        if decoded == 0:
            break
        total = decoded  # the container over-counted (a truncated file): resample what exists
    raise VideoDecodeError(path, "no decodable frames" if total == 0 else f"decoding failed after {total} frames")
