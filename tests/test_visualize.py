"""`stop-fast visualize` and stop_fast.visualize: the saved figure shows exactly what STOP.explain computes."""
import json
import warnings

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from stop_fast import STOP, STOPConfig, load_clip
from stop_fast.cli import main
from stop_fast.data import read_video_clip
from stop_fast.synthetic import moving_square, write_video
from stop_fast.train.checkpoint import PROMPTS_FILE
from stop_fast.visualize import (
    OUTLINE_INSET,
    OUTLINE_RGB,
    OUTLINE_WIDTH,
    clip_to_rgb,
    draw_explanation,
    explain_clip,
    figure_layout,
)

from helpers import clip_model, make_stop

SIZE = 112  # stop-tiny's input: a 7 x 7 grid of 16 px patches


def write_clip(path, clip):
    """A CLIP-normalised clip (T, 3, H, W) -> an MJPEG file (every frame coded alone, near lossless)."""
    return write_video(path, (clip_to_rgb(clip) * 255).round().astype(np.uint8))


@pytest.fixture(scope="module")
def square_video(tmp_path_factory):
    clip = moving_square(16, SIZE, direction=2, generator=torch.Generator().manual_seed(3))
    return write_clip(tmp_path_factory.mktemp("videos") / "square.avi", clip)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Files a user would hold: backbone weights, and a checkpoint folder with non-trivial prompt weights
    trained over them. Returns ``(model_for, backbone file, checkpoint folder)``; ``model_for(T)`` is the
    checkpoint's model for T frames, built from the files as the command builds it."""
    root = tmp_path_factory.mktemp("checkpoint")
    backbone = root / "backbone.pt"
    torch.save(clip_model("stop-tiny").state_dict(), backbone)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip = load_clip("stop-tiny", backbone)  # the prompt file records these backbone weights
    folder = root / "run"
    folder.mkdir()

    def model_for(num_frames):
        return STOP(STOPConfig(model_name="stop-tiny", num_frames=num_frames), clip).eval()

    model = model_for(6)
    model.load_trainable_state_dict(make_stop("stop-tiny", randomize=True, seed=5).trainable_state_dict())
    model.save_prompts(folder / PROMPTS_FILE)

    def loaded(num_frames):
        m = model_for(num_frames)
        m.load_prompts(folder / PROMPTS_FILE)
        return m

    return loaded, str(backbone), str(folder)


def read_png(path):
    img = imread(path)
    assert img.dtype == np.float32 and img.shape[-1] in (3, 4)
    return np.round(img[..., :3] * 255).astype(np.uint8)


def outline_mask(img):
    return np.all(img == np.round(np.asarray(OUTLINE_RGB) * 255).astype(np.uint8), axis=-1)


def outlined_patches(red, layout, t, video=0):
    """Patches of frame t whose outline ring (OUTLINE_INSET px inside the border) is the outline colour.

    ``red``: the outline-coloured pixels of the image. Every ring must be all or nothing
    outline-coloured: a shifted or blurred outline fails here."""
    found = set()
    for j in range(layout.grid ** 2):
        x0, y0, x1, y1 = layout.patch_box(video, 0, t, j)
        a, b = OUTLINE_INSET, OUTLINE_INSET + OUTLINE_WIDTH
        ring = np.concatenate([
            red[y0 + a : y0 + b, x0 + a : x1 - a].ravel(), red[y1 - b : y1 - a, x0 + a : x1 - a].ravel(),
            red[y0 + a : y1 - a, x0 + a : x0 + b].ravel(), red[y0 + a : y1 - a, x1 - b : x1 - a].ravel(),
        ])
        share = ring.mean()
        assert share > 0.98 or share < 0.02, f"frame {t}, patch {j}: {share:.0%} of its outline ring is red"
        if share > 0.98:
            found.add(j)
    return found


def check_outlines(png, layout, selected, video=0):
    img = read_png(png)
    assert img.shape[:2] == (layout.height, layout.width)
    red = outline_mask(img)
    for t in range(len(selected)):
        assert outlined_patches(red, layout, t, video) == {int(j) for j in selected[t]}, f"frame {t}"


