"""The ``prepare`` manifest: JSON lines, one record per video, and what the loaders take from it.

A record (``stop-fast prepare`` writes it; see stop_fast/data/README.md for every field):

    {"path": "a/clip.mp4", "root": "/data/set", "ok": true, "codec": "h264", "frames": 250,
     "key_frames": [[0, 300, 1]], "pts": [[0, 512, 250]], "fps": 25.0, "width": 320, "height": 240,
     "rotation": 0, "color_range": "limited", "duration": 10.0, "bytes": 263168, "mtime_ns": ...,
     "prepared": "/data/set-copies/a/clip.mp4.mp4", "prepared_index": {...the copy's probe...},
     "error": null}

``path`` is the key: the path relative to ``root`` (an absolute path for a video outside it), so a
video named relatively or absolutely is one video and a dataset that moves keeps its manifest.
``bytes`` and ``mtime_ns`` tell whether the file changed since it was probed: a changed file's record
is not trusted. ``frames`` / ``key_frames`` / ``pts`` are the frame index of :mod:`.probe` (exact:
``prepare`` decodes every frame), so a reader seeks without demuxing the file first.

Reading never fails on what a killed run left: unreadable lines (torn, not UTF-8, not JSON objects,
records without ``path`` / ``ok``) are skipped and listed in ``Manifest.skipped``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Union

from .datasets import VideoDataset
from .probe import VideoProbe, file_state

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


def manifest_key(path: str, root: Optional[str]) -> str:
    """The manifest key of a video: its path relative to ``root`` ('/'-separated) when it lies
    inside, else its absolute path."""
    absolute = os.path.abspath(path)
    if root:
        base = os.path.abspath(root)
        if absolute == base or absolute.startswith(base.rstrip(os.sep) + os.sep):
            return Path(os.path.relpath(absolute, base)).as_posix()
    return absolute


def state_fields(path: str) -> Dict:
    """``{"bytes", "mtime_ns"}`` of a file as a record stores them (None when it cannot be read)."""
    state = file_state(path)
    return {"bytes": state[0] if state else None, "mtime_ns": state[1] if state else None}


def is_current(record: Dict, path: str) -> bool:
    """Whether ``path`` is still the file ``record`` describes (same size and modification time).
    Records written before these fields existed are not trusted."""
    if record.get("bytes") is None or record.get("mtime_ns") is None:
        return False
    return file_state(path) == (record["bytes"], record["mtime_ns"])


class Manifest(dict):
    """key -> record of a manifest (later records win), with what could not be read in ``skipped``
    ("line N: reason") and :meth:`find` to look a video up by its path."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.skipped: List[str] = []
        self._by_absolute: Optional[Dict[str, Dict]] = None

    def find(self, path: str, root: Optional[str] = None) -> Optional[Dict]:
        """The record of the video at ``path``: by its key under ``root`` (a dataset's root), else by
        its absolute path (each record's ``root`` joined to its key)."""
        if root:
            record = self.get(manifest_key(path, root))
            if record is not None:
                return record
        if self._by_absolute is None:
            self._by_absolute = {os.path.abspath(os.path.join(r.get("root") or "", k)): r for k, r in self.items()}
        return self._by_absolute.get(os.path.abspath(path))

    @property
    def unreadable(self) -> int:
        return sum(not r["ok"] for r in self.values())


def check_manifest_path(path: str) -> None:
    if os.path.isdir(path):
        raise ValueError(f"manifest {path} is a folder; name a file, e.g. {os.path.join(path, 'manifest.jsonl')}")


def read_manifest(path: PathLike) -> Manifest:
    """Every readable record of a manifest; unreadable lines are skipped and listed in ``.skipped``
    (a torn last line, invalid UTF-8, JSON that is not an object, a record without ``path`` / ``ok``).
    A manifest that does not exist yet reads as empty."""
    path = os.fspath(path)
    manifest = Manifest(path)
    if not os.path.exists(path):
        return manifest
    check_manifest_path(path)
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        torn = number == len(lines)  # no newline after it: a run killed while writing it
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            manifest.skipped.append(f"line {number}: not UTF-8")
            continue
        except json.JSONDecodeError:
            manifest.skipped.append(f"line {number}: {'torn (a killed run)' if torn else 'not JSON'}")
            continue
        if not isinstance(record, dict):
            manifest.skipped.append(f"line {number}: not a JSON object")
        elif not isinstance(record.get("path"), str) or not isinstance(record.get("ok"), bool):
            manifest.skipped.append(f"line {number}: a record needs a string 'path' and a boolean 'ok'")
        else:
            manifest[record["path"]] = record
    if manifest.skipped:
        log.warning("%s: %d unreadable lines skipped (%s)", path, len(manifest.skipped), "; ".join(manifest.skipped[:3]))
    return manifest


