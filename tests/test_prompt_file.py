"""Prompt files: self-describing, atomic, and every unreadable or mismatched file a PromptFileError."""
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import stop_fast
from stop_fast.prompt_file import PromptFileError, read_prompt_file

from helpers import make_stop, random_video


def _stop(seed=0, quick_gelu=True, randomize=False, **config):
    """STOP over a fresh stop-tiny backbone with seeded random weights (the source prompt files record)."""
    config.setdefault("num_frames", 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip = stop_fast.load_clip("stop-tiny", seed=seed, quick_gelu=quick_gelu)
    model = stop_fast.STOP(stop_fast.STOPConfig(model_name="stop-tiny", **config), clip)
    if randomize:
        gen = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for p in model.trainable_parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = _stop(seed=1, randomize=True)
    path = tmp_path_factory.mktemp("prompts") / "prompts.safetensors"
    model.save_prompts(path)
    return model, path


def test_round_trip_and_metadata(saved):
    model, path = saved
    longer = _stop(seed=1, num_frames=8)  # T may differ: STOP does not depend on it
    longer.load_prompts(path)
    assert all(torch.equal(v, model.trainable_state_dict()[k]) for k, v in longer.trainable_state_dict().items())
    other = _stop(seed=1)
    other.load_prompts(path)
    video = random_video(model)
    torch.testing.assert_close(other.encode_video(video), model.encode_video(video), rtol=0, atol=0)
    prompts = read_prompt_file(path)
    assert prompts.config == model.config.to_dict()
    assert prompts.backbone == {"model_name": "stop-tiny", "gelu": "quick", "weights": None, "sha256": None,
                                "random_seed": 1}


@pytest.mark.parametrize("change, field", [
    (dict(seed=2), "backbone weights"),
    (dict(seed=1, quick_gelu=False), "backbone gelu"),
    (dict(seed=1, rho=3), "config rho"),
    (dict(seed=1, alpha=0.5), "config alpha"),
])
def test_mismatch_names_the_field_and_force_loads_with_a_warning(saved, change, field):
    model, path = saved
    other = _stop(**change)
    with pytest.raises(PromptFileError, match=rf"prompts\.safetensors was saved for another model: .*{field}"):
        other.load_prompts(path)
    if "rho" in change:  # other shapes: force cannot help
        with pytest.warns(UserWarning, match="loading anyway"), pytest.raises(PromptFileError, match="has shape"):
            other.load_prompts(path, force=True)
        return
    with pytest.warns(UserWarning, match=rf"{field}.*loading anyway"):
        other.load_prompts(path, force=True)
    for key, value in other.trainable_state_dict().items():
        assert torch.equal(value, model.trainable_state_dict()[key])


def test_real_weights_file_is_fingerprinted(tmp_path):
    weights = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in _stop(seed=4).clip.state_dict().items()}, str(weights))
    model = stop_fast.STOP(stop_fast.STOPConfig(model_name="stop-tiny", num_frames=4),
                           stop_fast.load_clip("stop-tiny", weights))
    path = tmp_path / "p.safetensors"
    model.save_prompts(path)
    backbone = read_prompt_file(path).backbone
    assert backbone["weights"] == "clip.safetensors"  # the name only, never the saver's folders
    assert len(backbone["sha256"]) == 64
    with pytest.raises(PromptFileError, match="backbone weights: saved clip.safetensors .*random weights"):
        _stop(seed=4).load_prompts(path)  # same numbers, but random weights by provenance


def _rewrite(path, dest, tensors=None, metadata=None):
    data = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    save_file(tensors(data) if tensors else data, str(dest), metadata=metadata(meta) if metadata else meta)
    return dest


