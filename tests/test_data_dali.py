"""DALI decoding on the CPU (VP9 / MJPEG), against PyAV; GPU (NVDEC) cases are marked gpu."""
import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from stop_fast.data import VideoDecodeError, read_video_clip  # noqa: E402
from stop_fast.data.dali_loader import DaliVideoLoader  # noqa: E402
from stop_fast.data.dali_reader import decode_frames_dali  # noqa: E402
from stop_fast.data.datasets import Sample, VideoDataset  # noqa: E402
from stop_fast.data.loader import VideoLoader  # noqa: E402

from data_fixtures import level, write_video  # noqa: E402


@pytest.mark.parametrize("codec, ext", [("libvpx-vp9", "webm"), ("mjpeg", "avi")])
def test_dali_cpu_and_pyav_agree(tmp_path, codec, ext):
    path = write_video(tmp_path / f"clip.{ext}", num_frames=24, codec=codec)
    frames = decode_frames_dali(str(path), [3, 9, 15, 21], use_gpu=False)
    assert frames.shape == (4, 48, 64, 3) and frames.dtype == torch.uint8
    for t, i in enumerate([3, 9, 15, 21]):
        assert abs(frames[t, 20:].float().mean().item() - level(i, 24)) < 4
    dali = read_video_clip(path, 4, size=32, backend="dali")
    pyav = read_video_clip(path, 4, size=32, backend="pyav")
    assert (dali - pyav).abs().max() < 0.05  # the same frames, two decoders' rounding


def test_dali_cpu_refuses_h264_with_advice(tmp_path):
    path = write_video(tmp_path / "clip.mp4", codec="libx264")
    if torch.cuda.is_available():
        pytest.skip("NVDEC decodes H.264")
    with pytest.raises(VideoDecodeError, match="backend='pyav'"):
        read_video_clip(path, 4, backend="dali")


def test_dali_loader_matches_the_pyav_loader(tmp_path):
    samples = [Sample(str(write_video(tmp_path / f"v{i}.webm", num_frames=10 + 3 * i, codec="libvpx-vp9")), i % 2)
               for i in range(3)]
    bad = tmp_path / "bad.webm"
    bad.write_bytes(b"junk" * 100)
    ds = VideoDataset("fixture", "test", samples + [Sample(str(bad), 1)], classes=["a", "b"])
    dali = list(DaliVideoLoader(ds, num_frames=4, batch_size=3, size=32, mode="eval", device="cpu"))
    pyav = list(VideoLoader(ds, num_frames=4, batch_size=3, size=32, mode="eval", num_workers=0))
    assert len(dali) == len(pyav) == 2
    for a, b in zip(dali, pyav):
        assert a["video"].shape == b["video"].shape == (3, 4, 3, 32, 32)
        assert torch.equal(a["valid"], b["valid"]) and torch.equal(a["index"], b["index"])
        ok = a["valid"]
        if ok.any():  # same frames; DALI's resize filter differs from torch's only at sharp edges
            assert (a["video"][ok] - b["video"][ok]).abs().mean() < 0.05
    assert sum(int(b["valid"].sum()) for b in dali) == 3


