"""Training pieces without a training run: metrics against hand-computed matrices, the schedule,
TrainConfig and the config files, atomic checkpoints, and one optimiser step on in-memory tensors."""
from __future__ import annotations

import glob
import math
import os

import pytest
import torch

import stop_fast

from stop_fast.train import checkpoint as ckpt
from stop_fast.train.config import DATASETS, TrainConfig, load_config, read_toml
from stop_fast.train.metrics import ranks_of, recognition_metrics, retrieval_metrics
from stop_fast.train.optim import build_optimizer, build_scheduler, warmup_cosine

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


# ---------------------------------------------------------------------------------------------- metrics
def test_retrieval_metrics_match_a_hand_computed_matrix_with_ties():
    # 4 captions x 4 videos, caption i describes video i. Hand-computed pessimistic ranks: 1 + the
    # number of OTHER candidates scoring at least as high as the right one.
    sim = torch.tensor([
        [0.9, 0.1, 0.2, 0.3],  # right 0.9, nothing >= -> t2v rank 1
        [0.5, 0.5, 0.1, 0.0],  # right 0.5 tied with video 0 -> rank 2 (ties never help)
        [0.7, 0.8, 0.6, 0.6],  # right 0.6: videos 0, 1 higher, video 3 tied -> rank 4
        [0.0, 0.0, 0.0, 0.1],  # right 0.1 -> rank 1
    ])
    t2v = [1, 2, 4, 1]
    # video to text, by column: video 0 right 0.9 -> 1; video 1 right 0.5 vs (0.1, 0.8, 0.0) -> 2;
    # video 2 right 0.6 vs (0.2, 0.1, 0.0) -> 1; video 3 right 0.1 vs (0.3, 0.0, 0.6) -> 3
    v2t = [1, 2, 1, 3]
    m = retrieval_metrics(sim, torch.arange(4))
    for prefix, ranks in (("t2v", t2v), ("v2t", v2t)):
        r = torch.tensor(ranks, dtype=torch.float64)
        assert m[f"{prefix}_r1"] == pytest.approx(100 * float((r <= 1).double().mean()))
        assert m[f"{prefix}_r5"] == pytest.approx(100.0)
        assert m[f"{prefix}_mean_rank"] == pytest.approx(float(r.mean()))
        assert m[f"{prefix}_median_rank"] == pytest.approx(float(sorted(ranks)[1] + sorted(ranks)[2]) / 2)
    assert m["t2v_r1"] == 50.0 and m["v2t_r1"] == 50.0


def test_all_equal_scores_rank_last_not_first():
    m = retrieval_metrics(torch.zeros(5, 5), torch.arange(5))
    assert m["t2v_r1"] == 0.0 and m["t2v_median_rank"] == 5.0 and m["v2t_mean_rank"] == 5.0


def test_retrieval_metrics_with_several_captions_per_video():
    # captions 0, 1 -> video 0; caption 2 -> video 1
    sim = torch.tensor([[0.2, 0.9], [0.8, 0.1], [0.3, 0.4]])
    m = retrieval_metrics(sim, torch.tensor([0, 0, 1]))
    # t2v: caption 0 -> rank 2, caption 1 -> 1, caption 2 -> 1
    assert m["t2v_r1"] == pytest.approx(200 / 3) and m["t2v_mean_rank"] == pytest.approx(4 / 3)
    # v2t: video 0's best own caption 0.8; other captions >= 0.8: none -> 1.
    # video 1's caption 0.4; other captions 0.9 (caption 0) -> rank 2
    assert m["v2t_r1"] == 50.0 and m["v2t_mean_rank"] == 1.5
    with pytest.raises(ValueError, match="at least one caption"):
        retrieval_metrics(sim, torch.tensor([0, 0, 0]))


