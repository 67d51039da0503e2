"""Decoding a clip on the CPU with PyAV (FFmpeg): any codec FFmpeg knows.

Three rules keep this path safe with any PyAV release and any input:

- Frames are converted (pixel format and size) by a private, single-threaded swscale context
  (:class:`Scaler`), never by ``VideoFrame.to_ndarray(format=...)`` / ``VideoFrame.reformat``: from
  PyAV 19 those share one scaler per thread whose worker-thread pool does not survive ``fork``, so a
  DataLoader or ``prepare`` worker forked after the parent decoded a video would wait forever.
- Frames are resized to the requested short side by swscale while still 8-bit, all to one common
  size (a stream whose resolution changes mid-way still stacks), and coded sizes above
  :data:`MAX_PIXELS` are refused: a 4000 x 4000 frame never becomes a float tensor.
- Only real videos are read: FFmpeg's text-art and still-image demuxers (which turn a ``.txt`` or a
  ``.png`` into a "video") are refused, and a degenerate display matrix counts as no rotation.
"""
from __future__ import annotations

import math
import os
import random
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import VideoDecodeError
from .sampling import resized_shape, sample_indices

# 8K UHD. Larger frames are refused before decoding: one such frame is 100 MB of RGB.
MAX_PIXELS = 7680 * 4320

# Demuxers and codecs that FFmpeg offers for files that are not videos: text art (`.txt`, `.nfo`,
# `.ans` ...) and single pictures. Animated formats (gif, apng, webp) stay readable.
NOT_VIDEO_DEMUXERS = {"tty", "bin", "xbin", "adf", "idf", "image2"}
NOT_VIDEO_CODECS = {"ansi", "bintext", "xbin", "idf"}


def _import_av():
    try:
        import av
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("decoding videos on the CPU needs PyAV: pip install av") from exc
    return av


class Scaler:
    """Converts frames to RGB uint8 at a chosen size with its own single-threaded swscale context.

    One instance per video read (not shared across threads or processes), so nothing of it outlives a
    ``fork``: see the module docstring."""

    def __init__(self):
        from av.video.reformatter import VideoReformatter

        self._reformatter = VideoReformatter()
        self._threads = True

    def __call__(self, frame, width: Optional[int] = None, height: Optional[int] = None,
                 format: str = "rgb24"):
        kwargs = dict(width=width, height=height, format=format, interpolation="BILINEAR")
        if self._threads:
            try:
                return self._reformatter.reformat(frame, threads=1, **kwargs)
            except TypeError:  # a PyAV without the `threads` argument has no scaler thread pool either
                self._threads = False
        return self._reformatter.reformat(frame, **kwargs)

    def rgb(self, frame, width: Optional[int] = None, height: Optional[int] = None) -> np.ndarray:
        return self(frame, width, height).to_ndarray()


def display_rotation(frame) -> int:
    """The frame's display rotation in degrees counter-clockwise (FFmpeg's convention); 0 when there
    is none or the display matrix is degenerate (FFmpeg's NaN, which PyAV turns into INT_MIN)."""
    value = getattr(frame, "rotation", 0) or 0
    try:
        value = float(value)
    except (TypeError, ValueError):
        return 0
    if not math.isfinite(value) or abs(value) > 360:
        return 0
    return int(round(value))


def _is_not_video(container, stream) -> Optional[str]:
    demuxers = set((getattr(container.format, "name", "") or "").split(","))
    codec = stream.codec_context.name
    if demuxers & NOT_VIDEO_DEMUXERS or any(d.endswith("_pipe") for d in demuxers):
        kind = "a text file" if demuxers & {"tty", "bin", "xbin", "adf", "idf"} else "a still image"
        return f"{kind} (FFmpeg demuxer {'/'.join(sorted(demuxers))}), not a video"
    if codec in NOT_VIDEO_CODECS:
        return f"text art (codec {codec}), not a video"
    return None


