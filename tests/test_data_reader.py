"""Clip sampling and decoding on generated videos with known content."""
import random

import numpy as np
import pytest
import torch

from stop_fast.data import VideoDecodeError, read_video_clip, sample_indices
from stop_fast.data.probe import probe_file
from stop_fast.data.pyav_reader import decode_frames

from data_fixtures import CONTAINERS, level, write_audio_only, write_resolution_change, write_video, zero_display_matrix


def test_eval_indices_are_segment_centres():
    assert sample_indices(24, 4, "eval") == [3, 9, 15, 21]
    assert sample_indices(12, 12, "eval") == list(range(12))
    assert sample_indices(100, 1, "eval") == [50]


def test_train_indices_take_one_frame_per_segment():
    rng = random.Random(0)
    for _ in range(50):
        idx = sample_indices(37, 5, "train", rng)
        for i, j in enumerate(idx):
            assert int(37 / 5 * i) <= j < max(int(37 / 5 * i) + 1, int(37 / 5 * (i + 1)))
    draws = {tuple(sample_indices(40, 4, "train", random.Random(s))) for s in range(20)}
    assert len(draws) > 1  # random
    assert sample_indices(40, 4, "train", random.Random(3)) == sample_indices(40, 4, "train", random.Random(3))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_short_videos_repeat_frames_in_order(mode):
    idx = sample_indices(3, 8, mode, random.Random(1))
    assert len(idx) == 8 and idx == sorted(idx) and set(idx) == {0, 1, 2}
    assert sample_indices(1, 5, mode, random.Random(1)) == [0] * 5


def test_sampler_refuses_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        sample_indices(10, 2, "test")
    with pytest.raises(ValueError, match="num_video_frames"):
        sample_indices(0, 2)
    with pytest.raises(ValueError, match="num_frames"):
        sample_indices(10, 0)


