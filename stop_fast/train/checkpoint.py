"""Training checkpoints: atomic, resumable, readable without running code, and found by one rule.

A checkpoint of step S is two files in ``OUT/checkpoints``:
- ``step-0000000S.safetensors``: the trainable weights, a prompt file (``STOP.save_prompts``:
  self-describing, STOPConfig and backbone in its metadata). ``stop-fast eval`` / ``predict`` take it.
- ``step-0000000S.pt``: the rest of the training state (optimiser, scheduler, step, RNG states, the
  loader's position, the run's settings), read back with ``torch.load(weights_only=True)``.

Both are written by :func:`stop_fast.io.atomic_path` (flushed, renamed; a killed save's temporary
is removed by the next save), the ``.pt`` last, so a checkpoint exists only once both halves are
complete. :func:`newest_readable` is what ``--resume auto`` reads: the newest checkpoint that loads,
with a warning naming each newer one that does not. :func:`resolve_prompts` is the one rule that
turns a user's ``--checkpoint`` (a run folder, a ``.pt`` or a prompt file) into a prompt file.
"""
from __future__ import annotations

import contextlib
import glob
import logging
import os
import random
import re
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..io import atomic_path

FORMAT = "stop_fast.train/1"
PROMPTS_FILE = "prompts.safetensors"  # a finished run's final prompts, in its folder
CHECKPOINTS_DIR = "checkpoints"
_NAME = re.compile(r"step-(\d{8,})\.pt$")

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- RNG
def rng_state() -> Dict[str, Any]:
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": _to_lists(random.getstate()),
             "numpy": [kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, tuple) else x


# ---------------------------------------------------------------------------------------------- files
def paths_for(folder: str, step: int) -> Dict[str, str]:
    stem = os.path.join(folder, f"step-{step:08d}")
    return {"state": stem + ".pt", "prompts": stem + ".safetensors"}


def save(folder: str, step: int, model, state: Dict[str, Any], keep: int) -> str:
    """Write checkpoint ``step`` (prompts, then state) and keep only the ``keep`` newest up to it;
    checkpoints past ``step`` (of a branch a resume from an older one abandoned, or damaged ones that
    resume skipped) go first, so they can never outrank it. Returns the .pt path."""
    os.makedirs(folder, exist_ok=True)
    paths = paths_for(folder, step)
    with atomic_path(paths["prompts"]) as tmp:
        model.save_prompts(tmp)
    payload = {"format": FORMAT, "step": step, "prompts": os.path.basename(paths["prompts"]), **state}
    with atomic_path(paths["state"]) as tmp:
        torch.save(payload, tmp)
    steps = list_checkpoints(folder)
    for old in [s for s in steps if s > step] + [s for s in steps if s <= step][:-keep]:
        for p in paths_for(folder, old).values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
    return paths["state"]


def list_checkpoints(folder: str) -> List[int]:
    """Steps of the complete checkpoints in ``folder``, oldest first."""
    steps = []
    for path in glob.glob(os.path.join(glob.escape(folder), "step-*.pt")):
        m = _NAME.search(os.path.basename(path))
        if m and os.path.isfile(paths_for(folder, int(m.group(1)))["prompts"]):
            steps.append(int(m.group(1)))
    return sorted(steps)


def latest(folder: str) -> Optional[str]:
    """The newest complete checkpoint's ``.pt`` path (None: none), whether or not it reads."""
    steps = list_checkpoints(folder)
    return paths_for(folder, steps[-1])["state"] if steps else None


def load(path: str, map_location="cpu") -> Dict[str, Any]:
    """The state dict of a ``.pt`` checkpoint, or a ValueError/FileNotFoundError naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle, zip and torch errors all mean "not readable"
        first = _first_line(exc)
        raise ValueError(f"{path} is not a readable stop_fast training checkpoint ({first})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a stop_fast training checkpoint (format {FORMAT} expected)")
    payload["prompts_path"] = os.path.join(os.path.dirname(os.path.abspath(path)), payload["prompts"])
    if not os.path.isfile(payload["prompts_path"]):
        raise FileNotFoundError(f"{path}: its weights file {payload['prompts_path']} is missing")
    return payload


def newest_readable(folder: str, check=None) -> Optional[Tuple[str, Dict[str, Any]]]:
    """``(path, state)`` of the newest checkpoint in ``folder`` that loads (and passes ``check(state)``,
    which raises ``ValueError`` / ``OSError`` for a damaged one); each newer damaged checkpoint is
    named in a warning. None when the folder holds no checkpoint; a ``ValueError`` when none reads."""
    steps = list_checkpoints(folder)
    damaged = []
    for step in reversed(steps):
        path = paths_for(folder, step)["state"]
        try:
            state = load(path)
            if check is not None:
                check(state)
        except (ValueError, OSError) as exc:
            log.warning("checkpoint %s cannot be resumed (%s); trying the one before it", path, _first_line(exc))
            damaged.append(path)
            continue
        return path, state
    if damaged:
        raise ValueError(f"no checkpoint in {folder} can be resumed (damaged: {', '.join(damaged)})")
    return None


def resolve_prompts(path: str) -> str:
    """A user's ``--checkpoint``: a prompt ``.safetensors`` file, a training ``.pt`` checkpoint, or a
    run folder (its final prompts, else its newest checkpoint) -> the prompt file."""
    if os.path.isdir(path):
        final = os.path.join(path, PROMPTS_FILE)
        if os.path.isfile(final):
            return final
        newest = latest(os.path.join(path, CHECKPOINTS_DIR))
        if newest is None:
            raise FileNotFoundError(f"{path}: no {PROMPTS_FILE} and no {CHECKPOINTS_DIR}/step-*.pt in this folder")
        path = newest
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".pt"):
        return load(path)["prompts_path"]
    return path


def run_folder(prompts: str) -> Optional[str]:
    """The run folder a prompt file belongs to (its own folder, or the one above ``checkpoints/``)
    when that folder holds the run's ``config.json``; None for a prompt file on its own."""
    folder = os.path.dirname(os.path.abspath(prompts))
    if os.path.basename(folder) == CHECKPOINTS_DIR:
        folder = os.path.dirname(folder)
    return folder if os.path.isfile(os.path.join(folder, "config.json")) else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
