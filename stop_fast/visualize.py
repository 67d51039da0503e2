"""Pictures of what STOP sees: the chosen patches, the maps behind them and the prompt counts per frame.

For each sampled frame the figure shows the frame with its top-K patches R_t outlined (the patches
that receive an intra-frame prompt, the paper's Figure 7), and as heatmaps over the frame the
attention map A_t, the temporal dynamics Dyn_t and the patch score S_t = (1 - alpha) A_t + alpha Dyn_t
(the maps of the paper's Figures 1 and 3). Below, a bar chart of the frame variation v^_t and of the
inter-frame prompt tokens n_t = ceil(rho v^_t) each frame receives. Long clips (T up to 64) wrap into
rows of at most 16 frames; every patch grid from 7 x 7 to 16 x 16 (and larger) gets whole pixels per
patch, so the outlines sit exactly on patch borders.

Command line: ``stop-fast visualize VIDEO [VIDEO...] --out FIG.png [--checkpoint PATH] [--html]``.
In Python::

    from stop_fast.visualize import clip_to_rgb, draw_explanation, explain_clip
    details = explain_clip(model, clip)              # clip (T, 3, H, W), CLIP-normalised
    fig = draw_explanation(clip_to_rgb(clip), details, model.config, title="my video")
    fig.savefig("fig.png")

Drawing needs only matplotlib (no pyplot, no global state): the functions return a
``matplotlib.figure.Figure``.
"""
from __future__ import annotations

import dataclasses
import html
import math
import textwrap
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

OUTLINE_RGB = (1.0, 0.0, 0.0)  # pure red, as the paper marks prompted patches; no frame pixel is recoloured otherwise
OUTLINE_INSET = 1  # px between a patch border and its outline, so outlines of neighbouring patches never merge
OUTLINE_WIDTH = 2  # px
HEATMAP_CMAP = "turbo"  # jet-like, as in the paper's attention figures, but perceptually ordered
HEATMAP_OPACITY = 0.6  # the frame stays visible beneath the heatmap
MAX_COLUMNS = 16  # frames per row of the figure; longer clips wrap
DPI = 100

MAPS = (  # explain() key and row label of the heatmap rows, top to bottom
    ("attention", "attention A\n(CLS, block 1)"),
    ("dynamics", "temporal\ndynamics Dyn"),
    ("score", "score S =\n(1-\u03b1)A + \u03b1Dyn\n\u03b1 = {alpha:g}"),
)

# Pixel geometry of the figure (the figure is laid out in whole pixels, see `figure_layout`)
_PANEL_TARGET = 154  # px: about the side of one frame panel
_MIN_PATCH = 8  # px per patch at least, so an outline leaves the patch's centre visible
_GAP = 6
_LEFT = 118  # row labels
_RIGHT = 78  # colour bars and their ticks
_TOP = 88  # the figure's title, its settings and which weights made it (two lines)
_VIDEO_TITLE = 30
_HEADER = 20  # frame numbers above a row of panels
_CHUNK_GAP = 16  # extra space between the rows of a wrapped long clip
_BAR_HEIGHT = 150
_BAR_PAD_TOP = 46
_BAR_PAD_BOTTOM = 44
_BOTTOM = 10
_MIN_WIDTH = 900


# --------------------------------------------------------------------------- inputs


def explain_clip(model, clip, impl: str = "reference") -> Dict[str, np.ndarray]:
    """``STOP.explain`` on one clip (T, 3, H, W), CLIP-normalised -> its quantities as numpy arrays.

    Keys as ``STOP.explain`` without the batch dimension: ``attention``, ``dynamics``, ``score``
    (T, N) and ``selected`` (T, K) when k > 0; ``variation`` (T,) when rho > 0; ``counts``, ``lengths``
    (T,); ``frame_features`` (T, E); ``feature`` (E,).
    """
    import torch

    device = next(model.parameters()).device
    video = clip[None].to(device=device, dtype=torch.float32)
    details = model.explain(video, impl=impl)
    return {key: value[0].detach().float().cpu().numpy() if value.is_floating_point() else value[0].cpu().numpy()
            for key, value in details.items()}


def clip_to_rgb(clip) -> np.ndarray:
    """A CLIP-normalised clip (T, 3, H, W) -> RGB frames (T, H, W, 3) in [0, 1], for display."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    x = clip.detach().float().cpu().numpy().transpose(0, 2, 3, 1)
    return np.clip(x * np.asarray(OPENAI_DATASET_STD) + np.asarray(OPENAI_DATASET_MEAN), 0.0, 1.0)


class VideoExplanation(NamedTuple):
    """One video of a figure: its title, RGB frames (T, H, W, 3) in [0, 1], and ``explain_clip``'s dict."""

    title: str
    frames: np.ndarray
    details: Dict[str, np.ndarray]


