"""`stop-fast demo`: STOP tells a video from its time reversal; mean pooling of frame features cannot.

The demo writes a small dataset of video files (:func:`stop_fast.synthetic.write_motion_dataset`: a
bright shape moving right or left, every clip's time reversal a clip of the other class), trains
STOP on the `stop-tiny` backbone through the ordinary training entry point
(``stop_fast.train.train``), and prints four rows of SPEC.md's ablation side by side:

- STOP (K = 6, rho = 12), the full method;
- intra-only (rho = 0) and inter-only (K = 0);
- prompts off (K = 0, rho = 0): CLIP's frame features, mean-pooled, nothing to train. A clip and its
  reversal hold the same frames, so this row gets exactly one clip of every validation pair right:
  50%, whatever the weights.

It leaves in ``out``: ``data/`` (the videos and their CSV lists), ``runs/<row>/`` (each run's
metrics, config and checkpoint, as `stop-fast train` writes them), ``demo.json`` (the table and the
settings) and ``curves.png`` (training loss and validation accuracy of every row).

The backbone has random weights unless ``weights`` names a CLIP checkpoint for `stop-tiny`'s
architecture: the demo shows what the prompts learn on top of a frozen network, not CLIP's
knowledge. Sizes, epochs and learning rate are the demo's own (SPEC.md's defaults are for real
datasets on a GPU); they are printed with the results.

What to expect (measured on a two-core CPU machine, seeds 0 to 4): STOP and inter-only reach 100%,
prompts off stays at exactly 50%, and intra-only lands between 81% and 100%. Intra-only picks its
K patches by a hard top-K that no gradient reaches; the random backbone starts with a large bias
towards one class for some seeds, and while training removes it the selection can drift off the
moving patches, whose difference features are the only place the direction shows. The whole demo
takes about a minute on a quiet machine (one torch thread), under two minutes on a busy one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional

from .io import write_json
from .synthetic import MOTION_CLASSES, write_motion_dataset

MODEL = "stop-tiny"
IMAGE_SIZE = 112  # stop-tiny's input size: the videos are written at it, so decoding needs no resize
RESULTS_FILE = "demo.json"
CURVES_FILE = "curves.png"


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    k: int
    rho: int
    what: str


ROWS = (
    Row("STOP", 6, 12, "intra- and inter-frame prompts"),
    Row("intra-only", 6, 0, "rho = 0: spatial prompts on K patches"),
    Row("inter-only", 0, 12, "K = 0: temporal prompt tokens"),
    Row("prompts off", 0, 0, "frozen CLIP, frame features mean-pooled"),
)


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """What the demo trains on and how long; every row uses the same settings."""

    num_train: int = 192
    num_val: int = 64
    frames: int = 8  # T: the files hold exactly T frames, so evaluation sampling is symmetric in time
    epochs: int = 2
    batch_size: int = 4  # small batches: more steps for the same compute (the cost per clip is flat in B)
    lr: float = 1e-3  # SPEC's AdamW; its other defaults (betas, weight decay, warm-up, clip) unchanged


FULL = DemoSettings()
# a smoke run: every step of the demo in seconds; its accuracies mean nothing
QUICK = DemoSettings(num_train=16, num_val=8, frames=4, epochs=1, batch_size=8)


def run_demo(
    out: str,
    weights: Optional[str] = None,
    seed: int = 0,
    quick: bool = False,
    device: str = "cpu",
    workers: int = 0,
    threads: Optional[int] = 1,
    settings: Optional[DemoSettings] = None,
    log: Callable[[str], None] = print,
) -> Dict:
    """Write the dataset, train and evaluate the four rows, print the table; returns ``demo.json``'s dict.

    ``settings`` overrides the sizes of the run (``quick`` picks :data:`QUICK`, else :data:`FULL`).
    ``out`` must be a new or empty folder, or one an earlier demo wrote (its results are replaced).
    ``workers``: video decoding processes (0: in the training process; decoding these clips costs
    about a tenth of training them). ``threads``: torch's CPU threads while the demo runs (None leaves
    the setting alone). One is the default because the model is tiny: on a two-core machine with
    anything else running, two threads waiting on each other took three times as long (measured).
    """
    settings = settings or (QUICK if quick else FULL)
    if weights is not None and not os.path.isfile(weights):
        raise FileNotFoundError(f"weights file not found: {weights}")
    _check_out(out)
    from .train import train  # noqa: F401 - the loop users run; a missing one is named before any file is written

    _clear_out(out)
    started = time.perf_counter()

    log(f"stop-fast demo: {MOTION_CLASSES[0]!r} vs {MOTION_CLASSES[1]!r}; every clip's time reversal is in the other class")
    log(_backbone_line(weights))
    data = os.path.join(out, "data")
    tick = time.perf_counter()
    train_csv, val_csv = write_motion_dataset(data, settings.num_train, settings.num_val, IMAGE_SIZE,
                                              settings.frames, seed)
    data_seconds = time.perf_counter() - tick
    log(f"data: {settings.num_train} training + {settings.num_val} validation videos, {settings.frames} frames of "
        f"{IMAGE_SIZE} px (MJPEG) in {data} ({data_seconds:.1f} s)")
    log(f"training: {settings.epochs} epochs, batch {settings.batch_size}, AdamW lr {settings.lr:g}, T = "
        f"{settings.frames}, the same for every row; {threads or 'default'} CPU thread(s)" + ("  [--quick: a smoke run, accuracies mean nothing]" if quick else ""))

    rows: List[Dict] = []
    with _torch_threads(threads), warnings.catch_warnings():
        # said once above; every run would repeat it
        warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
        for row in ROWS:
            rows.append(_run_row(row, settings, train_csv, val_csv, data, out, weights, seed, device, workers, log))

    total = time.perf_counter() - started
    summary = {
        "task": {"classes": list(MOTION_CLASSES), "chance": 100.0 / len(MOTION_CLASSES),
                 "train_list": train_csv, "val_list": val_csv},
        "model": MODEL, "weights": weights, "random_weights": weights is None, "seed": seed, "quick": quick,
        "device": device, "threads": threads, "settings": dataclasses.asdict(settings), "rows": rows,
        "data_seconds": round(data_seconds, 1), "total_seconds": round(total, 1),
        "checkpoint": rows[0]["checkpoint"], "out": out,
    }
    curves = _plot_curves(rows, os.path.join(out, CURVES_FILE))
    summary["curves"] = curves
    write_json(os.path.join(out, RESULTS_FILE), summary)
    for line in format_table(summary):
        log(line)
    return summary


def _run_row(row: Row, settings: DemoSettings, train_csv: str, val_csv: str, data: str, out: str,
             weights: Optional[str], seed: int, device: str, workers: int, log: Callable[[str], None]) -> Dict:
    """One row of the table: a run of the ordinary training entry point (evaluation only when K = rho = 0)."""
    from .config import STOPConfig
    from .train import TrainConfig, train

    run_dir = os.path.join(out, "runs", _slug(row.name))
    config = TrainConfig(
        dataset="csv", train_list=train_csv, val_list=val_csv, video_root=data, weights=weights,
        stop=STOPConfig(model_name=MODEL, num_frames=settings.frames, k=row.k, rho=row.rho),
        epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.lr, out=run_dir, decoder="pyav",
        workers=workers, flip=False, device=device, compile=False, seed=seed,
    )
    log(f"-- {row.name} (K = {row.k}, rho = {row.rho}): " + ("evaluation only" if row.k == row.rho == 0 else "training"))
    tick = time.perf_counter()
    result = train(config)
    seconds = time.perf_counter() - tick
    if "val_top1" not in result:
        raise RuntimeError(f"stop_fast.train.train returned no 'val_top1' for the {row.name} row: {sorted(result)}")
    return {
        "row": row.name, "k": row.k, "rho": row.rho, "what": row.what,
        "val_top1": float(result["val_top1"]), "seconds": round(seconds, 1),  # percent, as the loop reports it
        "checkpoint": result.get("checkpoint"), "run_dir": run_dir,
    }


@contextlib.contextmanager
def _torch_threads(threads: Optional[int]):
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def format_table(summary: Dict) -> List[str]:
    """The comparison table and where the outputs are, as printed lines."""
    chance = summary["task"]["chance"]
    lines = ["", f"{'':13s} {'K':>2s} {'rho':>4s}  {'val top-1':>9s}  {'time':>6s}  what"]
    for r in summary["rows"]:
        lines.append(f"{r['row']:13s} {r['k']:2d} {r['rho']:4d}  {r['val_top1']:8.1f}%  {r['seconds']:5.0f}s  {r['what']}")
    lines.append(f"chance: {chance:.0f}%. Mean pooling sees a clip and its reversal as the same set of frames.")
    if summary["random_weights"]:
        lines.append(f"backbone: {summary['model']} with RANDOM frozen weights (pass --weights FILE for a CLIP checkpoint)")
    lines.append(f"total {summary['total_seconds']:.0f} s; results {os.path.join(summary['out'], RESULTS_FILE)}"
                 + (f", curves {summary['curves']}" if summary.get("curves") else "")
                 + (f"; STOP's checkpoint {summary['checkpoint']}" if summary.get("checkpoint") else ""))
    return lines


def _backbone_line(weights: Optional[str]) -> str:
    if weights is None:
        return (f"backbone: {MODEL} with RANDOM frozen weights (no --weights given): the prompts learn on top of a "
                "frozen random network; CLIP's knowledge is not involved")
    return f"backbone: {MODEL} with frozen weights from {weights}"


def _check_out(out: str) -> None:
    """``out`` must be new, empty, or an earlier demo's folder."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise NotADirectoryError(f"--out {out} is a file; give a folder")
    if os.path.isdir(out) and os.listdir(out) and not os.path.isfile(os.path.join(out, RESULTS_FILE)):
        raise FileExistsError(f"--out {out} is not empty and holds no earlier demo ({RESULTS_FILE}); "
                              "give a new or empty folder")