def test_recognition_metrics_by_hand():
    logits = torch.tensor([
        [3.0, 1.0, 0.0, 0.0, 0.0, 0.0],  # label 0 -> rank 1
        [2.0, 2.0, 0.0, 0.0, 0.0, 0.0],  # label 1 tied with 0 -> rank 2
        [5.0, 4.0, 3.0, 2.0, 1.0, 0.0],  # label 5 -> rank 6
        [0.0, 0.0, 1.0, 0.0, 0.0, 0.0],  # label 2 -> rank 1
    ])
    labels = torch.tensor([0, 1, 5, 2])
    assert ranks_of(logits, labels).tolist() == [1, 2, 6, 1]
    m = recognition_metrics(logits, labels)
    assert m["top1"] == 50.0 and m["top5"] == 75.0
    assert m["mean_class_acc"] == pytest.approx(100 * (1 + 0 + 0 + 1) / 4)
    assert m["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits.double(), labels)))
    m = recognition_metrics(logits[:2], torch.tensor([0, 0]))  # one class: ranks 1 and 2 (a tie) -> 50%
    assert m["mean_class_acc"] == 50.0 and m["top1"] == 50.0


# ---------------------------------------------------------------------------------------------- schedule
def test_warmup_then_cosine():
    total, warm = 100, 10
    assert warmup_cosine(0, total, warm) == pytest.approx(0.1)
    assert warmup_cosine(9, total, warm) == pytest.approx(1.0)
    assert warmup_cosine(10, total, warm) == pytest.approx(1.0)
    assert warmup_cosine(55, total, warm) == pytest.approx(0.5)
    assert warmup_cosine(100, total, warm) == pytest.approx(0.0)
    p = [torch.nn.Parameter(torch.zeros(3))]
    opt = build_optimizer(p, TrainConfig())
    assert opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["eps"] == 1e-6
    assert opt.defaults["weight_decay"] == 0.2 and opt.defaults["lr"] == 1e-3
    sched = build_scheduler(opt, 20, 0.1)
    lrs = []
    for _ in range(20):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(5e-4) and lrs[1] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:])) and lrs[-1] < 1e-5


# ---------------------------------------------------------------------------------------------- config
def test_defaults_are_specs():
    c = TrainConfig()
    assert (c.lr, c.betas, c.eps, c.weight_decay, c.warmup, c.grad_clip) == (1e-3, (0.9, 0.98), 1e-6, 0.2, 0.1, 1.0)
    assert (c.epochs, c.batch_size, c.stop.num_frames, c.stop.k, c.stop.rho, c.stop.alpha, c.stop.beta) == \
        (5, 128, 12, 6, 12, 0.4, 4.0)


@pytest.mark.parametrize("field, value", [
    ("lr", 0.0), ("batch_size", 0), ("warmup", 1.0), ("decoder", "ffmpeg"), ("eval_crops", 2), ("betas", (0.9,)),
    ("dataset", "imagenet"), ("precision", "fp16"), ("flip", "yes"), ("accumulation", 0), ("gelu", "tanh"),
    ("stop.num_frames", 2.5), ("stop.rho", -1),
])
def test_bad_settings_name_the_field(field, value):
    if field.startswith("stop."):
        with pytest.raises(ValueError, match=f"^stop: {field[5:]} "):
            TrainConfig(stop={field[5:]: value})
        return
    with pytest.raises(ValueError, match=f"^{field} "):
        TrainConfig(**{field: value})


def test_toml_files_and_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('dataset = "csv"\nvideo_root = "/x"\nepochs = 3\nbetas = [0.8, 0.9]\n')
    c = load_config(str(path), epochs=7, lr=None)
    assert c.epochs == 7 and c.betas == (0.8, 0.9) and c.lr == 1e-3  # flags win, None leaves the file's value
    path.write_text("epohcs = 3\n")
    with pytest.raises(ValueError, match="unknown setting.*epohcs"):
        load_config(str(path))
    path.write_text("epochs = \n")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_config(str(path))
    path.write_text("epochs = -1\n")
    with pytest.raises(ValueError, match=r"run.toml: epochs must be >= 1"):
        load_config(str(path))