@pytest.mark.parametrize("damage, reason", [
    ("truncated", "not a readable safetensors file"),
    ("garbage", "not a readable safetensors file"),
    ("empty", "not a readable safetensors file"),
    ("metadata_list", "metadata 'stop_config' is not a JSON object"),
    ("metadata_not_json", "metadata 'backbone' is not valid JSON"),
    ("no_config", "no stop_config"),
    ("int_tensor", "holds torch.int64 values"),
    ("bool_tensor", "holds torch.bool values"),
    ("nan", "NaN or infinite"),
    ("inf", "NaN or infinite"),
    ("wrong_shape", "has shape"),
    ("missing_key", "does not fit"),
    ("missing_file", "not found"),
    ("folder", "is a folder"),
])
def test_every_unreadable_file_is_a_prompt_file_error_naming_it(saved, tmp_path, damage, reason):
    _, path = saved
    bad = tmp_path / "bad.safetensors"
    first = sorted(load_file(str(path)))[0]

    def poison(value):
        return lambda d: {**d, first: torch.full_like(d[first], value)}

    if damage == "truncated":
        bad.write_bytes(path.read_bytes()[:-100])
    elif damage == "garbage":
        bad.write_bytes(os.urandom(4096))
    elif damage == "empty":
        bad.write_bytes(b"")
    elif damage == "metadata_list":
        _rewrite(path, bad, metadata=lambda m: {**m, "stop_config": "[1, 2]"})
    elif damage == "metadata_not_json":
        _rewrite(path, bad, metadata=lambda m: {**m, "backbone": "{oops"})
    elif damage == "no_config":
        _rewrite(path, bad, metadata=lambda m: {k: v for k, v in m.items() if k != "stop_config"})
    elif damage == "int_tensor":
        _rewrite(path, bad, tensors=lambda d: {**d, first: d[first].long()})
    elif damage == "bool_tensor":
        _rewrite(path, bad, tensors=lambda d: {**d, first: d[first] > 0})
    elif damage == "nan":
        _rewrite(path, bad, tensors=poison(float("nan")))
    elif damage == "inf":
        _rewrite(path, bad, tensors=poison(float("inf")))
    elif damage == "wrong_shape":
        _rewrite(path, bad, tensors=lambda d: {**d, first: torch.zeros(3, 3)})
    elif damage == "missing_key":
        _rewrite(path, bad, tensors=lambda d: {k: v for k, v in d.items() if k != first})
    elif damage == "missing_file":
        pass
    elif damage == "folder":
        bad.mkdir()
    model = _stop(seed=1)
    for force in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(PromptFileError, match=rf"bad\.safetensors.*{reason}"):
                model.load_prompts(bad, force=force)
    assert isinstance(PromptFileError("x"), ValueError)


def test_old_files_without_a_backbone_load_with_a_warning(saved, tmp_path):
    model, path = saved
    old = _rewrite(path, tmp_path / "old.safetensors",
                   metadata=lambda m: {"stop_config": m["stop_config"]})
    other = _stop(seed=1)
    with pytest.warns(UserWarning, match="records no backbone"):
        other.load_prompts(old)
    assert all(torch.equal(v, model.trainable_state_dict()[k]) for k, v in other.trainable_state_dict().items())


def test_prompts_of_an_unknown_backbone_load(tmp_path):
    """A STOP over an open_clip model built without load_clip: nothing to contradict."""
    model = make_stop(randomize=True, seed=2)
    clip = model.clip
    source = clip.__dict__.pop("stop_fast_source", None)
    try:
        path = tmp_path / "p.safetensors"
        model.save_prompts(path)
        make_stop().load_prompts(path)
    finally:
        if source is not None:
            clip.stop_fast_source = source


# ------------------------------------------------------------------ atomic saving
def _siblings(folder):
    return sorted(p.name for p in folder.iterdir())


def test_failed_save_keeps_the_old_file_and_leaves_no_temporary(saved, tmp_path, monkeypatch):
    model, path = saved
    target = tmp_path / "p.safetensors"
    target.write_bytes(path.read_bytes())

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space"):
        _stop(seed=9, randomize=True).save_prompts(target)
    assert _siblings(tmp_path) == ["p.safetensors"]
    assert target.read_bytes() == path.read_bytes()


def test_save_respects_the_umask_and_clears_temporaries_of_killed_saves(saved, tmp_path):
    """A save killed mid-write (kill -9) leaves its temporary; the next save into the folder removes
    it, and leaves alone the temporary of a save still running in another process."""
    model, _ = saved
    target = tmp_path / "p.safetensors"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo)
    writer = ("import os, sys, time; from stop_fast.io import atomic_path\n"
              f"with atomic_path({str(target)!r}) as tmp:\n"
              "    open(tmp, 'wb').write(b'partial'); print(tmp, flush=True)\n"
              "    os._exit(9) if sys.argv[1] == 'kill' else time.sleep(600)\n")
    running = subprocess.Popen([sys.executable, "-c", writer, "run"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        live = running.stdout.readline().strip()
        killed = subprocess.run([sys.executable, "-c", writer, "kill"], capture_output=True, text=True, env=env)
        stale = killed.stdout.strip()
        assert os.path.exists(stale) and os.path.exists(live)
        old = os.umask(0o027)
        try:
            model.save_prompts(target)
        finally:
            os.umask(old)
        assert _siblings(tmp_path) == sorted([os.path.basename(live), "p.safetensors"])
    finally:
        running.kill()
        running.wait()
    assert (target.stat().st_mode & 0o777) == 0o640
    read_prompt_file(target)


def test_equal_prompts_give_equal_bytes(saved, tmp_path):
    model, path = saved
    for i in range(5):  # safetensors orders its metadata differently from call to call
        model.save_prompts(tmp_path / f"{i}.safetensors")
        assert (tmp_path / f"{i}.safetensors").read_bytes() == path.read_bytes()


def test_save_into_a_missing_folder_is_a_clear_error(saved, tmp_path):
    model, _ = saved
    with pytest.raises(FileNotFoundError, match="folder .*nope does not exist"):
        model.save_prompts(tmp_path / "nope" / "p.safetensors")


def test_metadata_is_json_objects(saved):
    _, path = saved
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "stop_fast.prompts"
    assert isinstance(json.loads(meta["stop_config"]), dict) and isinstance(json.loads(meta["backbone"]), dict)
