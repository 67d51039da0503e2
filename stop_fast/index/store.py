"""The index folder: immutable feature shards, one published manifest, and the protocol that replaces
one index by the next all at once.

Layout of an index folder::

    index.json                          the manifest: the one file a reader starts from
    prompts.safetensors                 a copy of the prompt file that made the index (none for zero-shot)
    shards/shard-<sha256>.safetensors   immutable rows, named by the sha256 of their bytes (20 hex digits)
    work/<run>-r<rank>-<seq>.safetensors  rows of a build that has not published yet (resume reads them)
    .lock                               held (flock) by the build that runs (``stop_fast.train.lock``)

A shard (and a work shard) is a safetensors file, written by :func:`stop_fast.io.write_atomic` with
byte-stable metadata (:func:`stop_fast.io.safetensors_bytes`), holding ``n`` rows:

    features   float16 (n, E)  the video's feature, L2-normalised in fp32, then rounded to fp16
    sizes      int64 (n,)      the file's size in bytes when it was encoded
    mtimes_ns  int64 (n,)      the file's modification time (ns) when it was encoded
    paths      uint8 (bytes,)  the absolute paths, UTF-8, concatenated
    path_ends  int64 (n,)      where each path ends in ``paths``

Its metadata holds ``format``; a work shard's also ``provenance`` (JSON: what encoded its rows, so a
resume under other settings is refused) and ``failed`` (JSON: the videos of its batches that did not
decode, each ``{"path", "size", "mtime_ns", "reason"}``).

``index.json`` (:func:`write_manifest`, sorted keys, atomic): ``format``, ``generation`` (1 for the
first publish, +1 for each next), ``provenance`` (``fingerprint`` and ``model``: see
``provenance.py``), ``embed_dim``, ``shards`` (``[{"file": "shards/...", "rows": n}]`` in path
order: row r of the index is row r of the shards laid end to end, and the paths ascend), ``videos``
(rows in all), ``failed`` (videos that did not decode, as above, sorted by path), ``last_update``
(rows ``encoded`` from work shards, ``reused`` from the shards before, ``removed``).

Publishing (:func:`publish`): the new shards are written under new names first (a shard whose name
exists already holds those bytes and is kept), then ``index.json`` is replaced atomically, then the
shards no manifest names any more and the merged work shards are removed. A reader
(:func:`load_index`) reads ``index.json`` and then its shards; a listed shard that is missing was
removed by a publish after the reader read the manifest, so it reads ``index.json`` again and
starts over: it sees the old index or the new one, never a mix.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..io import safetensors_bytes, write_atomic, write_json

FORMAT = "stop_fast.index/1"
SHARD_FORMAT = "stop_fast.index.shard/1"
MANIFEST = "index.json"
PROMPTS = "prompts.safetensors"
SHARDS_DIR = "shards"
WORK_DIR = "work"
READ_ATTEMPTS = 8  # manifests re-read by a reader that keeps meeting publishes (each needs a new update)

Key = Tuple[str, int, int]  # (path, size, mtime_ns): a file is unchanged while all three are


class IndexFormatError(ValueError):
    """An index folder or one of its files cannot be read as an index; the message names the file."""


@dataclasses.dataclass
class Rows:
    """Rows of an index: a path, its size and mtime when encoded, and its fp16 feature."""

    paths: List[str]
    sizes: torch.Tensor  # int64 (n,)
    mtimes: torch.Tensor  # int64 (n,)
    features: torch.Tensor  # float16 (n, E)

    def __len__(self) -> int:
        return len(self.paths)

    def keys(self) -> List[Key]:
        return list(zip(self.paths, self.sizes.tolist(), self.mtimes.tolist()))

    def take(self, rows: Sequence[int]) -> "Rows":
        index = torch.as_tensor(list(rows), dtype=torch.long)
        return Rows([self.paths[i] for i in rows], self.sizes[index], self.mtimes[index], self.features[index])

    @staticmethod
    def empty(dim: int) -> "Rows":
        none = torch.zeros(0, dtype=torch.int64)
        return Rows([], none, none.clone(), torch.zeros(0, dim, dtype=torch.float16))

    @staticmethod
    def cat(parts: Sequence["Rows"], dim: int) -> "Rows":
        parts = [p for p in parts if len(p)]
        if not parts:
            return Rows.empty(dim)
        return Rows([path for p in parts for path in p.paths], torch.cat([p.sizes for p in parts]),
                    torch.cat([p.mtimes for p in parts]), torch.cat([p.features for p in parts]))


# ---------------------------------------------------------------------------------------------- shards
def shard_bytes(rows: Rows, metadata: Optional[Dict[str, str]] = None) -> bytes:
    """The safetensors bytes of ``rows`` (equal rows and metadata, equal bytes)."""
    encoded = [p.encode("utf-8") for p in rows.paths]
    blob = b"".join(encoded)
    paths = torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob else torch.zeros(0, dtype=torch.uint8)
    ends = torch.tensor([len(e) for e in encoded], dtype=torch.int64).cumsum(0) if encoded else \
        torch.zeros(0, dtype=torch.int64)
    tensors = {"features": rows.features.to(torch.float16).contiguous(), "sizes": rows.sizes.contiguous(),
               "mtimes_ns": rows.mtimes.contiguous(), "paths": paths, "path_ends": ends}
    return safetensors_bytes(tensors, {"format": SHARD_FORMAT, **(metadata or {})})


def read_shard(path: str, features: bool = True) -> Tuple[Rows, Dict[str, str]]:
    """``(rows, metadata)`` of a shard file; ``features=False`` leaves the features out (an (n, 0)
    tensor), for callers that need only which files it holds. A missing file raises
    ``FileNotFoundError``, anything unreadable :class:`IndexFormatError`."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != SHARD_FORMAT:
                raise IndexFormatError(f"{path}: not an index shard (format {SHARD_FORMAT} expected)")
            sizes, mtimes = f.get_tensor("sizes"), f.get_tensor("mtimes_ns")
            blob, ends = f.get_tensor("paths").numpy().tobytes(), f.get_tensor("path_ends").tolist()
            feats = f.get_tensor("features") if features else torch.zeros(len(ends), 0, dtype=torch.float16)
    except IndexFormatError:
        raise
    except Exception as exc:  # truncated, not safetensors, a tensor missing: safetensors' own error types
        raise IndexFormatError(f"{path}: not a readable index shard ({' '.join(str(exc).split())})") from None
    starts = [0] + ends[:-1]
    paths = [blob[a:b].decode("utf-8") for a, b in zip(starts, ends)]
    if not (len(paths) == len(sizes) == len(mtimes) == feats.shape[0]):
        raise IndexFormatError(f"{path}: its tensors hold different numbers of rows")
    return Rows(paths, sizes, mtimes, feats), metadata


