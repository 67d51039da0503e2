"""TrainConfig: every setting of a training or evaluation run, its default (SPEC.md) and its checks.

A run's model is a :class:`~stop_fast.config.STOPConfig` held in ``TrainConfig.stop`` (backbone name,
frames T, K, rho, alpha, beta, widths); the other fields say what data it sees and how it trains.
A config comes from a TOML file (``configs/<dataset>.toml``: top-level settings and a ``[stop]``
table, read with the standard library's ``tomllib``), from keyword arguments, or both
(``load_config(path, **overrides)``, ``stop=`` taking a dict of STOPConfig fields to change); the
command line passes its flags as overrides. ``None`` means "the dataset's default" (see
``DATASET_DEFAULTS``) or "decided by the device" (``device``, ``precision``, ``impl``, ``compile``);
:meth:`TrainConfig.resolved` fills those in for the run, and ``OUT/config.json`` records the
resolved values (:data:`RUN_FORMAT`).

Files written before the model moved into ``[stop]`` (flat ``model``, ``frames``, ``k``, ``rho``,
... keys, and run records without a format) are read through :data:`FLAT_MODEL_KEYS`, the one
place that knows the old names.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import warnings
from typing import Any, Dict, Optional, Tuple

from ..config import IMPLS, STOPConfig

log = logging.getLogger(__name__)

# Per dataset: the task, which splits train and evaluate, whether horizontal flips keep the labels
# true (SPEC.md "Sampling": on for UCF101, HMDB51 and Kinetics; never for SSv2; off for captions,
# which may say "left" or "right"; off by default for a user's CSV), the caption length in tokens
# for retrieval (32 for MSR-VTT and VATEX, 64 elsewhere), how class names become the words of the
# class texts (tasks.class_words: "ApplyEyeMakeup", "brush_hair", "[something]" -> words; a CSV's
# names as given), and which captions make training pairs: every caption of every video for MSR-VTT
# (CLIP4Clip's protocol, which the STOP authors' MSR-VTT script selects with
# --expand_msrvtt_sentences), one caption per video per epoch elsewhere (paragraphs are one caption).
DATASET_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "ucf101": {"task": "recognition", "flip": True, "train_split": "train", "val_split": "test", "class_names": "words"},
    "hmdb51": {"task": "recognition", "flip": True, "train_split": "train", "val_split": "test", "class_names": "words"},
    "ssv2": {"task": "recognition", "flip": False, "train_split": "train", "val_split": "validation",
             "class_names": "words"},
    "kinetics400": {"task": "recognition", "flip": True, "train_split": "train", "val_split": "val",
                    "class_names": "words"},
    "msrvtt": {"task": "retrieval", "flip": False, "caption_tokens": 32, "train_split": "train", "val_split": "test",
               "train_captions": "all"},
    "vatex": {"task": "retrieval", "flip": False, "caption_tokens": 32, "train_split": "train", "val_split": "test"},
    "didemo": {"task": "retrieval", "flip": False, "caption_tokens": 64, "train_split": "train", "val_split": "test"},
    "activitynet": {"task": "retrieval", "flip": False, "caption_tokens": 64, "train_split": "train", "val_split": "val"},
    "csv": {"task": None, "flip": False, "caption_tokens": 64, "train_split": "train", "val_split": "val"},
}
DATASETS = tuple(DATASET_DEFAULTS)
DECODERS = ("auto", "dali", "pyav")
PRECISIONS = ("bf16", "fp32")
GELUS = ("quick", "erf")
CLASS_NAMES = ("raw", "words")  # class names into the class texts as given, or as words (tasks.class_words)
TRAIN_CAPTIONS = ("one", "all")  # retrieval training pairs: one caption per video per epoch, or every caption
RUN_FORMAT = "stop_fast.run/2"  # OUT/config.json; records without a format are read as version 1
# Version 1 (flat) names of the model's settings -> STOPConfig fields.
FLAT_MODEL_KEYS = {"model": "model_name", "frames": "num_frames", "k": "k", "rho": "rho", "alpha": "alpha",
                   "beta": "beta", "r_intra": "r_intra", "r_inter": "r_inter"}


@dataclasses.dataclass
class TrainConfig:
    """Settings of one run. Defaults are SPEC.md's (the authors' MSR-VTT script) unless marked."""

    # model: the backbone, T, K, rho, ... (STOPConfig's defaults are SPEC.md's)
    stop: STOPConfig = dataclasses.field(default_factory=STOPConfig)
    weights: Optional[str] = None  # local CLIP weights; None: random weights drawn from `seed` (a warning says so)
    gelu: str = "quick"  # the backbone's activation: quick (OpenAI's CLIP) or erf (most LAION checkpoints)

    # data
    dataset: Optional[str] = None  # one of DATASETS (required)
    video_root: Optional[str] = None  # the dataset's root folder (required)
    train_list: Optional[str] = None  # annotations of the training split: a file (csv, kinetics400) or
    val_list: Optional[str] = None  # the folder of split files (the other datasets); None: under video_root
    train_split: Optional[str] = None  # split names passed to the dataset adapter; None: DATASET_DEFAULTS
    val_split: Optional[str] = None
    fold: int = 1  # UCF101 / HMDB51 split number
    eval_frames: Optional[int] = None  # T for evaluation; None: stop.num_frames
    eval_clips: int = 1  # evaluation views: clips per video x crops per clip, averaged
    eval_crops: int = 1
    flip: Optional[bool] = None  # horizontal flips in training; None: the dataset's default
    caption_tokens: Optional[int] = None  # retrieval caption length; None: DATASET_DEFAULTS
    class_template: str = "a video of a person doing {}"
    class_names: Optional[str] = None  # raw or words; None: the dataset's (words for the paper's, raw for a CSV)
    train_captions: Optional[str] = None  # one or all; None: the dataset's (all for MSR-VTT, one elsewhere)
    manifest: Optional[str] = None  # a `stop-fast prepare` manifest: read its copies with their frame indexes
    decoder: str = "auto"  # auto: DALI on a GPU where NVDEC decodes and DALI is installed, else PyAV
    workers: Optional[int] = None  # PyAV decoding processes, or DALI host threads; None: min(4, usable cores)

    # optimisation
    epochs: int = 5
    batch_size: int = 128  # global: videos per optimiser step over all ranks and accumulation steps
    eval_batch_size: Optional[int] = None  # global; None: batch_size
    lr: float = 1e-3
    betas: Tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.2
    warmup: float = 0.1  # fraction of all optimiser steps with a linear warm-up, then cosine to 0
    grad_clip: float = 1.0  # max gradient norm; 0 switches clipping off
    accumulation: int = 1  # micro-batches per optimiser step (for InfoNCE each one is its own contrastive batch)

    # run
    out: str = "runs/stop"
    resume: Optional[str] = None  # "auto" (newest readable checkpoint in out, if any) or a checkpoint file
    device: Optional[str] = None  # cpu, cuda, cuda:N; None: CUDA when available (torchrun: cuda:LOCAL_RANK)
    precision: Optional[str] = None  # bf16 or fp32; None: bf16 on CUDA, fp32 on CPU
    impl: Optional[str] = None  # reference or fast; None: fast on CUDA, reference on CPU
    compile: Optional[bool] = None  # torch.compile the step's encoder; None: on with CUDA
    grad_checkpointing: bool = False
    seed: int = 0  # sampling, the prompters' initialisation and a random backbone's weights
    log_every: int = 10  # optimiser steps between log lines (the only host syncs of the loop)
    eval_every: int = 1  # epochs between evaluations; 0: only after the last epoch
    save_every: int = 0  # optimiser steps between checkpoints; 0: at the end of each epoch only
    keep_checkpoints: int = 2  # newest training checkpoints kept in out/checkpoints
    stop_after_steps: int = 0  # end this run (with a checkpoint) after it has taken so many steps (a resumed run
    # counts its own); the schedule still spans all epochs
    progress: bool = True  # tqdm progress bar (rank 0)

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        if isinstance(self.stop, dict):
            self.stop = _stop_config(self.stop)
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self, require_data: bool = False) -> None:
        """Raise ``ValueError`` naming the first bad field. ``require_data`` also asks for a dataset."""
        if not isinstance(self.stop, STOPConfig):
            raise ValueError(f"stop must be a STOPConfig, got {type(self.stop).__name__}")
        if self.dataset is not None and self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        if require_data:
            if self.dataset is None:
                raise ValueError("dataset is required (one of " + ", ".join(DATASETS) + ")")
            if not self.video_root:
                raise ValueError("video_root is required: the dataset's root folder")
        for name in ("video_root", "train_list", "val_list", "train_split", "val_split", "manifest", "weights",
                     "resume", "device", "out", "class_template"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        if "{}" not in self.class_template:
            raise ValueError(f"class_template must contain '{{}}' where the class name goes, got {self.class_template!r}")
        for name, low in (("fold", 1), ("eval_clips", 1), ("epochs", 1), ("batch_size", 1), ("accumulation", 1),
                          ("log_every", 1), ("eval_every", 0), ("save_every", 0),
                          ("keep_checkpoints", 1), ("stop_after_steps", 0), ("seed", 0)):
            _check_int(name, getattr(self, name), low)
        for name, low in (("eval_frames", 1), ("eval_batch_size", 1), ("caption_tokens", 1), ("workers", 0)):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), low)
        if self.eval_crops not in (1, 3) or isinstance(self.eval_crops, bool):
            raise ValueError(f"eval_crops must be 1 or 3, got {self.eval_crops!r}")
        for name in ("lr", "eps"):
            _check_real(name, getattr(self, name), low=0.0, open_low=True)
        for name in ("weight_decay", "grad_clip"):
            _check_real(name, getattr(self, name), low=0.0)
        _check_real("warmup", self.warmup, low=0.0)
        if self.warmup >= 1:
            raise ValueError(f"warmup is a fraction of all steps and must lie in [0, 1), got {self.warmup}")
        if (not isinstance(self.betas, tuple) or len(self.betas) != 2
                or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in self.betas)):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        for name, allowed in (("decoder", DECODERS), ("gelu", GELUS), ("precision", PRECISIONS), ("impl", IMPLS),
                              ("class_names", CLASS_NAMES), ("train_captions", TRAIN_CAPTIONS)):
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        for name in ("flip", "compile", "grad_checkpointing", "progress"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false, got {value!r}")

    # ------------------------------------------------------------------ derived settings
    def dataset_default(self, key: str):
        return DATASET_DEFAULTS.get(self.dataset or "csv", DATASET_DEFAULTS["csv"]).get(key)

    @property
    def use_flip(self) -> bool:
        return self.dataset_default("flip") if self.flip is None else self.flip

    @property
    def text_tokens(self) -> int:
        return self.caption_tokens or self.dataset_default("caption_tokens") or 64

    @property
    def splits(self) -> Tuple[str, str]:
        return (self.train_split or self.dataset_default("train_split"),
                self.val_split or self.dataset_default("val_split"))

    @property
    def eval_num_frames(self) -> int:
        """T of evaluation: ``eval_frames``, else the model's (which a checkpoint may set)."""
        return self.eval_frames or self.stop.num_frames

    @property
    def trains_anything(self) -> bool:
        """Table 4's first row (k = 0, rho = 0) has no trainable part: the run only evaluates."""
        return self.stop.intra_enabled or self.stop.inter_enabled

    def resolved(self, cuda_available: bool, local_rank: int = 0) -> "TrainConfig":
        """A copy with the device-dependent ``None`` fields decided (what ``OUT/config.json`` records;
        ``eval_frames`` stays None, "the model's T", which :attr:`eval_num_frames` reads)."""
        device = self.device or (f"cuda:{local_rank}" if cuda_available else "cpu")
        on_cuda = device.startswith("cuda")
        return dataclasses.replace(
            self,
            device=device,
            precision=self.precision or ("bf16" if on_cuda else "fp32"),
            impl=self.impl or ("fast" if on_cuda else "reference"),
            compile=on_cuda if self.compile is None else self.compile,
            # more DataLoader workers than usable cores only compete (and torch warns about it)
            workers=min(4, _usable_cores()) if self.workers is None else self.workers,
            eval_batch_size=self.eval_batch_size or self.batch_size,
            flip=self.use_flip,
            caption_tokens=self.text_tokens,
            class_names=self.class_names or self.dataset_default("class_names") or "raw",
            train_captions=self.train_captions or self.dataset_default("train_captions") or "one",
            train_split=self.splits[0],
            val_split=self.splits[1],
        )

    def with_stop(self, **changes) -> "TrainConfig":
        """A copy whose STOPConfig has ``changes`` (e.g. ``k=0, rho=0`` for prompts off)."""
        return dataclasses.replace(self, stop=dataclasses.replace(self.stop, **changes))

    def to_dict(self) -> Dict[str, Any]:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out

    @classmethod
    def from_dict(cls, values: Dict[str, Any], source: Optional[str] = None) -> "TrainConfig":
        """``values``: TrainConfig fields, ``stop`` a dict of STOPConfig fields (or a STOPConfig).
        ``source`` (a file name) prefixes error messages."""
        prefix = f"{source}: " if source else ""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{prefix}unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))} "
                             f"(the model's settings go in the [stop] table: {', '.join(_stop_fields())})")
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{prefix}{exc}") from None


