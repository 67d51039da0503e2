"""`prepare`'s copies made for training: format, size, frames, frame rate and colours, the manifest's
frame index, and the loaders reading the copies through the manifest."""
import json
import random

import av
import numpy as np
import pytest

from stop_fast.cli import main
from stop_fast.data import sample_indices
from stop_fast.data.datasets import Sample, VideoDataset
from stop_fast.data.loader import VideoLoader
from stop_fast.data.manifest import read_manifest, sources
from stop_fast.data.prepare import CopySettings, copy_size, kept_frames, probe_video, reencode_video
from stop_fast.data.probe import probe_file
from stop_fast.data.pyav_reader import decode_frames

from data_fixtures import frame_number, write_numbered_video

# flat bands whose colours a range mistake moves: near black and near white, saturated, skin-like
BANDS = [(6, 6, 6), (23, 7, 40), (199, 120, 30), (60, 200, 220), (250, 250, 250)]


def _write_bands(path, codec, pix_fmt, frames=6, width=160, height=48):
    """Vertical bands of BANDS, encoded from RGB by FFmpeg (the encoder's own RGB -> YUV, full range
    for yuvj formats and MJPEG as the demo writes, limited otherwise)."""
    img = np.zeros((height, width, 3), np.uint8)
    step = width // len(BANDS)
    for k, colour in enumerate(BANDS):
        img[:, k * step : (k + 1) * step] = colour
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.options = {"q:v": "2"} if codec == "mjpeg" else {"crf": "12"}
        for _ in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _band_medians(rgb):
    step = rgb.shape[1] // len(BANDS)
    return [np.median(rgb[4:-4, k * step + 4 : (k + 1) * step - 4].reshape(-1, 3), axis=0) for k in range(len(BANDS))]


@pytest.mark.parametrize("codec, pix_fmt, range_name", [("mjpeg", "yuvj420p", "full"), ("mjpeg", "yuvj444p", "full"),
                                                         ("libx264", "yuv420p", "limited")])
@pytest.mark.parametrize("copy_codec", ["h264", "vp9", "mjpeg"])
def test_copies_keep_the_colours(tmp_path, codec, pix_fmt, range_name, copy_codec):
    src = _write_bands(tmp_path / f"bands.{'avi' if codec == 'mjpeg' else 'mp4'}", codec, pix_fmt)
    assert probe_file(str(src)).color_range == range_name
    copy = reencode_video(str(src), str(tmp_path / "copy"), CopySettings(copy_codec, short_side=48))
    original, _ = decode_frames(str(src), [2])
    copied, _ = decode_frames(str(tmp_path / "copy"), [2], probe=copy)
    for want, got_source, got_copy in zip(BANDS, _band_medians(original[0]), _band_medians(copied[0])):
        assert np.abs(got_source - want).max() <= 4, (want, got_source)  # the reader reads the source right...
        assert np.abs(got_copy - want).max() <= 5, (want, got_copy)  # ...and the copy shows the same colours


def test_the_default_copy_is_all_intra_h264_at_224_without_b_frames(tmp_path):
    src = write_numbered_video(tmp_path / "src.mkv", 30, "libx264", {"g": "30", "bf": "3"}, width=320, height=240)
    copy = reencode_video(str(src), str(tmp_path / "copy.mp4"))
    assert (copy.codec, copy.width, copy.height, copy.frames, copy.fps) == ("h264", 298, 224, 30, 25.0)
    assert copy.key_frames == ((0, 1, 30),) and copy.seekable
    with av.open(str(tmp_path / "copy.mp4")) as container:
        stream = container.streams.video[0]
        assert not stream.codec_context.has_b_frames
    assert copy.color_range == "limited"
    frames, decoded = decode_frames(str(tmp_path / "copy.mp4"), [3, 17, 29], probe=copy)
    assert [frame_number(f) for f in frames] == [3, 17, 29] and decoded == 3


def test_copies_are_never_upscaled_and_keep_frames_and_rate(tmp_path):
    assert copy_size(320, 240, 224) == (298, 224) and copy_size(320, 240, 256) == (320, 240)
    assert copy_size(63, 37, 224) == (62, 36)  # even sizes, rounded down
    times = [0, 40, 80, 400, 440, 1000, 1040, 1080]  # variable frame rate: every decoded frame kept
    src = write_numbered_video(tmp_path / "small.mkv", 8, "libx264", {"g": "4", "bf": "2"}, width=96, height=64,
                               times_ms=times)
    copy = reencode_video(str(src), str(tmp_path / "copy.mp4"), CopySettings(short_side=224))
    source = probe_file(str(src), full_decode=True)
    assert (copy.width, copy.height, copy.frames) == (96, 64, 8) and copy.fps == pytest.approx(source.fps, rel=1e-3)
    frames, _ = decode_frames(str(tmp_path / "copy.mp4"), list(range(8)), probe=copy)
    assert [frame_number(f) for f in frames] == list(range(8))


