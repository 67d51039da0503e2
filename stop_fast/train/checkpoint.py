"""Training checkpoints: atomic, resumable, and readable without running code.

A checkpoint of step S is two files in ``OUT/checkpoints``:
- ``step-0000000S.safetensors``: the trainable weights, written by ``STOP.save_prompts`` (self-describing:
  STOPConfig and backbone in its metadata). This is the file ``stop-fast eval`` / ``predict`` take.
- ``step-0000000S.pt``: the rest of the training state (optimiser, scheduler, step, RNG states, the
  loader's position, the run's settings), read back with ``torch.load(weights_only=True)``.

Each file is written to a temporary name in the same folder, flushed to disk (fsync), and renamed
over its final name; on any error the temporary file is removed. The ``.pt`` file is written last,
so a checkpoint exists (for ``--resume auto``) only once both halves are complete.
"""
from __future__ import annotations

import contextlib
import glob
import os
import random
import re
import tempfile
from typing import Any, Dict, Iterator, List, Optional

import torch

FORMAT = "stop_fast.train/1"
_NAME = re.compile(r"step-(\d{8,})\.pt$")


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path beside ``path`` (same suffix) to write to; on success it is fsynced and
    renamed to ``path``, on error removed (with a ``.tmp`` sibling a writer may have left)."""
    folder = os.path.dirname(os.path.abspath(path))
    stem, suffix = os.path.splitext(os.path.basename(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".tmp{suffix}", dir=folder)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(folder)
    except BaseException:
        for leftover in (tmp, tmp + ".tmp"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
        raise


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


def paths_for(folder: str, step: int) -> Dict[str, str]:
    stem = os.path.join(folder, f"step-{step:08d}")
    return {"state": stem + ".pt", "prompts": stem + ".safetensors"}


def save(folder: str, step: int, model, state: Dict[str, Any], keep: int) -> str:
    """Write checkpoint ``step`` (prompts, then state) and keep only the ``keep`` newest; returns the .pt path."""
    os.makedirs(folder, exist_ok=True)
    paths = paths_for(folder, step)
    with atomic_path(paths["prompts"]) as tmp:
        model.save_prompts(tmp)
    payload = {"format": FORMAT, "step": step, "prompts": os.path.basename(paths["prompts"]), **state}
    with atomic_path(paths["state"]) as tmp:
        torch.save(payload, tmp)
    for old in list_checkpoints(folder)[:-keep]:
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
    steps = list_checkpoints(folder)
    return paths_for(folder, steps[-1])["state"] if steps else None


def load(path: str, map_location="cpu") -> Dict[str, Any]:
    """The state dict of a ``.pt`` checkpoint, or a ValueError/FileNotFoundError naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle, zip and torch errors all mean "not readable"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path} is not a readable stop_fast training checkpoint ({first})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a stop_fast training checkpoint (format {FORMAT} expected)")
    payload["prompts_path"] = os.path.join(os.path.dirname(os.path.abspath(path)), payload["prompts"])
    if not os.path.isfile(payload["prompts_path"]):
        raise FileNotFoundError(f"{path}: its weights file {payload['prompts_path']} is missing")
    return payload


def resolve_prompts(path: str) -> str:
    """A user's ``--checkpoint``: a prompts ``.safetensors`` file, a training ``.pt`` checkpoint, or a
    run folder (its final prompts, else its newest checkpoint) -> the prompts file."""
    if os.path.isdir(path):
        final = os.path.join(path, "prompts.safetensors")
        if os.path.isfile(final):
            return final
        newest = latest(os.path.join(path, "checkpoints"))
        if newest is None:
            raise FileNotFoundError(f"{path}: no prompts.safetensors and no checkpoints/step-*.pt in this folder")
        path = newest
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".pt"):
        return load(path)["prompts_path"]
    return path
