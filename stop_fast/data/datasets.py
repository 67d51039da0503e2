"""Dataset adapters: the official split files of each benchmark, read as published.

Each adapter returns a :class:`VideoDataset`: a list of samples (a video path and either a class
index or the video's captions) plus the class names. Nothing is decoded here; paths that do not
exist are kept and reported when read (see ``stop-fast prepare`` to probe a dataset up front).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

PathLike = Union[str, os.PathLike]


@dataclasses.dataclass(frozen=True)
class Sample:
    path: str
    label: int = -1  # class index (recognition), -1 for retrieval
    captions: Tuple[str, ...] = ()  # retrieval: every caption of the video


@dataclasses.dataclass
class VideoDataset:
    name: str
    split: str
    samples: List[Sample]
    classes: List[str] = dataclasses.field(default_factory=list)
    task: str = "recognition"  # or "retrieval"
    allow_flip: bool = True  # False where classes name directions (Something-Something V2)

    def __len__(self) -> int:
        return len(self.samples)

    def class_texts(self, template: str = "a video of a person doing {}") -> List[str]:
        """Prompts for the frozen text tower, one per class (SPEC.md: recognition)."""
        return [template.format(c) for c in self.classes]


def _need(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _lines(path: Path) -> List[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _split(split: str, allowed: Sequence[str]) -> str:
    if split not in allowed:
        raise ValueError(f"split must be one of {tuple(allowed)}, got {split!r}")
    return split


def ucf101(root: PathLike, split: str = "train", fold: int = 1, annotations: Optional[PathLike] = None) -> VideoDataset:
    """UCF101: ``classInd.txt`` ("1 ApplyEyeMakeup"), ``trainlist0N.txt`` ("Class/v_x.avi 1"),
    ``testlist0N.txt`` ("Class/v_x.avi"); videos under ``root/Class/``."""
    _split(split, ("train", "test"))
    if fold not in (1, 2, 3):
        raise ValueError(f"fold must be 1, 2 or 3, got {fold}")
    root = Path(root)
    ann = Path(annotations) if annotations else root / "ucfTrainTestlist"
    classes = [line.split(maxsplit=1)[1] for line in _lines(_need(ann / "classInd.txt", "UCF101 classInd.txt"))]
    index = {c: i for i, c in enumerate(classes)}
    listing = _need(ann / f"{split}list0{fold}.txt", f"UCF101 {split} list")
    lower = {c.lower(): i for c, i in index.items()}  # folder and classInd spellings differ in case
    samples = []
    for line in _lines(listing):
        parts = line.split()
        rel, folder = parts[0], parts[0].split("/")[0]
        if len(parts) > 1:  # trainlist lines carry the 1-based class number
            label = int(parts[1]) - 1
        elif folder in index or folder.lower() in lower:
            label = index.get(folder, lower.get(folder.lower()))
        else:
            raise ValueError(f"{listing}: class folder {folder!r} is not in classInd.txt")
        samples.append(Sample(str(root / rel), label))
    return VideoDataset("ucf101", split, samples, classes)


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
        for line in _lines(f):
            name, mark = line.split()
            if mark == wanted:
                samples.append(Sample(str(root / cls / name), classes.index(cls)))
    return VideoDataset("hmdb51", split, samples, classes)


def ssv2(root: PathLike, split: str = "train", annotations: Optional[PathLike] = None) -> VideoDataset:
    """Something-Something V2: ``labels.json`` (template -> index), ``train.json`` /
    ``validation.json`` (id, template, ...); videos ``root/<id>.webm``. No horizontal flips."""
    _split(split, ("train", "validation"))
    root = Path(root)
    ann = Path(annotations) if annotations else root
    with open(_need(ann / "labels.json", "SSv2 labels.json"), encoding="utf-8") as f:
        labels = {name: int(i) for name, i in json.load(f).items()}
    classes = [name for name, _ in sorted(labels.items(), key=lambda kv: kv[1])]
    with open(_need(ann / f"{split}.json", f"SSv2 {split}.json"), encoding="utf-8") as f:
        entries = json.load(f)
    samples = [Sample(str(root / f"{e['id']}.webm"), labels[e["template"].replace("[", "").replace("]", "")])
               for e in entries]
    return VideoDataset("ssv2", split, samples, classes, allow_flip=False)


def kinetics400(root: PathLike, split: str = "train", annotations: Optional[PathLike] = None) -> VideoDataset:
    """Kinetics-400: CSV ``label,youtube_id,time_start,time_end,split``; videos named
    ``<youtube_id>_<start:06d>_<end:06d>.mp4`` under ``root/<split>/<label>/`` or ``root/<split>/``."""
    _split(split, ("train", "val", "test"))
    root = Path(root)
    table = Path(annotations) if annotations else root / "annotations" / f"{split}.csv"
    with open(_need(table, "Kinetics-400 CSV"), newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    classes = sorted({r["label"] for r in rows})
    index = {c: i for i, c in enumerate(classes)}
    samples = []
    for r in rows:
        name = f"{r['youtube_id']}_{int(float(r['time_start'])):06d}_{int(float(r['time_end'])):06d}.mp4"
        by_class = root / split / r["label"] / name
        path = by_class if by_class.exists() or not (root / split / name).exists() else root / split / name
        samples.append(Sample(str(path), index[r["label"]]))
    return VideoDataset("kinetics400", split, samples, classes)


def msrvtt(root: PathLike, split: str = "train", annotations: Optional[PathLike] = None) -> VideoDataset:
    """MSR-VTT retrieval: ``MSRVTT_data.json`` (every caption), ``train.9k.csv`` (training videos,
    all their captions) and ``JSFUSION_test.csv`` (the 1k-A test pairs); videos ``root/videos/<id>.mp4``."""
    _split(split, ("train", "test"))
    root = Path(root)
    ann = Path(annotations) if annotations else root
    video_dir = root / "videos" if (root / "videos").is_dir() else root
    if split == "test":
        with open(_need(ann / "JSFUSION_test.csv", "MSR-VTT JSFUSION_test.csv"), newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        samples = [Sample(str(video_dir / f"{r['video_id']}.mp4"), captions=(r["sentence"],)) for r in rows]
        return VideoDataset("msrvtt", split, samples, task="retrieval")
    with open(_need(ann / "MSRVTT_data.json", "MSR-VTT MSRVTT_data.json"), encoding="utf-8") as f:
        data = json.load(f)
    captions: Dict[str, List[str]] = {}
    for s in data["sentences"]:
        captions.setdefault(s["video_id"], []).append(s["caption"])
    with open(_need(ann / "train.9k.csv", "MSR-VTT train.9k.csv"), newline="", encoding="utf-8") as f:
        ids = [r["video_id"] for r in csv.DictReader(f)]
    samples = [Sample(str(video_dir / f"{v}.mp4"), captions=tuple(captions.get(v, ()))) for v in ids]
    return VideoDataset("msrvtt", split, samples, task="retrieval")


def csv_dataset(root: PathLike, split: str = "train", annotations: Optional[PathLike] = None) -> VideoDataset:
    """A CSV with a header: ``path,label`` (recognition; label = class name) or ``path,caption``
    (retrieval; one row per caption). Paths are relative to ``root``. Default file ``root/<split>.csv``."""
    root = Path(root)
    table = Path(annotations) if annotations else root / f"{split}.csv"
    with open(_need(table, "dataset CSV"), newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        rows = list(reader)
    if "path" not in fields or not ({"label", "caption"} & set(fields)):
        raise ValueError(f"{table}: the header must be 'path,label' or 'path,caption', got {','.join(fields)}")
    if "label" in fields:
        classes = sorted({r["label"] for r in rows})
        index = {c: i for i, c in enumerate(classes)}
        samples = [Sample(str(root / r["path"]), index[r["label"]]) for r in rows]
        return VideoDataset("csv", split, samples, classes)
    grouped: Dict[str, List[str]] = {}
    for r in rows:
        grouped.setdefault(r["path"], []).append(r["caption"])
    samples = [Sample(str(root / p), captions=tuple(c)) for p, c in grouped.items()]
    return VideoDataset("csv", split, samples, task="retrieval")


DATASETS: Dict[str, Callable[..., VideoDataset]] = {
    "ucf101": ucf101, "hmdb51": hmdb51, "ssv2": ssv2, "kinetics400": kinetics400, "msrvtt": msrvtt, "csv": csv_dataset,
}


def build_dataset(name: str, root: PathLike, split: str = "train", **kwargs) -> VideoDataset:
    """``build_dataset("ucf101", "/data/UCF101", "test", fold=2)`` and so on (see ``DATASETS``)."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {name!r}")
    return DATASETS[name](root, split, **kwargs)