def check_frame_size(path: str, width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise VideoDecodeError(path, f"frames of {width} x {height} exceed the {MAX_PIXELS:,}-pixel limit (8K)")


def _open(path: str):
    """The container and its first video stream, checked: a real video, of a size we decode."""
    av = _import_av()
    if not os.path.isfile(path):
        raise VideoDecodeError(path, "file not found")
    try:
        container = av.open(path)
    except Exception as exc:  # FFmpeg's errors differ by version; the reason is in the message
        raise VideoDecodeError(path, f"not a readable video container ({type(exc).__name__}: {exc})") from exc
    try:
        if not container.streams.video:
            raise VideoDecodeError(path, "no video stream (audio-only or data file)")
        stream = container.streams.video[0]
        reason = _is_not_video(container, stream)
        if reason:
            raise VideoDecodeError(path, reason)
        check_frame_size(path, stream.codec_context.width or 0, stream.codec_context.height or 0)
    except BaseException:
        container.close()
        raise
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
                        rotation, seen = display_rotation(frame), True
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


def decode_frames(path: str, indices: Sequence[int], size: Optional[int] = None) -> Tuple[List[np.ndarray], int]:
    """Decode the frames at ``indices`` (non-decreasing) as RGB uint8 (H, W, 3) arrays of one size.

    ``size``: the short side is scaled to ``size`` (the long side keeps the aspect ratio, as
    :func:`~stop_fast.data.transforms.resize_crop_normalise` computes it) by swscale at decode time;
    None keeps the first frame's size. Every frame gets the first frame's size and rotation, so a
    stream whose resolution changes mid-way still yields frames that stack.

    Returns the frames and the number of frames decoded. Stops early at a corrupt or truncated tail;
    the caller sees fewer frames than it asked for and can resample over what did decode.
    Rotation metadata is applied, so frames come out upright.
    """
    wanted = set(indices)
    last = max(wanted)
    found = {}
    decoded = 0
    container = _open(path)
    scaler = Scaler()
    target = None  # (coded width, coded height, rotation) of every output frame
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = container.decode(stream)
        while decoded <= last:
            try:
                frame = next(frames)
            except StopIteration:
                break
            except Exception:  # a truncated or corrupt tail: keep what decoded
                break
            check_frame_size(path, frame.width, frame.height)
            if target is None:
                h, w = frame.height, frame.width
                if size is not None:
                    h, w = resized_shape(h, w, size)
                target = (w, h, display_rotation(frame))
            if decoded in wanted:
                try:
                    found[decoded] = _upright(scaler.rgb(frame, target[0], target[1]), target[2])
                except Exception as exc:  # not the file's tail: say what failed
                    raise VideoDecodeError(path, f"frame {decoded} ({frame.format.name}, {frame.width} x "
                                                 f"{frame.height}) could not be converted to RGB "
                                                 f"({type(exc).__name__}: {exc})") from exc
            decoded += 1
    finally:
        container.close()
    return [found[i] for i in indices if i in found], decoded


def _upright(rgb: np.ndarray, rotation) -> np.ndarray:
    """Apply a display rotation (degrees counter-clockwise, FFmpeg's convention) to an (H, W, 3) frame."""
    quarter = int(round((rotation or 0) / 90.0)) % 4
    return np.ascontiguousarray(np.rot90(rgb, k=quarter)) if quarter else rgb


def read_clip_pyav(path: Union[str, os.PathLike], num_frames: int, mode: str = "eval",
                   rng: Optional[random.Random] = None, size: Optional[int] = None):
    """The sampled frames of a clip as a uint8 tensor (num_frames, H, W, 3), the short side scaled
    to ``size`` (None: the video's own size)."""
    import torch

    path = os.fspath(path)
    total = count_frames(path)
    if total == 0:
        raise VideoDecodeError(path, "the video stream holds no frames")
    for _ in range(2):
        indices = sample_indices(total, num_frames, mode, rng)
        frames, decoded = decode_frames(path, indices, size)
        if len(frames) == num_frames:
            return torch.from_numpy(np.stack(frames))
        if decoded == 0:
            break
        total = decoded  # the container over-counted (a truncated file): resample what exists
    raise VideoDecodeError(path, "no decodable frames" if total == 0 else f"decoding failed after {total} frames")
