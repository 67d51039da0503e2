"""Training runs end to end on tiny generated clips (stop-tiny, random frozen backbone, CPU):
both tasks learn from the true initialisation, resume is exact, k = 0 and rho = 0 only evaluates,
zero-shot evaluation is CLIP's mean pooling, bad videos are skipped by name, SIGTERM checkpoints,
and two gloo processes under torchrun match one process."""
from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from train_fixtures import make_dataset

from stop_fast.train import TrainConfig, evaluate, train
from stop_fast.train import checkpoint as ckpt
from stop_fast.train.records import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(root, out, frames=3, k=6, rho=12, **kw) -> TrainConfig:
    values = dict(dataset="csv", video_root=str(root), batch_size=4, epochs=1, workers=0, out=str(out), log_every=1,
                  eval_every=0, progress=False, warmup=0.0,
                  stop={"model_name": "stop-tiny", "num_frames": frames, "k": k, "rho": rho})
    values.update(kw)
    return TrainConfig(**values)


def losses(out) -> list:
    return [r["loss"] for r in read_metrics(os.path.join(out, "metrics.jsonl")) if "loss" in r]


@pytest.fixture(scope="module")
def recognition_set(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("rec")), per_class=2, classes=2)


@pytest.fixture(scope="module")
def retrieval_set(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("ret")), per_class=2, classes=2, task="retrieval")


def test_recognition_learns_from_the_true_initialisation_and_skips_a_corrupt_video(tmp_path):
    root = make_dataset(str(tmp_path / "data"), per_class=2, classes=2, corrupt="videos/broken.mp4")
    out = tmp_path / "out"
    result = train(tiny(root, out, frames=4, epochs=6))  # the prompters' last layers start at zero
    seen = losses(out)
    assert len(seen) == 6
    assert sum(seen[-2:]) / 2 < 0.3 * seen[0], seen
    # the evaluation split holds the training clips: its loss falls with the training loss
    assert result["val_loss"] < 0.3 * seen[0] and result["steps"] == 6 and result["interrupted"] is None
    # the broken file was met (it is one of five training entries in every epoch), named and skipped
    assert result["skipped_videos"] >= 1
    with open(out / "train.log") as f:
        assert "broken.mp4" in f.read()
    for name in ("metrics.jsonl", "config.json", "curves.png", "prompts.safetensors", "metrics.json"):
        assert (out / name).is_file(), name
    if importlib.util.find_spec("tensorboard") is not None:  # TensorBoard events when it is installed
        assert any(n.startswith("events") for n in os.listdir(out / "tensorboard"))
    else:
        assert not (out / "tensorboard").exists()
    evals = [r for r in read_metrics(out / "metrics.jsonl") if "val_top1" in r]
    assert evals[-1]["val_top1"] == result["val_top1"] and {"val_top5", "val_mean_class_acc"} <= set(evals[-1])
    import json

    with open(out / "config.json") as f:
        used = json.load(f)
    assert used["lr"] == 1e-3 and used["logit_scale"] == 100.0 and used["flip"] is False and used["impl"] == "reference"


def test_retrieval_learns(retrieval_set, tmp_path):
    result = train(tiny(retrieval_set, tmp_path, frames=4, epochs=6))
    seen = losses(tmp_path)
    assert sum(seen[-2:]) / 2 < 0.5 * seen[0], seen
    for key in ("val_t2v_r1", "val_t2v_r5", "val_t2v_r10", "val_t2v_median_rank", "val_t2v_mean_rank",
                "val_v2t_r1", "val_v2t_median_rank", "val_v2t_mean_rank"):
        assert key in result


