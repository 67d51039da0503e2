"""load_clip: random weights with a warning, every supported weights file, clear errors, no network,
and weights files that cannot run code."""
import hashlib
import json
import os
import subprocess
import sys
import warnings

import open_clip
import pytest
import torch
from safetensors.torch import save_file

import stop_fast
from stop_fast.backbone import WeightsError, load_clip, read_state_dict


def _random_clip(seed=0):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return open_clip.create_model("stop-tiny", force_quick_gelu=True)


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_random_weights_warn_once_and_model_is_frozen():
    with pytest.warns(UserWarning, match="RANDOM weights") as record:
        model = load_clip("stop-tiny")
    assert len(record) == 1
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training
    assert model.visual.grid_size == (7, 7) and model.visual.image_size == (112, 112)
    assert model.visual.transformer.resblocks[0].attn.num_heads == 4
    image = torch.randn(2, 3, 112, 112)
    assert model.encode_image(image).shape == (2, 64)  # open_clip's own methods keep working


@pytest.mark.parametrize("kind", ["safetensors", "state_dict", "checkpoint_module_prefix", "torchscript"])
def test_every_weights_format_loads(tmp_path, kind):
    source = _random_clip(seed=1)
    path = tmp_path / ("w.safetensors" if kind == "safetensors" else "w.pt")
    if kind == "safetensors":
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    elif kind == "state_dict":
        torch.save(source.state_dict(), path)
    elif kind == "checkpoint_module_prefix":  # open_clip training checkpoints (DDP)
        torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in source.state_dict().items()}}, path)
    else:  # OpenAI's releases are TorchScript archives
        torch.jit.script(source).save(str(path))
    loaded = load_clip("stop-tiny", path)
    assert _same_weights(source, loaded)


def test_missing_file_says_what_to_pass(tmp_path):
    with pytest.raises(WeightsError, match=r"not found: .*nope\.pt.*weights=None"):
        load_clip("stop-tiny", tmp_path / "nope.pt")


def test_unreadable_file_is_named(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(WeightsError, match="garbage.pt"):
        load_clip("stop-tiny", path)


def test_untrusted_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": object()}, path)
    with pytest.raises(WeightsError, match="evil.pt"):
        load_clip("stop-tiny", path)


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "b32.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = open_clip.create_model("ViT-S-32")
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    with pytest.raises(WeightsError, match="does not fit model_name 'stop-tiny'"):
        load_clip("stop-tiny", path)


def test_unknown_model_and_network_use_need_explicit_consent():
    with pytest.raises(ValueError, match="model_name 'ViT-Q-99'"):
        load_clip("ViT-Q-99")
    with pytest.raises(ValueError, match="allow_download=True"):
        load_clip("ViT-B-32", pretrained_tag="openai")


def test_stop_refuses_a_non_vit_backbone():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resnet = open_clip.create_model("RN50")
    with pytest.raises(ValueError, match="VisionTransformer"):
        stop_fast.STOP(stop_fast.STOPConfig(model_name="RN50"), resnet)


def test_patch_count_comes_from_the_backbone():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b16 = open_clip.create_model("ViT-S-16")  # 224 px / 16 = 14 x 14 patches
    model = stop_fast.STOP(stop_fast.STOPConfig(model_name="ViT-S-16", k=100), b16)
    assert model.num_patches == 196


# ------------------------------------------------------------------ TorchScript archives never run code
class _Planter(torch.nn.Module):
    """A TorchScript module whose __setstate__ writes a file when torch.jit.load restores it."""

    def __init__(self, target: str):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))
        self.plain = torch.zeros(2)
        self.target = target

    def forward(self, x):
        return x * self.w

    @torch.jit.export
    def __getstate__(self):
        return (self.w, self.plain, self.target, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, torch.Tensor, str, bool]):
        self.w = state[0]
        self.target = state[2]
        self.training = state[3]
        planted = torch.from_file(self.target, shared=True, size=16, dtype=torch.uint8)
        planted.fill_(65)
        self.plain = planted.to(torch.float32)[:2]


class _Spinner(torch.nn.Module):
    """A TorchScript module whose __setstate__ never returns."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.w

    @torch.jit.export
    def __getstate__(self):
        return (self.w, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, bool]):
        self.w = state[0]
        self.training = state[1]
        i = 0
        while i >= 0:
            i = i + 1


def _script_save(module, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated; OpenAI's files were made with it
        torch.jit.script(module).save(str(path))


def test_torchscript_archive_that_writes_a_file_is_read_without_running_it(tmp_path):
    target = tmp_path / "planted.pth"
    archive = tmp_path / "evil.pt"
    _script_save(_Planter(str(target)), archive)
    torch.jit.load(str(archive))  # the archive really is dangerous: trusting it writes the file
    assert target.read_bytes() == b"A" * 16
    target.unlink()
    with pytest.raises(WeightsError, match=r"evil\.pt without running its code.*--trust-weights"):
        load_clip("stop-tiny", archive)
    with pytest.raises(WeightsError, match="without running its code"):
        read_state_dict(archive)
    assert not target.exists()
    read_state_dict(archive, trust_torchscript=True)  # the explicit opt-in runs the archive's code
    assert target.exists()


def test_torchscript_archive_that_never_returns_does_not_hang(tmp_path):
    archive = tmp_path / "spin.pt"
    _script_save(_Spinner(), archive)
    # In a child process, so that a regression fails this test instead of hanging the suite.
    code = (
        "import sys; from stop_fast.backbone import WeightsError, read_state_dict\n"
        "try:\n    read_state_dict(sys.argv[1])\nexcept WeightsError as exc:\n    print(exc)\n"
    )
    root = os.path.dirname(os.path.dirname(stop_fast.__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    try:
        done = subprocess.run([sys.executable, "-c", code, str(archive)], capture_output=True, text=True,
                              env=env, timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail("reading the archive hung")
    assert "without running its code" in done.stdout, done.stderr[-2000:]


class _WithPlainTensor(torch.nn.Module):
    """Parameters, a buffer, a plain tensor attribute and a submodule, as OpenAI's scripted CLIP has."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 3)
        self.register_buffer("scale", torch.rand(3))
        self.attn_mask = torch.rand(2, 2)  # an attribute, not state: jit's state_dict() leaves it out
        self.blocks = torch.nn.ModuleList([torch.nn.LayerNorm(3), torch.nn.LayerNorm(3)])

    def forward(self, x):
        x = self.proj(x) * self.scale
        for block in self.blocks:
            x = block(x)
        return x


