"""The demo's motion-direction task (stop_fast.synthetic) and `stop-fast demo` end to end."""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import warnings

import numpy as np
import pytest
import torch

from stop_fast.synthetic import MOTION_CLASSES, motion_clip, write_motion_dataset


def _centroid_columns(clip: torch.Tensor) -> torch.Tensor:
    """x of the bright shape's centre in each frame: (T, H, W, 3) uint8 -> (T,)."""
    bright = (clip.float().mean(-1) > 0.5 * 255).float()  # the background stays below 0.35
    cols = torch.arange(clip.shape[2], dtype=torch.float32)
    return (bright.sum(1) * cols).sum(-1) / bright.sum((1, 2))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_moving_left_is_moving_right_reversed_and_motion_is_real(seed):
    right = motion_clip(0, 8, 112, torch.Generator().manual_seed(seed))
    left = motion_clip(1, 8, 112, torch.Generator().manual_seed(seed))
    assert right.shape == (8, 112, 112, 3) and right.dtype == torch.uint8
    assert torch.equal(left, right.flip(0))
    x = _centroid_columns(right)
    assert (x[1:] > x[:-1]).all(), "the shape must move right in every frame"
    assert float(x[-1] - x[0]) > 30, "the shape must cross a good part of the frame"
    assert not torch.equal(right, left), "a clip must not equal its reversal"


def test_motion_clip_checks_its_arguments():
    with pytest.raises(ValueError, match="label"):
        motion_clip(2, 8, 112)
    with pytest.raises(ValueError, match="num_frames"):
        motion_clip(0, 1, 112)
    with pytest.raises(ValueError, match="size"):
        motion_clip(0, 8, 8)


@pytest.fixture(scope="module")
def motion_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("motion")
    train_csv, val_csv = write_motion_dataset(root, num_train=8, num_val=6, size=64, frames=6, seed=3)
    return root, train_csv, val_csv