def test_a_frame_rate_cap_keeps_the_nearest_frames(tmp_path):
    keep = kept_frames(25.0, 3.0)
    assert [i for i in range(50) if keep(i)] == [0, 8, 17, 25, 33, 42]  # round(k * 25 / 3)
    assert all(kept_frames(25.0, None)(i) for i in range(10)) and all(kept_frames(2.0, 3.0)(i) for i in range(10))
    src = write_numbered_video(tmp_path / "src.mkv", 50, "libx264", {"g": "10"}, fps=25)
    copy = reencode_video(str(src), str(tmp_path / "copy.mp4"), CopySettings(max_fps=3))
    assert copy.frames == 6 and copy.fps == pytest.approx(3.0)
    frames, _ = decode_frames(str(tmp_path / "copy.mp4"), list(range(6)), probe=copy)
    assert [frame_number(f) for f in frames] == [0, 8, 17, 25, 33, 42]


def test_copy_settings_are_checked():
    for kwargs, name in [({"codec": "png"}, "codec"), ({"short_side": 1}, "short_side"), ({"gop": 0}, "gop"),
                         ({"max_fps": 0}, "max_fps")]:
        with pytest.raises(ValueError, match=name):
            CopySettings(**kwargs)


def _prepared(tmp_path, codec="h264", frames=(24, 30, 36)):
    videos = tmp_path / "videos"
    videos.mkdir()
    for i, n in enumerate(frames):
        write_numbered_video(videos / f"v{i}.mkv", n, "libx264", {"g": str(n), "bf": "3", "x264-params": "scenecut=0"},
                             width=80, height=64)
    (videos / "bad.mp4").write_bytes(b"\x00" * 300)
    manifest = tmp_path / "m.jsonl"
    assert main(["prepare", "--videos", str(videos), "--manifest", str(manifest), "--reencode-dir", str(tmp_path / "copies"),
                 "--codec", codec, "--short-side", "48", "--workers", "1"]) == 0
    samples = [Sample(str(videos / f"v{i}.mkv"), i) for i in range(len(frames))] + [Sample(str(videos / "bad.mp4"), 0)]
    return VideoDataset("fixture", "test", samples, classes=["a", "b", "c"], root=str(videos)), manifest


def test_the_manifest_records_what_a_reader_needs(tmp_path):
    dataset, manifest = _prepared(tmp_path)
    records = read_manifest(str(manifest))
    record = records["v1.mkv"]
    assert record["frames"] == 30 and record["key_frames"] == [[0, 1, 1]] and record["pts"][0][2] == 30
    assert record["color_range"] == "limited" and record["codec"] == "h264"
    index = record["prepared_index"]
    assert index["frames"] == 30 and index["key_frames"] == [[0, 1, 30]] and (index["width"], index["height"]) == (60, 48)
    assert index["bytes"] > 0 and index["mtime_ns"] > 0
    known = sources(dataset, str(manifest))
    assert known[dataset.samples[1].path].path == record["prepared"] and known[dataset.samples[1].path].probe.frames == 30
    assert "marked unreadable" in known[dataset.samples[3].path].error


def test_the_loader_reads_the_copies_with_the_manifest_index(tmp_path, monkeypatch, caplog):
    import logging

    from stop_fast.data import probe as probe_module

    dataset, manifest = _prepared(tmp_path)

    def no_probe(path):
        raise AssertionError(f"probed {path} although the manifest knows it")

    monkeypatch.setattr(probe_module.CACHE, "get", no_probe)
    loader = VideoLoader(dataset, 4, 4, size=48, mode="eval", num_workers=0, manifest=str(manifest))
    with caplog.at_level(logging.WARNING, logger="stop_fast.data.loader"):
        (batch,) = list(loader)
    assert batch["valid"].tolist() == [True, True, True, False] and loader.stats == {"clips": 3, "failures": 1}
    assert "bad.mp4" in caplog.text
    monkeypatch.undo()
    plain = list(VideoLoader(dataset, 4, 4, size=48, mode="eval", num_workers=0))[0]
    assert (batch["video"][:3] - plain["video"][:3]).abs().mean() < 0.05  # the same frames, from the copies


