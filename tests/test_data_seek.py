"""Readers decode only what a clip needs, and frame i stays the i-th frame of a decode from the start.

Every video here shows its own frame number as a bar code (data_fixtures.numbered_frame), so a frame
read by seeking is identified by its pixels, across containers and codecs, with B-frames, open GOPs,
variable frame rate, a first timestamp that is not zero, and MP4 edit lists that hide frames.
"""
import dataclasses
import random

import av
import pytest
import torch

from stop_fast.data import VideoDecodeError, read_video_clip, sample_indices
from stop_fast.data.probe import from_runs, probe_file, to_runs
from stop_fast.data.pyav_reader import decode_frames, seek_plan

from data_fixtures import NUMBERED, cut_with_edit_list, frame_number, write_numbered_video, write_video

FRAMES = 60


def _forward_numbers(path):
    """The frame numbers of a plain decode from the start: what frame i means."""
    with av.open(str(path)) as container:
        return [frame_number(f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """name -> (path, the frame number shown by frame i of a decode from the start)."""
    folder = tmp_path_factory.mktemp("numbered")
    out = {}
    for name, (codec, options) in NUMBERED.items():
        out[name] = write_numbered_video(folder / name, FRAMES, codec, options)
    out["vfr.mkv"] = write_numbered_video(folder / "vfr.mkv", 30, "libx264", {"g": "6", "bf": "2"},
                                          times_ms=[3 * i * i + i for i in range(30)])
    out["late-start.mp4"] = write_numbered_video(folder / "late-start.mp4", 40, "libx264", {"g": "8", "bf": "2"},
                                                 first_pts=17)
    out["late-start.webm"] = write_numbered_video(folder / "late-start.webm", 40, "libvpx-vp9", {"g": "8"},
                                                  first_pts=17)
    out["edit-list-5.mp4"] = cut_with_edit_list(out["h264-gop10.mkv"], folder / "edit-list-5.mp4", 5)
    out["edit-list-12.mp4"] = cut_with_edit_list(out["h264-gop10.mkv"], folder / "edit-list-12.mp4", 12)
    return {name: (str(path), _forward_numbers(path)) for name, path in out.items()}


def test_the_fixtures_number_their_frames(videos):
    for name, (_, numbers) in videos.items():
        cut = int(name.split("-")[-1].split(".")[0]) if name.startswith("edit-list") else 0
        assert numbers == list(range(cut, cut + len(numbers))), name  # an edit list hides the first `cut`
    assert len(videos["edit-list-12.mp4"][1]) == FRAMES - 12


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("index", ["demuxed", "decoded"])
def test_sampled_frames_are_the_frames_of_a_decode_from_the_start(videos, mode, index):
    for name, (path, numbers) in videos.items():
        probe = probe_file(path, full_decode=True) if index == "decoded" else None
        assert probe is None or probe.frames == len(numbers)
        for seed in range(6):
            indices = sample_indices(len(numbers), 12, mode, random.Random(seed))
            frames, _ = decode_frames(path, indices, size=None, probe=probe)
            assert [frame_number(f) for f in frames] == [numbers[i] for i in indices], (name, mode, seed)


def test_the_demuxed_index_matches_the_decoded_one(videos):
    for name, (path, numbers) in videos.items():
        demuxed, decoded = probe_file(path), probe_file(path, full_decode=True)
        assert decoded.frames == len(numbers) and decoded.seekable, name
        if name.startswith("mpeg4"):  # MPEG-4 Part 2 may hold packets that are no frame: never seeked undecoded
            assert not demuxed.seekable and demuxed.frames == len(numbers)
        else:
            assert (demuxed.frames, demuxed.pts, demuxed.key_frames) == (decoded.frames, decoded.pts, decoded.key_frames), name


def test_seeking_decodes_only_what_the_clip_needs(videos):
    """All-intra files decode exactly the frames asked for; short GOPs at most a GOP per frame."""
    path, _ = videos["mjpeg.avi"]
    indices = sample_indices(FRAMES, 12, "train", random.Random(0))
    _, decoded = decode_frames(path, indices)
    assert decoded == len(set(indices))
    path, _ = videos["vp9-gop8.webm"]
    _, decoded = decode_frames(path, [3, 50])
    assert decoded <= 4 + 3  # frames 0..3 from the start, then key frame 48 .. 50
    path, _ = videos["h264-bframes.mp4"]  # one key frame: decode forward up to the last frame needed
    _, decoded = decode_frames(path, [5, 20])
    assert decoded <= 21 + 4  # plus what B-frame reordering holds back


def test_clips_show_the_sampled_frames(tmp_path):
    # square frames at their own size: no resize and no crop, so the bar code survives the transform
    path = write_numbered_video(tmp_path / "square.mkv", 50, "libx264", {"g": "5", "bf": "2"}, width=64, height=64)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    for mode, seed in [("train", 1), ("train", 2), ("eval", None)]:
        clip = read_video_clip(path, 8, size=64, mode=mode, seed=seed)
        rgb = ((clip * std + mean) * 255).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
        expected = sample_indices(50, 8, mode, random.Random(seed))
        assert [frame_number(f) for f in rgb] == expected, mode


def test_an_open_gop_cut_decodes_the_frames_it_shows(videos, tmp_path):
    """A stream-copied cut at an open-GOP I frame keeps the leading B-frames the decoder never shows:
    their packets would number frames that do not exist, so the file decodes forward."""
    source, _ = videos["h264-open-gop.mkv"]
    cut = tmp_path / "cut.mkv"
    with av.open(str(source)) as inp, av.open(str(cut), "w") as out:
        stream_in = inp.streams.video[0]
        stream_out = out.add_stream_from_template(stream_in)
        keys = 0
        for packet in inp.demux(stream_in):
            if packet.size == 0:
                continue
            keys += packet.is_keyframe
            if keys >= 2:  # from the second key frame on, as `ffmpeg -ss ... -c copy` cuts
                packet.stream = stream_out
                out.mux(packet)
    numbers = _forward_numbers(cut)
    assert not probe_file(cut).seekable  # the demuxed index would count packets that show no frame
    for indices in ([30], [25, 30], [0, 30], sample_indices(len(numbers), 12, "train", random.Random(3))):
        frames, _ = decode_frames(cut, indices)
        assert [frame_number(f) for f in frames] == [numbers[i] for i in indices], indices


def test_a_wrong_index_falls_back_to_the_right_frames(videos):
    path, numbers = videos["vp9-gop8.webm"]
    good = probe_file(path, full_decode=True)
    pts = from_runs(good.pts)
    shifted = dataclasses.replace(good, pts=to_runs([p + 1 for p in pts]))  # timestamps no frame carries
    every_key = dataclasses.replace(good, key_frames=((0, 1, good.frames),))  # key frames that are not
    too_long = dataclasses.replace(good, frames=good.frames + 8, pts=to_runs(pts + [pts[-1] + k for k in range(1, 9)]))
    indices = sample_indices(good.frames, 12, "train", random.Random(4))
    for probe in (shifted, every_key):
        frames, _ = decode_frames(path, indices, probe=probe)
        assert [frame_number(f) for f in frames] == [numbers[i] for i in indices]
    frames, _ = decode_frames(path, [2, good.frames + 3], probe=too_long)  # past the real end
    assert [frame_number(f) for f in frames] == [numbers[2]]
    clip = read_video_clip(path, 12, size=32, mode="eval", probe=too_long)  # resampled over what decodes
    assert clip.shape == (12, 3, 32, 32)


def test_a_truncated_seekable_file_is_read_or_reported(tmp_path):
    path = write_numbered_video(tmp_path / "cut.mkv", 60, "libx264", {"g": "6", "bf": "2"})
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    for seed in range(4):
        try:
            frames, _ = decode_frames(str(path), sample_indices(60, 8, "train", random.Random(seed)))
        except VideoDecodeError as exc:
            assert "cut.mkv" in str(exc)
            continue
        numbers = [frame_number(f) for f in frames]
        assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)  # never a neighbouring frame
    try:
        clip = read_video_clip(path, 8, size=32, mode="train", seed=0)
    except VideoDecodeError as exc:
        assert "cut.mkv" in str(exc)
    else:
        assert clip.shape == (8, 3, 32, 32) and torch.isfinite(clip).all()


def test_the_8k_cap_holds_on_the_seeking_path(tmp_path, monkeypatch):
    from stop_fast.data import probe as probe_module

    path = write_numbered_video(tmp_path / "clip.mkv", 12, "libx264", {"g": "4"})
    monkeypatch.setattr(probe_module, "MAX_PIXELS", 64 * 48 - 1)
    with pytest.raises(VideoDecodeError, match="64 x 48 exceed") as info:
        read_video_clip(path, 2, size=16)
    assert "clip.mkv" in str(info.value)


@pytest.mark.parametrize("rotation", [90, -90])
def test_rotation_is_applied_when_seeking(tmp_path, rotation):
    path = write_video(tmp_path / "rot.mp4", num_frames=24, width=64, height=48, codec="libx264", rotation=rotation)
    probe = probe_file(str(path))
    assert probe.seekable and probe.rotation == rotation
    frames, _ = decode_frames(str(path), [17])
    assert frames[0].shape == (64, 48, 3)  # upright: width and height swap


def test_seek_plan_groups_frames_by_key_frame():
    keys = [0, 10, 20, 30]
    assert seek_plan([3, 5, 12, 13, 29, 35], keys) == [(None, [3, 5]), (10, [12, 13]), (20, [29, 35])]  # 30 follows 29
    assert seek_plan([3, 5, 12, 13, 29, 36], keys) == [(None, [3, 5]), (10, [12, 13]), (20, [29, 36])]
    assert seek_plan([3, 25, 36], keys) == [(None, [3]), (20, [25]), (30, [36])]
    assert seek_plan([12, 14, 12], keys) == [(10, [12, 14])]  # distinct, in order
    assert seek_plan([5, 9], [8]) == [(None, [5]), (8, [9])]  # 8, 9 instead of 6, 7, 8, 9
    assert seek_plan([5, 9], [6]) == [(None, [5, 9])]  # nothing to gain: 6 is where decoding goes on
    assert seek_plan([3, 25], [8, 20]) == [(None, [3]), (20, [25])]  # before the first key frame: from the start
    assert seek_plan([10, 11], [0, 10]) == [(10, [10, 11])]
    assert seek_plan([2, 3], list(range(10))) == [(2, [2, 3])]  # all-intra: the next frame follows on


def test_runs_round_trip():
    for values in ([], [5], [0, 512, 1024, 1536], [0, 1, 2, 10, 11, 30], [7, 7, 7]):
        assert from_runs(to_runs(values)) == values
    assert to_runs(list(range(0, 300, 12))) == ((0, 12, 25),)


@pytest.mark.parametrize("name", ["vp9-gop8.webm", "mjpeg.avi"])
def test_dali_cpu_reads_the_same_frames(videos, name):
    pytest.importorskip("nvidia.dali")
    from stop_fast.data.dali_reader import decode_frames_dali

    path, numbers = videos[name]
    for mode in ("train", "eval"):
        indices = sample_indices(len(numbers), 12, mode, random.Random(3))
        frames = decode_frames_dali(path, indices, use_gpu=False)
        assert [frame_number(f) for f in frames.numpy()] == [numbers[i] for i in indices], mode


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["h264-bframes.mp4", "h264-gop10.mkv", "h264-open-gop.mkv", "vp9-gop8.webm",
                                  "late-start.mp4", "vfr.mkv", "mpeg4-bframes.mp4"])
def test_nvdec_reads_the_same_frames(videos, name):
    pytest.importorskip("nvidia.dali")
    from stop_fast.data.dali_reader import decode_frames_dali

    path, numbers = videos[name]
    for mode in ("train", "eval"):
        indices = sample_indices(len(numbers), 12, mode, random.Random(5))
        frames = decode_frames_dali(path, indices, use_gpu=True)
        assert [frame_number(f) for f in frames.numpy()] == [numbers[i] for i in indices], mode
