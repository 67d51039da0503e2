"""The CPU loader: epochs cover every sample once per rank, reshuffle, and survive corrupt files."""
import logging

import pytest
import torch

from stop_fast.data.datasets import Sample, VideoDataset
from stop_fast.data.loader import PADDING, ShardedSampler, VideoLoader

from data_fixtures import write_video


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    samples = []
    for i in range(5):
        path = write_video(root / f"v{i}.mp4", num_frames=12 + i, width=40, height=32)
        samples.append(Sample(str(path), label=i % 2))
    bad = root / "broken.mp4"
    bad.write_bytes(b"not a video at all" * 50)
    samples.append(Sample(str(bad), label=1))
    return VideoDataset("fixture", "train", samples, classes=["a", "b"])


def test_sampler_shards_evaluation_exactly_once_with_padding():
    seen = []
    for rank in range(3):
        s = ShardedSampler(10, batch_size=2, mode="eval", rank=rank, world_size=3)
        idx = list(s)
        assert len(idx) == 4  # ceil(10 / 3) = 4 per rank, whole batches of 2: equal batch counts
        seen += [i for i in idx if i != PADDING]
    assert sorted(seen) == list(range(10))


def test_sampler_training_is_seeded_reshuffled_and_disjoint_across_ranks():
    a = [list(ShardedSampler(12, 2, "train", r, 3, seed=5)) for r in range(3)]
    assert sorted(sum(a, [])) == list(range(12))  # disjoint, covering
    assert all(len(x) == 4 for x in a)
    s = ShardedSampler(12, 2, "train", 0, 1, seed=5)
    first = list(s)
    s.set_epoch(1)
    assert list(s) != first and sorted(list(s)) == list(range(12))
    assert list(ShardedSampler(12, 2, "train", 0, 1, seed=5)) == first
    with pytest.raises(ValueError, match="rank"):
        ShardedSampler(12, 2, "train", 3, 3)


def test_evaluation_epoch_reports_bad_files_and_completes(small_dataset, caplog):
    loader = VideoLoader(small_dataset, num_frames=4, batch_size=4, size=32, mode="eval", num_workers=0)
    with caplog.at_level(logging.WARNING, logger="stop_fast.data.loader"):
        batches = list(loader)
    assert len(batches) == 2
    valid = torch.cat([b["valid"] for b in batches])
    index = torch.cat([b["index"] for b in batches])
    assert batches[0]["video"].shape == (4, 4, 3, 32, 32)
    assert sorted(index[valid].tolist()) == [0, 1, 2, 3, 4]  # every readable sample once
    assert 5 in index.tolist() and not valid[index == 5].any()  # the broken one, reported invalid
    assert loader.stats == {"clips": 5, "failures": 1}
    assert "broken.mp4" in caplog.text


def test_training_replaces_bad_files_and_is_deterministic(small_dataset):
    def epoch(seed, e):
        loader = VideoLoader(small_dataset, num_frames=4, batch_size=3, size=32, mode="train", seed=seed, num_workers=0)
        loader.set_epoch(e)
        batches = list(loader)
        return batches, loader.stats

    batches, stats = epoch(0, 0)
    assert len(batches) == 2 and all(b["valid"].all() for b in batches)
    assert all(5 not in b["index"].tolist() for b in batches)  # the broken file was replaced
    again, _ = epoch(0, 0)
    for a, b in zip(batches, again):
        torch.testing.assert_close(a["video"], b["video"], rtol=0, atol=0)
    other, _ = epoch(0, 1)
    assert any(not torch.equal(a["index"], b["index"]) or not torch.equal(a["video"], b["video"]) for a, b in zip(batches, other))
    assert stats["clips"] == 6


def test_worker_processes_give_the_same_batches(small_dataset):
    ref = list(VideoLoader(small_dataset, 4, 3, size=32, mode="eval", num_workers=0))
    par = list(VideoLoader(small_dataset, 4, 3, size=32, mode="eval", num_workers=2))
    for a, b in zip(ref, par):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["video"], b["video"])


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_ranks_get_disjoint_shares_and_equal_batch_counts(small_dataset, mode):
    shares, counts = [], []
    for rank in range(2):
        loader = VideoLoader(small_dataset, num_frames=2, batch_size=2, size=16, mode=mode, seed=3, rank=rank,
                             world_size=2, num_workers=0)
        loader.set_epoch(1)
        batches = list(loader)
        counts.append(len(batches))
        index = torch.cat([b["index"] for b in batches])
        assert all(b["video"].shape == (2, 2, 3, 16, 16) for b in batches)
        shares.append([i for i in index.tolist() if i != PADDING])
    assert counts[0] == counts[1] == (2 if mode == "eval" else 1)  # training drops the partial batch
    if mode == "eval":  # every sample exactly once over the ranks (the broken one reported, not dropped)
        assert sorted(shares[0] + shares[1]) == list(range(6)) and not set(shares[0]) & set(shares[1])
    else:  # the broken file (5) was replaced, so the shares may meet only in its replacement
        assert 5 not in shares[0] + shares[1] and len(set(shares[0]) & set(shares[1])) <= 1


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_an_unexpected_error_in_one_sample_does_not_end_the_epoch(small_dataset, mode, monkeypatch, caplog):
    from stop_fast.data import loader as loader_module

    real = loader_module.read_video_clip

    def flaky(path, *args, **kwargs):  # a bug or an odd file raising something other than VideoDecodeError
        if path.endswith("v2.mp4"):
            raise ValueError("all the input array dimensions except for the concatenation axis must match")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(loader_module, "read_video_clip", flaky)
    loader = VideoLoader(small_dataset, num_frames=2, batch_size=3, size=16, mode=mode, num_workers=0)
    with caplog.at_level(logging.WARNING, logger="stop_fast.data.loader"):
        batches = list(loader)
    index = torch.cat([b["index"] for b in batches])
    valid = torch.cat([b["valid"] for b in batches])
    assert "v2.mp4 (unexpected ValueError: all the input array" in caplog.text
    if mode == "eval":
        assert index.tolist() == [0, 1, 2, 3, 4, 5] and valid.tolist() == [True, True, False, True, True, False]
        assert loader.stats == {"clips": 4, "failures": 2}
    else:
        assert valid.all() and not {2, 5} & set(index.tolist()) and loader.stats["failures"] >= 1


def test_a_resolution_change_mid_stream_is_a_valid_clip(tmp_path):
    from stop_fast.data.datasets import Sample, VideoDataset

    from data_fixtures import write_resolution_change

    path = write_resolution_change(tmp_path / "capture.ts")
    ds = VideoDataset("fixture", "test", [Sample(str(path), 0)], classes=["a"])
    loader = VideoLoader(ds, num_frames=8, batch_size=1, size=24, mode="eval", num_workers=0)
    (batch,) = list(loader)
    assert batch["valid"].all() and batch["video"].shape == (1, 8, 3, 24, 24) and loader.stats["failures"] == 0