def as_manifest(manifest: Union[PathLike, Manifest]) -> Manifest:
    return manifest if isinstance(manifest, Manifest) else read_manifest(manifest)


class ManifestWriter:
    """Appends records to a manifest, each on its own line, flushed as it is written."""

    def __init__(self, path: str):
        check_manifest_path(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.file = open(path, "ab")
        if self.file.tell() > 0:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # a torn last line: never glue a record onto it
                    self.file.write(b"\n")

    def write(self, record: Dict) -> None:
        self.file.write(json.dumps(record).encode("utf-8") + b"\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


# ----------------------------------------------------------------------------------------------------
# The loaders' side


@dataclasses.dataclass(frozen=True)
class Source:
    """What a loader reads for one sample: ``path`` (the ``prepare`` copy when there is a current
    one, else the original), its frame index ``probe`` (None: probe at run time), or ``error`` when
    the manifest marks the video unreadable."""

    path: str
    probe: Optional[VideoProbe] = None
    error: Optional[str] = None


def _probe_of(record: Dict, what: str) -> Optional[VideoProbe]:
    try:
        return VideoProbe.from_record(record, what)
    except ValueError as exc:  # an older manifest without the index, or a damaged record: probe at run time
        log.debug("%s", exc)
        return None


def sources(dataset: VideoDataset, manifest: Union[PathLike, Manifest], use_prepared: bool = True) -> Dict[str, Source]:
    """sample path -> :class:`Source` for every sample of ``dataset`` whose record is current.

    A record whose file changed since it was probed is left out (the loader probes that file at run
    time, so a stale frame count never yields wrong frames); a copy whose own size or modification
    time changed (``prepared_index``) is not used, the original is read instead. An original that is
    gone (removed to save space once its copy was written) leaves its current copy in use."""
    records = as_manifest(manifest)
    out: Dict[str, Source] = {}
    stale = copies = 0
    for sample in dataset.samples:
        record = records.find(sample.path, dataset.root)
        if record is None:
            continue
        copy, index = record.get("prepared"), record.get("prepared_index")
        has_copy = use_prepared and isinstance(copy, str) and isinstance(index, dict) and is_current(index, copy)
        if not is_current(record, sample.path) and not (has_copy and not os.path.exists(sample.path)):
            stale += 1
            continue
        if not record["ok"]:
            out[sample.path] = Source(sample.path, error=f"marked unreadable in {records.path}: {record.get('error')}")
            continue
        if has_copy:
            probe = _probe_of(index, f"{records.path}: {record['path']} (prepared copy)")
            if probe is not None:
                out[sample.path] = Source(copy, probe)
                copies += 1
                continue
        out[sample.path] = Source(sample.path, _probe_of(record, f"{records.path}: {record['path']}"))
    if stale:
        log.warning("%d videos changed since %s was written: probing them at run time; re-run `stop-fast prepare`",
                    stale, records.path)
    log.info("%s: %d of %d videos known, %d read from prepared copies", records.path, len(out), len(dataset), copies)
    return out


def exclude_bad(dataset: VideoDataset, manifest: Union[PathLike, Manifest], use_prepared: bool = True) -> VideoDataset:
    """The dataset without the files the manifest marks unreadable, the prepared copies swapped in
    (current records only: a changed file is kept, for the loaders to check at run time)."""
    records = as_manifest(manifest)
    known = sources(dataset, records, use_prepared)
    keep = []
    dropped = 0
    for s in dataset.samples:
        source = known.get(s.path)
        if source is not None and source.error:
            dropped += 1
            continue
        keep.append(s if source is None else dataclasses.replace(s, path=source.path))
    if dropped:
        log.warning("%s: %d unreadable videos left out (see %s)", dataset.name, dropped, records.path)
    return dataclasses.replace(dataset, samples=keep)