def write_shard(folder: str, rows: Rows) -> str:
    """Write ``rows`` as an immutable shard of the index in ``folder``; returns its name relative to
    ``folder``. The name is the content's sha256, so a shard that exists already holds these bytes."""
    data = shard_bytes(rows)
    name = f"{SHARDS_DIR}/shard-{hashlib.sha256(data).hexdigest()[:20]}.safetensors"
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_atomic(path, data)
    return name


def write_work_shard(folder: str, name: str, rows: Rows, failed: List[dict], provenance: dict) -> str:
    """A chunk of a build's rows (and its videos that failed) as ``folder/work/name``, atomically."""
    path = os.path.join(folder, WORK_DIR, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomic(path, shard_bytes(rows, {"provenance": json.dumps(provenance, sort_keys=True),
                                          "failed": json.dumps(failed, sort_keys=True)}))
    return path


def work_shards(folder: str) -> List[str]:
    """The complete work shards of ``folder`` (temporaries of unfinished writes start with a dot)."""
    work = os.path.join(folder, WORK_DIR)
    if not os.path.isdir(work):
        return []
    return sorted(os.path.join(work, n) for n in os.listdir(work) if n.endswith(".safetensors") and not n.startswith("."))


def read_work_shard(path: str) -> Tuple[Rows, List[dict], dict]:
    """``(rows, failed, provenance)`` of a work shard."""
    rows, metadata = read_shard(path)
    try:
        return rows, json.loads(metadata["failed"]), json.loads(metadata["provenance"])
    except (KeyError, ValueError):
        raise IndexFormatError(f"{path}: not a work shard of an index build (no failed / provenance)") from None


# ---------------------------------------------------------------------------------------------- manifest
def has_manifest(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, MANIFEST))


def read_manifest(folder: str) -> dict:
    """The published manifest of the index in ``folder``, checked for its format."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"index {folder}: no such folder")
    if not os.path.isfile(path):
        raise IndexFormatError(f"{folder} is not a stop_fast index (no {MANIFEST}; make one with stop-fast index)")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as exc:
        raise IndexFormatError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise IndexFormatError(f"{path}: index format {found!r}, this stop_fast reads {FORMAT!r}")
    for key, kind in (("shards", list), ("failed", list), ("provenance", dict), ("embed_dim", int),
                      ("generation", int)):
        if not isinstance(manifest.get(key), kind):
            raise IndexFormatError(f"{path}: {key!r} is missing or not a {kind.__name__}")
    return manifest


def write_manifest(folder: str, manifest: dict) -> None:
    write_json(os.path.join(folder, MANIFEST), manifest)


def publish(folder: str, manifest: dict, merged_work: Sequence[str]) -> None:
    """Make ``manifest`` (whose shards are written already) the index of ``folder``, atomically, then
    remove what no manifest names any more: old shards and the work shards merged into it."""
    write_manifest(folder, manifest)
    listed = {s["file"] for s in manifest["shards"]}
    shards = os.path.join(folder, SHARDS_DIR)
    for name in sorted(os.listdir(shards)) if os.path.isdir(shards) else []:
        if name.endswith(".safetensors") and not name.startswith(".") and f"{SHARDS_DIR}/{name}" not in listed:
            _remove(os.path.join(shards, name))
    for path in merged_work:
        _remove(path)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------------------------------------- reading
def load_index(folder: str) -> Tuple[dict, Rows]:
    """``(manifest, rows)`` of the index in ``folder``: every shard the manifest lists, in order.

    A shard that is missing was removed by a publish that came after this manifest was read: the
    manifest is read again and loading starts over (up to :data:`READ_ATTEMPTS` manifests), so the
    rows are those of one published index."""
    for _ in range(READ_ATTEMPTS):
        manifest = read_manifest(folder)
        try:
            parts = [read_shard(os.path.join(folder, s["file"]))[0] for s in manifest["shards"]]
        except FileNotFoundError:
            continue  # replaced while we read it
        rows = Rows.cat(parts, manifest["embed_dim"])
        if len(rows) != manifest.get("videos") or rows.features.shape[1] != manifest["embed_dim"]:
            raise IndexFormatError(f"{os.path.join(folder, MANIFEST)}: its shards hold {tuple(rows.features.shape)} "
                                   f"features, the manifest says {manifest.get('videos')} x {manifest['embed_dim']}")
        return manifest, rows
    raise IndexFormatError(f"index {folder}: its shards kept changing while it was read ({READ_ATTEMPTS} "
                           "publishes in a row); try again")
