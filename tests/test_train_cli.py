"""`stop-fast train`, `eval` and `predict`: what they print, and one line for every user mistake."""
from __future__ import annotations

import json
import os

import pytest
import torch

from train_fixtures import make_dataset

from stop_fast.cli import main


def run_cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A one-step run on a tiny recognition set: (dataset root, run folder)."""
    root = make_dataset(str(tmp_path_factory.mktemp("cli")), per_class=1, classes=2)
    out = os.path.join(root, "run")
    code = main(["train", "--dataset", "csv", "--video-root", root, "--model", "stop-tiny", "--frames", "3",
                 "--batch-size", "2", "--epochs", "1", "--workers", "0", "--out", out, "--no-progress"])
    assert code == 0
    return root, out


def data_flags(root):
    return ["--dataset", "csv", "--video-root", root, "--frames", "3", "--workers", "0"]


def test_train_prints_metrics_and_paths(trained, capsys):
    root, out = trained
    code, stdout, _ = run_cli(capsys, "train", *data_flags(root), "--model", "stop-tiny", "--batch-size", "2",
                              "--epochs", "1", "--out", out, "--resume", "auto", "--no-progress")  # nothing to train
    assert code == 0 and "top1" in stdout and "prompts.safetensors" in stdout
    log = open(os.path.join(out, "train.log")).read()
    assert "finished its 1 epoch(s)" in log and "epoch 2" not in log


def test_eval_prints_a_table_and_writes_json(trained, capsys, tmp_path):
    root, out = trained
    code, stdout, _ = run_cli(capsys, "eval", "--checkpoint", out, *data_flags(root), "--out", str(tmp_path / "m.json"))
    assert code == 0, stdout
    assert "metric" in stdout and "top1" in stdout and "RANDOM backbone" in stdout
    with open(tmp_path / "m.json") as f:
        saved = json.load(f)
    with open(os.path.join(out, "metrics.json")) as f:
        final = json.load(f)
    # the same prompts on the same videos (batched differently, hence the tolerance)
    assert saved["val_top1"] == final["val_top1"] and saved["val_loss"] == pytest.approx(final["val_loss"], rel=1e-4)
    code, stdout, _ = run_cli(capsys, "eval", "--zero-shot", *data_flags(root), "--model", "stop-tiny",
                              "--out", str(tmp_path / "z.json"))
    assert code == 0 and "zero-shot" in stdout


def test_eval_of_a_run_takes_its_settings_from_the_run(trained, capsys, tmp_path):
    """No dataset flags: the run's dataset, video root and frames (3, not the default 12) evaluate its
    prompts exactly as the run itself did; a flag still overrides."""
    root, out = trained
    code, stdout, err = run_cli(capsys, "eval", "--checkpoint", out, "--workers", "0", "--out", str(tmp_path / "e.json"))
    assert code == 0, err
    assert os.path.join(out, "config.json") in err
    with open(tmp_path / "e.json") as f:
        saved = json.load(f)
    with open(os.path.join(out, "metrics.json")) as f:
        final = json.load(f)
    assert saved["frames"] == 3 and saved["val_top1"] == final["val_top1"]
    assert saved["val_loss"] == pytest.approx(final["val_loss"], rel=1e-4)
    code, _, _ = run_cli(capsys, "eval", "--checkpoint", out, "--workers", "0", "--eval-frames", "2",
                         "--out", str(tmp_path / "f.json"))
    with open(tmp_path / "f.json") as f:
        assert code == 0 and json.load(f)["frames"] == 2


def test_a_run_whose_dataset_moved_says_which_path_is_gone(trained, capsys, caplog, tmp_path):
    import shutil

    _, out = trained
    moved = tmp_path / "run"
    shutil.copytree(out, moved)
    record = json.loads((moved / "config.json").read_text())
    record["video_root"] = str(tmp_path / "gone")
    (moved / "config.json").write_text(json.dumps(record))
    code, _, err = run_cli(capsys, "eval", "--checkpoint", str(moved), "--workers", "0")
    assert code == 2 and "video_root is required" in err
    assert any(f"the run's video_root {tmp_path / 'gone'} no longer exists; pass --video-root" in r.getMessage()
               for r in caplog.records)


def test_predict_seed_that_contradicts_the_checkpoint_is_named(trained, capsys):
    root, out = trained
    video = os.path.join(root, "videos", "right_0.mp4")
    code, _, err = run_cli(capsys, "predict", video, "--checkpoint", out, "--classes", "right,left", "--seed", "5")
    assert code == 2 and "random weights (seed 0)" in err and "(seed 5)" in err and "--force" in err


def test_an_unwritable_out_names_the_flag(trained, capsys, tmp_path):
    root, _ = trained
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, _, err = run_cli(capsys, "train", *data_flags(root), "--model", "stop-tiny", "--out", str(blocker / "run"))
    assert code == 2 and err.strip().startswith("stop-fast train: error: --out ") and "Not a directory" in err


def test_installed_configs_by_name_and_a_file_of_that_name_wins(tmp_path, monkeypatch, capsys):
    from stop_fast.train.config import config_path, load_config

    installed = config_path("hmdb51")
    assert installed.endswith(os.path.join("configs", "hmdb51.toml")) and os.path.isfile(installed)
    assert load_config("msrvtt.toml").dataset == "msrvtt"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hmdb51").write_text('dataset = "ucf101"\n')
    assert config_path("hmdb51") == "hmdb51" and load_config("hmdb51").dataset == "ucf101"
    code, _, err = run_cli(capsys, "train", "--config", "hmdb51", "--video-root", str(tmp_path / "none"))
    assert code == 2 and "config: hmdb51" in err
    code, _, err = run_cli(capsys, "train", "--config", "hmdb5")
    assert code == 2 and "--config hmdb5: no such file, and not an installed config (activitynet, didemo" in err


def test_predict_classes_and_text(trained, capsys):
    root, out = trained
    videos = sorted(os.path.join(root, "videos", n) for n in os.listdir(os.path.join(root, "videos")))
    code, stdout, _ = run_cli(capsys, "predict", *videos, "--checkpoint", out, "--classes", "right,left,up",
                              "--frames", "3", "--json")
    assert code == 0
    result = json.loads(stdout)
    assert [r["video"] for r in result] == videos
    for r in result:
        probs = [c["probability"] for c in r["classes"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1, abs=1e-3)
    code, stdout, _ = run_cli(capsys, "predict", *videos, "--checkpoint", out, "--text", "a square moves right",
                              "--frames", "3")
    assert code == 0 and "1." in stdout and all(os.path.basename(v) in stdout for v in videos)


def _corrupt_prompts(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    return str(bad)


def _mismatched_prompts(tmp_path):
    """Readable, says it is stop-tiny with k = 6, rho = 12, but holds tensors of the wrong shape."""
    from safetensors.torch import save_file

    from stop_fast import STOPConfig

    path = str(tmp_path / "other.safetensors")
    meta = {"stop_config": json.dumps(STOPConfig(model_name="stop-tiny", num_frames=3).to_dict())}
    save_file({"conv_intra.conv.weight": torch.zeros(1, 2, 3, 3, 3)}, path, metadata=meta)
    return path


@pytest.mark.parametrize("make_args, message", [
    (lambda t, r: ["train"], "dataset is required"),
    (lambda t, r: ["train", "--dataset", "csv"], "video_root is required"),
    (lambda t, r: ["train", "--dataset", "csv", "--video-root", str(t / "nowhere")], "--video-root"),
    (lambda t, r: ["train", "--config", str(t / "missing.toml")], "--config"),
    (lambda t, r: ["train", *data_flags(r), "--batch-size", "0"], "--batch-size: batch_size must be >= 1"),
    (lambda t, r: ["train", *data_flags(r), "--warmup", "2"], "--warmup"),
    (lambda t, r: ["train", *data_flags(r), "--weights", str(t / "none.pt")], "--weights"),
    (lambda t, r: ["train", *data_flags(r), "--device", "cuda"], "no CUDA device"),
    (lambda t, r: ["train", *data_flags(r), "--resume", str(t / "none.pt")], "checkpoint not found"),
    (lambda t, r: ["train", *data_flags(r), "--model", "stop-tiny", "--batch-size", "100", "--out", str(t / "o")],
     "fewer than one batch"),
    (lambda t, r: ["eval", "--checkpoint", str(t / "none"), *data_flags(r)], "--checkpoint"),
    (lambda t, r: ["eval", "--checkpoint", _corrupt_prompts(t), *data_flags(r)], "not a readable safetensors file"),
    (lambda t, r: ["eval", "--checkpoint", _mismatched_prompts(t), *data_flags(r)], "other.safetensors"),
    (lambda t, r: ["predict", os.path.join(r, "videos", "right_0.mp4"), "--zero-shot", "--classes", "one"], "at least two"),
    (lambda t, r: ["predict", str(t / "no.mp4"), "--zero-shot", "--text", "x"], "no.mp4"),
    (lambda t, r: ["predict", os.path.join(r, "videos", "right_0.mp4"), "--zero-shot", "--classes", str(t / "c.txt")],
     "c.txt: no such file"),
])
def test_user_mistakes_are_one_line(make_args, message, trained, capsys, tmp_path):
    root, _ = trained
    args = make_args(tmp_path, root)
    if torch.cuda.is_available() and "cuda" in args:
        pytest.skip("CUDA is available here")
    code, _, err = run_cli(capsys, *args)
    lines = [line for line in err.strip().splitlines() if line.strip() and "Warning" not in line
             and "load_clip" not in line and "clip = " not in line]
    assert code == 2 and len(lines) == 1, err
    assert "Traceback" not in err and message in lines[0], lines[0]


def test_config_file_and_flags(tmp_path, capsys):
    root = make_dataset(str(tmp_path / "d"), per_class=1, classes=2)
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'dataset = "csv"\nvideo_root = "{root}"\nbatch_size = 2\nepochs = 1\nworkers = 0\n'
                   f'out = "{tmp_path / "from-file"}"\n[stop]\nmodel_name = "stop-tiny"\nnum_frames = 3\nk = 0\nrho = 0\n')
    code, _, _ = run_cli(capsys, "train", "--config", str(cfg), "--out", str(tmp_path / "from-flag"), "--no-progress")
    assert code == 0
    assert (tmp_path / "from-flag" / "config.json").is_file() and not (tmp_path / "from-file").exists()
    with open(tmp_path / "from-flag" / "config.json") as f:
        used = json.load(f)
    assert used["stop"]["k"] == 0 and used["stop"]["num_frames"] == 3 and used["stop"]["model_name"] == "stop-tiny"
    cfg.write_text('dataset = "csv"\nbatch_szie = 2\n')
    code, _, err = run_cli(capsys, "train", "--config", str(cfg))
    assert code == 2 and "batch_szie" in err and str(cfg) in err


def test_eval_seed_that_contradicts_the_checkpoint_is_named(trained, capsys):
    _, out = trained
    code, _, err = run_cli(capsys, "eval", "--checkpoint", out, "--workers", "0", "--seed", "5")
    assert code == 2 and "random weights (seed 0)" in err and "(seed 5)" in err and "--force" in err