def _clear_out(out: str) -> None:
    """Remove what an earlier demo left in ``out`` (only the demo's own names), create it if new."""
    for name in ("data", "runs"):
        shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    for name in (RESULTS_FILE, CURVES_FILE):
        if os.path.isfile(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    os.makedirs(out, exist_ok=True)


def _slug(name: str) -> str:
    return name.lower().replace(" ", "-")


def _read_metrics(run_dir: str) -> List[Dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _plot_curves(rows: List[Dict], path: str) -> Optional[str]:
    """Training loss per step and validation top-1 per epoch of every row, from the runs' metrics.jsonl.

    Returns the path written, or None (with a note on stderr) when matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        print("stop-fast demo: matplotlib is not installed; no curves plotted", file=sys.stderr)
        return None
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for r in rows:
        records = _read_metrics(r["run_dir"])
        losses = [(m["step"], m["loss"]) for m in records if "loss" in m and "step" in m]
        evals = [(m.get("epoch", i), m["val_top1"]) for i, m in enumerate(records) if "val_top1" in m]
        if losses:
            loss_ax.plot(*zip(*losses), label=r["row"])
        if r["k"] == r["rho"] == 0:  # nothing trained: one evaluation, drawn as a level
            acc_ax.axhline(r["val_top1"], linestyle="--", color="grey", label=f"{r['row']} ({r['val_top1']:.0f}%)")
        elif evals:  # STOP thickest and underneath, so that rows on the same values stay visible
            full = r["row"] == ROWS[0].name
            acc_ax.plot(*zip(*evals), marker="o", label=r["row"], linewidth=4 if full else 1.5,
                        markersize=10 if full else 5, zorder=2 if full else 3)
    loss_ax.set(xlabel="step", ylabel="training loss (cross-entropy)", yscale="log", title="training")
    acc_ax.set(xlabel="epoch", ylabel="validation top-1 (%)", ylim=(0, 105), title="validation")
    acc_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle("STOP on moving right vs moving left (every clip's reversal in the other class)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
