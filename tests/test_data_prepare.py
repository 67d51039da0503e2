"""stop-fast prepare: probing, the manifest, resuming, re-encoding, and loaders skipping bad files."""
import json

import torch

from stop_fast.cli import main
from stop_fast.data import read_video_clip
from stop_fast.data.datasets import build_dataset
from stop_fast.data.prepare import exclude_bad, probe_video, read_manifest

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
    rec = read_manifest(str(manifest))[str(videos / "a" / "one.mp4")]
    assert rec["prepared"] == str(copies / "a" / "one.webm")
    probed = probe_video(rec["prepared"])
    assert probed["ok"] and probed["codec"] == "vp9" and probed["frames"] == 20 and probed["height"] == 32
    original = read_video_clip(videos / "a" / "one.mp4", 4, size=32)
    copy = read_video_clip(rec["prepared"], 4, size=32)
    assert (original - copy).abs().mean() < 0.1  # same frames, within the two codecs' error


def test_loaders_leave_out_files_the_manifest_marks_bad(tmp_path):
    videos = _folder(tmp_path)
    (tmp_path / "train.csv").write_text("path,label\nvideos/a/one.mp4,x\nvideos/bad.mp4,y\nvideos/two.avi,x\n")
    manifest = tmp_path / "manifest.jsonl"
    assert main(["prepare", "--dataset", "csv", "--root", str(tmp_path), "--manifest", str(manifest), "--workers", "1"]) == 0
    ds = exclude_bad(build_dataset("csv", tmp_path, "train"), str(manifest))
    assert [s.path.rsplit("/", 1)[1] for s in ds.samples] == ["one.mp4", "two.avi"]


def test_prepare_needs_a_root_for_datasets(tmp_path, capsys):
    assert main(["prepare", "--dataset", "ucf101", "--manifest", str(tmp_path / "m.jsonl")]) == 2
    assert "--root" in capsys.readouterr().err


def test_reencoding_applies_rotation(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    src = write_video(videos / "phone.mp4", num_frames=12, width=64, height=48, rotation=90)
    manifest = tmp_path / "manifest.jsonl"
    assert main(["prepare", "--videos", str(videos), "--manifest", str(manifest), "--reencode-dir",
                 str(tmp_path / "out"), "--codec", "mjpeg", "--short-side", "48", "--workers", "1"]) == 0
    rec = read_manifest(str(manifest))[str(src)]
    assert rec["rotation"] == 90 and (rec["width"], rec["height"]) == (64, 48)
    copy = probe_video(rec["prepared"])
    assert copy["rotation"] == 0 and (copy["width"], copy["height"]) == (48, 64)  # upright pixels
    torch.testing.assert_close(read_video_clip(rec["prepared"], 3, size=32), read_video_clip(src, 3, size=32),
                               atol=0.25, rtol=0)
