"""Decoding in processes forked after the parent decoded: DataLoader workers, `prepare`'s workers.

From PyAV 19 on, ``VideoFrame.to_ndarray(format=...)`` converts through one swscale context per
thread whose worker-thread pool does not survive ``fork``: a child that used it waited forever. The
readers convert through a private single-threaded scaler instead. The parent here poisons PyAV's
shared scaler on purpose, as any user code may; every child must still finish.

This file imports no torch at module level, so it also runs in a bare environment with another PyAV
release (e.g. Python 3.12 with av 19): ``pytest --noconftest -o addopts= tests/test_data_fork.py``.
"""
import multiprocessing
import os

import av
import numpy as np
import pytest

from stop_fast.data.pyav_reader import decode_frames

from data_fixtures import level, write_video

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX only")


def _poison_the_shared_scaler(path):
    """Decode and convert as PyAV's own helpers do, in this (the parent) process."""
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            frame.to_ndarray(format="rgb24")
            frame.reformat(width=32, height=24, format="rgb24")


def _levels(path, queue):
    frames, decoded = decode_frames(str(path), [0, 5, 11], size=24)
    queue.put((decoded, [round(float(f[12:].mean())) for f in frames]))


def _finish(context, target, args, what, timeout=120):
    """Run ``target`` in a forked child and return what it put in the queue (its last argument)."""
    child = context.Process(target=target, args=args)
    child.start()
    try:
        return args[-1].get(timeout=timeout)
    except Exception:
        pytest.fail(f"{what} hung or failed (PyAV {av.__version__})")
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()


def test_a_forked_child_decodes_after_the_parent_did(tmp_path):
    path = write_video(tmp_path / "clip.mp4", num_frames=12, width=64, height=48)
    _poison_the_shared_scaler(path)
    parent = decode_frames(str(path), [0, 5, 11], size=24)
    context = multiprocessing.get_context("fork")
    decoded, levels = _finish(context, _levels, (path, context.Queue()), "a forked child decoding", 60)
    assert decoded == 12 and len(parent[0]) == 3
    assert all(abs(got - level(i, 12)) < 6 for got, i in zip(levels, [0, 5, 11])), levels


def _prepare(argv, queue):
    import argparse

    from stop_fast.commands import prepare

    parser = argparse.ArgumentParser()
    prepare.add_arguments(parser)
    queue.put(prepare.run(parser.parse_args(argv)))


def test_prepare_workers_decode_after_the_parent_did(tmp_path):
    from stop_fast.data.prepare import read_manifest

    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(3):
        write_video(videos / f"v{i}.mp4", num_frames=6 + i, width=48, height=32)
    _poison_the_shared_scaler(videos / "v0.mp4")
    manifest = tmp_path / "m.jsonl"
    argv = ["--videos", str(videos), "--manifest", str(manifest), "--reencode-dir", str(tmp_path / "copies"),
            "--codec", "mjpeg", "--short-side", "32", "--workers", "2"]
    context = multiprocessing.get_context("fork")
    assert _finish(context, _prepare, (argv, context.Queue()), "prepare's workers") == 0
    records = read_manifest(str(manifest))
    assert sorted(r["frames"] for r in records.values()) == [6, 7, 8] and all(r["ok"] for r in records.values())


def test_dataloader_workers_decode_after_the_parent_did(tmp_path):
    pytest.importorskip("torch")
    from stop_fast.data.datasets import Sample, VideoDataset
    from stop_fast.data.loader import VideoLoader

    samples = [Sample(str(write_video(tmp_path / f"v{i}.mp4", num_frames=8 + i, width=40, height=32)), 0)
               for i in range(4)]
    _poison_the_shared_scaler(samples[0].path)
    ds = VideoDataset("fixture", "test", samples, classes=["a"])
    serial = list(VideoLoader(ds, 3, 2, size=16, mode="eval", num_workers=0))
    context = multiprocessing.get_context("fork")
    queue = context.Queue()

    def run(queue):
        batches = list(VideoLoader(ds, 3, 2, size=16, mode="eval", num_workers=2))
        queue.put([b["video"].numpy() for b in batches])

    parallel = _finish(context, run, (queue,), "DataLoader workers")
    assert len(parallel) == 2
    for a, b in zip(serial, parallel):
        np.testing.assert_array_equal(a["video"].numpy(), b)
