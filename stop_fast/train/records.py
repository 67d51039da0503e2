"""What a run leaves behind besides checkpoints: ``metrics.jsonl``, TensorBoard events (when
tensorboard is installed), ``curves.png``, and ``train.log`` with the warnings of the run (skipped
videos by name, stop requests). Written by rank 0 only."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
from typing import Any, Dict, List, Optional

from ..io import atomic_path

log = logging.getLogger(__name__)


class MetricsLog:
    """One JSON object per line: each logging step (``epoch``, ``step``, ``loss``, ``lr``,
    ``videos_per_s``) and each evaluation (``epoch``, ``step`` and ``val_*`` metrics).

    A resumed run appends to the same file after dropping the records of steps past its checkpoint,
    so the file always reads as one uninterrupted run."""

    def __init__(self, out: str, resume_step: Optional[int] = None):
        self.path = os.path.join(out, "metrics.jsonl")
        self.records: List[Dict[str, Any]] = []
        if resume_step is not None and os.path.isfile(self.path):
            self.records = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
        with open(self.path, "w", encoding="utf-8") as f:
            for r in self.records:
                f.write(json.dumps(r) + "\n")
        self._tb = _tensorboard_writer(out, purge_step=None if resume_step is None else resume_step + 1)

    def write(self, record: Dict[str, Any]) -> None:
        self.records.append(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if key not in ("epoch", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(("val/" + key[4:]) if key.startswith("val_") else ("train/" + key), value, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path: str) -> List[Dict[str, Any]]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # a torn last line of a killed run
                    pass
    return out


def _tensorboard_writer(out: str, purge_step: Optional[int]):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(os.path.join(out, "tensorboard"), purge_step=purge_step)


def plot_curves(records: List[Dict[str, Any]], path: str) -> Optional[str]:
    """Training loss and learning rate against the step, and the evaluation metrics, as one PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a dependency, but plots are never worth a crash
        log.warning("matplotlib is not installed: no %s", path)
        return None
    train = [r for r in records if "loss" in r and "lr" in r]
    evals = [r for r in records if any(k.startswith("val_") for k in r)]
    keys = sorted({k for r in evals for k in r if k.startswith("val_") and _is_percent(k)})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], color="tab:blue")
    axes[0].set(title="training loss", xlabel="step", ylabel="loss")
    axes[1].plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:orange")
    axes[1].set(title="learning rate", xlabel="step")
    for key in keys:
        points = [(r["step"], r[key]) for r in evals if key in r and _finite(r[key])]
        if points:
            axes[2].plot(*zip(*points), marker="o", label=key[4:])
    axes[2].set(title="evaluation", xlabel="step", ylabel="%")
    if keys:
        axes[2].legend(fontsize="small")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return path


def _is_percent(key: str) -> bool:
    return any(key.endswith(s) for s in ("top1", "top5", "mean_class_acc", "_r1", "_r5", "_r10"))


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# ---------------------------------------------------------------------------------------------- train.log
@contextlib.contextmanager
def run_logging(out: str, rank_prefix: str = ""):
    """Log records of ``stop_fast`` (skipped videos by name, stop requests) to stderr, above the
    progress bar, and to ``OUT/train.log``, while the run lasts."""
    logger = logging.getLogger("stop_fast")
    fmt = logging.Formatter(rank_prefix + "%(asctime)s %(levelname)s %(message)s")
    # above a progress bar on a terminal; plain lines into a pipe or a log file
    handlers = [logging.FileHandler(os.path.join(out, "train.log")),
                _TqdmHandler() if sys.stderr.isatty() else logging.StreamHandler(sys.stderr)]
    for h in handlers:
        h.setFormatter(fmt)
        h.setLevel(logging.INFO)
        logger.addHandler(h)
    old_level, old_propagate = logger.level, logger.propagate
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.propagate = False  # printed once, above the progress bar, whatever the root logger holds
    try:
        yield
    finally:
        for h in handlers:
            logger.removeHandler(h)
            h.close()
        logger.setLevel(old_level)
        logger.propagate = old_propagate


class _TqdmHandler(logging.StreamHandler):
    """Log lines printed above the progress bar instead of through it."""

    def emit(self, record):
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never break the run
            self.handleError(record)