def test_the_model_is_a_stop_table_and_flat_model_keys_of_old_files_still_read(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('dataset = "csv"\nepochs = 3\n[stop]\nmodel_name = "stop-tiny"\nk = 2\n')
    c = load_config(str(path), stop={"rho": 4, "k": None})
    assert (c.stop.model_name, c.stop.k, c.stop.rho, c.epochs) == ("stop-tiny", 2, 4, 3)
    path.write_text('dataset = "csv"\nmodel = "stop-tiny"\nframes = 5\nk = 2\n')  # stop_fast 0.1.0's keys
    with pytest.warns(UserWarning, match="model, frames, k are read as \\[stop\\] settings"):
        c = load_config(str(path))
    assert (c.stop.model_name, c.stop.num_frames, c.stop.k) == ("stop-tiny", 5, 2)
    path.write_text('[stop]\nkay = 2\n')
    with pytest.raises(ValueError, match="run.toml: stop: unknown STOPConfig field.*kay"):
        load_config(str(path))


def test_config_files_hold_the_papers_settings():
    names = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(CONFIGS, "*.toml")))
    assert names == sorted(d for d in DATASETS if d != "csv")
    for name in names:
        c = load_config(os.path.join(CONFIGS, f"{name}.toml"))
        assert c.dataset == name
        assert (c.lr, c.betas, c.eps, c.weight_decay, c.warmup, c.grad_clip, c.epochs, c.batch_size) == \
               (1e-3, (0.9, 0.98), 1e-6, 0.2, 0.1, 1.0, 5, 128)
        assert (c.stop.model_name, c.stop.k, c.stop.rho, c.stop.alpha, c.stop.beta) == ("ViT-B-32", 6, 12, 0.4, 4.0)
        assert c.use_flip == (name in ("ucf101", "hmdb51", "kinetics400"))
        assert c.stop.num_frames == (64 if name in ("didemo", "activitynet") else 12)
        if c.dataset_default("task") == "retrieval":
            assert c.text_tokens == (32 if name in ("msrvtt", "vatex") else 64)
    assert read_toml(os.path.join(CONFIGS, "didemo.toml"))["grad_checkpointing"] is True


def test_flip_defaults_per_dataset():
    assert TrainConfig(dataset="ssv2", flip=True).use_flip is True  # the flag is the user's explicit choice
    assert TrainConfig(dataset="ssv2").use_flip is False
    assert TrainConfig(dataset="ucf101").use_flip is True
    assert TrainConfig(dataset="csv").use_flip is False
    assert TrainConfig(dataset="csv", flip=True).use_flip is True
    assert TrainConfig(dataset="ucf101", flip=False).use_flip is False


# ---------------------------------------------------------------------------------------------- checkpoints
class _Saver:
    def __init__(self, fail=False):
        self.fail = fail

    def save_prompts(self, path):
        with open(path, "wb") as f:
            f.write(b"weights")
        if self.fail:
            raise OSError("disk full")


def test_atomic_checkpoints_leave_nothing_behind_on_error(tmp_path):
    folder = str(tmp_path / "ck")
    with pytest.raises(OSError, match="disk full"):
        ckpt.save(folder, 3, _Saver(fail=True), {}, keep=2)
    assert os.listdir(folder) == [] and ckpt.latest(folder) is None
    for step in (1, 2, 3):
        ckpt.save(folder, step, _Saver(), {"epoch": 0}, keep=2)
    assert sorted(os.listdir(folder)) == ["step-00000002.pt", "step-00000002.safetensors",
                                          "step-00000003.pt", "step-00000003.safetensors"]
    assert ckpt.latest(folder).endswith("step-00000003.pt")
    assert ckpt.load(ckpt.latest(folder))["epoch"] == 0
    # a state file whose weights half is missing is not a checkpoint
    os.unlink(os.path.join(folder, "step-00000003.safetensors"))
    assert ckpt.latest(folder).endswith("step-00000002.pt")


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "step-00000001.pt"
    bad.write_bytes(b"garbage" * 100)
    with pytest.raises(ValueError, match="not a readable stop_fast training checkpoint"):
        ckpt.load(str(bad))
    torch.save({"hello": 1}, str(bad))
    with pytest.raises(ValueError, match="not a stop_fast training checkpoint"):
        ckpt.load(str(bad))
    with pytest.raises(FileNotFoundError):
        ckpt.resolve_prompts(str(tmp_path))


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = ckpt.rng_state()
    a = (torch.rand(3), random.random(), np.random.rand())
    ckpt.set_rng_state(state)
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


