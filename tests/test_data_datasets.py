"""Dataset adapters on small fixture files written in each benchmark's official format."""
import json

import pytest

from stop_fast.data.datasets import build_dataset


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_ucf101(tmp_path):
    ann = tmp_path / "ucfTrainTestlist"
    _write(ann / "classInd.txt", "1 ApplyEyeMakeup\n2 ApplyLipstick\n3 Archery\n")
    _write(ann / "trainlist01.txt", "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\nArchery/v_Archery_g08_c02.avi 3\n")
    _write(ann / "testlist01.txt", "ApplyLipstick/v_ApplyLipstick_g01_c01.avi\r\narchery/v_Archery_g01_c01.avi\n")
    train = build_dataset("ucf101", tmp_path, "train")
    assert train.classes == ["ApplyEyeMakeup", "ApplyLipstick", "Archery"]
    assert [(s.path, s.label) for s in train.samples] == [
        (str(tmp_path / "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi"), 0),
        (str(tmp_path / "Archery/v_Archery_g08_c02.avi"), 2)]
    test = build_dataset("ucf101", tmp_path, "test")
    assert [s.label for s in test.samples] == [1, 2]  # class from the folder, whatever its case
    assert test.class_texts()[2] == "a video of a person doing Archery"
    with pytest.raises(FileNotFoundError, match="testlist02"):
        build_dataset("ucf101", tmp_path, "test", fold=2)


def test_hmdb51(tmp_path):
    ann = tmp_path / "testTrainMulti_7030_splits"
    _write(ann / "brush_hair_test_split1.txt", "a.avi 1 \nb.avi 2 \nc.avi 0 \n")
    _write(ann / "cartwheel_test_split1.txt", "d.avi 2 \ne.avi 1 \n")
    _write(ann / "cartwheel_test_split2.txt", "d.avi 1 \n")
    train = build_dataset("hmdb51", tmp_path, "train")
    assert train.classes == ["brush_hair", "cartwheel"]
    assert [(s.path.split("/")[-2:], s.label) for s in train.samples] == [(["brush_hair", "a.avi"], 0), (["cartwheel", "e.avi"], 1)]
    test = build_dataset("hmdb51", tmp_path, "test")
    assert sorted(s.path.rsplit("/", 1)[1] for s in test.samples) == ["b.avi", "d.avi"]


def test_ssv2(tmp_path):
    _write(tmp_path / "labels.json", json.dumps({"Approaching something with your camera": "0",
                                                 "Pushing something from left to right": "1"}))
    _write(tmp_path / "train.json", json.dumps([
        {"id": "78687", "label": "pushing a cup from left to right", "template": "Pushing [something] from left to right",
         "placeholders": ["a cup"]},
        {"id": "42326", "label": "approaching a door with your camera", "template": "Approaching [something] with your camera",
         "placeholders": ["a door"]}]))
    ds = build_dataset("ssv2", tmp_path, "train")
    assert [(s.path, s.label) for s in ds.samples] == [(str(tmp_path / "78687.webm"), 1), (str(tmp_path / "42326.webm"), 0)]
    assert ds.classes[1] == "Pushing something from left to right" and ds.allow_flip is False


def test_kinetics400(tmp_path):
    _write(tmp_path / "annotations" / "val.csv",
           "label,youtube_id,time_start,time_end,split\nabseiling,0wR5jVB-WPk,417,427,val\nair drumming,--nQbRBEz2s,104,114,val\n")
    (tmp_path / "val" / "abseiling").mkdir(parents=True)
    (tmp_path / "val" / "abseiling" / "0wR5jVB-WPk_000417_000427.mp4").write_bytes(b"")
    ds = build_dataset("kinetics400", tmp_path, "val")
    assert ds.classes == ["abseiling", "air drumming"]
    assert ds.samples[0].path == str(tmp_path / "val/abseiling/0wR5jVB-WPk_000417_000427.mp4")
    assert ds.samples[1].path == str(tmp_path / "val/air drumming/--nQbRBEz2s_000104_000114.mp4")


def test_msrvtt(tmp_path):
    _write(tmp_path / "MSRVTT_data.json", json.dumps({"videos": [{"video_id": "video0"}, {"video_id": "video1"}], "sentences": [
        {"caption": "a man is talking", "video_id": "video0", "sen_id": 0},
        {"caption": "someone speaks", "video_id": "video0", "sen_id": 1},
        {"caption": "a cat plays", "video_id": "video1", "sen_id": 2}]}))
    _write(tmp_path / "train.9k.csv", "video_id\nvideo0\nvideo1\n")
    _write(tmp_path / "JSFUSION_test.csv", ",key,vid_key,video_id,sentence\n0,ret0,msr7579,video7579,a girl wearing red top\n")
    (tmp_path / "videos").mkdir()
    train = build_dataset("msrvtt", tmp_path, "train")
    assert train.task == "retrieval"
    assert train.samples[0].captions == ("a man is talking", "someone speaks")
    assert train.samples[1].path == str(tmp_path / "videos/video1.mp4")
    test = build_dataset("msrvtt", tmp_path, "test")
    assert [(s.path.rsplit("/", 1)[1], s.captions) for s in test.samples] == [("video7579.mp4", ("a girl wearing red top",))]


def test_generic_csv(tmp_path):
    _write(tmp_path / "train.csv", "path,label\nclips/a.mp4,jumping\nclips/b.mp4,running\nclips/c.mp4,jumping\n")
    ds = build_dataset("csv", tmp_path, "train")
    assert ds.classes == ["jumping", "running"] and [s.label for s in ds.samples] == [0, 1, 0]
    _write(tmp_path / "test.csv", "path,caption\na.mp4,a dog runs\na.mp4,the dog is fast\nb.mp4,rain\n")
    rt = build_dataset("csv", tmp_path, "test")
    assert rt.task == "retrieval" and rt.samples[0].captions == ("a dog runs", "the dog is fast")
    _write(tmp_path / "bad.csv", "file,label\nx.mp4,a\n")
    with pytest.raises(ValueError, match="path,label"):
        build_dataset("csv", tmp_path, "bad")


def test_unknown_dataset_and_split():
    with pytest.raises(ValueError, match="dataset must be one of"):
        build_dataset("imagenet", "/tmp")
    with pytest.raises(ValueError, match="split must be one of"):
        build_dataset("ucf101", "/tmp", "val")