def test_command_draws_the_patches_explain_selects(trained, square_video, tmp_path, capsys):
    model_for, backbone, folder = trained
    model = model_for(6)
    out = tmp_path / "fig.png"
    rc = main(["visualize", square_video, "--weights", backbone, "--checkpoint", folder, "--out", str(out),
               "--html", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    # the same clip through the same model, computed here
    clip = read_video_clip(square_video, 6, size=SIZE, mode="eval")
    details = explain_clip(model, clip)
    layout = figure_layout(6, 7)
    assert layout.width > 6 * layout.panel and layout.patch * 7 == layout.panel
    check_outlines(out, layout, details["selected"])
    # distinct frames choose distinct patches, so a figure repeating one frame's outlines would fail
    assert len({tuple(sorted(r)) for r in details["selected"].tolist()}) > 1
    page = (tmp_path / "fig.html").read_text()
    assert "fig.png" in page and "square.avi" in page
    first = " ".join(f"({int(j) // 7},{int(j) % 7})" for j in details["selected"][0])
    assert first in page
    for t, n in enumerate(details["counts"]):
        assert f"<tr><td>{t + 1}</td><td>{int(n)}</td>" in page
    assert "wrote" in capsys.readouterr().out


def test_random_weights_are_said_on_the_figure(square_video, tmp_path, monkeypatch):
    import stop_fast.visualize as viz

    seen = {}
    real = viz.draw_explanations

    def spy(videos, config, subtitle=""):
        seen["subtitle"], seen["config"] = subtitle, config
        return real(videos, config, subtitle=subtitle)

    monkeypatch.setattr(viz, "draw_explanations", spy)  # the command imports it when it runs
    out = tmp_path / "r.png"
    with pytest.warns(UserWarning, match="RANDOM weights"):
        assert main(["visualize", square_video, "--model", "stop-tiny", "--frames", "3", "--k", "4",
                     "--alpha", "0.7", "--out", str(out), "--device", "cpu"]) == 0
    assert "random weights" in seen["subtitle"] and "stop-tiny" in seen["subtitle"]
    assert (seen["config"].k, seen["config"].alpha, seen["config"].rho) == (4, 0.7, 12)
    layout = figure_layout(3, 7)
    assert read_png(out).shape[:2] == (layout.height, layout.width)


@pytest.fixture(scope="module")
def grid16(tmp_path_factory):
    """A tiny open_clip config with 8 px patches at 128 px: a 16 x 16 grid like ViT-B/16 at 256 px."""
    import open_clip

    folder = tmp_path_factory.mktemp("configs")
    (folder / "viz-grid16.json").write_text(json.dumps({
        "embed_dim": 32, "quick_gelu": True,
        "vision_cfg": {"image_size": 128, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 1},
    }))
    open_clip.add_model_config(folder)
    return "viz-grid16"


def test_16x16_grid_figure(grid16, tmp_path):
    model = make_stop(grid16, randomize=True, seed=1, num_frames=3, k=9)
    assert model.grid == 16
    clip = moving_square(3, 128, direction=0, generator=torch.Generator().manual_seed(0))
    details = explain_clip(model, clip)
    fig = draw_explanation(clip_to_rgb(clip), details, model.config, title="16 x 16")
    layout = fig.stop_fast_layout
    assert layout.grid == 16 and layout.patch >= 8
    out = tmp_path / "g16.png"
    fig.savefig(out, dpi=fig.dpi)
    check_outlines(out, layout, details["selected"])


def test_64_frames_wrap_into_rows_of_16(tmp_path):
    model = make_stop("stop-tiny", randomize=True, seed=2, num_frames=64)
    clip = moving_square(64, SIZE, direction=3, generator=torch.Generator().manual_seed(4))
    details = explain_clip(model, clip)
    fig = draw_explanation(clip_to_rgb(clip), details, model.config, title="64 frames")
    layout = fig.stop_fast_layout
    assert layout.columns == 16
    tops = sorted({y for (_, row, _), (_, y) in layout.panels.items() if row == 0})
    assert len(tops) == 4  # four rows of frames, each followed by its three maps
    assert layout.width < 3200 and layout.height < 3600
    out = tmp_path / "t64.png"
    fig.savefig(out, dpi=fig.dpi, pil_kwargs={"compress_level": 1})  # a large image: encode it fast
    check_outlines(out, layout, details["selected"])


@pytest.mark.parametrize("k, rho", [(0, 12), (6, 0)])
def test_switched_off_branches_leave_their_rows_out(k, rho, tmp_path):
    model = make_stop("stop-tiny", randomize=True, num_frames=4, k=k, rho=rho)
    clip = moving_square(4, SIZE, generator=torch.Generator().manual_seed(0))
    details = explain_clip(model, clip)
    fig = draw_explanation(clip_to_rgb(clip), details, model.config)
    layout = fig.stop_fast_layout
    assert layout.rows == (4 if k else 1) and bool(layout.bars) == bool(rho)
    out = tmp_path / "off.png"
    fig.savefig(out, dpi=fig.dpi)
    img = read_png(out)
    assert img.shape[:2] == (layout.height, layout.width)
    if k == 0:  # no selection, no outline anywhere
        assert not outline_mask(img).any()
    else:
        check_outlines(out, layout, details["selected"])


def test_several_videos_in_one_figure(trained, square_video, tmp_path):
    model_for, backbone, folder = trained
    other = write_clip(tmp_path / "other.avi", moving_square(10, 80, direction=1, generator=torch.Generator().manual_seed(9)))
    out = tmp_path / "two.png"
    assert main(["visualize", square_video, other, "--weights", backbone, "--checkpoint",
                 f"{folder}/{PROMPTS_FILE}", "--frames", "5", "--out", str(out), "--device", "cpu"]) == 0
    layout = figure_layout(5, 7, num_videos=2)
    model = model_for(5)
    for v, path in enumerate([square_video, other]):
        details = explain_clip(model, read_video_clip(path, 5, size=SIZE, mode="eval"))
        check_outlines(out, layout, details["selected"], video=v)


def one_line_error(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("stop-fast visualize: error:"), err
    for needle in needles:
        assert needle in err, err
    return err


def test_bad_paths_give_one_line_errors(square_video, tmp_path, capsys):
    out = str(tmp_path / "f.png")
    one_line_error(capsys, ["visualize", str(tmp_path / "missing.mp4"), "--out", out], "VIDEO", "missing.mp4")
    one_line_error(capsys, ["visualize", square_video, "--out", str(tmp_path / "no" / "f.png")], "--out")
    one_line_error(capsys, ["visualize", square_video, "--out", str(tmp_path / "f.xyz")], "--out", "xyz")
    one_line_error(capsys, ["visualize", square_video, "--out", out, "--weights", str(tmp_path / "w.pt")], "--weights")
    one_line_error(capsys, ["visualize", square_video, "--out", out, "--frames", "0"], "--frames")
    garbage = tmp_path / "broken.mp4"
    garbage.write_bytes(b"\x00not a video" * 100)
    with pytest.warns(UserWarning):
        one_line_error(capsys, ["visualize", str(garbage), "--model", "stop-tiny", "--out", out,
                                "--device", "cpu"], "broken.mp4")


def test_bad_checkpoints_give_one_line_errors(trained, square_video, tmp_path, capsys):
    from safetensors.torch import save_file

    model_for, backbone, folder = trained
    model = model_for(6)
    out = str(tmp_path / "f.png")
    base = ["visualize", square_video, "--out", out, "--weights", backbone, "--device", "cpu", "--checkpoint"]
    one_line_error(capsys, base + [str(tmp_path / "nothing")], "--checkpoint", "no such file or folder")
    empty = tmp_path / "empty_run"
    empty.mkdir()
    one_line_error(capsys, base + [str(empty)], str(empty), PROMPTS_FILE)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 64)
    one_line_error(capsys, base + [str(junk)], "junk.safetensors", "not a readable safetensors file")
    bare = tmp_path / "bare.safetensors"
    save_file({"x": torch.zeros(2)}, bare)
    one_line_error(capsys, base + [str(bare)], "bare.safetensors", "no stop_config in its metadata")
    # the right metadata over the wrong tensors
    wrong = tmp_path / "wrong.safetensors"
    meta = {"stop_config": json.dumps(model.config.to_dict())}
    save_file({"conv_intra.conv.weight": torch.zeros(3)}, wrong, metadata=meta)
    one_line_error(capsys, base + [str(wrong)], "wrong.safetensors")
    # a checkpoint trained on a backbone weights file cannot be shown over random backbone weights
    needs = tmp_path / "needs_weights.safetensors"
    save_file(model.trainable_state_dict(), needs, metadata={
        **meta, "backbone": json.dumps({"model_name": "stop-tiny", "gelu": "quick", "weights": "clip.pt"})})
    one_line_error(capsys, ["visualize", square_video, "--out", out, "--checkpoint", str(needs)], "clip.pt", "--weights")
    # flags that contradict the checkpoint: named before any backbone is built
    one_line_error(capsys, base + [folder, "--k", "3"], "config k: saved 6, this model 3", "--force")
    one_line_error(capsys, base + [folder, "--model", "ViT-B-32"], "model_name: saved 'stop-tiny'", "'ViT-B-32'")


def test_fast_path_explains_the_same_patches(tmp_path):
    model = make_stop("stop-tiny", randomize=True, seed=7, num_frames=4)
    clip = moving_square(4, SIZE, direction=1, generator=torch.Generator().manual_seed(2))
    reference = explain_clip(model, clip, impl="reference")
    fast = explain_clip(model, clip, impl="fast")
    top = np.sort(reference["score"], axis=-1)[:, ::-1]
    clear = top[:, model.config.k - 1] - top[:, model.config.k] > 1e-5  # SPEC: near-ties may go either way
    assert clear.sum() >= 2
    np.testing.assert_array_equal(fast["selected"][clear], reference["selected"][clear])
    np.testing.assert_allclose(fast["score"], reference["score"], rtol=1e-4, atol=1e-6)
    scaled = model.config.rho * reference["variation"]
    away = np.abs(scaled - np.round(scaled)) > 1e-5
    np.testing.assert_array_equal(fast["counts"][away], reference["counts"][away])
    fig = draw_explanation(clip_to_rgb(clip), fast, model.config)
    out = tmp_path / "fast.png"
    fig.savefig(out, dpi=fig.dpi)
    check_outlines(out, fig.stop_fast_layout, fast["selected"])
