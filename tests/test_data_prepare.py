"""stop-fast prepare: probing, the manifest, resuming, re-encoding, and loaders skipping bad files."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from stop_fast.cli import main
from stop_fast.data import read_video_clip
from stop_fast.data.datasets import build_dataset
from stop_fast.data.manifest import exclude_bad, read_manifest
from stop_fast.data.prepare import probe_video

from data_fixtures import write_video


def _folder(tmp_path):
    videos = tmp_path / "videos"
    (videos / "a").mkdir(parents=True)
    write_video(videos / "a" / "one.mp4", num_frames=20, width=80, height=48)
    write_video(videos / "two.avi", num_frames=10, codec="mjpeg")
    (videos / "bad.mp4").write_bytes(b"\x00" * 500)
    return videos


def test_probe_reports_content_and_errors(tmp_path):
    videos = _folder(tmp_path)
    r = probe_video(str(videos / "a" / "one.mp4"))
    assert r["ok"] and r["frames"] == 20 and (r["width"], r["height"]) == (80, 48) and r["codec"] == "mpeg4"
    assert abs(r["fps"] - 12) < 1e-6
    bad = probe_video(str(videos / "bad.mp4"))
    assert not bad["ok"] and bad["error"]


def test_prepare_writes_a_manifest_and_resumes(tmp_path, capsys):
    videos = _folder(tmp_path)
    manifest = tmp_path / "out" / "manifest.jsonl"
    assert main(["prepare", "--videos", str(videos), "--manifest", str(manifest), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "unreadable: " in out and "bad.mp4" in out
    records = read_manifest(str(manifest))
    assert len(records) == 3 and sum(r["ok"] for r in records.values()) == 2
    # a second run finds everything done
    assert main(["prepare", "--videos", str(videos), "--manifest", str(manifest), "--workers", "1"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["probed"] == 0 and summary["already_in_manifest"] == 3
    assert len(manifest.read_text().splitlines()) == 3


def test_reencoded_copies_decode_to_the_same_content(tmp_path):
    videos = _folder(tmp_path)
    manifest = tmp_path / "manifest.jsonl"
    copies = tmp_path / "prepared"
    assert main(["prepare", "--videos", str(videos), "--manifest", str(manifest), "--reencode-dir", str(copies),
                 "--short-side", "32", "--workers", "1"]) == 0
    records = read_manifest(str(manifest))
    rec = records.find(str(videos / "a" / "one.mp4"))
    assert rec is records["a/one.mp4"] and rec["root"] == str(videos)  # keyed by the path under the root
    assert rec["prepared"] == str(copies / "a" / "one.mp4.mp4")
    probed = probe_video(rec["prepared"])
    assert probed["ok"] and probed["codec"] == "h264" and probed["frames"] == 20 and probed["height"] == 32
    assert rec["prepared_index"]["key_frames"] == [[0, 1, 20]]  # all-intra: every frame a key frame
    original = read_video_clip(videos / "a" / "one.mp4", 4, size=32)
    copy = read_video_clip(rec["prepared"], 4, size=32)
    assert (original - copy).abs().mean() < 0.1  # same frames, within the two codecs' error


def test_loaders_leave_out_files_the_manifest_marks_bad(tmp_path):
    _folder(tmp_path)
    (tmp_path / "train.csv").write_text("path,label\nvideos/a/one.mp4,x\nvideos/bad.mp4,y\nvideos/two.avi,x\n")
    manifest = tmp_path / "manifest.jsonl"
    assert main(["prepare", "--dataset", "csv", "--video-root", str(tmp_path), "--manifest", str(manifest), "--workers", "1"]) == 0
    ds = exclude_bad(build_dataset("csv", tmp_path, "train"), str(manifest))
    assert [s.path.rsplit("/", 1)[1] for s in ds.samples] == ["one.mp4", "two.avi"]


def test_prepare_needs_a_root_for_datasets(tmp_path, capsys):
    assert main(["prepare", "--dataset", "ucf101", "--manifest", str(tmp_path / "m.jsonl")]) == 2
    assert "--video-root" in capsys.readouterr().err


def test_reencoding_applies_rotation(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    src = write_video(videos / "phone.mp4", num_frames=12, width=64, height=48, rotation=90)
    manifest = tmp_path / "manifest.jsonl"
    assert main(["prepare", "--videos", str(videos), "--manifest", str(manifest), "--reencode-dir",
                 str(tmp_path / "out"), "--codec", "mjpeg", "--short-side", "48", "--workers", "1"]) == 0
    rec = read_manifest(str(manifest)).find(str(src))
    assert rec["rotation"] == 90 and (rec["width"], rec["height"]) == (64, 48)
    copy = probe_video(rec["prepared"])
    assert copy["rotation"] == 0 and (copy["width"], copy["height"]) == (48, 64)  # upright pixels
    torch.testing.assert_close(read_video_clip(rec["prepared"], 3, size=32), read_video_clip(src, 3, size=32),
                               atol=0.25, rtol=0)


def _run(*argv):
    return main(["prepare", *map(str, argv), "--workers", "1"] if "--workers" not in argv else ["prepare", *map(str, argv)])


def _summary(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_a_video_named_relatively_and_absolutely_is_probed_once(tmp_path, capsys, monkeypatch):
    _folder(tmp_path)
    (tmp_path / "train.csv").write_text(f"path,label\nvideos/a/one.mp4,x\n{tmp_path}/videos/a/one.mp4,x\nvideos/two.avi,y\n")
    monkeypatch.chdir(tmp_path.parent)
    manifest = tmp_path / "m.jsonl"
    assert _run("--dataset", "csv", "--video-root", tmp_path.name, "--manifest", manifest) == 0  # a relative root
    summary = _summary(capsys)
    assert summary["videos"] == summary["probed"] == 2
    assert sorted(read_manifest(str(manifest))) == ["videos/a/one.mp4", "videos/two.avi"]
    assert _run("--dataset", "csv", "--root", tmp_path, "--manifest", manifest) == 0  # the same root, absolute, by the old flag
    assert _summary(capsys)["probed"] == 0


def test_resume_survives_whatever_a_killed_run_left(tmp_path, capsys):
    videos = _folder(tmp_path)
    manifest = tmp_path / "m.jsonl"
    assert _run("--videos", videos, "--manifest", manifest) == 0
    lines = manifest.read_bytes().splitlines(keepends=True)
    assert len(lines) == 3
    torn = lines[2][: len(lines[2]) // 2]  # killed while writing: half a record, no newline
    junk = [b"[1, 2, 3]\n", b"\xff\xfe not utf-8\n", b'{"path": "two.avi", "frames": 10}\n', b'"just a string"\n']
    manifest.write_bytes(lines[0] + b"".join(junk) + lines[1] + torn)
    capsys.readouterr()
    assert _run("--videos", videos, "--manifest", manifest) == 0
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["probed"] == 1 and summary["manifest_lines_skipped"] == 5  # four junk lines and the torn one
    assert "not a JSON object" in out and "not UTF-8" in out and "'ok'" in out and "torn" in out
    records = read_manifest(str(manifest))
    assert len(records) == 3 and len(records.skipped) == 5  # the new record did not glue onto the torn line
    assert summary["manifest_videos"] == 3 and summary["manifest_unreadable"] == 1
    (tmp_path / "train.csv").write_text("path,label\nvideos/a/one.mp4,x\nvideos/bad.mp4,y\nvideos/two.avi,x\n")
    assert len(exclude_bad(build_dataset("csv", tmp_path, "train"), str(manifest)).samples) == 2
    assert _run("--videos", videos, "--manifest", manifest) == 0
    assert _summary(capsys)["probed"] == 0


def test_the_summary_counts_the_manifest_too(tmp_path, capsys):
    videos = _folder(tmp_path)
    manifest = tmp_path / "m.jsonl"
    assert _run("--videos", videos, "--manifest", manifest) == 0
    assert _summary(capsys)["unreadable"] == 1
    assert _run("--videos", videos, "--manifest", manifest) == 0
    summary = _summary(capsys)
    assert summary["unreadable"] == 0 and summary["manifest_unreadable"] == 1 and summary["manifest_videos"] == 3


def test_a_changed_video_is_probed_again(tmp_path, capsys):
    videos = _folder(tmp_path)
    manifest = tmp_path / "m.jsonl"
    assert _run("--videos", videos, "--manifest", manifest) == 0
    write_video(videos / "a" / "one.mp4", num_frames=7, width=32, height=32)
    (tmp_path / "train.csv").write_text("path,label\nvideos/a/one.mp4,x\nvideos/bad.mp4,y\n")
    ds = exclude_bad(build_dataset("csv", tmp_path, "train"), str(manifest))
    # bad.mp4 is as probed: left out; one.mp4 changed since: kept, for the loaders to check at run time
    assert [s.path for s in ds.samples] == [str(videos / "a" / "one.mp4")]
    (videos / "bad.mp4").write_bytes(b"\x01" * 600)  # same size: the modification time tells
    os.utime(videos / "bad.mp4", ns=(1, 1))
    capsys.readouterr()
    assert _run("--videos", videos, "--manifest", manifest) == 0
    assert _summary(capsys)["probed"] == 2
    assert read_manifest(str(manifest)).find(str(videos / "a" / "one.mp4"))["frames"] == 7


def test_a_text_file_is_not_a_video(tmp_path, capsys):
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "readme.txt").write_text("this is a text file, not a video\n" * 30)
    (tmp_path / "train.csv").write_text("path,label\nclips/readme.txt,x\n")
    assert _run("--dataset", "csv", "--video-root", tmp_path, "--manifest", tmp_path / "m.jsonl") == 0
    assert "not a video" in capsys.readouterr().out
    assert not read_manifest(str(tmp_path / "m.jsonl"))["clips/readme.txt"]["ok"]


def test_copies_keep_the_full_source_name(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "same.mp4", num_frames=12, width=64, height=48)
    write_video(videos / "same.avi", num_frames=9, width=64, height=48, codec="mjpeg")
    manifest = tmp_path / "m.jsonl"
    assert _run("--videos", videos, "--manifest", manifest, "--reencode-dir", tmp_path / "copies",
                "--codec", "mjpeg", "--short-side", "32") == 0
    records = read_manifest(str(manifest))
    assert records["same.mp4"]["prepared"] == str(tmp_path / "copies" / "same.mp4.avi")
    assert records["same.avi"]["prepared"] == str(tmp_path / "copies" / "same.avi.avi")
    assert [probe_video(records[k]["prepared"])["frames"] for k in ("same.mp4", "same.avi")] == [12, 9]


@pytest.mark.parametrize("argv, message", [
    (["--short-side", "0"], "--short-side"),
    (["--short-side", "-32"], "--short-side"),
    (["--workers", "0"], "--workers"),
    (["--gop", "0"], "--gop"),
    (["--reencode-dir", "{videos}"], "--reencode-dir"),
    (["--reencode-dir", "{videos}/copies"], "inside --videos"),
    (["--manifest", "{tmp}"], "is a folder"),
])
def test_prepare_refuses_with_one_line(tmp_path, capsys, argv, message):
    videos = _folder(tmp_path)
    argv = [a.format(videos=videos, tmp=tmp_path) for a in argv]
    if "--manifest" not in argv:
        argv += ["--manifest", str(tmp_path / "m.jsonl")]
    assert main(["prepare", "--videos", str(videos), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (videos / "copies").exists()


def test_prepare_without_pyav_says_what_to_install(tmp_path, capsys, monkeypatch):
    videos = _folder(tmp_path)
    monkeypatch.setitem(sys.modules, "av", None)
    assert main(["prepare", "--videos", str(videos), "--manifest", str(tmp_path / "m.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "pip install av" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.jsonl").exists()


def test_a_worker_that_dies_is_recorded_and_the_run_goes_on(tmp_path, capsys, monkeypatch):
    from stop_fast.data import prepare

    videos = _folder(tmp_path)
    for i in range(3):
        write_video(videos / f"extra{i}.mp4", num_frames=5 + i, width=32, height=32)
    real = prepare.probe_video

    def crashing(path):  # what a decoder segfault or the OOM killer does to the worker
        if path.endswith("two.avi"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path)

    monkeypatch.setattr(prepare, "probe_video", crashing)  # the forked workers inherit it
    manifest = tmp_path / "m.jsonl"
    assert main(["prepare", "--videos", str(videos), "--manifest", str(manifest), "--workers", "2"]) == 0
    summary = _summary(capsys)
    records = read_manifest(str(manifest))
    assert summary["workers_died"] == 1 and len(records) == 6
    assert not records["two.avi"]["ok"] and "died (killed by SIGKILL)" in records["two.avi"]["error"]
    assert sum(r["ok"] for r in records.values()) == 4  # all but two.avi and bad.mp4
    assert main(["prepare", "--videos", str(videos), "--manifest", str(manifest), "--workers", "2"]) == 0
    assert _summary(capsys)["probed"] == 0  # the culprit is recorded: resuming does not die on it again


_HANGING_PREPARE = """
import os, sys, time
from stop_fast.data import prepare
folder = sys.argv[1]
def stuck(path):
    open(os.path.join(folder, "pid-%d" % os.getpid()), "w").close()
    time.sleep(300)
prepare.probe_video = stuck
from stop_fast.cli import main
main(["prepare", "--videos", os.path.join(folder, "videos"), "--manifest", os.path.join(folder, "m.jsonl"),
      "--workers", "2"])
"""


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_die_with_a_killed_run(tmp_path):
    _folder(tmp_path)
    run = subprocess.Popen([sys.executable, "-c", _HANGING_PREPARE, str(tmp_path)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while len(list(tmp_path.glob("pid-*"))) < 2 and time.time() < deadline:
            time.sleep(0.1)
        workers = [int(p.name[4:]) for p in tmp_path.glob("pid-*")]
        assert len(workers) == 2 and all(_alive(w) for w in workers)
    finally:
        run.kill()  # kill -9: no cleanup code of the run gets to execute
        run.wait()
    deadline = time.time() + 10
    while any(_alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.1)
    survivors = [w for w in workers if _alive(w)]
    for w in survivors:
        os.kill(w, signal.SIGKILL)
    assert not survivors
