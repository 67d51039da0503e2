"""`stop-fast index` / `stop-fast search` and ``stop_fast.index`` on tiny generated clips (stop-tiny,
random frozen backbone, CPU): search ranks as `predict --text` does, a killed build resumes to the
same index, updates encode only what changed, undecodable videos are named and not retried, other
models are refused naming the field, a search during a publish sees one index, torchrun shards the
work, and every user mistake is one line."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from helpers import make_stop
from train_fixtures import make_dataset, write_clip

from stop_fast import cli
from stop_fast.index import IndexMismatchError, VideoIndex, build_index, top_k, videos_in_folder
from stop_fast.index import store
from stop_fast.train import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTION = "a square moves left"
TOL = 2e-3  # fp16 storage of unit features: a score moves by less than this


def config(**kw) -> TrainConfig:
    return TrainConfig(stop={"model_name": "stop-tiny", "num_frames": 3}, workers=0, device="cpu", **kw)


def build(out, folder, checkpoint=None, **kw):
    """The library's model (or the index's own, without a checkpoint), small batches and shards so
    that a handful of videos spans several of each."""
    kw = {"batch_size": 2, "progress": False, "shard_rows": 2, "work_rows": 2, **kw}
    return build_index(str(out), videos_in_folder(str(folder)), config(), checkpoint, **kw)


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """Six clips and an undecodable file in ``videos/``, and two prompt files of stop-tiny (seed-0
    random backbone), trained prompts stood in for by random prompter weights."""
    root = str(tmp_path_factory.mktemp("library"))
    make_dataset(root, per_class=3, classes=2, corrupt="videos/broken.mp4")
    make_stop(randomize=True, num_frames=3, seed=0).save_prompts(os.path.join(root, "prompts.safetensors"))
    make_stop(randomize=True, num_frames=3, seed=1).save_prompts(os.path.join(root, "other.safetensors"))
    return root


def videos(library) -> str:
    return os.path.join(library, "videos")


def prompts(library, name="prompts") -> str:
    return os.path.join(library, f"{name}.safetensors")


def good_videos(library):
    return [p for p in videos_in_folder(videos(library)) if not p.endswith("broken.mp4")]


@pytest.fixture(scope="module")
def indexed(library, tmp_path_factory):
    """The library indexed in one uninterrupted build (read-only for the tests)."""
    out = tmp_path_factory.mktemp("indexed") / "lib.idx"
    result = build(out, videos(library), prompts(library))
    assert result["videos"] == 6 and result["encoded"] == 6 == result["encoded_now"] - 1  # + the broken file
    return str(out)


def answers(folder, caption=CAPTION):
    return VideoIndex.open(folder, device="cpu").search_text(caption, top=100)


# ---------------------------------------------------------------------------------------------- search
def test_search_ranks_the_videos_as_predict_text_does(library, indexed, capsys):
    assert cli.main(["search", indexed, CAPTION, "--top", "4", "--json", "--device", "cpu"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["videos"] == 6 and found["query"] == {"text": CAPTION} and len(found["results"]) == 4
    assert cli.main(["predict", *good_videos(library), "--checkpoint", prompts(library), "--text", CAPTION,
                     "--json", "--device", "cpu"]) == 0
    predicted = {os.path.abspath(r["video"]): r["similarity"] for r in json.loads(capsys.readouterr().out)["ranking"]}
    hits = [(r["path"], r["score"]) for r in found["results"]]
    assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)
    for path, score in hits:  # the same scores, up to fp16 storage (and predict's 4 decimals)
        assert abs(score - predicted[path]) <= TOL, (path, score, predicted[path])
    chosen = {p for p, _ in hits}
    for a, _ in hits:  # the top K are predict's top K, up to ties within the tolerance
        assert all(predicted[a] >= predicted[b] - TOL for b in predicted if b not in chosen)
    for (a, _), (b, _) in zip(hits, hits[1:]):  # in predict's order, up to such ties
        assert predicted[a] >= predicted[b] - TOL
    spread = max(predicted.values()) - min(predicted.values())
    assert spread > 3 * TOL  # the ranking is not all ties: the order checks above can fail


def test_search_by_video_finds_the_video_itself_first(library, indexed, capsys):
    query = good_videos(library)[0]
    hits = VideoIndex.open(indexed, device="cpu").search_video(query, top=3)
    assert hits[0].path == query and abs(hits[0].score - 1.0) <= TOL and hits[0].score > hits[1].score
    assert cli.main(["search", indexed, "--video", query, "--top", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"top 2 of 6 videos for videos like {query}" and out[1].endswith(query)


def test_multi_view_rows_are_the_averaged_views_a_query_video_gets(library, tmp_path):
    clips, out = tmp_path / "clips", str(tmp_path / "lib.idx")
    clips.mkdir()
    for name in ("left_0.mp4", "right_0.mp4", "broken.mp4"):
        shutil.copy2(os.path.join(videos(library), name), clips / name)
    result = build_index(out, videos_in_folder(str(clips)), config(eval_clips=2, eval_crops=3), prompts(library),
                         batch_size=2, progress=False)
    assert result["videos"] == 2 and [f["path"] for f in result["failed"]] == [str(clips / "broken.mp4")]
    index = VideoIndex.open(out, device="cpu")
    assert index.manifest["provenance"]["fingerprint"]["views"] == [2, 3]
    for row, path in enumerate(index.paths):  # the loader's 6 views averaged = the query path's 6 views averaged
        assert (index.features[row] - index.encode_video(path)[0]).abs().max() < 1e-3
    from stop_fast.train.inference import video_features
    from stop_fast.train.setup import model_from_checkpoint

    model, one_view = model_from_checkpoint(config().resolved(False), prompts(library), torch.device("cpu"))
    centre = video_features(model, one_view, torch.device("cpu"), index.paths[:1])[0]
    assert (index.features[0] - centre).abs().max() > 2e-3  # and not what the centre view alone gives


def test_top_k_orders_equal_scores_by_row_across_chunks():
    gen = torch.Generator().manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(50, 8, generator=gen), dim=-1)
    features[[3, 17, 40]] = features[9].clone()  # four equal rows, the best match of the query below
    features[[5, 6]] = -features[9]
    features = features.half()
    query = features[9].float()[None]
    scores, rows = top_k(features, query, 6, chunk_rows=7)
    assert rows[0].tolist()[:4] == [3, 9, 17, 40] and torch.equal(scores[0, :4], scores[0, :1].expand(4))
    exact = features.float() @ query[0]
    order = sorted(range(50), key=lambda i: (-float(exact[i]), i))
    assert rows[0].tolist() == order[:6] and torch.equal(scores[0], exact[order[:6]])
    scores, rows = top_k(features, -query, 2, chunk_rows=3)  # negative scores, ties again
    assert rows[0].tolist() == [5, 6]
    with pytest.raises(ValueError, match="top"):
        VideoIndex("x", {"embed_dim": 8}, store.Rows.empty(8), torch.device("cpu")).search(query, top=0)


def test_videos_come_from_a_folder_a_csv_or_a_dataset(library, tmp_path, caplog):
    from stop_fast.index import videos_in_csv, videos_in_dataset

    every = videos_in_folder(library)  # any depth, video suffixes only (not the CSVs or prompt files)
    assert every == videos_in_folder(videos(library)) and len(every) == 7 and every == sorted(every)
    assert videos_in_csv(os.path.join(library, "val.csv")) == good_videos(library)  # relative to the CSV
    assert videos_in_dataset("csv", library, "val") == good_videos(library)
    assert videos_in_dataset("csv", library) == every  # train (with the broken file) and val, once each
    os.makedirs(tmp_path / "only-train")
    shutil.copy(os.path.join(library, "train.csv"), tmp_path / "only-train" / "train.csv")
    assert len(videos_in_dataset("csv", str(tmp_path / "only-train"))) == 7  # the missing val split is said
    assert "the csv split is left out of the index: val" in caplog.text


# ---------------------------------------------------------------------------------------------- resume
def test_a_build_killed_after_a_work_shard_resumes_to_the_same_index(library, indexed, tmp_path, monkeypatch):
    out = tmp_path / "lib.idx"
    real = store.write_work_shard

    def write_then_die(*args, **kwargs):
        real(*args, **kwargs)
        raise RuntimeError("killed after a work shard")

    monkeypatch.setattr(store, "write_work_shard", write_then_die)
    with pytest.raises(RuntimeError, match="killed"):
        build(out, videos(library), prompts(library))
    monkeypatch.undo()
    assert not store.has_manifest(str(out)) and len(store.work_shards(str(out))) == 1
    resumed = build(out, videos(library), prompts(library))
    assert resumed["encoded_now"] == 7 - 2 and resumed["encoded"] == 6  # two files came from the work shard
    assert store.work_shards(str(out)) == []
    with open(out / "index.json", "rb") as a, open(os.path.join(indexed, "index.json"), "rb") as b:
        assert a.read() == b.read()  # the same shard names: the same bytes (names are their sha256)
    for shard in store.read_manifest(str(out))["shards"]:
        with open(out / shard["file"], "rb") as a, open(os.path.join(indexed, shard["file"]), "rb") as b:
            assert a.read() == b.read()
    assert answers(str(out)) == answers(indexed)


def test_a_build_killed_by_sigkill_resumes_to_the_same_answers(library, indexed, tmp_path):
    """A real kill (no clean-up, the lock released by the kernel) after the first work shard."""
    out = str(tmp_path / "lib.idx")
    script = tmp_path / "die.py"
    script.write_text(
        "import functools, os, signal, sys\n"
        "from stop_fast.index import build, store\n"
        "real = store.write_work_shard\n"
        "def write_then_die(*a, **k):\n"
        "    real(*a, **k)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "store.write_work_shard = write_then_die\n"
        "build.build_index = functools.partial(build.build_index, work_rows=2)\n"
        "from stop_fast.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    argv = ["index", videos(library), "--checkpoint", prompts(library), "--out", out, "--workers", "0",
            "--batch-size", "2", "--device", "cpu", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=str(torch.get_num_threads()))  # the same threads: the same rounding
    run = subprocess.run([sys.executable, str(script), *argv], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    assert len(store.work_shards(out)) == 1 and not store.has_manifest(out)
    assert cli.main(argv) == 0
    assert answers(out) == answers(indexed)


# ---------------------------------------------------------------------------------------------- updates
def test_an_update_encodes_only_new_or_changed_files_and_drops_removed_ones(library, tmp_path):
    clips, out = tmp_path / "clips", tmp_path / "lib.idx"
    clips.mkdir()
    names = ["left_0.mp4", "left_1.mp4", "right_0.mp4", "right_1.mp4"]
    for name in names:
        shutil.copy2(os.path.join(videos(library), name), clips / name)
    first = build(out, clips, prompts(library))
    assert (first["encoded_now"], first["encoded"], first["videos"], first["generation"]) == (4, 4, 4, 1)
    shards = {s["file"]: os.stat(out / s["file"]).st_mtime_ns for s in store.read_manifest(str(out))["shards"]}
    same = build(out, clips)  # no checkpoint: the index's own model
    assert (same["encoded_now"], same["reused"], same["removed"], same["generation"]) == (0, 4, 0, 2)
    assert {s["file"]: os.stat(out / s["file"]).st_mtime_ns for s in store.read_manifest(str(out))["shards"]} == shards

    for name in ("left_2.mp4", "right_2.mp4"):  # two new files
        shutil.copy2(os.path.join(videos(library), name), clips / name)
    os.remove(clips / "left_0.mp4")  # one removed
    stamp = os.stat(clips / "right_1.mp4").st_mtime_ns
    shutil.copyfile(clips / "right_2.mp4", clips / "right_1.mp4")  # one changed: right_2's content now
    os.utime(clips / "right_1.mp4", ns=(stamp + 10**9, stamp + 10**9))
    before = VideoIndex.open(str(out), device="cpu")
    grown = build(out, clips, prompts(library))
    assert (grown["encoded_now"], grown["encoded"], grown["reused"], grown["removed"]) == (3, 3, 2, 2)
    index = VideoIndex.open(str(out), device="cpu")
    assert index.paths == videos_in_folder(str(clips)) and len(index) == 5
    assert not any(p.endswith("left_0.mp4") for p in index.paths)

    def row(ix, name):
        return ix.features[ix.paths.index(str(clips / name))]

    # the changed file was encoded again, from its new content (right_2's); the unchanged rows are the old ones
    assert torch.allclose(row(index, "right_1.mp4"), row(index, "right_2.mp4"), atol=1e-3)
    assert not torch.allclose(row(before, "right_1.mp4"), row(index, "right_1.mp4"), atol=1e-3)
    assert torch.equal(row(before, "left_1.mp4"), row(index, "left_1.mp4"))
    for name in os.listdir(out / "shards"):  # nothing left behind that no manifest names
        assert f"shards/{name}" in {s["file"] for s in index.manifest["shards"]}


def test_an_undecodable_video_is_named_counted_and_not_retried_while_unchanged(library, tmp_path, capsys):
    clips, out = tmp_path / "clips", str(tmp_path / "lib.idx")
    clips.mkdir()
    for name in ("left_0.mp4", "right_0.mp4", "broken.mp4"):
        shutil.copy2(os.path.join(videos(library), name), clips / name)
    argv = ["index", str(clips), "--checkpoint", prompts(library), "--out", out, "--workers", "0", "--device", "cpu",
            "--no-progress"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    broken = str(clips / "broken.mp4")
    assert "2 videos (2 new, 0 unchanged, 0 removed), 1 failed to decode" in printed
    assert f"failed: {broken}: not a readable video container" in printed
    assert cli.main(argv + ["--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["encoded_now"] == 0 and [f["path"] for f in again["failed"]] == [broken]  # not decoded again
    assert VideoIndex.open(out, device="cpu").failed[0]["reason"].startswith("not a readable video container")
    write_clip(broken, 1, seed=7)  # repaired: a new size and mtime, so it is tried again
    assert cli.main(argv + ["--json"]) == 0
    fixed = json.loads(capsys.readouterr().out)
    assert fixed["encoded_now"] == 1 and fixed["failed"] == [] and fixed["videos"] == 3


def test_an_index_refuses_other_prompts_backbones_and_settings_naming_the_field(library, indexed, tmp_path, capsys):
    with pytest.raises(IndexMismatchError, match="prompts_sha256"):
        build(indexed, videos(library), prompts(library, "other"))
    assert cli.main(["index", videos(library), "--checkpoint", prompts(library), "--frames", "4", "--out", indexed,
                     "--workers", "0", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "was made with frames 3, this model has 4" in err and "choose another --out" in err
    zero = tmp_path / "zero.idx"
    one = [videos_in_folder(videos(library))[0]]
    build_index(str(zero), one, config(), zero_shot=True, progress=False)
    with pytest.raises(IndexMismatchError, match="backbone 'random:0', this model has 'random:1'"):
        build_index(str(zero), one, config(seed=1), zero_shot=True, progress=False)
    assert store.read_manifest(str(zero))["generation"] == 1  # nothing was published


# ---------------------------------------------------------------------------------------------- readers
def test_a_search_during_a_publish_sees_the_old_index_or_the_new_one(library, tmp_path, monkeypatch):
    clips, out = tmp_path / "clips", str(tmp_path / "lib.idx")
    clips.mkdir()
    for name in ("left_0.mp4", "left_1.mp4", "right_0.mp4"):
        shutil.copy2(os.path.join(videos(library), name), clips / name)
    build(out, clips, prompts(library), shard_rows=10**6)  # one shard, which any change replaces
    old = VideoIndex.open(out, device="cpu")
    shutil.copy2(os.path.join(videos(library), "right_1.mp4"), clips / "right_1.mp4")
    real, seen, state = store.read_manifest, [], {"published": False}

    def read_then_publish(folder):
        manifest = real(folder)
        if not state["published"]:  # an update publishes between the reader's manifest and its shards
            state["published"] = True
            build(out, clips, prompts(library), shard_rows=10**6)
        seen.append(manifest["generation"])
        return manifest

    monkeypatch.setattr(store, "read_manifest", read_then_publish)
    new = VideoIndex.open(out, device="cpu")
    assert seen[-2:] == [1, 2]  # it met the removed shard, read index.json again and loaded generation 2
    assert new.manifest["generation"] == 2 and new.paths == videos_in_folder(str(clips))
    assert len(old) == 3 and len(old.search_text(CAPTION, top=10)) == 3  # an open index keeps answering


# ---------------------------------------------------------------------------------------------- torchrun
def test_two_gloo_processes_index_like_one(library, indexed, tmp_path):
    out = str(tmp_path / "lib.idx")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                          "--nproc_per_node", "2", "-m", "stop_fast.cli", "index", videos(library), "--checkpoint",
                          prompts(library), "--out", out, "--workers", "0", "--batch-size", "2", "--device", "cpu",
                          "--no-progress", "--json"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout)  # rank 0 alone prints
    assert summary["videos"] == 6 and len(summary["failed"]) == 1 and summary["encoded_now"] == 4  # its share of 7
    two, one = VideoIndex.open(out, device="cpu"), VideoIndex.open(indexed, device="cpu")
    assert two.paths == one.paths and two.failed == one.failed
    assert torch.allclose(two.features, one.features, atol=TOL)
    assert [h.path for h in two.search_text(CAPTION, 6)] == [h.path for h in one.search_text(CAPTION, 6)]


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("argv, message", [
    (["search", "{tmp}/nowhere", "a dog"], "INDEX {tmp}/nowhere: no such folder"),
    (["search", "{videos}", "a dog"], "is not a stop_fast index (no index.json"),
    (["search", "{indexed}", "  "], "the caption is empty"),
    (["search", "{indexed}"], "give a caption (or --video FILE)"),
    (["search", "{indexed}", "a dog", "--top", "0"], "--top must be >= 1"),
    (["search", "{indexed}", "--video", "{tmp}/none.mp4"], "--video {tmp}/none.mp4: no such file"),
    (["index", "{tmp}/nowhere", "--zero-shot", "--out", "{tmp}/a"], "VIDEOS {tmp}/nowhere: no such file or folder"),
    (["index", "{tmp}", "--zero-shot", "--out", "{tmp}/a"], "no video files in this folder"),
    (["index", "{videos}", "--out", "{tmp}/a"], "holds no index yet: name the model, --checkpoint RUN or --zero-shot"),
    (["index", "{videos}", "--checkpoint", "{tmp}/none", "--out", "{tmp}/a"], "--checkpoint {tmp}/none: no such"),
    (["index", "--dataset", "csv", "--zero-shot", "--out", "{tmp}/a"], "--dataset needs --video-root"),
    (["index", "{videos}", "--out", "{indexed}", "--frames", "4"], "--frames: the index in"),
    (["index", "{videos}", "--zero-shot", "--out", "{library}"], "holds other files"),
])
def test_every_mistake_is_one_line_naming_the_argument(library, indexed, tmp_path, capsys, argv, message):
    fill = {"tmp": str(tmp_path), "videos": videos(library), "indexed": indexed, "library": library}
    assert cli.main([a.format(**fill) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message.format(**fill) in err, err
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(os.path.join(library, ".lock"))