def _frame_level(clip: torch.Tensor, t: int) -> float:
    """Mean grey level (0..255) of the part of a decoded frame below the moving square."""
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    rgb = clip[t] * std + mean
    return float(rgb[:, rgb.shape[1] // 3 :, :].mean() * 255)


@pytest.mark.parametrize("codec", list(CONTAINERS))
def test_decoded_frames_match_the_known_content(tmp_path, codec):
    path = write_video(tmp_path / f"clip.{CONTAINERS[codec]}", num_frames=24, codec=codec)
    assert probe_file(str(path)).frames == 24
    clip = read_video_clip(path, 4, size=32, mode="eval")
    assert clip.shape == (4, 3, 32, 32) and clip.dtype == torch.float32
    for t, i in enumerate([3, 9, 15, 21]):  # the eval indices of 24 frames in 4 segments
        assert abs(_frame_level(clip, t) - level(i, 24)) < 4, (codec, t)


def test_training_clips_are_seeded(tmp_path):
    path = write_video(tmp_path / "clip.mp4", num_frames=40, width=96, height=48)
    a = read_video_clip(path, 4, size=32, mode="train", seed=1)
    b = read_video_clip(path, 4, size=32, mode="train", seed=1)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    others = [read_video_clip(path, 4, size=32, mode="train", seed=s) for s in range(2, 6)]
    assert any((o - a).abs().max() > 1e-3 for o in others)


def test_flip_mirrors_the_clip(tmp_path):
    path = write_video(tmp_path / "clip.mp4", num_frames=12, width=48, height=48)
    # one segment centre per frame and a full-frame crop: flipping is the only difference
    plain = read_video_clip(path, 12, size=48, mode="train", seed=0)
    flipped = read_video_clip(path, 12, size=48, mode="train", seed=0, flip=True)
    torch.testing.assert_close(flipped, plain.flip(-1))


@pytest.mark.parametrize("rotation", [90, -90])
def test_rotation_metadata_is_applied(tmp_path, rotation):
    path = write_video(tmp_path / "rot.mp4", width=64, height=48, rotation=rotation)
    probe = probe_file(str(path))
    assert (probe.codec, probe.frames, probe.rotation) == ("mpeg4", 24, rotation)
    frames, _ = decode_frames(str(path), [0])
    frame = frames[0].astype(int)
    assert frame.shape == (64, 48, 3)  # displayed upright: width and height swap
    # frame 0's square sits at the top-left of the coded picture; a quarter turn counter-clockwise
    # (FFmpeg's +90) takes it to the bottom-left, clockwise (-90) to the top-right
    side = 48 // 6
    corners = {"bottom-left": frame[-side:, :side], "top-right": frame[:side, -side:],
               "top-left": frame[:side, :side], "bottom-right": frame[-side:, -side:]}
    bright = [name for name, patch in corners.items() if patch.mean() > 200]
    assert bright == (["bottom-left"] if rotation == 90 else ["top-right"])


def test_variable_frame_rate_samples_by_decoded_frame(tmp_path):
    # bursts and gaps in time: sampling by timestamp would pick other frames than sampling by index
    times = [0, 10, 20, 200, 210, 600, 610, 620, 900, 1500, 1510, 1520]
    path = write_video(tmp_path / "vfr.mkv", num_frames=12, codec="mpeg4", times_ms=times)
    clip = read_video_clip(path, 4, size=32, mode="eval")
    for t, i in enumerate(sample_indices(12, 4, "eval")):  # [1, 4, 7, 10]
        assert abs(_frame_level(clip, t) - level(i, 12)) < 4, t


def test_grayscale_and_odd_sizes(tmp_path):
    path = write_video(tmp_path / "gray.mp4", num_frames=10, width=63, height=37, codec="libx264", pix_fmt="gray")
    clip = read_video_clip(path, 3, size=20)
    assert clip.shape == (3, 3, 20, 20) and torch.isfinite(clip).all()
    assert torch.allclose(clip[:, 0] * 0.26862954 + 0.48145466, clip[:, 1] * 0.26130258 + 0.4578275, atol=1e-5)


def test_truncated_file_is_read_or_reported(tmp_path):
    path = write_video(tmp_path / "cut.mp4", num_frames=48, codec="libx264")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    try:
        clip = read_video_clip(path, 8, size=32)
    except VideoDecodeError as exc:
        assert "cut.mp4" in str(exc)
    else:
        assert clip.shape == (8, 3, 32, 32) and torch.isfinite(clip).all()


@pytest.mark.parametrize("make, reason", [
    (lambda p: p.write_bytes(b"\x00garbage" * 100), "not a readable video"),
    (lambda p: None, "file not found"),
    (lambda p: write_audio_only(p), "no video stream"),
])
def test_unreadable_files_name_the_file_and_reason(tmp_path, make, reason):
    path = tmp_path / "broken.m4a"
    make(path)
    with pytest.raises(VideoDecodeError, match=reason) as info:
        read_video_clip(path, 4, size=32)
    assert info.value.path == str(path) and "broken.m4a" in str(info.value)


@pytest.mark.parametrize("views", [False, True])
def test_resolution_change_mid_stream_gives_one_frame_size(tmp_path, views):
    from stop_fast.data.views import read_video_views

    path = write_resolution_change(tmp_path / "capture.ts")  # 8 frames at 64 x 48, then 8 at 40 x 40
    frames, decoded = decode_frames(str(path), list(range(16)))
    assert decoded == 16 and {f.shape for f in frames} == {(48, 64, 3)}  # the first frame's size
    if views:
        clip = read_video_views(path, 8, size=32, num_clips=2)[1]
    else:
        clip = read_video_clip(path, 8, size=32)
    assert clip.shape == (8, 3, 32, 32) and torch.isfinite(clip).all()
    for t, i in enumerate(sample_indices(16, 8) if not views else [1, 3, 5, 7, 9, 11, 13, 15]):
        n = i % 8  # each half is its own fixture video of 8 frames
        assert abs(_frame_level(clip, t) - level(n, 8)) < 6, t


def test_frames_are_scaled_while_still_uint8(tmp_path):
    path = write_video(tmp_path / "wide.mkv", num_frames=3, width=400, height=200, codec="ffv1", pix_fmt="yuv420p")
    frames, _ = decode_frames(str(path), [0, 2], size=32)
    assert [f.shape for f in frames] == [(32, 64, 3)] * 2 and frames[0].dtype == np.uint8
    clip = read_video_clip(path, 2, size=32)
    assert abs(_frame_level(clip, 1) - level(2, 3)) < 4


def test_a_conversion_error_is_named_not_taken_for_a_truncated_tail(tmp_path, monkeypatch):
    from stop_fast.data import pyav_reader

    path = write_video(tmp_path / "clip.mp4", num_frames=6)

    def broken(self, frame, width=None, height=None):
        raise TypeError("unsupported argument")

    monkeypatch.setattr(pyav_reader.Scaler, "rgb", broken)
    with pytest.raises(VideoDecodeError, match=r"frame 1 \(yuv420p, 64 x 48\) could not be converted to RGB \(TypeError") as info:
        read_video_clip(path, 2, size=16)
    assert info.value.path == str(path)


def test_frames_larger_than_the_cap_are_refused(tmp_path, monkeypatch):
    from stop_fast.data import probe

    path = write_video(tmp_path / "clip.mp4", num_frames=4, width=64, height=48)
    monkeypatch.setattr(probe, "MAX_PIXELS", 64 * 48 - 1)
    with pytest.raises(VideoDecodeError, match="64 x 48 exceed") as info:
        read_video_clip(path, 2, size=16)
    assert "clip.mp4" in str(info.value)


@pytest.mark.parametrize("name, content, reason", [
    ("notes.txt", b"hello, this is not a video\n" * 40, "text file"),
    ("art.ans", b"\x1b[31mred\x1b[0m text\n" * 40, "text file"),
])
def test_text_files_are_not_videos(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(VideoDecodeError, match=reason):
        read_video_clip(path, 4, size=16)
    with pytest.raises(VideoDecodeError, match="not a video"):
        probe_file(str(path))


def test_still_images_are_not_videos(tmp_path):
    import av

    path = tmp_path / "picture.png"
    with av.open(str(path), "w", format="image2") as c:
        s = c.add_stream("png", rate=1)
        s.width, s.height, s.pix_fmt = 16, 16, "rgb24"
        for packet in s.encode(av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")):
            c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    with pytest.raises(VideoDecodeError, match="still image"):
        read_video_clip(path, 2, size=16)


def test_degenerate_display_matrix_means_no_rotation(tmp_path):
    path = zero_display_matrix(write_video(tmp_path / "odd.mp4", num_frames=8, width=64, height=48, rotation=90))
    assert probe_file(str(path)).rotation == 0
    frames, _ = decode_frames(str(path), [0])
    assert frames[0].shape == (48, 64, 3)  # not turned
    plain = write_video(tmp_path / "plain.mp4", num_frames=8, width=64, height=48)
    torch.testing.assert_close(read_video_clip(path, 2, size=32), read_video_clip(plain, 2, size=32))


def test_reader_refuses_bad_arguments(tmp_path):
    path = write_video(tmp_path / "clip.mp4", num_frames=8)
    with pytest.raises(ValueError, match="backend"):
        read_video_clip(path, 4, backend="opencv")
    with pytest.raises(ValueError, match="mode"):
        read_video_clip(path, 4, mode="val")
    with pytest.raises(ValueError, match="num_frames"):
        read_video_clip(path, 0)


def test_cli_encodes_a_video_file(tmp_path, capsys):
    from stop_fast.cli import main

    path = write_video(tmp_path / "clip.webm", num_frames=16, codec="libvpx-vp9")
    assert main(["encode", "--model", "stop-tiny", "--frames", "4", "--video", str(path)]) == 0
    assert '"embedding_dim": 64' in capsys.readouterr().out
    assert main(["encode", "--model", "stop-tiny", "--frames", "4", "--video", str(tmp_path / "none.mp4")]) == 2
    assert "none.mp4" in capsys.readouterr().err


def test_missing_backends_are_named(tmp_path, monkeypatch):
    import subprocess
    import sys

    # the package imports with neither PyAV nor DALI installed
    code = ("import sys; sys.modules['av'] = None; sys.modules['nvidia'] = None; sys.modules['nvidia.dali'] = None; "
            "import stop_fast.data as d; print(d.sample_indices(8, 2))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[2, 6]", out.stderr
    path = write_video(tmp_path / "clip.mp4", num_frames=8)
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(ImportError, match="nvidia-dali"):
        read_video_clip(path, 2, size=16, backend="dali")
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(ImportError, match="pip install av"):
        read_video_clip(path, 2, size=16, backend="pyav")