def test_resumed_run_equals_an_uninterrupted_one(recognition_set, tmp_path):
    whole = tiny(recognition_set, tmp_path / "whole", batch_size=2, epochs=2)  # 2 steps an epoch
    a = train(whole)
    parted = tiny(recognition_set, tmp_path / "parted", batch_size=2, epochs=2, stop_after_steps=3)
    first = train(parted)
    assert first["interrupted"] == "stop_after_steps" and first["steps"] == 3
    assert ckpt.latest(str(tmp_path / "parted" / "checkpoints")).endswith("step-00000003.pt")
    b = train(tiny(recognition_set, tmp_path / "parted", batch_size=2, epochs=2, resume="auto"))
    assert b["steps"] == 4
    assert losses(tmp_path / "whole") == losses(tmp_path / "parted")  # bit-identical on the CPU
    assert a["val_loss"] == b["val_loss"] and a["val_top1"] == b["val_top1"]
    from safetensors.torch import load_file

    wa, wb = load_file(a["checkpoint"]), load_file(b["checkpoint"])
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_stop_after_steps_counts_the_steps_of_this_run(recognition_set, tmp_path):
    config = tiny(recognition_set, tmp_path, batch_size=2, epochs=3, stop_after_steps=2)  # 2 steps an epoch
    assert train(config)["steps"] == 2
    resumed = train(tiny(recognition_set, tmp_path, batch_size=2, epochs=3, stop_after_steps=2, resume="auto"))
    assert resumed["steps"] == 4 and resumed["interrupted"] == "stop_after_steps"


def test_k0_rho0_only_evaluates_and_logs(recognition_set, tmp_path):
    result = train(tiny(recognition_set, tmp_path, k=0, rho=0))
    assert result["steps"] == 0 and "val_top1" in result
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert len(records) == 1 and records[0]["step"] == 0 and records[0]["val_top1"] == result["val_top1"]
    assert not (tmp_path / "checkpoints").exists() and (tmp_path / "curves.png").is_file()
    # the same thing, asked for as zero-shot evaluation
    zero = evaluate(tiny(recognition_set, tmp_path / "zs"), zero_shot=True, out=str(tmp_path / "zs.json"))
    assert zero["val_top1"] == result["val_top1"] and zero["val_loss"] == pytest.approx(result["val_loss"])
    assert (tmp_path / "zs.json").is_file()


def test_zero_shot_features_are_clips_mean_pooled_features(recognition_set):
    from stop_fast.train import distributed
    from stop_fast.train.evaluation import encode_loader
    from stop_fast.train.setup import build_datasets, build_loader, build_model, make_encoder

    cpu = torch.device("cpu")
    config = tiny(recognition_set, "unused", k=0, rho=0).resolved(False)
    model = build_model(config, cpu)
    _, val = build_datasets(config, need_train=False)
    loader = build_loader(config, val, "eval", distributed.Dist(), cpu, model.image_size, 3)
    loader.set_epoch(0)
    features, valid = encode_loader(make_encoder(model, "reference", False), loader, len(val), distributed.Dist(), cpu,
                                    contextlib.nullcontext)
    assert bool(valid.all())
    expected = torch.zeros_like(features)
    with torch.no_grad():
        for batch in loader:
            video = batch["video"]
            frames = model.clip.encode_image(video.flatten(0, 1)).unflatten(0, video.shape[:2])
            for row, index in enumerate(batch["index"].tolist()):
                if index >= 0:
                    expected[index] = F.normalize(frames[row].mean(0), dim=-1)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)


def _cli(*args) -> list:
    return [sys.executable, "-m", "stop_fast.cli", *args]


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    return env


