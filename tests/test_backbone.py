"""load_clip: random weights with a warning, every supported weights file, clear errors, no network."""
import warnings

import open_clip
import pytest
import torch
from safetensors.torch import save_file

import stop_fast
from stop_fast.backbone import WeightsError, load_clip


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
