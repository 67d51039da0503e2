"""Dataset adapters on small fixture files written in each benchmark's official format."""
import json

import pytest

from stop_fast.data.datasets import AnnotationError, build_dataset


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


def test_labels_sort_numerically_and_a_bom_is_fine(tmp_path):
    _write(tmp_path / "train.csv", "\ufeffpath,label\na.mp4,10\nb.mp4,2\nc.mp4,0\nd.mp4,1\n")  # what spreadsheets write
    ds = build_dataset("csv", tmp_path, "train")
    assert ds.classes == ["0", "1", "2", "10"] and [s.label for s in ds.samples] == [3, 2, 0, 1]
    _write(tmp_path / "words.csv", "path,label\na.mp4,run\nb.mp4,10\n")
    assert build_dataset("csv", tmp_path, "words").classes == ["10", "run"]


@pytest.mark.parametrize("text, line, reason", [
    ("path,label\na.mp4,x\nb.mp4\n", 3, "no 'label'"),
    ("path,label\na.mp4,x\nb.mp4,\n", 3, "no 'label'"),
    ("path,caption\n,a dog\n", 2, "no 'path'"),
    ("file,label\nx.mp4,a\n", 1, "path,label"),
])
def test_csv_rows_without_their_fields_name_the_line(tmp_path, text, line, reason):
    _write(tmp_path / "train.csv", text)
    with pytest.raises(AnnotationError, match=reason) as info:
        build_dataset("csv", tmp_path, "train")
    assert info.value.line == line and f"train.csv, line {line}" in str(info.value)


def test_ucf101_refuses_labels_outside_the_classes(tmp_path):
    ann = tmp_path / "ucfTrainTestlist"
    _write(ann / "classInd.txt", "\ufeff1 ApplyEyeMakeup\n2 Archery\n")
    for bad in ("0", "3", "x"):
        _write(ann / "trainlist01.txt", f"ApplyEyeMakeup/a.avi 1\nArchery/b.avi {bad}\n")
        with pytest.raises(AnnotationError, match=r"trainlist01.txt, line 2: class number .* outside 1..2"):
            build_dataset("ucf101", tmp_path, "train")
    _write(ann / "trainlist01.txt", "ApplyEyeMakeup/a.avi 1 extra\n")
    with pytest.raises(AnnotationError, match="line 1"):
        build_dataset("ucf101", tmp_path, "train")
    _write(ann / "testlist01.txt", "ApplyEyeMakeup/a.avi\nJuggling/b.avi\n")
    with pytest.raises(AnnotationError, match="testlist01.txt, line 2: class folder 'Juggling'"):
        build_dataset("ucf101", tmp_path, "test")
    _write(ann / "classInd.txt", "1 ApplyEyeMakeup\nArchery\n")
    with pytest.raises(AnnotationError, match="classInd.txt, line 2"):
        build_dataset("ucf101", tmp_path, "test")


def test_malformed_lines_name_the_file_and_line(tmp_path):
    ann = tmp_path / "testTrainMulti_7030_splits"
    _write(ann / "brush_hair_test_split1.txt", "a.avi 1\nb.avi\n")
    with pytest.raises(AnnotationError, match="brush_hair_test_split1.txt, line 2"):
        build_dataset("hmdb51", tmp_path, "train")
    _write(tmp_path / "labels.json", '{"Pushing something": "0"}')
    _write(tmp_path / "train.json", '[{"id": "1", "template": "Pushing [something]"},\n {"id": "2"}]')
    with pytest.raises(AnnotationError, match="train.json: entry 1: needs 'template'"):
        build_dataset("ssv2", tmp_path, "train")
    _write(tmp_path / "train.json", '[{"id": "1", "template": "Pushing [something]"},\n {"id": 2,,}]')
    with pytest.raises(AnnotationError, match="train.json, line 2: not valid JSON"):
        build_dataset("ssv2", tmp_path, "train")
    (tmp_path / "train.json").write_bytes(b'[{"id": "1", "template": "Pushing \xff"}]')
    with pytest.raises(AnnotationError, match="train.json, line 1: not UTF-8"):
        build_dataset("ssv2", tmp_path, "train")
    _write(tmp_path / "annotations" / "train.csv", "label,youtube_id,time_start,time_end,split\nabseiling,x,1,soon,train\n")
    with pytest.raises(AnnotationError, match="train.csv, line 2: time_start / time_end"):
        build_dataset("kinetics400", tmp_path, "train")


def test_kinetics_test_split_without_labels(tmp_path):
    _write(tmp_path / "annotations" / "test.csv", "youtube_id,time_start,time_end,split\n--07WQ2iBlw,1,11,test\n")
    ds = build_dataset("kinetics400", tmp_path, "test")
    assert ds.classes == [] and [(s.path, s.label) for s in ds.samples] == [
        (str(tmp_path / "test" / "--07WQ2iBlw_000001_000011.mp4"), -1)]