def test_sigterm_saves_a_loadable_checkpoint(recognition_set, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(_cli("train", "--dataset", "csv", "--video-root", recognition_set, "--model", "stop-tiny",
                                 "--frames", "3", "--batch-size", "2", "--epochs", "100", "--workers", "0",
                                 "--log-every", "1", "--out", str(out)),
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if (out / "metrics.jsonl").is_file() and losses(out):
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "--resume auto" in err
    # stderr is a pipe here, not a terminal: no progress bar redrawn with carriage returns, log lines instead
    assert "\r" not in err, repr(err[max(0, err.find("\r") - 300):err.find("\r") + 100])
    assert "epoch 1/100, step 1/" in err
    path = ckpt.latest(str(out / "checkpoints"))
    state = ckpt.load(path)
    assert state["step"] >= 1 and "optimizer" in state and "rng" in state
    from stop_fast.train.setup import build_model

    model = build_model(tiny(recognition_set, out).resolved(False), torch.device("cpu"))
    model.load_prompts(state["prompts_path"])
    assert not [n for n in os.listdir(out / "checkpoints") if ".tmp" in n]


def test_two_gloo_processes_match_one(retrieval_set, tmp_path):
    """Retrieval: the InfoNCE batch is gathered across ranks, so this checks the gather and the
    gradient scaling too (a large AdamW epsilon and no clipping make the update depend on the
    gradient's scale, which plain Adam would hide). Global batch 4 = 2 ranks x 2."""
    settings = dict(eps=1.0, grad_clip=0.0, lr=0.05)
    common = ["--dataset", "csv", "--video-root", retrieval_set, "--model", "stop-tiny", "--frames", "3",
              "--batch-size", "4", "--epochs", "2", "--workers", "0", "--log-every", "1", "--warmup", "0",
              "--no-progress", "--eval-every", "0", "--eps", "1", "--grad-clip", "0", "--lr", "0.05"]
    two = tmp_path / "two"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                          "--nproc_per_node", "2", "-m", "stop_fast.cli", "train", *common, "--out", str(two)],
                         env=_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "broadcast_buffers" not in run.stderr  # no deprecation warning per rank
    one = train(tiny(retrieval_set, tmp_path / "one", batch_size=4, epochs=2, **settings))
    assert losses(two) == pytest.approx(losses(tmp_path / "one"), rel=1e-5, abs=1e-6)
    evals = [r for r in read_metrics(two / "metrics.jsonl") if "val_t2v_r1" in r]
    for key, value in one.items():
        if key.startswith("val_"):
            assert evals[-1][key] == pytest.approx(value, abs=1e-6), key
    with open(two / "config.json") as f:
        assert '"world_size": 2' in f.read()


def _dali_installed() -> bool:
    try:
        from stop_fast.data.dali_reader import import_dali

        import_dali()
        return True
    except ImportError:
        return False


@pytest.mark.skipif(not _dali_installed(), reason="nvidia-dali is not installed")
def test_dali_decoder_on_the_cpu(tmp_path):
    """DALI's CPU decoder (VP9 clips) feeds the same loop, and resumes mid-epoch like PyAV."""
    root = make_dataset(str(tmp_path / "data"), per_class=2, classes=2, codec="libvpx-vp9")
    first = train(tiny(root, tmp_path / "out", batch_size=2, decoder="dali", stop_after_steps=1))
    assert first["interrupted"] == "stop_after_steps"
    result = train(tiny(root, tmp_path / "out", batch_size=2, decoder="dali", resume="auto"))
    seen = losses(tmp_path / "out")
    assert result["steps"] == 2 and len(seen) == 2 and all(0 < x < 100 for x in seen)
    assert result["val_videos"] == 4 and result["val_skipped"] == 0


@pytest.mark.gpu
@pytest.mark.parametrize("impl, compile", [("fast", True), ("reference", False)])
def test_training_on_a_gpu(tmp_path, impl, compile):
    """bf16 autocast, the backbone cast once, the fast path (compiled) or the reference path, the
    default decoder (DALI when installed), on stop-tiny: the loss falls and evaluation runs."""
    root = make_dataset(str(tmp_path / "data"), per_class=4, classes=2, codec="libvpx-vp9")
    result = train(tiny(root, tmp_path / "out", frames=4, batch_size=4, epochs=8, device="cuda", impl=impl,
                        compile=compile, workers=2))
    seen = losses(tmp_path / "out")
    assert all(x == x for x in seen) and sum(seen[-2:]) / 2 < 0.5 * seen[0], seen
    with open(tmp_path / "out" / "config.json") as f:
        import json

        used = json.load(f)
    assert used["precision"] == "bf16" and used["device"].startswith("cuda") and used["impl"] == impl
    assert "val_top1" in result and "max_memory_gb" in read_metrics(tmp_path / "out" / "metrics.jsonl")[0]