# --------------------------------------------------------------------------- geometry


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where everything goes, in pixels from the figure's top-left corner (all whole numbers).

    ``panels[(video, row, t)]`` is the top-left corner of a ``panel`` x ``panel`` square; row 0 is
    the frame with its outlined patches, rows 1..3 the maps of ``MAPS`` (when k > 0). Patch ``j``
    of a frame covers ``patch`` x ``patch`` pixels at grid row ``j // grid``, column ``j % grid``.
    """

    width: int
    height: int
    grid: int
    patch: int
    panel: int
    columns: int
    rows: int
    panels: Dict[Tuple[int, int, int], Tuple[int, int]]
    colorbars: Dict[Tuple[int, int, int], Tuple[int, int, int, int]]  # (video, chunk, row) -> x, y, w, h
    bars: Dict[int, Tuple[int, int, int, int]]  # video -> x, y, w, h of the bar chart
    video_titles: Dict[int, int]  # video -> y of its title's baseline area
    chunk_headers: Dict[Tuple[int, int], int]  # (video, chunk) -> y of the frame-number line

    def patch_box(self, video: int, row: int, t: int, j: int) -> Tuple[int, int, int, int]:
        """Pixel box (x0, y0, x1, y1), end-exclusive, of patch ``j`` in a panel."""
        x, y = self.panels[(video, row, t)]
        r, c = divmod(j, self.grid)
        return x + c * self.patch, y + r * self.patch, x + (c + 1) * self.patch, y + (r + 1) * self.patch


def figure_layout(num_frames: int, grid: int, *, maps: bool = True, bars: bool = True, num_videos: int = 1) -> Layout:
    """The pixel layout of a figure of ``num_videos`` clips of ``num_frames`` frames each.

    ``grid``: patches per side (7 for ViT-B/32 at 224 px, 14 for ViT-B/16, ...). ``maps``: whether the
    A / Dyn / S rows exist (k > 0); ``bars``: whether the v^ / n_t chart exists (rho > 0).
    The layout depends on nothing else, so a saved figure can be read back pixel by pixel.
    """
    if num_frames < 1 or grid < 1 or num_videos < 1:
        raise ValueError(f"figure_layout: need num_frames, grid, num_videos >= 1, got {num_frames}, {grid}, {num_videos}")
    patch = max(_MIN_PATCH, round(_PANEL_TARGET / grid))
    panel = patch * grid
    chunks = math.ceil(num_frames / MAX_COLUMNS)
    columns = math.ceil(num_frames / chunks)
    rows = 1 + (len(MAPS) if maps else 0)
    strip = columns * (panel + _GAP) - _GAP
    width = max(_LEFT + strip + _RIGHT, _MIN_WIDTH)  # short clips: room for the titles and the legend
    panels, colorbars, bar_boxes, titles, headers = {}, {}, {}, {}, {}
    y = _TOP
    for v in range(num_videos):
        titles[v] = y
        y += _VIDEO_TITLE
        for chunk in range(chunks):
            if chunk:
                y += _CHUNK_GAP
            headers[(v, chunk)] = y
            y += _HEADER
            for row in range(rows):
                for col in range(columns):
                    t = chunk * columns + col
                    if t < num_frames:
                        panels[(v, row, t)] = (_LEFT + col * (panel + _GAP), y)
                if row > 0:
                    colorbars[(v, chunk, row)] = (_LEFT + strip + 10, y, 12, panel)
                y += panel + _GAP
        if bars:
            y += _BAR_PAD_TOP
            bar_boxes[v] = (_LEFT, y, strip, _BAR_HEIGHT)
            y += _BAR_HEIGHT + _BAR_PAD_BOTTOM
        else:
            y += _GAP
    return Layout(width=width, height=y + _BOTTOM, grid=grid, patch=patch, panel=panel, columns=columns,
                  rows=rows, panels=panels, colorbars=colorbars, bars=bar_boxes, video_titles=titles,
                  chunk_headers=headers)


# --------------------------------------------------------------------------- drawing


def draw_explanation(frames: np.ndarray, details: Dict[str, np.ndarray], config, *, title: str = "",
                     subtitle: str = ""):
    """One clip's figure: ``frames`` (T, H, W, 3) RGB in [0, 1], ``details`` from :func:`explain_clip`,
    ``config`` the model's ``STOPConfig`` (k, alpha, rho). Returns a ``matplotlib.figure.Figure``."""
    return draw_explanations([VideoExplanation(title, frames, details)], config, subtitle=subtitle)