# What a run's config.json lends `eval`, `predict` and `visualize` of its checkpoint: what defines its
# model and how it is evaluated. Never the device, the workers, or how it trained.
INHERITED_SETTINGS = ("stop", "weights", "gelu", "seed", "dataset", "video_root", "train_list", "val_list",
                      "train_split", "val_split", "fold", "manifest", "eval_frames", "eval_clips", "eval_crops",
                      "caption_tokens", "class_template", "class_names")


def run_settings(folder: str) -> Dict[str, Any]:
    """The :data:`INHERITED_SETTINGS` of the run in ``folder`` (its ``config.json``), as overrides for
    :func:`load_config` (``base=``); paths that no longer exist (a moved dataset or weights file) are
    left out, so that the caller's flags or their own error say what is missing."""
    path = os.path.join(folder, "config.json")
    import json

    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable run record ({exc})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}: not a run record (a JSON object expected)")
    config = read_run_record(record, path)
    values = {name: getattr(config, name) for name in INHERITED_SETTINGS}
    for name in ("video_root", "train_list", "val_list", "manifest", "weights"):
        if values[name] is not None and not os.path.exists(values[name]):
            log.warning("%s: the run's %s %s no longer exists; pass --%s", path, name, values[name],
                        name.replace("_", "-"))
            values[name] = None
    return {k: v for k, v in values.items() if v is not None}