def _rows(table):
    with open(table, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_dataset_is_a_balanced_csv_dataset(motion_dataset):
    from stop_fast.data import build_dataset

    root, train_csv, val_csv = motion_dataset
    for split, table, count in (("train", train_csv, 8), ("val", val_csv, 6)):
        rows = _rows(table)
        assert len(rows) == count and set(rows[0]) == {"path", "label"}
        assert [r["label"] for r in rows].count(MOTION_CLASSES[0]) == count // 2
        dataset = build_dataset("csv", root, split, annotations=table)
        assert sorted(dataset.classes) == sorted(MOTION_CLASSES)
        assert all((root / r["path"]).is_file() for r in rows)


def test_decoded_pairs_are_exact_time_reversals(motion_dataset):
    """MJPEG codes frames independently: the reversal symmetry survives writing and decoding."""
    from stop_fast.data.pyav_reader import decode_frames

    root, _, val_csv = motion_dataset
    rows = _rows(val_csv)
    for forward, backward in zip(rows[0::2], rows[1::2]):
        assert (forward["label"], backward["label"]) == MOTION_CLASSES
        a, _ = decode_frames(str(root / forward["path"]), list(range(6)))
        b, _ = decode_frames(str(root / backward["path"]), list(range(6)))
        assert len(a) == len(b) == 6 and a[0].shape == (64, 64, 3)
        np.testing.assert_array_equal(np.stack(a), np.stack(b)[::-1])
        # the same frames in another order: every frame-order-invariant statistic agrees
        np.testing.assert_array_equal(np.stack(a).mean(0), np.stack(b).mean(0))
        assert not np.array_equal(np.stack(a), np.stack(b))


def test_dataset_is_deterministic_and_seeded(tmp_path, motion_dataset):
    root, _, _ = motion_dataset
    write_motion_dataset(tmp_path / "same", num_train=8, num_val=6, size=64, frames=6, seed=3)
    write_motion_dataset(tmp_path / "other", num_train=8, num_val=6, size=64, frames=6, seed=4)
    name = "videos/train_00002.avi"
    assert (tmp_path / "same" / name).read_bytes() == (root / name).read_bytes()
    assert (tmp_path / "other" / name).read_bytes() != (root / name).read_bytes()
    # splits never share a scene
    assert (root / "videos/val_00000.avi").read_bytes() != (root / "videos/train_00000.avi").read_bytes()


def test_dataset_checks_its_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_train"):
        write_motion_dataset(tmp_path, num_train=3, num_val=2)
    with pytest.raises(ValueError, match="num_val"):
        write_motion_dataset(tmp_path, num_train=2, num_val=0)


def test_prompts_off_is_exactly_at_chance(tmp_path):
    """Mean pooling gives a clip and its reversal the same feature: one of each pair is wrong."""
    from helpers import make_stop
    from stop_fast.data import build_dataset, read_video_clip

    _, val_csv = write_motion_dataset(tmp_path, num_train=2, num_val=8, size=112, frames=4, seed=0)
    dataset = build_dataset("csv", tmp_path, "val", annotations=val_csv)
    model = make_stop(k=0, rho=0, num_frames=4).eval()
    video = torch.stack([read_video_clip(s.path, 4, 112, "eval", backend="pyav") for s in dataset.samples])
    with torch.no_grad():
        features = model.encode_video(video)
    torch.testing.assert_close(features[0::2], features[1::2], rtol=0, atol=1e-5)
    # any classifier of these features gets exactly one clip of each pair right
    text = torch.nn.functional.normalize(torch.randn(2, features.shape[1]), dim=-1)
    labels = torch.tensor([s.label for s in dataset.samples])
    correct = (features @ text.T).argmax(1) == labels
    assert correct.float().mean().item() == 0.5
    assert (correct[0::2] ^ correct[1::2]).all()


# ---------------------------------------------------------------- `stop-fast demo`
def _tree_has_train() -> bool:
    """stop_fast.train of this tree (an editable install elsewhere may resolve the name to another one)."""
    import stop_fast

    spec = importlib.util.find_spec("stop_fast.train")
    package = os.path.dirname(os.path.abspath(stop_fast.__file__))
    return spec is not None and spec.origin is not None and os.path.abspath(spec.origin).startswith(package + os.sep)


needs_train = pytest.mark.skipif(not _tree_has_train(), reason="the demo runs stop_fast.train, which this tree does not have")


def test_demo_command_rejects_a_foreign_out_folder_and_a_missing_weights_file(tmp_path, capsys):
    from stop_fast.cli import main

    (tmp_path / "notes.txt").write_text("mine")
    assert main(["demo", "--out", str(tmp_path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "not empty" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert main(["demo", "--out", str(tmp_path / "new"), "--weights", str(tmp_path / "missing.pt")]) == 2
    assert "--weights" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def _check_summary(summary, out):
    rows = {r["row"]: r for r in summary["rows"]}
    assert list(rows) == ["STOP", "intra-only", "inter-only", "prompts off"]
    assert [(r["k"], r["rho"]) for r in summary["rows"]] == [(6, 12), (6, 0), (0, 12), (0, 0)]
    # a clip and its reversal get the same mean-pooled feature: exactly one of each pair is right
    assert rows["prompts off"]["val_top1"] == 50.0  # percent
    assert summary["random_weights"] is True
    assert summary["checkpoint"] and (out / "runs" / "stop").is_dir()
    assert json.loads((out / "demo.json").read_text())["rows"] == summary["rows"]
    assert (out / "curves.png").stat().st_size > 0
    return rows


@pytest.fixture
def no_triton_interpreter(monkeypatch):
    """The demo times a CPU run: the model's PyTorch paths, not Triton's CPU interpreter (CI's switch for
    testing the kernels, set in conftest), which would make every step many times slower."""
    monkeypatch.setenv("STOP_FAST_DISABLE_TRITON", "1")


@needs_train
def test_demo_quick_runs_every_step(tmp_path, capsys, no_triton_interpreter):
    from stop_fast.cli import main

    out = tmp_path / "demo"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["demo", "--out", str(out), "--quick", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "demo.json").read_text())
    _check_summary(summary, out)
    for name in ("STOP", "intra-only", "inter-only", "prompts off", "RANDOM", "demo.json"):
        assert name in printed
    # an earlier demo's folder may be reused: its results are replaced
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["demo", "--out", str(out), "--quick", "--device", "cpu", "--seed", "1"]) == 0
    assert json.loads((out / "demo.json").read_text())["seed"] == 1


@needs_train
@pytest.mark.slow
def test_demo_stop_tells_clips_from_their_reversals(tmp_path, no_triton_interpreter):
    """The README's claim: STOP >= 90% where mean pooling is at chance (about two minutes on 2 cores)."""
    from stop_fast.demo import run_demo

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = run_demo(str(tmp_path), device="cpu", log=lambda line: None)
    rows = _check_summary(summary, tmp_path)
    assert rows["STOP"]["val_top1"] >= 90.0, summary["rows"]