def test_torchscript_tensors_equal_jit_state_dict(tmp_path):
    archive = tmp_path / "scripted.pt"
    _script_save(_WithPlainTensor(), archive)
    ours = read_state_dict(archive)
    theirs = torch.jit.load(str(archive)).state_dict()
    assert ours.keys() == theirs.keys() and "attn_mask" not in ours
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_format_comes_from_the_content_not_the_name(tmp_path):
    source = _random_clip(seed=2)
    tensors = {k: v.contiguous() for k, v in source.state_dict().items()}
    upper = tmp_path / "W.SAFETENSORS"
    save_file(tensors, str(upper))
    misnamed = tmp_path / "really_safetensors.pt"
    save_file(tensors, str(misnamed))
    pickled = tmp_path / "checkpoint.safetensors"
    torch.save(source.state_dict(), pickled)
    for path in (upper, misnamed, pickled):
        assert _same_weights(source, load_clip("stop-tiny", path)), path


@pytest.mark.parametrize("poison", ["int", "bool", "nan", "inf"])
def test_integer_boolean_nan_or_infinite_weights_are_refused(tmp_path, poison):
    state = {k: v.clone() for k, v in _random_clip(seed=3).state_dict().items()}
    key = "visual.conv1.weight"
    if poison in ("nan", "inf"):
        state[key][0, 0, 0, 0] = float(poison)
    else:
        state[key] = state[key].to(torch.int32 if poison == "int" else torch.bool)
    path = tmp_path / "poisoned.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(WeightsError, match=r"poisoned\.safetensors: visual\.conv1\.weight (holds|contains NaN|contains inf)"):
        load_clip("stop-tiny", path)


# ------------------------------------------------------------------ GELU flavour, seeds, provenance
def test_quick_gelu_false_overrides_a_quickgelu_config():
    from open_clip.transformer import QuickGELU

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quick = load_clip("stop-tiny", seed=5)  # stop-tiny's config sets quick_gelu
        erf = load_clip("stop-tiny", seed=5, quick_gelu=False)
    assert any(isinstance(m, QuickGELU) for m in quick.modules())
    assert not any(isinstance(m, QuickGELU) for m in erf.modules())
    assert any(isinstance(m, torch.nn.GELU) for m in erf.modules())
    assert (quick.stop_fast_source["gelu"], erf.stop_fast_source["gelu"]) == ("quick", "erf")
    image = torch.randn(1, 3, 112, 112)
    assert _same_weights(quick, erf)
    assert (quick.encode_image(image) - erf.encode_image(image)).abs().max() > 1e-4


def test_seeded_random_weights_are_reproducible_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b, c = load_clip("stop-tiny", seed=7), load_clip("stop-tiny", seed=7), load_clip("stop-tiny", seed=8)
    assert torch.equal(torch.rand(1), expected_next)
    assert _same_weights(a, b) and not _same_weights(a, c)
    assert a.stop_fast_source == {"model_name": "stop-tiny", "gelu": "quick", "weights": None,
                                  "sha256": None, "random_seed": 7}
    with pytest.raises(ValueError, match="seed"):
        load_clip("stop-tiny", seed=-1)


def test_random_weights_are_always_seeded(capsys):
    """Without a seed a random backbone is seed 0's, whatever the global RNG holds: two builds, two
    `encode` runs and a prompt file that records the seed all agree."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(1)
        a = load_clip("stop-tiny")
        torch.manual_seed(2)
        b = load_clip("stop-tiny")
    assert _same_weights(a, b) and a.stop_fast_source["random_seed"] == 0
    from stop_fast.cli import main

    heads = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert main(["encode", "--model", "stop-tiny", "--frames", "3", "--device", "cpu"]) == 0
        heads.append(json.loads(capsys.readouterr().out)["embedding_head"])
    assert heads[0] == heads[1]


def test_source_records_the_weights_file_and_its_sha256(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in _random_clip(seed=1).state_dict().items()}, str(path))
    clip = load_clip("stop-tiny", path, quick_gelu=False)
    assert clip.stop_fast_source == {
        "model_name": "stop-tiny", "gelu": "erf", "weights": str(path),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "random_seed": None,
    }
