"""What a run leaves on disk and how it treats it: a run owns its folder, resume skips a damaged
checkpoint, a killed save leaves no temporary for long, a non-finite loss saves nothing, files get
the user's umask, and runs written by stop_fast 0.1.0 (before the training room was redesigned)
still evaluate and resume."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from train_fixtures import make_dataset

from stop_fast.cli import main
from stop_fast.train import TrainConfig, evaluate, train
from stop_fast.train import checkpoint as ckpt
from stop_fast.train.lock import RunLock, RunLockedError
from stop_fast.train.loop import NonFiniteLossError
from stop_fast.train.records import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEGACY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "runs-0.1.0")


def tiny(root, out, **kw) -> TrainConfig:
    values = dict(dataset="csv", video_root=str(root), batch_size=2, epochs=1, workers=0, out=str(out), log_every=1,
                  eval_every=0, progress=False, warmup=0.0, stop={"model_name": "stop-tiny", "num_frames": 3})
    values.update(kw)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("runs")), per_class=2, classes=2)


# ---------------------------------------------------------------------------------------------- the run's folder
def test_a_second_run_into_a_held_folder_is_a_one_line_error_naming_the_holder(data, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    with RunLock(str(out), "train"):
        with pytest.raises(RunLockedError, match=rf"in use by another run \(stop-fast train, pid {os.getpid()} on"):
            train(tiny(data, out))
        code = main(["train", "--dataset", "csv", "--video-root", data, "--model", "stop-tiny", "--frames", "3",
                     "--batch-size", "2", "--workers", "0", "--out", str(out), "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "in use by another run" in err[0] and f"pid {os.getpid()}" in err[0]
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()
    assert train(tiny(data, out))["steps"] == 2  # released: the folder is free again


def test_a_killed_holder_leaves_no_lock(data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from stop_fast.train.lock import RunLock\n"
        f"lock = RunLock({str(out)!r}, 'train').__enter__(); print('held', flush=True); time.sleep(600)")],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=REPO))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
            with RunLock(str(out), "train"):
                pass
    finally:
        holder.kill()  # SIGKILL: no clean-up code runs
        holder.wait()
    with RunLock(str(out), "train"):  # the kernel released the lock with the process
        pass


# ---------------------------------------------------------------------------------------------- resume
def test_resume_auto_skips_a_damaged_newest_checkpoint_with_a_warning(data, tmp_path):
    out = tmp_path / "out"
    first = train(tiny(data, out, epochs=2, save_every=1, keep_checkpoints=3, stop_after_steps=3))
    assert first["steps"] == 3 and ckpt.list_checkpoints(str(out / "checkpoints")) == [1, 2, 3]
    paths = {step: ckpt.paths_for(str(out / "checkpoints"), step) for step in (2, 3)}
    with open(paths[3]["state"], "r+b") as f:  # a torn write of the newest state file
        f.truncate(100)
    with open(paths[2]["prompts"], "r+b") as f:  # and a damaged weights half of the one before
        f.seek(200)
        f.write(b"\xff" * 64)
    result = train(tiny(data, out, epochs=2, save_every=1, keep_checkpoints=3, resume="auto"))
    warned = [line for line in (out / "train.log").read_text().splitlines() if " WARNING " in line]
    assert any(paths[3]["state"] in line and "cannot be resumed" in line for line in warned), warned
    assert any(paths[2]["state"] in line and paths[2]["prompts"] in line for line in warned), warned
    assert result["steps"] == 4 and result["interrupted"] is None
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]  # from step 1


def test_resume_auto_with_no_readable_checkpoint_is_an_error(data, tmp_path):
    out = tmp_path / "out"
    train(tiny(data, out, epochs=2, stop_after_steps=1))
    state = ckpt.latest(str(out / "checkpoints"))
    with open(state, "wb") as f:
        f.write(b"garbage")
    with pytest.raises(ValueError, match="no checkpoint .* can be resumed"):
        train(tiny(data, out, epochs=2, resume="auto"))


def test_a_killed_save_leaves_a_temporary_that_the_next_save_removes(data, tmp_path):
    out = tmp_path / "out"
    train(tiny(data, out, epochs=2, stop_after_steps=1))
    folder = out / "checkpoints"
    killed = subprocess.run([sys.executable, "-c", (
        "import os; from stop_fast.io import atomic_path\n"
        f"with atomic_path({str(folder / 'step-00000009.pt')!r}) as tmp:\n"
        "    open(tmp, 'wb').write(b'x' * 1000); os._exit(9)")], env=dict(os.environ, PYTHONPATH=REPO))
    assert killed.returncode == 9
    assert [n for n in os.listdir(folder) if ".tmp" in n]  # what a kill -9 mid-save leaves
    train(tiny(data, out, epochs=2, resume="auto"))
    assert not [n for n in os.listdir(folder) if ".tmp" in n]


# ---------------------------------------------------------------------------------------------- non-finite loss
class _InfiniteGradient(torch.autograd.Function):
    """The identity forward, an infinite gradient backward: a finite loss whose step makes NaN weights."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


