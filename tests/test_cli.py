"""The `stop-fast` command line: instant help, one-line errors for every user mistake, one forward in
`encode`, safe weights conversion. Commands run in-process through `stop_fast.cli.main`."""
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import stop_fast
from stop_fast.cli import main

from helpers import make_stop

TINY = ["--model", "stop-tiny", "--frames", "4"]


def run_cli(capsys, *argv):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, out, err, command, *fragments):
    assert code == 2, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"stop-fast {command}: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in err and out == ""


@pytest.fixture
def no_model_built(monkeypatch):
    """Fail the test if a command gets as far as building a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the arguments were checked")

    monkeypatch.setattr(stop_fast, "build_stop", refuse)


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "prompts.safetensors"
    make_stop(randomize=True, seed=3).save_prompts(path)
    return path


# ------------------------------------------------------------------ instant help
def test_help_and_argument_errors_are_instant_and_import_no_torch():
    script = textwrap.dedent("""
        import json, sys, time
        start = time.perf_counter()
        from stop_fast.cli import main
        codes = []
        for argv in (["--help"], ["encode", "--help"], ["convert-weights", "--help"], ["info", "--help"],
                     ["index", "--help"], ["search", "--help"],
                     ["encode", "--frames", "many"], ["no-such-command"]):
            try:
                main(argv)
            except SystemExit as exc:
                codes.append(exc.code)
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "open_clip", "numpy", "av", "safetensors", "triton"))
        print(json.dumps({"codes": codes, "heavy": heavy, "seconds": time.perf_counter() - start}))
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(stop_fast.__file__)),
                                                        os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["codes"] == [0, 0, 0, 0, 0, 0, 2, 2]
    assert report["heavy"] == []
    assert report["seconds"] < 5.0, report
    assert "convert-weights" in done.stdout  # the top-level help lists every command


# ------------------------------------------------------------------ one-line errors, before any model is built
@pytest.mark.parametrize("argv, fragments", [
    (["info", *TINY, "--device", "bogus"], ["--device 'bogus' is not a device"]),
    (["info", *TINY, "--device", "mps"], ["only cpu and cuda"]),
    (["info", *TINY, "--rho", "100000000"], ["--rho 100000000", "GiB", "more than"]),
    (["info", *TINY, "--frames", "0"], ["num_frames must be >= 1"]),
    (["info", *TINY, "--k", "-1"], ["k must be >= 0"]),
    (["encode", *TINY, "--weights", "missing.pt"], ["--weights missing.pt: no such file"]),
    (["encode", *TINY, "--checkpoint", "missing.safetensors"], ["--checkpoint missing.safetensors: no such file"]),
    (["encode", *TINY, "--video", "missing.mp4"], ["--video missing.mp4: no such file"]),
    (["encode", *TINY, "--out", "no/such/folder/e.pt"], ["--out no/such/folder/e.pt: the folder", "does not exist"]),
])
def test_mistakes_are_one_line_errors_before_any_model(capsys, no_model_built, argv, fragments):
    assert_one_line_error(*run_cli(capsys, *argv), argv[0], *fragments)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line(capsys, no_model_built):
    assert_one_line_error(*run_cli(capsys, "encode", *TINY, "--device", "cuda"), "encode",
                          "--device cuda: no CUDA device is available here")


@pytest.mark.parametrize("damage, fragment", [
    ("truncated", "not a readable safetensors file"),
    ("garbage", "not a readable safetensors file"),
    ("metadata", "metadata 'stop_config' is not a JSON object"),
])
def test_unreadable_prompts_are_one_line_before_any_model(capsys, no_model_built, tmp_path, prompt_file, damage, fragment):
    bad = tmp_path / "bad.safetensors"
    if damage == "truncated":
        bad.write_bytes(prompt_file.read_bytes()[:-64])
    elif damage == "garbage":
        bad.write_bytes(b"\x00" * 100)
    else:
        save_file(load_file(str(prompt_file)), str(bad), metadata={"stop_config": '"a string"'})
    assert_one_line_error(*run_cli(capsys, "encode", *TINY, "--prompts", str(bad)), "encode", str(bad), fragment)


# ------------------------------------------------------------------ one-line errors from reading files
def test_mismatched_prompts_name_the_field_and_force_loads(capsys, prompt_file):
    code, out, err = run_cli(capsys, "encode", *TINY, "--rho", "3", "--prompts", str(prompt_file))
    assert_one_line_error(code, out, err, "encode", str(prompt_file), "config rho: saved 12, this model 3", "--force")
    code, out, err = run_cli(capsys, "encode", *TINY, "--gelu", "erf", "--prompts", str(prompt_file))
    assert_one_line_error(code, out, err, "encode", "backbone gelu: saved 'quick', this model 'erf'")
    code, out, _ = run_cli(capsys, "encode", *TINY, "--gelu", "erf", "--prompts", str(prompt_file), "--force")
    assert code == 0 and json.loads(out)["embedding_dim"] == 64