# ---------------------------------------------------------------------------------------------- one step
def test_one_optimiser_step_changes_only_trainable_parameters():
    from helpers import make_stop

    from stop_fast.train import distributed
    from stop_fast.train.loop import micro_step, optimiser_step
    from stop_fast.train.setup import autocast_for
    from stop_fast.train.tasks import RecognitionTask

    model = make_stop("stop-tiny", num_frames=3)
    autocast = autocast_for(torch.device("cpu"), "fp32")
    task = RecognitionTask(model, ["left", "right", "up"], "a video of a person doing {}", autocast)
    params = list(model.trainable_parameters())
    frozen = {k: v.clone() for k, v in model.clip.state_dict().items()}
    before = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    optimizer = build_optimizer(params, TrainConfig())
    scheduler = build_scheduler(optimizer, 10, 0.0)
    gen = torch.Generator().manual_seed(1)
    batch = {"video": torch.randn(2, 3, 3, model.image_size, model.image_size, generator=gen),
             "target": torch.tensor([0, 2])}
    loss = micro_step(lambda v: model.encode_video(v, check_inputs=False), task, batch, autocast, distributed.Dist())
    assert math.isfinite(float(loss))
    assert all(p.grad is not None for p in params)
    assert all(p.grad is None for p in model.clip.parameters())
    optimiser_step(params, optimizer, scheduler, grad_clip=1.0)
    after = model.trainable_state_dict()
    for k, v in model.clip.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    # the zero-initialised last layers move at step 1 (SPEC.md), and weight decay moves the rest
    assert not torch.equal(after["prompter_intra.up.weight"], before["prompter_intra.up.weight"])
    assert not torch.equal(after["prompter_inter.up.weight"], before["prompter_inter.up.weight"])
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in params}


# ---------------------------------------------------------------------------------------------- evaluation plumbing
def test_encode_loader_averages_views_and_restores_dataset_order():
    """Batches arrive sharded and padded (index -1), with failed videos marked invalid; multi-view
    batches (B, views, T, ...) are encoded view by view and averaged, then L2-normalised."""
    import contextlib

    from stop_fast.train import distributed
    from stop_fast.train.evaluation import encode_loader

    gen = torch.Generator().manual_seed(0)
    views, size = 3, 5
    videos = torch.randn(size, views, 2, 3, 4, 4, generator=gen)
    weight = torch.randn(3 * 4 * 4, 6, generator=gen)

    def encoder(video):  # (N, T, 3, 4, 4) -> (N, 6), normalised like encode_video
        return torch.nn.functional.normalize(video.mean(1).flatten(1) @ weight, dim=-1)

    order = [3, 0, 4, 1, 2, -1]  # a shuffled dataset and one padding entry
    batches = []
    for k in range(0, len(order), 2):
        idx = torch.tensor(order[k : k + 2])
        video = torch.stack([videos[i] if i >= 0 else torch.zeros_like(videos[0]) for i in idx.tolist()])
        batches.append({"video": video, "index": idx, "valid": (idx >= 0) & (idx != 4)})
    features, valid = encode_loader(encoder, batches, size, distributed.Dist(), torch.device("cpu"),
                                    contextlib.nullcontext, views=views)
    for i in range(size):
        expected = torch.nn.functional.normalize(encoder(videos[i]).mean(0), dim=-1)
        torch.testing.assert_close(features[i], expected)
    assert valid.tolist() == [True, True, True, True, False]


def test_retrieval_evaluation_leaves_out_undecodable_videos_and_their_captions():
    from stop_fast.train.tasks import Captions, RetrievalTask

    gen = torch.Generator().manual_seed(0)
    videos = torch.nn.functional.normalize(torch.randn(3, 8, generator=gen), dim=-1)
    caps = Captions.__new__(Captions)
    caps.counts = torch.tensor([2, 1, 1])  # video 0 has two captions
    caps.offsets = torch.tensor([0, 2, 3])
    caps.features = torch.nn.functional.normalize(torch.randn(4, 8, generator=gen), dim=-1)
    task = RetrievalTask.__new__(RetrievalTask)
    task.val_captions = caps
    valid = torch.tensor([True, False, True])
    got = task.evaluate(videos, valid)
    keep = [0, 1, 3]  # the captions of videos 0 and 2
    expected = retrieval_metrics(caps.features[keep] @ videos[[0, 2]].T, torch.tensor([0, 0, 1]))
    assert got == expected