@pytest.mark.parametrize("poison", ["nan loss", "infinite gradient"])
def test_a_non_finite_loss_stops_the_run_before_anything_is_saved(data, tmp_path, monkeypatch, poison):
    from stop_fast.train.tasks import RecognitionTask

    real_loss, calls = RecognitionTask.loss, []

    def loss_turning_nan(self, features, batch, info):
        calls.append(1)
        value = real_loss(self, features, batch, info)
        if len(calls) != 3:  # the third step's
            return value
        return value * float("nan") if poison == "nan loss" else _InfiniteGradient.apply(value)

    monkeypatch.setattr(RecognitionTask, "loss", loss_turning_nan)
    out = tmp_path / "out"
    with pytest.raises(NonFiniteLossError, match="at or before step 4.*step-00000002"):
        train(tiny(data, out, epochs=2, save_every=2, log_every=100))
    assert ckpt.list_checkpoints(str(out / "checkpoints")) == [2]  # the step-2 save; nothing after the NaN
    assert not (out / "prompts.safetensors").exists()


# ---------------------------------------------------------------------------------------------- files
def test_run_files_get_the_users_umask_and_prompts_are_byte_stable(data, tmp_path):
    old = os.umask(0o022)
    try:
        result = train(tiny(data, tmp_path / "a", epochs=1))
    finally:
        os.umask(old)
    for path in [result["checkpoint"], result["training_checkpoint"], tmp_path / "a" / "config.json",
                 tmp_path / "a" / "metrics.json"]:
        assert os.stat(path).st_mode & 0o777 == 0o644, path
    again = train(tiny(data, tmp_path / "b", epochs=1))
    assert open(result["checkpoint"], "rb").read() == open(again["checkpoint"], "rb").read()


# ---------------------------------------------------------------------------------------------- stop_fast 0.1.0 runs
@pytest.fixture(scope="module")
def legacy_data(tmp_path_factory):
    """The dataset the 0.1.0 runs were trained on (tests/data/runs-0.1.0/make_runs.py), written again."""
    return make_dataset(str(tmp_path_factory.mktemp("legacy") / "data"), per_class=2, classes=2)


def _legacy_config(data, out, **kw):
    with open(os.path.join(LEGACY, "stopped", "config.json")) as f:
        record = json.load(f)
    from stop_fast.train.config import read_run_record

    config = read_run_record(record, "config.json")
    values = dict(video_root=data, out=str(out), device=None, precision=None, impl=None, compile=None,
                  eval_frames=None, eval_batch_size=None, train_split=None, val_split=None, stop_after_steps=0)
    values.update(kw)
    import dataclasses

    return dataclasses.replace(config, **values)


def test_a_0_1_0_run_record_reads_as_the_config_it_was(legacy_data):
    config = _legacy_config(legacy_data, "unused")
    assert (config.stop.model_name, config.stop.num_frames, config.stop.k, config.stop.rho) == ("stop-tiny", 4, 2, 2)
    assert (config.stop.r_intra, config.stop.r_inter, config.seed, config.lr, config.epochs) == (8, 8, 3, 0.01, 2)