def test_dali_training_batches_are_seeded(tmp_path):
    samples = [Sample(str(write_video(tmp_path / f"v{i}.webm", num_frames=20, width=80, codec="libvpx-vp9")), 0)
               for i in range(4)]
    ds = VideoDataset("fixture", "train", samples, classes=["a"])

    def run(seed, dtype=torch.float32):
        return [b["video"] for b in DaliVideoLoader(ds, 4, 2, size=32, mode="train", seed=seed, device="cpu", dtype=dtype)]

    a, b, c = run(1), run(1), run(2)
    half = run(1, torch.bfloat16)
    assert half[0].dtype == torch.bfloat16
    torch.testing.assert_close(half[0].float(), a[0], rtol=1e-2, atol=1e-2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert any(not torch.equal(x, y) for x, y in zip(a, c))


@pytest.mark.gpu
def test_nvdec_decodes_h264(tmp_path):
    path = write_video(tmp_path / "clip.mp4", num_frames=24, codec="libx264")
    frames = decode_frames_dali(str(path), [3, 9, 15, 21], use_gpu=True)
    for t, i in enumerate([3, 9, 15, 21]):
        assert abs(frames[t, 20:].float().mean().item() - level(i, 24)) < 4


def test_dali_loader_uses_the_manifest_instead_of_probing(tmp_path, monkeypatch):
    from stop_fast.cli import main
    from stop_fast.data import dali_loader

    (tmp_path / "v").mkdir()
    for i in range(2):
        write_video(tmp_path / "v" / f"{i}.webm", num_frames=16, codec="libvpx-vp9")
    manifest = tmp_path / "m.jsonl"
    assert main(["prepare", "--videos", str(tmp_path / "v"), "--manifest", str(manifest), "--workers", "1"]) == 0
    ds = VideoDataset("fixture", "test", [Sample(str(tmp_path / "v" / f"{i}.webm"), 0) for i in range(2)], classes=["a"])

    def no_probe(path):
        raise AssertionError(f"probed {path} although the manifest knows it")

    monkeypatch.setattr(dali_loader, "cached_probe", no_probe)
    batches = list(DaliVideoLoader(ds, 4, 2, size=32, mode="eval", device="cpu", manifest=str(manifest)))
    assert len(batches) == 1 and batches[0]["valid"].all()


def test_dali_single_clips_apply_rotation_like_pyav(tmp_path):
    path = write_video(tmp_path / "rot.mp4", num_frames=12, codec="libvpx-vp9", rotation=90)
    frames = decode_frames_dali(str(path), [0], use_gpu=False)
    assert frames.shape == (1, 48, 64, 3)  # DALI itself ignores the rotation...
    dali = read_video_clip(path, 3, size=32, backend="dali")
    pyav = read_video_clip(path, 3, size=32, backend="pyav")
    assert (dali - pyav).abs().mean() < 0.05  # ...read_video_clip turns it upright, as PyAV does


def _breaks_dali_but_passes_the_probe(folder):
    """A VP9 file with a damaged packet: PyAV's probe counts its frames, DALI's decoder fails on it."""
    from stop_fast.data.probe import probe_file

    clean = write_video(folder / "clean.webm", num_frames=48, codec="libvpx-vp9").read_bytes()
    rng = np.random.default_rng(0)
    for offset in range(200, len(clean) - 400, 50):
        data = bytearray(clean)
        data[offset : offset + 400] = rng.integers(0, 256, 400, dtype=np.uint8).tobytes()
        path = folder / "damaged.webm"
        path.write_bytes(bytes(data))
        try:
            if probe_file(str(path)).frames < 2:
                continue
        except VideoDecodeError:
            continue
        try:
            decode_frames_dali(str(path), [0, 1], use_gpu=False)
        except VideoDecodeError:
            return path
    raise AssertionError("no damaged file that passes the probe and breaks DALI")


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_dali_loader_survives_a_file_that_breaks_the_decoder(tmp_path, mode, caplog):
    import logging

    damaged = _breaks_dali_but_passes_the_probe(tmp_path)
    rotated = write_video(tmp_path / "rotated.webm", num_frames=12, codec="libvpx-vp9", rotation=90)
    good = [write_video(tmp_path / f"v{i}.webm", num_frames=12, codec="libvpx-vp9") for i in range(3)]
    samples = [Sample(str(p), 0) for p in [good[0], damaged, good[1], rotated, good[2]]]
    ds = VideoDataset("fixture", mode, samples, classes=["a"])
    loader = DaliVideoLoader(ds, 4, 5, size=32, mode=mode, device="cpu", flip=False)
    with caplog.at_level(logging.WARNING, logger="stop_fast.data.dali_loader"):
        (batch,) = list(loader)
        assert "damaged.webm (DALI could not decode it" in caplog.text  # found by the one-by-one search
        assert "rotated.webm (rotation metadata" in caplog.text
        (again,) = list(loader)  # the bad files are remembered: no second failed batch
    index = batch["index"].tolist()
    if mode == "eval":
        assert index == [0, 1, 2, 3, 4] and batch["valid"].tolist() == [True, False, True, False, True]
        assert loader.stats == {"clips": 6, "failures": 4}
    else:
        assert batch["valid"].all() and not {1, 3} & set(index)  # replaced by readable videos
        assert loader.stats["clips"] == 10 and loader.stats["failures"] >= 4
    assert torch.isfinite(batch["video"]).all() and torch.equal(batch["video"], again["video"])


def test_dali_loader_restarts_cleanly_after_an_abandoned_epoch(tmp_path):
    samples = [Sample(str(write_video(tmp_path / f"v{i}.webm", num_frames=8 + i, codec="libvpx-vp9")), i) for i in range(4)]
    ds = VideoDataset("fixture", "test", samples, classes=["a", "b", "c", "d"])
    loader = DaliVideoLoader(ds, 2, 2, size=16, mode="eval", device="cpu")
    full = list(loader)
    for batch in loader:  # leave after the first batch, with the second already scheduled
        break
    again = list(loader)
    assert [b["index"].tolist() for b in again] == [[0, 1], [2, 3]]
    assert all(torch.equal(a["video"], b["video"]) for a, b in zip(full, again))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dali_gpu_loader_matches_the_cpu_loader(tmp_path, dtype):
    samples = [Sample(str(write_video(tmp_path / f"v{i}.webm", num_frames=20, width=96, codec="libvpx-vp9")), i % 2)
               for i in range(5)]
    ds = VideoDataset("fixture", "train", samples, classes=["a", "b"])
    gpu = list(DaliVideoLoader(ds, 4, 2, size=32, mode="train", seed=4, device="gpu", dtype=dtype))
    cpu = list(DaliVideoLoader(ds, 4, 2, size=32, mode="train", seed=4, device="cpu"))
    assert len(gpu) == len(cpu) == 2
    for g, c in zip(gpu, cpu):
        assert g["video"].is_cuda and g["video"].dtype == dtype and torch.equal(g["index"], c["index"])
        # the same frames, crops and flips; NVDEC and libvpx may round a level differently
        assert (g["video"].float().cpu() - c["video"]).abs().mean() < 0.05


def test_dali_loader_does_not_trust_a_stale_manifest(tmp_path):
    from stop_fast.cli import main

    (tmp_path / "v").mkdir()
    path = write_video(tmp_path / "v" / "0.webm", num_frames=40, codec="libvpx-vp9")
    manifest = tmp_path / "m.jsonl"
    assert main(["prepare", "--videos", str(tmp_path / "v"), "--manifest", str(manifest), "--workers", "1"]) == 0
    write_video(path, num_frames=8, codec="libvpx-vp9")  # replaced after the manifest was written
    ds = VideoDataset("fixture", "test", [Sample(str(path), 0)], classes=["a"])
    (dali,) = list(DaliVideoLoader(ds, 4, 1, size=32, mode="eval", device="cpu", manifest=str(manifest)))
    (pyav,) = list(VideoLoader(ds, 4, 1, size=32, mode="eval", num_workers=0))
    assert dali["valid"].all()
    # with the manifest's 40 frames, DALI would be asked for frames 5..35 of 8 and return black ones
    assert (dali["video"] - pyav["video"]).abs().mean() < 0.05


def test_dali_loader_survives_an_unexpected_error_on_one_file(tmp_path, monkeypatch, caplog):
    import logging

    from stop_fast.data import dali_loader

    samples = [Sample(str(write_video(tmp_path / f"v{i}.webm", num_frames=8, codec="libvpx-vp9")), 0) for i in range(3)]
    real = dali_loader.cached_probe

    def flaky(path):
        if path.endswith("v1.webm"):
            raise KeyError("codec_context")
        return real(path)

    monkeypatch.setattr(dali_loader, "cached_probe", flaky)
    ds = VideoDataset("fixture", "test", samples, classes=["a"])
    loader = DaliVideoLoader(ds, 2, 3, size=16, mode="eval", device="cpu")
    with caplog.at_level(logging.WARNING, logger="stop_fast.data.dali_loader"):
        (batch,) = list(loader)
    assert batch["valid"].tolist() == [True, False, True] and loader.stats == {"clips": 2, "failures": 1}
    assert "v1.webm (unexpected KeyError" in caplog.text


def test_several_pipelines_and_prefetch_give_the_same_batches(tmp_path):
    samples = [Sample(str(write_video(tmp_path / f"v{i}.webm", num_frames=10 + i, codec="libvpx-vp9")), i % 2)
               for i in range(8)]
    ds = VideoDataset("fixture", "train", samples, classes=["a", "b"])

    def run(**kwargs):
        loader = DaliVideoLoader(ds, 3, 2, size=16, mode="train", seed=7, device="cpu", **kwargs)
        return [(b["index"].tolist(), b["video"]) for b in loader]

    one = run(num_pipelines=1, prefetch=1)
    for kwargs in ({"num_pipelines": 1, "prefetch": 3}, {"num_pipelines": 3, "prefetch": 2}):
        other = run(**kwargs)
        assert [i for i, _ in other] == [i for i, _ in one] and len(one) == 4
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(one, other))
    with pytest.raises(ValueError, match="num_pipelines"):
        DaliVideoLoader(ds, 3, 2, device="cpu", num_pipelines=0)
    with pytest.raises(ValueError, match="prefetch"):
        DaliVideoLoader(ds, 3, 2, device="cpu", prefetch=0)


def test_a_broken_batch_does_not_disturb_the_batches_queued_behind_it(tmp_path):
    damaged = _breaks_dali_but_passes_the_probe(tmp_path)
    good = [write_video(tmp_path / f"v{i}.webm", num_frames=12 + i, codec="libvpx-vp9") for i in range(5)]
    samples = [Sample(str(p), 0) for p in [good[0], damaged, *good[1:]]]
    ds = VideoDataset("fixture", "test", samples, classes=["a"])
    loader = DaliVideoLoader(ds, 4, 2, size=16, mode="eval", device="cpu", num_pipelines=1, prefetch=3)
    batches = list(loader)
    reference = list(VideoLoader(ds, 4, 2, size=16, mode="eval", num_workers=0))
    assert [b["index"].tolist() for b in batches] == [[0, 1], [2, 3], [4, 5]]
    assert [b["valid"].tolist() for b in batches] == [[True, False], [True, True], [True, True]]
    for a, b in zip(batches, reference):  # the batches after the broken one are their own videos
        ok = a["valid"] & b["valid"]
        assert (a["video"][ok] - b["video"][ok]).abs().mean() < 0.05