def read_run_record(record: Dict[str, Any], source: str) -> TrainConfig:
    """The TrainConfig of a run's ``config.json`` (either format; the run's own extra keys ignored)."""
    if record.get("format") == RUN_FORMAT:
        values = dict(record)
    elif "format" in record:
        raise ValueError(f"{source}: run format {record['format']!r} is newer than this stop_fast reads "
                         f"({RUN_FORMAT}); upgrade stop_fast")
    else:  # version 1: flat model keys (its "stop_config" holds the model's every field), raw class names
        values = {k: v for k, v in record.items() if k not in FLAT_MODEL_KEYS}
        values["stop"] = record.get("stop_config") or {new: record[old] for old, new in FLAT_MODEL_KEYS.items()
                                                        if old in record}
        values.update(class_names="raw", train_captions="one")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig.from_dict({k: v for k, v in values.items() if k in known}, source=source)


def config_path(name: str) -> str:
    """``--config``: a TOML file, or the name of an installed config (``hmdb51``, ``msrvtt.toml``); an
    existing file of that name wins over the installed one."""
    if os.path.isfile(name):
        return name
    import importlib.resources

    installed = importlib.resources.files("stop_fast.configs")
    stem = name[:-5] if name.endswith(".toml") else name
    if os.sep not in name and (installed / f"{stem}.toml").is_file():
        return str(installed / f"{stem}.toml")
    names = sorted(p.name[:-5] for p in installed.iterdir() if p.name.endswith(".toml"))
    raise FileNotFoundError(f"config {name}: no such file, and not an installed config ({', '.join(names)})")


