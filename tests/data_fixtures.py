"""Small test videos with known content, written with PyAV: frame i is a flat grey of level
``level(i, n)`` with a white square whose column moves right, so decoded frames can be identified."""
from __future__ import annotations

from fractions import Fraction

import av
import numpy as np

CONTAINERS = {"mpeg4": "mp4", "libx264": "mp4", "libvpx-vp9": "webm", "mjpeg": "avi"}


def level(i: int, n: int) -> int:
    return int(round(30 + 180 * i / max(1, n - 1)))


def frame_content(i: int, n: int, width: int, height: int) -> np.ndarray:
    img = np.full((height, width, 3), level(i, n), dtype=np.uint8)
    side = max(2, height // 6)
    x = int((width - side) * i / max(1, n - 1))
    img[:side, x : x + side] = 255
    return img


def write_video(path, num_frames=24, width=64, height=48, codec="mpeg4", fps=12, pix_fmt=None, rotation=None,
                times_ms=None):
    """``times_ms``: presentation time of each frame in milliseconds (variable frame rate)."""
    pix_fmt = pix_fmt or ("yuvj420p" if codec == "mjpeg" else "yuv420p")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if codec in ("mpeg4", "mjpeg"):
            stream.options = {"qscale": "2"} if codec == "mpeg4" else {"q:v": "2"}
            stream.codec_context.qmin, stream.codec_context.qmax = 1, 3
        elif codec == "libx264":
            stream.options = {"crf": "10", "g": "8"}
        elif codec == "libvpx-vp9":
            stream.options = {"crf": "10", "b:v": "0", "g": "8"}
        if rotation is not None:
            if not hasattr(stream, "set_display_rotation"):
                import pytest

                pytest.skip(f"writing rotation metadata needs a newer PyAV than {av.__version__}")
            stream.set_display_rotation(rotation)
        if times_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(frame_content(i, num_frames, width, height), format="rgb24")
            if times_ms is not None:
                frame.pts, frame.time_base = times_ms[i], Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_audio_only(path):
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("aac", rate=16000)
        samples = np.zeros((1, 1024), dtype=np.float32)
        for _ in range(4):
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate = 16000
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_resolution_change(path, sizes=((64, 48), (40, 40)), frames_each=8):
    """An MPEG-TS capture whose resolution changes mid-stream: two H.264 streams of different sizes
    written back to back (TS segments concatenate byte-wise, as players and FFmpeg expect)."""
    import tempfile

    data = b""
    with tempfile.TemporaryDirectory() as tmp:
        for k, (width, height) in enumerate(sizes):
            part = f"{tmp}/part{k}.ts"
            write_video(part, num_frames=frames_each, width=width, height=height, codec="libx264")
            with open(part, "rb") as f:
                data += f.read()
    with open(str(path), "wb") as f:
        f.write(data)
    return path


def zero_display_matrix(path):
    """Overwrite the display matrix of an MP4's video track (tkhd) with zeros: a degenerate matrix,
    for which FFmpeg's rotation is NaN (PyAV reads INT_MIN). The file must carry a rotation."""
    data = bytearray(open(str(path), "rb").read())
    at = data.find(b"tkhd")
    assert at > 0 and data[at + 4] == 0, "expected a version-0 tkhd box"
    start = at - 4 + 48  # box start + header fields before the 3x3 matrix (version 0 layout)
    data[start : start + 36] = bytes(36)
    with open(str(path), "wb") as f:
        f.write(bytes(data))
    return path