def test_a_changed_copy_is_not_trusted(tmp_path):
    dataset, manifest = _prepared(tmp_path, frames=(20,))
    record = read_manifest(str(manifest))["v0.mkv"]
    write_numbered_video(record["prepared"], 5, "libx264", {"g": "1"})  # replaced after prepare
    assert sources(dataset, str(manifest))[dataset.samples[0].path].path == dataset.samples[0].path


def test_the_dali_loader_reads_vp9_copies(tmp_path):
    pytest.importorskip("nvidia.dali")
    from stop_fast.data.dali_loader import DaliVideoLoader

    dataset, manifest = _prepared(tmp_path, codec="vp9")
    dali = list(DaliVideoLoader(dataset, 4, 4, size=48, mode="eval", device="cpu", manifest=str(manifest)))[0]
    pyav = list(VideoLoader(dataset, 4, 4, size=48, mode="eval", num_workers=0, manifest=str(manifest)))[0]
    assert dali["valid"].tolist() == pyav["valid"].tolist() == [True, True, True, False]
    assert (dali["video"][:3] - pyav["video"][:3]).abs().mean() < 0.05


def test_prepare_accepts_the_old_root_flag_and_caps_the_frame_rate(tmp_path, capsys):
    (tmp_path / "v").mkdir()
    write_numbered_video(tmp_path / "v" / "a.mkv", 50, "libx264", {"g": "50"})
    (tmp_path / "train.csv").write_text("path,label\nv/a.mkv,x\n")
    manifest = tmp_path / "m.jsonl"
    copies = tmp_path.parent / f"{tmp_path.name}-copies"
    assert main(["prepare", "--dataset", "csv", "--root", str(tmp_path), "--manifest", str(manifest),
                 "--reencode-dir", str(copies), "--max-fps", "5", "--workers", "1"]) == 0
    captured = capsys.readouterr()
    assert "--root is deprecated" in captured.err and json.loads(captured.out.strip().splitlines()[-1])["probed"] == 1
    assert read_manifest(str(manifest))["v/a.mkv"]["prepared_index"]["frames"] == 10
    assert main(["prepare", "--dataset", "csv", "--root", str(tmp_path), "--video-root", str(tmp_path),
                 "--manifest", str(manifest)]) == 2
    assert main(["prepare", "--videos", str(tmp_path / "v"), "--manifest", str(manifest), "--max-fps", "0"]) == 2
    assert "--max-fps" in capsys.readouterr().err


def test_probe_video_records_the_index_of_a_long_gop_source(tmp_path):
    src = write_numbered_video(tmp_path / "long.mp4", 40, "libx264", {"g": "300", "bf": "3", "x264-params": "scenecut=0"})
    record = probe_video(str(src))
    assert record["ok"] and record["frames"] == 40 and record["key_frames"] == [[0, 1, 1]]
    assert record["pts"] == [[0, 512, 40]]
    indices = sample_indices(record["frames"], 6, "train", random.Random(0))
    frames, _ = decode_frames(str(src), indices)
    assert [frame_number(f) for f in frames] == indices


def test_copies_asked_for_later_or_otherwise_are_made_and_named_absolutely(tmp_path, monkeypatch):
    """A video probed without copies gets one when copies are asked for; other copy settings or a
    deleted copy make it again; a relative copy folder is recorded as an absolute path."""
    from stop_fast.data.prepare import prepare

    from data_fixtures import write_video

    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "a.mp4", num_frames=12, width=64, height=48, codec="libx264")
    manifest = str(tmp_path / "m.jsonl")
    assert prepare([str(videos / "a.mp4")], str(videos), manifest).summary["probed"] == 1
    monkeypatch.chdir(tmp_path)
    first = prepare([str(videos / "a.mp4")], str(videos), manifest, copy_dir="copies")
    record = read_manifest(manifest)["a.mp4"]
    assert first.summary["probed"] == 1 and record["prepared"] == str(tmp_path / "copies" / "a.mp4.mp4")
    assert prepare([str(videos / "a.mp4")], str(videos), manifest, copy_dir="copies").summary["probed"] == 0
    smaller = prepare([str(videos / "a.mp4")], str(videos), manifest, copy_dir="copies",
                      settings=CopySettings(short_side=32))
    assert smaller.summary["probed"] == 1 and read_manifest(manifest)["a.mp4"]["prepared_index"]["height"] == 32
    (tmp_path / "copies" / "a.mp4.mp4").unlink()
    again = prepare([str(videos / "a.mp4")], str(videos), manifest, copy_dir="copies",
                    settings=CopySettings(short_side=32))
    assert again.summary["probed"] == 1 and (tmp_path / "copies" / "a.mp4.mp4").is_file()