# ---------------------------------------------------------------------------------------------- dataset conventions
@pytest.mark.parametrize("name, words", [
    ("ApplyEyeMakeup", "apply eye makeup"), ("YoYo", "yo yo"), ("HandstandPushups", "handstand pushups"),
    ("brush_hair", "brush hair"), ("fall_floor", "fall floor"),
    ("Pushing [something] from left to right", "pushing something from left to right"),
    ("air drumming", "air drumming"), ("petting animal (not cat)", "petting animal (not cat)"),
])
def test_class_names_become_words(name, words):
    from stop_fast.train.tasks import class_texts, class_words

    assert class_words(name) == words
    assert class_texts([name], "a video of {}", "words") == [f"a video of {words}"]
    assert class_texts([name], "a video of {}", "raw") == [f"a video of {name}"]


def test_class_name_and_caption_defaults_per_dataset_and_for_old_runs():
    from stop_fast.train.config import read_run_record

    assert TrainConfig(dataset="ucf101").resolved(False).class_names == "words"
    assert TrainConfig(dataset="csv").resolved(False).class_names == "raw"
    assert TrainConfig(dataset="csv", class_names="words").resolved(False).class_names == "words"
    assert TrainConfig(dataset="msrvtt").resolved(False).train_captions == "all"
    assert TrainConfig(dataset="vatex").resolved(False).train_captions == "one"
    old = read_run_record({"dataset": "hmdb51", "model": "ViT-B-32", "k": 6}, "config.json")  # stop_fast 0.1.0's
    assert old.class_names == "raw" and old.train_captions == "one"  # what those runs trained with
    assert TrainConfig().resolved(False).workers <= max(1, len(os.sched_getaffinity(0)))


def test_every_caption_a_pair_and_pairs_of_one_video_are_not_each_others_negatives():
    """Symmetric InfoNCE with two pairs of one video in the batch: their cross terms leave both
    softmaxes; every other pair's loss is the plain one. Checked against float64 by hand."""
    from stop_fast.data import Sample, VideoDataset
    from stop_fast.train import distributed
    from stop_fast.train.tasks import Captions, RetrievalTask, caption_pairs

    videos = VideoDataset("msrvtt", "train", [Sample("a.mp4", captions=("a dog", "a puppy")),
                                              Sample("b.mp4", captions=("a cat",))], task="retrieval")
    pairs = caption_pairs(videos)
    assert [(s.path, s.captions) for s in pairs.samples] == [("a.mp4", ("a dog",)), ("a.mp4", ("a puppy",)),
                                                              ("b.mp4", ("a cat",))]
    gen = torch.Generator().manual_seed(0)
    caps = Captions.__new__(Captions)
    caps.features = torch.nn.functional.normalize(torch.randn(3, 8, generator=gen), dim=-1)
    caps.video = torch.tensor([0, 0, 1])
    task = RetrievalTask.__new__(RetrievalTask)
    task.train_captions = caps
    features = torch.nn.functional.normalize(torch.randn(3, 8, generator=gen), dim=-1)
    loss = task.loss(features, {"target": torch.tensor([0, 1, 2])}, distributed.Dist())
    logits = (100 * features.double() @ caps.features.double().T)
    allowed = ~torch.tensor([[False, True, False], [True, False, False], [False, False, False]])
    rows = [-(logits[i, i] - torch.logsumexp(logits[i][allowed[i]], 0)) for i in range(3)]
    cols = [-(logits[i, i] - torch.logsumexp(logits[:, i][allowed[:, i]], 0)) for i in range(3)]
    expected = 0.5 * (torch.stack(rows).mean() + torch.stack(cols).mean())
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_cli_version_help_layout_and_ansi_free_errors(capsys):
    from stop_fast.cli import _user_error_message, main

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"stop-fast {stop_fast.__version__}" == "stop-fast 0.2.0"
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "\n    stop-fast eval --checkpoint runs/hmdb51\n" in capsys.readouterr().out  # examples keep their lines
    assert _user_error_message(ValueError("\x1b[31mbad\x1b[0m file")) == "bad file"
