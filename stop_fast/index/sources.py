"""Which videos an index holds: every video file under a folder, the paths a CSV lists, or a dataset's
videos; and each file's identity (absolute path, size, mtime), which decides whether it changed.

Every listing is absolute paths, without duplicates, sorted: the index's deterministic order.
"""
from __future__ import annotations

import csv
import dataclasses
import logging
import os
import stat
from typing import List, Optional, Sequence, Tuple

from ..data.datasets import video_files

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, order=True)
class VideoFile:
    """A video as the index knows it: the file is unchanged while path, size and mtime all are."""

    path: str
    size: int
    mtime_ns: int

    @property
    def key(self) -> Tuple[str, int, int]:
        return (self.path, self.size, self.mtime_ns)


def videos_in_folder(folder: str) -> List[str]:
    """Every file under ``folder`` (any depth; symbolic links to folders are not followed) whose
    suffix is a video's (``stop_fast.data.VIDEO_SUFFIXES``, any case), as ``stop-fast prepare --videos``
    lists them."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such folder")
    return video_files(os.path.abspath(folder))


def videos_in_csv(path: str) -> List[str]:
    """The ``path`` column of a CSV with a header (the dataset CSVs' ``path,label`` / ``path,caption``
    work as they are); relative paths are relative to the CSV's folder."""
    from ..data.datasets import AnnotationError

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        if "path" not in [(h or "").strip() for h in reader.fieldnames or []]:
            raise AnnotationError(path, 1, "the header needs a 'path' column")
        reader.fieldnames = [(h or "").strip() for h in reader.fieldnames]
        folder = os.path.dirname(os.path.abspath(path))
        paths = []
        for row in reader:
            value = (row.get("path") or "").strip()
            if not value:
                raise AnnotationError(path, reader.line_num, "no path in this row")
            paths.append(os.path.join(folder, value))
    return _unique(paths)


def videos_in_dataset(name: str, root: str, split: Optional[str] = None) -> List[str]:
    """The videos of ``split`` of a dataset (``stop_fast.data.build_dataset``), or with ``split=None``
    of its training and evaluation splits (the ones ``stop-fast train`` reads); a default split whose
    annotation file is missing is left out with a warning, as long as one split reads."""
    from ..data import build_dataset
    from ..train.config import DATASET_DEFAULTS

    if name not in DATASET_DEFAULTS:
        raise ValueError(f"dataset must be one of {', '.join(DATASET_DEFAULTS)}, got {name!r}")
    splits = [split] if split else list(dict.fromkeys(DATASET_DEFAULTS[name][k] for k in ("train_split", "val_split")))
    paths, missing = [], []
    for one in splits:
        try:
            paths += [s.path for s in build_dataset(name, root, one).samples]
        except FileNotFoundError as exc:
            if split:
                raise
            missing.append(f"{one} ({exc})")
    if missing and not paths:
        raise FileNotFoundError(f"no split of the {name} dataset under {root} reads: " + "; ".join(missing))
    for entry in missing:
        log.warning("the %s split is left out of the index: %s", name, entry)
    return _unique(paths)


def stat_videos(paths: Sequence[str]) -> Tuple[List[VideoFile], List[str]]:
    """``(files, missing)``: each path's identity, sorted by path, and the paths that are not files."""
    files, missing = [], []
    for path in _unique(paths):
        try:
            st = os.stat(path)
        except OSError:
            st = None
        if st is None or not stat.S_ISREG(st.st_mode):
            missing.append(path)
            continue
        files.append(VideoFile(path, st.st_size, st.st_mtime_ns))
    return files, missing


def _unique(paths: Sequence[str]) -> List[str]:
    return sorted({os.path.abspath(p) for p in paths})