def draw_explanations(videos: Sequence[VideoExplanation], config, *, subtitle: str = ""):
    """Several clips of the same model, one above the other, in one ``matplotlib.figure.Figure``.

    ``subtitle`` is printed under the figure's title line (say which weights and checkpoint made it).
    """
    from matplotlib.figure import Figure

    if not videos:
        raise ValueError("draw_explanations: no videos given")
    num_frames = _check_videos(videos, config)
    maps = config.k > 0
    bars = config.rho > 0
    grid = _grid_of(videos[0].details) if maps else 7
    layout = figure_layout(num_frames, grid, maps=maps, bars=bars, num_videos=len(videos))
    fig = Figure(figsize=(layout.width / DPI, layout.height / DPI), dpi=DPI, facecolor="white")

    head = "STOP: selected patches and inter-frame prompt counts per frame" if len(videos) > 1 else videos[0].title
    _text(fig, layout, _LEFT, 12, head, fontsize=14, fontweight="bold")
    settings = (f"{config.model_name}    K = {config.k}    \u03b1 = {config.alpha:g}    \u03c1 = {config.rho}    "
                f"T = {num_frames}")
    _text(fig, layout, _LEFT, 36, settings, fontsize=10.5, color="0.15")
    if subtitle:  # which weights: at most two lines, so the layout never depends on the text
        chars = max(40, int((layout.width - _LEFT - 10) / 6.6))
        lines = textwrap.wrap(subtitle, chars, max_lines=2, placeholder=" ...")
        _text(fig, layout, _LEFT, 56, "\n".join(lines), fontsize=9.5, color="0.3", linespacing=1.4)

    # Every panel goes onto one canvas shown pixel for pixel: outlines land on exact pixels, and one
    # image draws far faster than hundreds of axes.
    canvas = np.full((layout.height, layout.width, 4), 255, dtype=np.uint8)  # RGBA, opaque white
    for v, video in enumerate(videos):
        _draw_video(fig, canvas, layout, v, video, config, many=len(videos) > 1)
    fig.figimage(canvas, 0, 0, origin="upper", zorder=-1)
    fig.stop_fast_layout = layout  # the geometry, for readers of the saved image (tests)
    return fig


def _draw_video(fig, canvas: np.ndarray, layout: Layout, v: int, video: VideoExplanation, config, many: bool) -> None:
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    d = video.details
    num_frames = len(video.frames)
    if many:
        _text(fig, layout, _LEFT, layout.video_titles[v] + 8, video.title, fontsize=12, fontweight="bold")
    shown = _resize(video.frames, layout.panel)  # (T, P, P, 3)
    grey = shown.mean(axis=-1, keepdims=True) * np.ones(3)
    counts = d.get("counts")
    chunks = [chunk for (vv, chunk) in layout.chunk_headers if vv == v]  # rows of a wrapped long clip

    # frame numbers above each column (and the tokens it receives)
    for t in range(num_frames):
        x, y = layout.panels[(v, 0, t)]
        label = f"t={t + 1}"
        if config.rho > 0 and counts is not None:
            label += f"  n={int(counts[t])}"
        _text(fig, layout, x + layout.panel / 2, y - 4, label, fontsize=8, ha="center", va="bottom", color="0.25")

    # row 0: the frame, its top-K patches outlined
    for t in range(num_frames):
        img = shown[t].copy()
        if config.k > 0:
            for j in d["selected"][t]:
                _outline(img, layout, int(j))
        _paste(canvas, layout, layout.panels[(v, 0, t)], img)
    for chunk in chunks:
        y = layout.panels[(v, 0, chunk * layout.columns)][1]
        label = f"frame, top-{config.k}\npatches (red)" if config.k > 0 else "frame\n(K = 0: no\nintra prompts)"
        _row_label(fig, layout, y, label)

    # rows 1..3: the maps as heatmaps over the frame, one colour scale per map across all frames
    if config.k > 0:
        cmap = colormaps[HEATMAP_CMAP]
        for row, (key, label) in enumerate(MAPS, start=1):
            values = d[key]  # (T, N)
            norm = Normalize(vmin=float(values.min()), vmax=float(values.max()))
            if norm.vmax <= norm.vmin:
                norm = Normalize(vmin=norm.vmin, vmax=norm.vmin + 1e-6)
            for t in range(num_frames):
                heat = cmap(norm(values[t].reshape(layout.grid, layout.grid)))[..., :3]
                heat = np.repeat(np.repeat(heat, layout.patch, axis=0), layout.patch, axis=1)
                img = (1 - HEATMAP_OPACITY) * grey[t] + HEATMAP_OPACITY * heat
                _paste(canvas, layout, layout.panels[(v, row, t)], img)
            for chunk in chunks:
                y = layout.panels[(v, row, chunk * layout.columns)][1]
                _row_label(fig, layout, y, label.format(alpha=config.alpha))
                x, cy, w, h = layout.colorbars[(v, chunk, row)]
                cax = fig.add_axes(_rect(layout, x, cy, w, h))
                bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax)
                bar.ax.tick_params(labelsize=7, length=2)
                bar.ax.yaxis.get_offset_text().set_fontsize(7)
                bar.ax.locator_params(nbins=4)

    # below: frame variation v^_t and inter-frame tokens n_t, on aligned axes (v^ = 1 <-> n = rho)
    if config.rho > 0:
        _bar_chart(fig, layout, v, d["variation"], counts, config.rho)


