"""Dataset adapters: the official split files of each benchmark, read as published.

Each adapter returns a :class:`VideoDataset`: a list of samples (a video path and either a class
index or the video's captions), the class names, and the root the paths live under. Nothing is
decoded here; paths that do not exist are kept and reported when read (see ``stop-fast prepare`` to
probe a dataset up front).

Annotation files are read strictly: UTF-8 with or without a byte-order mark; a line or entry that
does not parse, a row without its label, or a label outside the class list raises
:class:`AnnotationError` (a ``ValueError``) naming the file and the line (or the JSON entry).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

PathLike = Union[str, os.PathLike]
# What counts as a video file in a folder of them (`stop-fast prepare --videos`, `stop-fast index FOLDER`).
VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".ts",
                            ".3gp"})

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Sample:
    path: str
    label: int = -1  # class index (recognition), -1 for retrieval or an unlabelled test split
    captions: Tuple[str, ...] = ()  # retrieval: every caption of the video (one paragraph for DiDeMo / ActivityNet)


@dataclasses.dataclass
class VideoDataset:
    name: str
    split: str
    samples: List[Sample]
    classes: List[str] = dataclasses.field(default_factory=list)
    task: str = "recognition"  # or "retrieval"
    allow_flip: bool = True  # False where classes name directions (Something-Something V2)
    root: Optional[str] = None  # the folder the videos lie under (manifests key videos relative to it)

    def __len__(self) -> int:
        return len(self.samples)

    def class_texts(self, template: str = "a video of a person doing {}") -> List[str]:
        """Prompts for the frozen text tower, one per class (SPEC.md: recognition)."""
        return [template.format(c) for c in self.classes]


class AnnotationError(ValueError):
    """An annotation file that cannot be read as its format says; names the file and the line."""

    def __init__(self, path: PathLike, line: Optional[int], reason: str):
        self.path, self.line, self.reason = str(path), line, reason
        where = f"{self.path}, line {line}" if line is not None else self.path
        super().__init__(f"{where}: {reason}")


# ----------------------------------------------------------------------------------------------------
# Reading annotation files


def _need(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _text(path: Path) -> str:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # utf-8-sig: spreadsheets write a BOM
            return f.read()
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise AnnotationError(path, line, "not UTF-8 text") from exc


def _lines(path: Path) -> List[Tuple[int, str]]:
    """(line number, text) of the non-blank lines."""
    return [(n, line.strip()) for n, line in enumerate(_text(path).splitlines(), 1) if line.strip()]


def _rows(path: Path, required: Sequence[str], optional: Sequence[str] = ()) -> List[Tuple[int, Dict[str, str]]]:
    """(line number, row) of a CSV with a header; every row must fill the ``required`` columns."""
    reader = csv.DictReader(_text(path).splitlines())
    fields = [f.strip() for f in reader.fieldnames or []]
    reader.fieldnames = fields
    missing = [c for c in required if c not in fields]
    if missing:
        raise AnnotationError(path, 1, f"the header needs the column(s) {', '.join(missing)}; it has {','.join(fields)}")
    rows = []
    for row in reader:
        line = reader.line_num
        if not any((v or "").strip() for k, v in row.items() if k is not None):
            continue  # a blank row
        for column in required:
            if not (row.get(column) or "").strip():
                raise AnnotationError(path, line, f"no {column!r} in this row")
        rows.append((line, {k: (v or "").strip() for k, v in row.items() if k in set(required) | set(optional)}))
    return rows


def _json(path: Path):
    try:
        return json.loads(_text(path))
    except json.JSONDecodeError as exc:
        raise AnnotationError(path, exc.lineno, f"not valid JSON ({exc.msg})") from exc


def _expect(path: Path, value, kind: type, what: str):
    if not isinstance(value, kind):
        raise AnnotationError(path, None, f"{what} must be a JSON {kind.__name__}, got {type(value).__name__}")
    return value


def _field(path: Path, entry, index: int, key: str, kind: type = str):
    if not isinstance(entry, dict) or not isinstance(entry.get(key), kind):
        raise AnnotationError(path, None, f"entry {index}: needs {key!r} ({kind.__name__}), got {json.dumps(entry)[:120]}")
    return entry[key]


def _split(split: str, allowed: Sequence[str]) -> str:
    if split not in allowed:
        raise ValueError(f"split must be one of {tuple(allowed)}, got {split!r}")
    return split


def _sorted_labels(labels: Iterable[str]) -> List[str]:
    """Class names in index order: integers numerically ("2" before "10"), anything else as strings."""
    names = set(labels)
    try:
        return sorted(names, key=int)
    except ValueError:
        return sorted(names)


class _VideoFinder:
    """Finds a video by its id or file name under a folder (any extension, any depth), for the
    retrieval sets whose annotations name videos without their container."""

    def __init__(self, folder: Path, default_suffix: str = ".mp4"):
        self.folder, self.default_suffix = folder, default_suffix
        self._by_name: Dict[str, str] = {}
        self._by_stem: Dict[str, str] = {}
        if folder.is_dir():
            for dirpath, _, files in os.walk(folder):
                for name in sorted(files):
                    path = os.path.join(dirpath, name)
                    self._by_name.setdefault(name, path)
                    self._by_stem.setdefault(os.path.splitext(name)[0], path)

    def __call__(self, *names: str) -> str:
        for name in names:
            for index in (self._by_name, self._by_stem):
                if name in index:
                    return index[name]
        name = names[0]
        return str(self.folder / (name if os.path.splitext(name)[1] else name + self.default_suffix))


def _video_folder(root: Path) -> Path:
    return root / "videos" if (root / "videos").is_dir() else root


# ----------------------------------------------------------------------------------------------------
# Recognition


def ucf101(root: PathLike, split: str = "train", fold: int = 1, annotations: Optional[PathLike] = None) -> VideoDataset:
    """UCF101: ``classInd.txt`` ("1 ApplyEyeMakeup"), ``trainlist0N.txt`` ("Class/v_x.avi 1"),
    ``testlist0N.txt`` ("Class/v_x.avi"); videos under ``root/Class/``. Class numbers must lie in
    1..C (the classes of ``classInd.txt``)."""
    _split(split, ("train", "test"))
    if fold not in (1, 2, 3):
        raise ValueError(f"fold must be 1, 2 or 3, got {fold}")
    root = Path(root)
    ann = Path(annotations) if annotations else root / "ucfTrainTestlist"
    class_file = _need(ann / "classInd.txt", "UCF101 classInd.txt")
    classes = []
    for line, text in _lines(class_file):
        parts = text.split(maxsplit=1)
        if len(parts) != 2 or not parts[0].isdigit() or int(parts[0]) != len(classes) + 1:
            raise AnnotationError(class_file, line, f"expected '{len(classes) + 1} ClassName', got {text!r}")
        classes.append(parts[1])
    index = {c: i for i, c in enumerate(classes)}
    lower = {c.lower(): i for c, i in index.items()}  # folder and classInd spellings differ in case
    listing = _need(ann / f"{split}list0{fold}.txt", f"UCF101 {split} list")
    samples = []
    for line, text in _lines(listing):
        parts = text.split()
        rel, folder = parts[0], parts[0].split("/")[0]
        if len(parts) > 2:
            raise AnnotationError(listing, line, f"expected 'Class/video.avi [class number]', got {text!r}")
        if len(parts) == 2:  # trainlist lines carry the 1-based class number
            if not parts[1].isdigit() or not 1 <= int(parts[1]) <= len(classes):
                raise AnnotationError(listing, line, f"class number {parts[1]!r} is outside 1..{len(classes)}")
            label = int(parts[1]) - 1
        elif folder in index or folder.lower() in lower:
            label = index.get(folder, lower.get(folder.lower()))
        else:
            raise AnnotationError(listing, line, f"class folder {folder!r} is not in classInd.txt")
        samples.append(Sample(str(root / rel), label))
    return VideoDataset("ucf101", split, samples, classes, root=str(root))


def hmdb51(root: PathLike, split: str = "train", fold: int = 1, annotations: Optional[PathLike] = None) -> VideoDataset:
    """HMDB51: ``<class>_test_split<N>.txt`` lines "video.avi 1|2|0" (1 train, 2 test, 0 unused);
    videos under ``root/<class>/``."""
    _split(split, ("train", "test"))
    if fold not in (1, 2, 3):
        raise ValueError(f"fold must be 1, 2 or 3, got {fold}")
    root = Path(root)
    ann = Path(annotations) if annotations else root / "testTrainMulti_7030_splits"
    files = sorted(ann.glob(f"*_test_split{fold}.txt"))
    if not files:
        raise FileNotFoundError(f"no HMDB51 split files *_test_split{fold}.txt in {ann}")
    suffix = f"_test_split{fold}"
    classes = sorted(f.stem[: -len(suffix)] for f in files)
    wanted = "1" if split == "train" else "2"
    samples = []
    for f in files:
        cls = f.stem[: -len(suffix)]
        for line, text in _lines(f):
            parts = text.split()
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise AnnotationError(f, line, f"expected 'video.avi 0|1|2', got {text!r}")
            if parts[1] == wanted:
                samples.append(Sample(str(root / cls / parts[0]), classes.index(cls)))
    return VideoDataset("hmdb51", split, samples, classes, root=str(root))


def ssv2(root: PathLike, split: str = "train", annotations: Optional[PathLike] = None) -> VideoDataset:
    """Something-Something V2: ``labels.json`` (template -> index), ``train.json`` /
    ``validation.json`` (id, template, ...); videos ``root/<id>.webm``. No horizontal flips."""
    _split(split, ("train", "validation"))
    root = Path(root)
    ann = Path(annotations) if annotations else root
    label_file = _need(ann / "labels.json", "SSv2 labels.json")
    labels = {}
    for name, i in _expect(label_file, _json(label_file), dict, "labels.json").items():
        try:
            labels[name] = int(i)
        except (TypeError, ValueError):
            raise AnnotationError(label_file, None, f"class {name!r}: index {i!r} is not an integer") from None
    classes = [name for name, _ in sorted(labels.items(), key=lambda kv: kv[1])]
    listing = _need(ann / f"{split}.json", f"SSv2 {split}.json")
    samples = []
    for n, entry in enumerate(_expect(listing, _json(listing), list, f"{split}.json")):
        vid = _field(listing, entry, n, "id")
        template = _field(listing, entry, n, "template").replace("[", "").replace("]", "")
        if template not in labels:
            raise AnnotationError(listing, None, f"entry {n} (id {vid}): template {template!r} is not in labels.json")
        samples.append(Sample(str(root / f"{vid}.webm"), labels[template]))
    return VideoDataset("ssv2", split, samples, classes, allow_flip=False, root=str(root))


def kinetics400(root: PathLike, split: str = "train", annotations: Optional[PathLike] = None) -> VideoDataset:
    """Kinetics-400: CSV ``label,youtube_id,time_start,time_end,split``; videos named
    ``<youtube_id>_<start:06d>_<end:06d>.mp4`` under ``root/<split>/<label>/`` or ``root/<split>/``.
    The test CSV, which has no ``label`` column, gives unlabelled samples (label -1, no classes)."""
    _split(split, ("train", "val", "test"))
    root = Path(root)
    table = _need(Path(annotations) if annotations else root / "annotations" / f"{split}.csv", "Kinetics-400 CSV")
    header = next(csv.reader(_text(table).splitlines()), [])
    labelled = "label" in [h.strip() for h in header]
    rows = _rows(table, ("youtube_id", "time_start", "time_end") + (("label",) if labelled else ()))
    classes = _sorted_labels(r["label"] for _, r in rows) if labelled else []
    index = {c: i for i, c in enumerate(classes)}
    samples = []
    for line, r in rows:
        try:
            start, end = int(float(r["time_start"])), int(float(r["time_end"]))
        except ValueError:
            raise AnnotationError(table, line, f"time_start / time_end must be numbers, got {r['time_start']!r}, "
                                               f"{r['time_end']!r}") from None
        name = f"{r['youtube_id']}_{start:06d}_{end:06d}.mp4"
        flat = root / split / name
        by_class = root / split / r["label"] / name if labelled else flat
        path = by_class if by_class.exists() or not flat.exists() else flat
        samples.append(Sample(str(path), index[r["label"]] if labelled else -1))
    return VideoDataset("kinetics400", split, samples, classes, root=str(root))


def video_files(folder: PathLike) -> List[str]:
    """Every video file under ``folder`` (any depth, by suffix: :data:`VIDEO_SUFFIXES`, any case), sorted."""
    return sorted(str(p) for p in Path(folder).rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())


def csv_dataset(root: PathLike, split: str = "train", annotations: Optional[PathLike] = None) -> VideoDataset:
    """A CSV with a header: ``path,label`` (recognition; label = class name) or ``path,caption``
    (retrieval; one row per caption). Paths are relative to ``root``; a path that leads outside it
    (absolute, or through ``..``) is read where it leads, with a warning naming how many do. Default
    file ``root/<split>.csv``. Class indices follow the sorted labels: integer labels sort numerically
    ("2" before "10", so labels 0..C-1 keep their values), other labels as strings."""
    root = Path(root)
    table = _need(Path(annotations) if annotations else root / f"{split}.csv", "dataset CSV")
    header = [h.strip() for h in next(csv.reader(_text(table).splitlines()), [])]
    if "path" not in header or not ({"label", "caption"} & set(header)):
        raise AnnotationError(table, 1, f"the header must be 'path,label' or 'path,caption', got {','.join(header)}")
    if "label" in header:
        rows = _rows(table, ("path", "label"))
        classes = _sorted_labels(r["label"] for _, r in rows)
        index = {c: i for i, c in enumerate(classes)}
        samples = [Sample(str(root / r["path"]), index[r["label"]]) for _, r in rows]
        _warn_outside(table, root, [r["path"] for _, r in rows])
        return VideoDataset("csv", split, samples, classes, root=str(root))
    grouped: Dict[str, List[str]] = {}
    for _, r in _rows(table, ("path", "caption")):
        grouped.setdefault(r["path"], []).append(r["caption"])
    samples = [Sample(str(root / p), captions=tuple(c)) for p, c in grouped.items()]
    _warn_outside(table, root, list(grouped))
    return VideoDataset("csv", split, samples, task="retrieval", root=str(root))


def _warn_outside(table: Path, root: Path, paths: List[str]) -> None:
    """Say how many of a CSV's paths lead outside the video root (a typo'd root, or paths meant for another)."""
    base = root.resolve()
    outside = [p for p in paths if not (base / p).resolve().is_relative_to(base)]
    if outside:
        log.warning("%s: %d of %d paths lie outside the video root %s (e.g. %s); they are read from there",
                    table, len(outside), len(paths), root, outside[0])


# ----------------------------------------------------------------------------------------------------
# Retrieval


def msrvtt(root: PathLike, split: str = "train", annotations: Optional[PathLike] = None) -> VideoDataset:
    """MSR-VTT retrieval: ``MSRVTT_data.json`` (every caption), ``train.9k.csv`` (training videos,
    all their captions) and ``JSFUSION_test.csv`` (the 1k-A test pairs); videos ``root/videos/<id>.mp4``."""
    _split(split, ("train", "test"))
    root = Path(root)
    ann = Path(annotations) if annotations else root
    video_dir = _video_folder(root)
    if split == "test":
        table = _need(ann / "JSFUSION_test.csv", "MSR-VTT JSFUSION_test.csv")
        samples = [Sample(str(video_dir / f"{r['video_id']}.mp4"), captions=(r["sentence"],))
                   for _, r in _rows(table, ("video_id", "sentence"))]
        return VideoDataset("msrvtt", split, samples, task="retrieval", root=str(root))
    data_file = _need(ann / "MSRVTT_data.json", "MSR-VTT MSRVTT_data.json")
    data = _expect(data_file, _json(data_file), dict, "MSRVTT_data.json")
    captions: Dict[str, List[str]] = {}
    for n, s in enumerate(_expect(data_file, data.get("sentences"), list, "'sentences'")):
        captions.setdefault(_field(data_file, s, n, "video_id"), []).append(_field(data_file, s, n, "caption"))
    table = _need(ann / "train.9k.csv", "MSR-VTT train.9k.csv")
    ids = [r["video_id"] for _, r in _rows(table, ("video_id",))]
    samples = [Sample(str(video_dir / f"{v}.mp4"), captions=tuple(captions.get(v, ()))) for v in ids]
    return VideoDataset("msrvtt", split, samples, task="retrieval", root=str(root))


def _id_list(path: Path) -> Optional[List[Tuple[int, str]]]:
    """(line, id) of a split list (one video id per line), or None when there is no such file."""
    return _lines(path) if path.is_file() else None


VATEX_FILES = {"train": "vatex_training_v1.0.json", "val": "vatex_validation_v1.0.json",
               "test": "vatex_public_test_english_v1.1.json"}


def vatex(root: PathLike, split: str = "train", annotations: Optional[PathLike] = None) -> VideoDataset:
    """VATEX retrieval: captions from the official ``vatex_training_v1.0.json``,
    ``vatex_validation_v1.0.json`` (and ``vatex_public_test_english_v1.1.json``), entries
    ``{"videoID": ..., "enCap": [10 English captions]}``. The split is ``<split>_list.txt`` (one
    videoID per line: the common 25,991 / 1,500 / 1,500 retrieval split, whose val and test halves
    come from the official validation set) when it exists, else the official file of that split.
    Videos ``<videoID>.<any extension>`` under ``root/videos`` or ``root``."""
    _split(split, ("train", "val", "test"))
    root = Path(root)
    ann = Path(annotations) if annotations else root
    captions: Dict[str, Tuple[str, ...]] = {}
    official: Dict[str, List[str]] = {}
    for name, filename in VATEX_FILES.items():
        path = ann / filename
        if not path.is_file():
            continue
        official[name] = []
        for n, entry in enumerate(_expect(path, _json(path), list, filename)):
            vid = _field(path, entry, n, "videoID")
            english = _field(path, entry, n, "enCap", list)
            if not all(isinstance(c, str) for c in english):
                raise AnnotationError(path, None, f"entry {n} (videoID {vid}): 'enCap' must hold strings")
            captions[vid] = tuple(c.strip() for c in english)
            official[name].append(vid)
    listing = ann / f"{split}_list.txt"
    ids = _id_list(listing)
    if ids is None:
        if split not in official:
            raise FileNotFoundError(f"VATEX {split} split not found: neither {listing} nor {ann / VATEX_FILES[split]}")
        ids = [(None, v) for v in official[split]]
    elif not official:
        raise FileNotFoundError(f"VATEX captions not found: none of {', '.join(VATEX_FILES.values())} in {ann}")
    find = _VideoFinder(_video_folder(root))
    samples = []
    for line, vid in ids:
        if vid not in captions:
            raise AnnotationError(listing, line, f"videoID {vid!r} has no captions in {', '.join(VATEX_FILES.values())}")
        samples.append(Sample(find(vid), captions=captions[vid]))
    return VideoDataset("vatex", split, samples, task="retrieval", root=str(root))


def didemo(root: PathLike, split: str = "train", annotations: Optional[PathLike] = None) -> VideoDataset:
    """DiDeMo paragraph-to-video retrieval: ``{train,val,test}_data.json``, a list of moments
    ``{"video": <file name>, "description": ..., "times": ...}``; every description of a video, in
    file order, joined into one paragraph (its one caption). ``<split>_list.txt`` (video file names)
    restricts the split when it exists. Videos by file name (or that name plus a suffix, e.g. after
    conversion to ``.mp4``) under ``root/videos`` or ``root``."""
    _split(split, ("train", "val", "test"))
    root = Path(root)
    ann = Path(annotations) if annotations else root
    data_file = _need(ann / f"{split}_data.json", f"DiDeMo {split}_data.json")
    paragraphs: Dict[str, List[str]] = {}
    for n, entry in enumerate(_expect(data_file, _json(data_file), list, f"{split}_data.json")):
        video = _field(data_file, entry, n, "video")
        paragraphs.setdefault(video, []).append(_field(data_file, entry, n, "description").strip())
    listed = _id_list(ann / f"{split}_list.txt")
    videos = list(paragraphs) if listed is None else [v for _, v in listed if v in paragraphs]
    find = _VideoFinder(_video_folder(root))
    samples = [Sample(find(v, os.path.splitext(v)[0]), captions=(" ".join(paragraphs[v]),)) for v in videos]
    return VideoDataset("didemo", split, samples, task="retrieval", root=str(root))


ACTIVITYNET_FILES = {"train": ("train.json", "train_ids.json"), "val": ("val_1.json", "val_ids.json")}


def activitynet(root: PathLike, split: str = "train", annotations: Optional[PathLike] = None) -> VideoDataset:
    """ActivityNet Captions paragraph-to-video retrieval: ``train.json`` / ``val_1.json``, a map
    ``{"v_<id>": {"duration": ..., "timestamps": [...], "sentences": [...]}}``; each video's
    sentences joined into one paragraph (its one caption). ``train_ids.json`` / ``val_ids.json``
    (lists of ``v_<id>``) restrict the split when they exist. Videos ``v_<id>.<ext>`` or
    ``<id>.<ext>`` under ``root/videos`` or ``root``."""
    _split(split, ("train", "val"))
    root = Path(root)
    ann = Path(annotations) if annotations else root
    caption_name, ids_name = ACTIVITYNET_FILES[split]
    data_file = _need(ann / caption_name, f"ActivityNet Captions {caption_name}")
    paragraphs: Dict[str, str] = {}
    for vid, entry in _expect(data_file, _json(data_file), dict, caption_name).items():
        sentences = entry.get("sentences") if isinstance(entry, dict) else None
        if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
            raise AnnotationError(data_file, None, f"video {vid}: needs 'sentences' (a list of strings)")
        paragraphs[vid] = " ".join(s.strip() for s in sentences)
    ids = list(paragraphs)
    if (ann / ids_name).is_file():
        listed = _expect(ann / ids_name, _json(ann / ids_name), list, ids_name)
        ids = [v for v in listed if v in paragraphs]
    find = _VideoFinder(_video_folder(root))
    samples = [Sample(find(v, v[2:] if v.startswith("v_") else v), captions=(paragraphs[v],)) for v in ids]
    return VideoDataset("activitynet", split, samples, task="retrieval", root=str(root))


DATASETS: Dict[str, Callable[..., VideoDataset]] = {
    "ucf101": ucf101, "hmdb51": hmdb51, "ssv2": ssv2, "kinetics400": kinetics400, "msrvtt": msrvtt,
    "vatex": vatex, "didemo": didemo, "activitynet": activitynet, "csv": csv_dataset,
}


def build_dataset(name: str, root: PathLike, split: str = "train", **kwargs) -> VideoDataset:
    """``build_dataset("ucf101", "/data/UCF101", "test", fold=2)`` and so on (see ``DATASETS``)."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {name!r}")
    return DATASETS[name](root, split, **kwargs)
