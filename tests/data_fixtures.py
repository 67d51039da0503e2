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


# ----------------------------------------------------------------------------------------------------
# Videos whose frame number is written in their pixels


def numbered_frame(i: int, width: int = 64, height: int = 48) -> np.ndarray:
    """Frame ``i`` with its number as a 16-bit bar code: two rows of eight big blocks (a third of the
    height each, an eighth of the width), black (16) for 0 and white (235) for 1, then a grey band.
    Big flat blocks survive every lossy codec and any scaling."""
    img = np.full((height, width, 3), 128, dtype=np.uint8)
    for bit in range(16):
        row, col = divmod(bit, 8)
        y0, y1 = row * height // 3, (row + 1) * height // 3
        x0, x1 = col * width // 8, (col + 1) * width // 8
        img[y0:y1, x0:x1] = 235 if (i >> bit) & 1 else 16
    return img


def frame_number(rgb) -> int:
    """The number :func:`numbered_frame` wrote into an (H, W, 3) uint8 frame (any size, same layout)."""
    rgb = np.asarray(rgb)
    height, width = rgb.shape[:2]
    number = 0
    for bit in range(16):
        row, col = divmod(bit, 8)
        y, x = int((row + 0.5) * height / 3), int((col + 0.5) * width / 8)
        if rgb[max(0, y - 1) : y + 2, max(0, x - 1) : x + 2].mean() > 128:
            number |= 1 << bit
    return number


# codec -> (container suffix, encoder options) of the numbered videos the frame-identity tests read
NUMBERED = {
    "h264-bframes.mp4": ("libx264", {"g": "300", "bf": "3", "crf": "18"}),  # one key frame, B-frames
    "h264-gop10.mkv": ("libx264", {"g": "10", "bf": "2", "crf": "18"}),
    "h264-open-gop.mkv": ("libx264", {"g": "12", "bf": "3", "crf": "18", "x264-params": "open-gop=1:keyint-min=12:scenecut=0"}),
    "vp9-gop8.webm": ("libvpx-vp9", {"g": "8", "crf": "20", "b:v": "0"}),
    "mjpeg.avi": ("mjpeg", {"q:v": "3"}),
    "mpeg4-bframes.mp4": ("mpeg4", {"g": "12", "bf": "2", "qscale": "3"}),
    "mpeg4-bframes.avi": ("mpeg4", {"g": "12", "bf": "2", "qscale": "3"}),
}


def write_numbered_video(path, num_frames: int = 40, codec: str = "libx264", options=None, width: int = 64,
                         height: int = 48, fps: int = 25, times_ms=None, first_pts: int = 0):
    """A video whose frame ``i`` shows the number ``i`` (:func:`numbered_frame`). ``times_ms``: the
    presentation time of each frame in milliseconds (variable frame rate); ``first_pts``: the first
    frame's timestamp in frames (a stream that does not start at zero)."""
    pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.options = dict(options or {})
        if times_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(numbered_frame(i, width, height), format="rgb24")
            if times_ms is not None:
                frame.pts, frame.time_base = times_ms[i], Fraction(1, 1000)
            else:
                frame.pts, frame.time_base = first_pts + i, Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def cut_with_edit_list(src, dst, frames_cut: int):
    """Remux ``src`` (an MKV) into MP4 with every timestamp moved ``frames_cut`` frames earlier: the
    MP4 muxer writes an edit list that starts at time 0, so the first ``frames_cut`` frames are
    decoded for reference but never shown (FFmpeg marks their packets "discard")."""
    with av.open(str(src)) as inp, av.open(str(dst), mode="w") as out:
        vin = inp.streams.video[0]
        vout = out.add_stream_from_template(vin)
        shift = int(round(frames_cut / (vin.average_rate * vin.time_base)))
        for packet in inp.demux(vin):
            if packet.dts is None and packet.pts is None:
                continue  # the flush packet
            packet.pts = None if packet.pts is None else packet.pts - shift
            packet.dts = None if packet.dts is None else packet.dts - shift
            packet.stream = vout
            out.mux(packet)
    return dst