def test_vatex(tmp_path):
    _write(tmp_path / "vatex_training_v1.0.json", json.dumps([
        {"videoID": "Ptf_2VRj-V0_000122_000132", "enCap": ["A man plays a guitar.", " Someone strums. "], "chCap": ["..."]},
        {"videoID": "abc_000001_000011", "enCap": ["A dog runs."]}]))
    _write(tmp_path / "vatex_validation_v1.0.json", json.dumps([
        {"videoID": "val1_000005_000015", "enCap": ["Two people dance."]},
        {"videoID": "val2_000000_000010", "enCap": ["A cat sleeps."]}]))
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "abc_000001_000011.webm").write_bytes(b"")
    train = build_dataset("vatex", tmp_path, "train")  # no split lists: the official training file
    assert train.task == "retrieval" and train.name == "vatex"
    assert train.samples[0].captions == ("A man plays a guitar.", "Someone strums.")
    assert [s.path for s in train.samples] == [str(tmp_path / "videos" / "Ptf_2VRj-V0_000122_000132.mp4"),
                                               str(tmp_path / "videos" / "abc_000001_000011.webm")]  # found as it is
    assert [s.captions for s in build_dataset("vatex", tmp_path, "val").samples] == [("Two people dance.",), ("A cat sleeps.",)]
    _write(tmp_path / "test_list.txt", "val2_000000_000010\n")  # the retrieval split: test from official validation
    test = build_dataset("vatex", tmp_path, "test")
    assert [s.captions for s in test.samples] == [("A cat sleeps.",)]
    _write(tmp_path / "test_list.txt", "val2_000000_000010\nnope_000000_000010\n")
    with pytest.raises(AnnotationError, match="test_list.txt, line 2: videoID 'nope_000000_000010' has no captions"):
        build_dataset("vatex", tmp_path, "test")
    _write(tmp_path / "vatex_validation_v1.0.json", json.dumps([{"videoID": "val1"}]))
    with pytest.raises(AnnotationError, match="entry 0: needs 'enCap'"):
        build_dataset("vatex", tmp_path, "val")


def test_didemo_paragraphs(tmp_path):
    moments = [
        {"video": "10015567@N08_3655084291_d8b58466fa.mov", "description": "a girl waves ", "times": [[0, 0]]},
        {"video": "other@N00_1_2.mp4", "description": "a car drives by", "times": [[1, 2]]},
        {"video": "10015567@N08_3655084291_d8b58466fa.mov", "description": "she turns around", "times": [[2, 3]]},
    ]
    _write(tmp_path / "test_data.json", json.dumps(moments))
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "10015567@N08_3655084291_d8b58466fa.mov.mp4").write_bytes(b"")  # converted, name kept
    ds = build_dataset("didemo", tmp_path, "test")
    assert ds.task == "retrieval" and len(ds) == 2
    assert ds.samples[0].captions == ("a girl waves she turns around",)  # one paragraph per video, in order
    assert ds.samples[0].path == str(tmp_path / "videos" / "10015567@N08_3655084291_d8b58466fa.mov.mp4")
    assert ds.samples[1].path == str(tmp_path / "videos" / "other@N00_1_2.mp4")
    _write(tmp_path / "test_list.txt", "other@N00_1_2.mp4\n")
    assert [s.captions for s in build_dataset("didemo", tmp_path, "test").samples] == [("a car drives by",)]
    _write(tmp_path / "test_data.json", json.dumps([{"video": "x.mp4", "times": []}]))
    with pytest.raises(AnnotationError, match="test_data.json: entry 0: needs 'description'"):
        build_dataset("didemo", tmp_path, "test")


def test_activitynet_paragraphs(tmp_path):
    _write(tmp_path / "val_1.json", json.dumps({
        "v_uqiMw7tQ1Cc": {"duration": 55.15, "timestamps": [[0.28, 55.15], [13.79, 54.32]],
                          "sentences": ["A weight lifting tutorial is given.", "  The coach helps the guy."]},
        "v_bXdq2zI1Ms0": {"duration": 73.1, "timestamps": [[0, 10]], "sentences": ["Three men dance."]}}))
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "bXdq2zI1Ms0.mkv").write_bytes(b"")  # named without the v_ prefix
    ds = build_dataset("activitynet", tmp_path, "val")
    assert ds.task == "retrieval" and ds.name == "activitynet"
    assert ds.samples[0].captions == ("A weight lifting tutorial is given. The coach helps the guy.",)
    assert [s.path for s in ds.samples] == [str(tmp_path / "videos" / "v_uqiMw7tQ1Cc.mp4"),
                                            str(tmp_path / "videos" / "bXdq2zI1Ms0.mkv")]
    _write(tmp_path / "val_ids.json", json.dumps(["v_bXdq2zI1Ms0"]))
    assert len(build_dataset("activitynet", tmp_path, "val")) == 1
    _write(tmp_path / "train.json", json.dumps({"v_a": {"duration": 3, "sentences": "not a list"}}))
    with pytest.raises(AnnotationError, match="train.json: video v_a: needs 'sentences'"):
        build_dataset("activitynet", tmp_path, "train")


def test_cli_reports_a_malformed_annotation_in_one_line(tmp_path, capsys):
    from stop_fast.cli import main

    _write(tmp_path / "train.csv", "path,label\na.mp4,x\nb.mp4\n")
    assert main(["prepare", "--dataset", "csv", "--video-root", str(tmp_path), "--manifest", str(tmp_path / "m.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "train.csv, line 3: no 'label'" in err and len(err.strip().splitlines()) == 1


def test_csv_paths_outside_the_video_root_are_said(tmp_path, caplog):
    root = tmp_path / "root"
    root.mkdir()
    (root / "train.csv").write_text("path,label\na.mp4,x\n../elsewhere/b.mp4,y\n/abs/c.mp4,x\n")
    with caplog.at_level("WARNING", logger="stop_fast.data"):
        ds = build_dataset("csv", root, "train")
    assert [s.path for s in ds.samples][1:] == [str(root / "../elsewhere/b.mp4"), "/abs/c.mp4"]  # read from there
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "2 of 3 paths lie outside the video root" in warned[0] and "train.csv" in warned[0]
    caplog.clear()
    (root / "train.csv").write_text("path,label\na.mp4,x\nsub/b.mp4,y\n")
    with caplog.at_level("WARNING", logger="stop_fast.data"):
        build_dataset("csv", root, "train")
    assert not caplog.records