def _bar_chart(fig, layout: Layout, v: int, variation: np.ndarray, counts: np.ndarray, rho: int) -> None:
    x, y, w, h = layout.bars[v]
    ax = fig.add_axes(_rect(layout, x, y, w, h))
    t = np.arange(1, len(variation) + 1)
    width = 0.4
    ax.bar(t - width / 2, variation * rho, width, color="#4c72b0", label="frame variation v\u0302$_t$ (right axis)")
    ax.bar(t + width / 2, counts, width, color="#dd8452", label="inter-frame prompt tokens n$_t$ = \u2308\u03c1 v\u0302$_t$\u2309 (left axis)")
    ax.set_xlim(0.5, len(t) + 0.5)
    ax.set_ylim(0, rho * 1.05)
    ax.set_ylabel("tokens n$_t$", fontsize=9)
    ax.set_xlabel("frame t", fontsize=9)
    ax.xaxis.set_major_locator(_integer_ticks(len(t)))
    ax.yaxis.set_major_locator(_integer_ticks(rho))
    ax.tick_params(labelsize=8)
    ax.grid(axis="y", color="0.9", linewidth=0.8)
    ax.set_axisbelow(True)
    if len(t) <= 32:
        for ti, n in zip(t, counts):
            ax.text(ti + width / 2, n + rho * 0.01, str(int(n)), ha="center", va="bottom", fontsize=7, color="#8c4a1c")
    right = ax.twinx()
    right.set_ylim(0, 1.05)
    right.set_ylabel("v\u0302$_t$", fontsize=9)
    right.tick_params(labelsize=8)
    for side in ("top",):
        ax.spines[side].set_visible(False)
        right.spines[side].set_visible(False)
    ax.legend(loc="lower left", bbox_to_anchor=(0, 1.0), ncol=2, fontsize=8.5, frameon=False, borderaxespad=0.3)


def _integer_ticks(top: int):
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(nbins=min(top, 16), integer=True, min_n_ticks=1)


def _outline(img: np.ndarray, layout: Layout, j: int) -> None:
    """Burn an outline into patch ``j`` of a panel image, ``OUTLINE_INSET`` px inside its border."""
    r, c = divmod(j, layout.grid)
    p = layout.patch
    y0, x0 = r * p + OUTLINE_INSET, c * p + OUTLINE_INSET
    y1, x1 = (r + 1) * p - OUTLINE_INSET, (c + 1) * p - OUTLINE_INSET  # end-exclusive
    w = OUTLINE_WIDTH
    img[y0 : y0 + w, x0:x1] = OUTLINE_RGB
    img[y1 - w : y1, x0:x1] = OUTLINE_RGB
    img[y0:y1, x0 : x0 + w] = OUTLINE_RGB
    img[y0:y1, x1 - w : x1] = OUTLINE_RGB


def _resize(frames: np.ndarray, size: int) -> np.ndarray:
    """RGB (T, H, W, 3) -> (T, size, size, 3): the model sees a square crop, so the panel is square too."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32)).permute(0, 3, 1, 2)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.permute(0, 2, 3, 1).numpy().clip(0.0, 1.0)


def _rect(layout: Layout, x: float, y: float, w: float, h: float) -> List[float]:
    """Pixel box from the top-left -> matplotlib's figure fraction [left, bottom, width, height]."""
    return [x / layout.width, 1 - (y + h) / layout.height, w / layout.width, h / layout.height]