def test_bad_video_weights_and_model_are_one_line(capsys, tmp_path):
    garbage = tmp_path / "clip.mp4"
    garbage.write_bytes(os.urandom(4096))
    assert_one_line_error(*run_cli(capsys, "encode", *TINY, "--video", str(garbage)), "encode",
                          "cannot decode video", str(garbage))
    assert_one_line_error(*run_cli(capsys, "encode", *TINY, "--weights", str(garbage)), "encode",
                          "cannot read weights file", str(garbage))
    assert_one_line_error(*run_cli(capsys, "info", "--model", "ViT-Q-99"), "info", "model_name 'ViT-Q-99'")


# ------------------------------------------------------------------ encode: one forward, counts of the path that ran
@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_encode_runs_one_forward_and_reports_its_counts(capsys, monkeypatch, impl):
    from stop_fast.commands import encode

    built, forwards = [], []
    real_build = encode.model_from_args

    def build_and_count(args):
        model, config = real_build(args)
        model.clip.visual.ln_post.register_forward_hook(lambda *a: forwards.append(1))  # once per forward, both paths
        built.append(model)
        return model, config

    monkeypatch.setattr(encode, "model_from_args", build_and_count)
    code, out, _ = run_cli(capsys, "encode", *TINY, "--impl", impl, "--device", "cpu")
    assert code == 0
    report = json.loads(out)
    per_run = len(forwards)
    model = built[0]
    from stop_fast.synthetic import moving_square

    video = moving_square(4, model.image_size, generator=torch.Generator().manual_seed(0))[None]
    forwards.clear()
    with torch.no_grad():
        details = model.explain(video, impl=impl)
    assert per_run == len(forwards) > 0  # encode's whole run = one explain, no second forward
    assert report["impl"] == impl
    assert report["temporal_tokens_per_frame"] == details["counts"][0].tolist()
    assert report["embedding_head"] == [round(float(x), 5) for x in details["feature"][0, :8]]


def test_encode_saves_the_embedding(capsys, tmp_path):
    out_path = tmp_path / "e.pt"
    code, out, _ = run_cli(capsys, "encode", *TINY, "--out", str(out_path))
    assert code == 0
    saved = torch.load(out_path, weights_only=True)
    assert saved.shape == (64,) and abs(float(saved.norm()) - 1) < 1e-5
    assert json.loads(out)["saved_to"] == str(out_path)
    assert sorted(os.listdir(tmp_path)) == ["e.pt"]


# ------------------------------------------------------------------ weights: --gelu, convert-weights
@pytest.fixture(scope="module")
def scripted_weights(tmp_path_factory):
    import open_clip

    import stop_fast.backbone  # noqa: F401 - registers the stop-tiny config with open_clip
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip = open_clip.create_model("stop-tiny", quick_gelu=True)
        torch.jit.script(clip).save(str(folder / "tiny.pt"))  # the form of OpenAI's released files
    return folder / "tiny.pt", clip


def test_convert_weights_round_trip(capsys, tmp_path, scripted_weights):
    archive, clip = scripted_weights
    converted = tmp_path / "tiny.safetensors"
    code, out, _ = run_cli(capsys, "convert-weights", str(archive), str(converted))
    assert code == 0 and out.startswith(f"wrote {converted}") and "(torchscript)" in out
    state = load_file(str(converted))
    own = clip.state_dict()
    assert all(torch.equal(state[k], own[k]) for k in own)
    a = stop_fast.load_clip("stop-tiny", archive)
    b = stop_fast.load_clip("stop-tiny", converted)
    assert a.stop_fast_source["sha256"] == b.stop_fast_source["sha256"]  # prompts trained with one fit both
    embeddings = []
    for weights in (archive, converted):
        torch.manual_seed(0)  # the untrained prompters' initial values come from the global RNG
        code, out, _ = run_cli(capsys, "encode", *TINY, "--weights", str(weights))
        assert code == 0
        embeddings.append(json.loads(out)["embedding_head"])
    assert embeddings[0] == embeddings[1]
    torch.manual_seed(0)
    code, out, _ = run_cli(capsys, "encode", *TINY, "--weights", str(converted), "--gelu", "erf")
    assert code == 0 and json.loads(out)["embedding_head"] != embeddings[0]


def test_convert_weights_refusals(capsys, tmp_path, scripted_weights):
    archive, _ = scripted_weights
    assert_one_line_error(*run_cli(capsys, "convert-weights", str(archive), str(archive)), "convert-weights",
                          "is IN")
    assert_one_line_error(*run_cli(capsys, "convert-weights", str(tmp_path / "none.pt"), str(tmp_path / "o")),
                          "convert-weights", "no such file")
    nan = tmp_path / "nan.safetensors"
    save_file({"w": torch.tensor([1.0, float("nan")])}, str(nan))
    assert_one_line_error(*run_cli(capsys, "convert-weights", str(nan), str(tmp_path / "o.safetensors")),
                          "convert-weights", "w contains NaN")
    assert not (tmp_path / "o.safetensors").exists()


def test_warnings_are_one_line_naming_the_command():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(stop_fast.__file__)),
                                                        os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-m", "stop_fast.cli", "encode", "--model", "stop-tiny", "--frames", "2",
                           "--device", "cpu"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        "stop-fast encode: warning: load_clip: stop-tiny has RANDOM weights (no weights file given, seed 0); "
        "features are meaningless until you pass weights=<CLIP checkpoint>"]