def test_a_0_1_0_checkpoint_resumes_to_the_0_1_0_uninterrupted_result(legacy_data, tmp_path):
    out = tmp_path / "stopped"
    shutil.copytree(os.path.join(LEGACY, "stopped"), out)
    result = train(_legacy_config(legacy_data, out, resume="auto"))
    assert result["steps"] == 4 and result["interrupted"] is None
    ours, theirs = load_file(result["checkpoint"]), load_file(os.path.join(LEGACY, "full", "prompts.safetensors"))
    assert ours.keys() == theirs.keys()
    for key in ours:  # the same arithmetic on the same CPU: equal up to float32 rounding across builds
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6)
    with open(os.path.join(LEGACY, "full", "metrics.jsonl")) as f:
        old_losses = [json.loads(line)["loss"] for line in f if '"loss"' in line]
    assert [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == pytest.approx(old_losses, rel=1e-5)


def test_a_0_1_0_prompt_file_evaluates_as_it_did(legacy_data):
    config = _legacy_config(legacy_data, "unused")
    result = evaluate(config, os.path.join(LEGACY, "full", "prompts.safetensors"))
    with open(os.path.join(LEGACY, "full", "metrics.json")) as f:
        then = json.load(f)
    assert result["val_top1"] == then["val_top1"]
    assert result["val_loss"] == pytest.approx(then["val_loss"], rel=1e-5)


# ---------------------------------------------------------------------------------------------- prepared copies
def test_training_reads_a_prepare_manifests_copies(tmp_path, capsys):
    """`stop-fast prepare` writes copies and a manifest; with --manifest, training and evaluation read
    the copies: the originals can be gone."""
    root = make_dataset(str(tmp_path / "data"), per_class=2, classes=2)
    manifest, copies = tmp_path / "m.jsonl", tmp_path / "copies"
    for split in ("train", "val"):
        assert main(["prepare", "--dataset", "csv", "--video-root", root, "--split", split, "--manifest",
                     str(manifest), "--reencode-dir", str(copies), "--workers", "1"]) == 0
    capsys.readouterr()
    for name in os.listdir(os.path.join(root, "videos")):
        os.unlink(os.path.join(root, "videos", name))
    result = train(tiny(root, tmp_path / "out", epochs=1, manifest=str(manifest)))
    assert result["steps"] == 2 and result["skipped_videos"] == 0 and result["val_skipped"] == 0
    from stop_fast.data import VideoDecodeError

    with pytest.raises(VideoDecodeError, match="failed to decode"):  # without the manifest nothing is left to read
        train(tiny(root, tmp_path / "without", epochs=1))


def test_a_fresh_run_into_a_folder_with_checkpoints_is_refused_and_a_resume_from_an_older_one_drops_the_newer(
        data, tmp_path):
    out = tmp_path / "out"
    train(tiny(data, out, epochs=3, save_every=1, keep_checkpoints=5, stop_after_steps=4))
    with pytest.raises(ValueError, match=r"holds the checkpoints of an earlier run \(step 4\).*--resume auto"):
        train(tiny(data, out, epochs=3))
    assert ckpt.list_checkpoints(str(out / "checkpoints")) == [1, 2, 3, 4]  # nothing touched
    older = ckpt.paths_for(str(out / "checkpoints"), 2)["state"]
    result = train(tiny(data, out, epochs=3, save_every=1, keep_checkpoints=5, resume=older, stop_after_steps=1))
    assert result["steps"] == 3 and ckpt.list_checkpoints(str(out / "checkpoints")) == [1, 2, 3]  # 4 abandoned
    assert result["training_checkpoint"].endswith("step-00000003.pt")


def test_a_stop_inside_an_accumulated_step_resumes_from_its_start(data, tmp_path, monkeypatch):
    """A signal that also kills the loader's workers mid-step: the checkpoint is at the last optimiser
    step, and the resumed run's losses are the uninterrupted run's."""
    from stop_fast.data.loader import VideoLoader
    from stop_fast.train.signals import StopRequest

    settings = dict(epochs=2, batch_size=2, accumulation=2)  # 4 micro-batches of 1 video an epoch, 2 steps
    train(tiny(data, tmp_path / "whole", **settings))
    real_iter, seen, stopped = VideoLoader.__iter__, [], []

    def dies_at_the_third_micro_batch(self):
        for batch in real_iter(self):
            seen.append(1)
            if len(seen) == 3:  # one step done, one micro-batch of the next
                stopped.append(1)
                raise RuntimeError("DataLoader worker (pid 1234) is killed by signal: Interrupt")
            yield batch

    monkeypatch.setattr(VideoLoader, "__iter__", dies_at_the_third_micro_batch)
    monkeypatch.setattr(StopRequest, "requested", property(lambda self: bool(stopped)))
    first = train(tiny(data, tmp_path / "parted", **settings))
    assert first["steps"] == 1 and ckpt.load(first["training_checkpoint"])["micro_batch"] == 2
    monkeypatch.undo()
    train(tiny(data, tmp_path / "parted", resume="auto", **settings))
    whole = [r["loss"] for r in read_metrics(tmp_path / "whole" / "metrics.jsonl") if "loss" in r]
    parted = [r["loss"] for r in read_metrics(tmp_path / "parted" / "metrics.jsonl") if "loss" in r]
    assert parted == whole