def _paste(canvas: np.ndarray, layout: Layout, corner: Tuple[int, int], img: np.ndarray) -> None:
    """Put ``img`` (panel x panel x 3, floats in [0, 1]) on the figure's pixel canvas at ``corner``."""
    x, y = corner
    canvas[y : y + layout.panel, x : x + layout.panel, :3] = np.round(np.clip(img, 0.0, 1.0) * 255)


def _text(fig, layout: Layout, x: float, y: float, s: str, **kwargs) -> None:
    kwargs.setdefault("va", "top")
    fig.text(x / layout.width, 1 - y / layout.height, s, **kwargs)


def _row_label(fig, layout: Layout, y: int, label: str) -> None:
    _text(fig, layout, _LEFT - 8, y + layout.panel / 2, label, fontsize=9, ha="right", va="center",
          multialignment="right")


def _grid_of(details: Dict[str, np.ndarray]) -> int:
    n = details["score"].shape[-1]
    grid = math.isqrt(n)
    if grid * grid != n:
        raise ValueError(f"details: {n} patches per frame is not a square grid")
    return grid


def _check_videos(videos: Sequence[VideoExplanation], config) -> int:
    """All videos must share T and hold the keys the config implies; returns T."""
    num_frames = len(videos[0].frames)
    for video in videos:
        frames, d = video.frames, video.details
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"{video.title}: frames must be (T, H, W, 3) RGB, got shape {frames.shape}")
        if len(frames) != num_frames:
            raise ValueError(f"{video.title}: {len(frames)} frames, but the first video has {num_frames}")
        needed = ["counts"] + (["attention", "dynamics", "score", "selected"] if config.k > 0 else []) + \
            (["variation"] if config.rho > 0 else [])
        missing = [key for key in needed if key not in d]
        if missing:
            raise ValueError(f"{video.title}: details lack {missing} (k = {config.k}, rho = {config.rho})")
        for key in needed:
            if len(d[key]) != num_frames:
                raise ValueError(f"{video.title}: details[{key!r}] has {len(d[key])} frames, frames has {num_frames}")
    return num_frames


# --------------------------------------------------------------------------- html


def explanation_html(image_name: str, videos: Sequence[VideoExplanation], config, *, subtitle: str = "",
                     sources: Optional[Sequence[str]] = None) -> str:
    """A self-contained page: the figure (``image_name``, relative to the page) and, per video and
    frame, the numbers behind it (n_t, v^_t, sequence length, selected patches as (row, column))."""
    e = html.escape
    parts = [
        "<!doctype html>",
        "<html><head><meta charset='utf-8'><title>STOP: what the model sees</title>",
        "<style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin:0.5em 0 2em}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}th{background:#f4f4f4}"
        "td.l{text-align:left}img{max-width:100%}</style></head><body>",
        "<h1>STOP: selected patches and inter-frame prompts per frame</h1>",
        f"<p>{e(subtitle)}<br>K = {config.k}, &alpha; = {config.alpha:g}, &rho; = {config.rho}, "
        f"beta = {config.beta:g}</p>",
        f"<p><img src='{e(image_name, quote=True)}' alt='STOP explanation figure'></p>",
    ]
    for i, video in enumerate(videos):
        d = video.details
        source = sources[i] if sources else video.title
        parts.append(f"<h2>{e(video.title)}</h2><p>{e(source)}</p>")
        head = ["t", "tokens n<sub>t</sub>", "v&#770;<sub>t</sub>", "sequence length"]
        if config.k > 0:
            head += ["max S<sub>t</sub>", "selected patches R<sub>t</sub> (row, column), best first"]
        parts.append("<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>")
        grid = _grid_of(d) if config.k > 0 else None
        for t in range(len(video.frames)):
            cells = [str(t + 1), str(int(d["counts"][t])),
                     f"{float(d['variation'][t]):.4f}" if "variation" in d else "-",
                     str(int(d["lengths"][t])) if "lengths" in d else "-"]
            if config.k > 0:
                cells.append(f"{float(d['score'][t].max()):.5f}")
                cells.append(" ".join(f"({int(j) // grid},{int(j) % grid})" for j in d["selected"][t]))
            parts.append("<tr>" + "".join(
                f"<td class='l'>{c}</td>" if k == len(cells) - 1 and config.k > 0 else f"<td>{c}</td>"
                for k, c in enumerate(cells)) + "</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