def read_toml(path: str) -> Dict[str, Any]:
    """The settings of a TOML config file: top-level keys (or a ``[train]`` table) and ``[stop]``."""
    import tomllib

    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        with open(path, "rb") as f:
            values = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML ({exc})") from None
    if "train" in values and isinstance(values["train"], dict):
        values = {**values.pop("train"), **values}
    nested = [k for k, v in values.items() if isinstance(v, dict) and k != "stop"]
    if nested:
        raise ValueError(f"{path}: unexpected table(s) {', '.join(nested)}; write settings as top-level keys "
                         "and the model's in [stop]")
    flat = [k for k in FLAT_MODEL_KEYS if k in values]
    if flat:
        warnings.warn(f"{path}: {', '.join(flat)} are read as [stop] settings "
                      f"({', '.join(FLAT_MODEL_KEYS[k] for k in flat)}); write them in the [stop] table",
                      UserWarning, stacklevel=2)
        values["stop"] = {**{FLAT_MODEL_KEYS[k]: values.pop(k) for k in flat}, **values.get("stop", {})}
    return values


def load_config(path: Optional[str] = None, base: Optional[Dict[str, Any]] = None, **overrides) -> TrainConfig:
    """TrainConfig from ``base`` (e.g. a run's settings), then a TOML file (a path or an installed
    config's name, :func:`config_path`), then ``overrides`` (those that are not None) on top; ``stop``
    settings are merged field by field at each level."""
    values = dict(base or {})
    if path:
        path = config_path(path)
        from_file = read_toml(path)
        if "stop" in from_file:
            from_file["stop"] = {**_stop_dict(values.get("stop")), **from_file["stop"]}
        values.update(from_file)
    stop_overrides = overrides.pop("stop", None) or {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    if stop_overrides or "stop" in values:
        values["stop"] = {**_stop_dict(values.get("stop")), **{k: v for k, v in stop_overrides.items() if v is not None}}
    return TrainConfig.from_dict(values, source=path)


def _stop_dict(stop) -> Dict[str, Any]:
    return stop.to_dict() if isinstance(stop, STOPConfig) else dict(stop or {})


def _usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one, as torch's DataLoader counts)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _stop_config(values: Dict[str, Any]) -> STOPConfig:
    try:
        return STOPConfig.from_dict(values)
    except ValueError as exc:
        raise ValueError(f"stop: {exc}") from None


def _stop_fields():
    return [f.name for f in dataclasses.fields(STOPConfig)]


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def _check_real(name: str, value, low: float, open_low: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < low or (open_low and value == low):
        raise ValueError(f"{name} must be {'>' if open_low else '>='} {low}, got {value}")
