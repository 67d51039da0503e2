"""TrainConfig: every setting of a training or evaluation run, its default (SPEC.md) and its checks.

A config comes from a TOML file (``configs/<dataset>.toml``, read with the standard library's
``tomllib``), from keyword arguments, or both (``load_config(path, **overrides)``); the command line
passes its flags as overrides. Keys are the field names below. ``None`` means "the dataset's
default" (see ``DATASET_DEFAULTS``) or "decided by the device" (``device``, ``precision``, ``impl``,
``compile``); :meth:`TrainConfig.resolved` fills those in for the run, and ``OUT/config.json``
records the resolved values.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Dict, Optional, Tuple

# Per dataset: the task, which splits train and evaluate, whether horizontal flips keep the labels
# true (SPEC.md "Sampling": on for UCF101, HMDB51 and Kinetics; never for SSv2; off for captions,
# which may say "left" or "right"; off by default for a user's CSV), and the caption length in
# tokens for retrieval (32 for MSR-VTT and VATEX, 64 elsewhere).
DATASET_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "ucf101": {"task": "recognition", "flip": True, "train_split": "train", "val_split": "test"},
    "hmdb51": {"task": "recognition", "flip": True, "train_split": "train", "val_split": "test"},
    "ssv2": {"task": "recognition", "flip": False, "train_split": "train", "val_split": "validation"},
    "kinetics400": {"task": "recognition", "flip": True, "train_split": "train", "val_split": "val"},
    "msrvtt": {"task": "retrieval", "flip": False, "caption_tokens": 32, "train_split": "train", "val_split": "test"},
    "vatex": {"task": "retrieval", "flip": False, "caption_tokens": 32, "train_split": "train", "val_split": "test"},
    "didemo": {"task": "retrieval", "flip": False, "caption_tokens": 64, "train_split": "train", "val_split": "test"},
    "activitynet": {"task": "retrieval", "flip": False, "caption_tokens": 64, "train_split": "train", "val_split": "val"},
    "csv": {"task": None, "flip": False, "caption_tokens": 64, "train_split": "train", "val_split": "val"},
}
DATASETS = tuple(DATASET_DEFAULTS)
DECODERS = ("auto", "dali", "pyav")
PRECISIONS = ("bf16", "fp32")
IMPLS = ("reference", "fast")
LOGIT_SCALE = 100.0  # SPEC.md: exactly 100, whatever the backbone file holds


@dataclasses.dataclass
class TrainConfig:
    """Settings of one run. Defaults are SPEC.md's (the authors' MSR-VTT script) unless marked."""

    # data
    dataset: Optional[str] = None  # one of DATASETS (required)
    video_root: Optional[str] = None  # the dataset's root folder (required)
    train_list: Optional[str] = None  # annotations of the training split: a file (csv, kinetics400) or
    val_list: Optional[str] = None  # the folder of split files (the other datasets); None: under video_root
    train_split: Optional[str] = None  # split names passed to the dataset adapter; None: DATASET_DEFAULTS
    val_split: Optional[str] = None
    fold: int = 1  # UCF101 / HMDB51 split number
    frames: int = 12  # T sampled per training clip
    eval_frames: Optional[int] = None  # T for evaluation; None: frames
    eval_clips: int = 1  # evaluation views: clips per video x crops per clip, averaged
    eval_crops: int = 1
    flip: Optional[bool] = None  # horizontal flips in training; None: the dataset's default
    caption_tokens: Optional[int] = None  # retrieval caption length; None: DATASET_DEFAULTS
    class_template: str = "a video of a person doing {}"
    decoder: str = "auto"  # auto: DALI on a GPU when installed, else PyAV
    workers: int = 4  # PyAV decoding processes, or DALI host threads

    # model
    model: str = "ViT-B-32"
    weights: Optional[str] = None  # local CLIP weights; None: random weights (a warning says so)
    k: int = 6
    rho: int = 12
    alpha: float = 0.4
    beta: float = 4.0
    r_intra: int = 128
    r_inter: int = 512

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
    resume: Optional[str] = None  # "auto" (latest checkpoint in out, if any) or a checkpoint file
    device: Optional[str] = None  # cpu, cuda, cuda:N; None: CUDA when available (torchrun: cuda:LOCAL_RANK)
    precision: Optional[str] = None  # bf16 or fp32; None: bf16 on CUDA, fp32 on CPU
    impl: Optional[str] = None  # reference or fast; None: fast on CUDA, reference on CPU
    compile: Optional[bool] = None  # torch.compile the step's encoder; None: on with CUDA
    grad_checkpointing: bool = False
    seed: int = 0
    log_every: int = 10  # optimiser steps between log lines (the only host syncs of the loop)
    eval_every: int = 1  # epochs between evaluations; 0: only after the last epoch
    save_every: int = 0  # optimiser steps between checkpoints; 0: at the end of each epoch only
    keep_checkpoints: int = 2  # newest training checkpoints kept in out/checkpoints
    stop_after_steps: int = 0  # end this run (with a checkpoint) after so many steps; the schedule still spans all epochs
    progress: bool = True  # tqdm progress bar (rank 0)

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self, require_data: bool = False) -> None:
        """Raise ``ValueError`` naming the first bad field. ``require_data`` also asks for a dataset."""
        if self.dataset is not None and self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        if require_data:
            if self.dataset is None:
                raise ValueError("dataset is required (one of " + ", ".join(DATASETS) + ")")
            if not self.video_root:
                raise ValueError("video_root is required: the dataset's root folder")
        for name in ("video_root", "train_list", "val_list", "train_split", "val_split", "weights", "resume",
                     "device", "out", "model", "class_template"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        if "{}" not in self.class_template:
            raise ValueError(f"class_template must contain '{{}}' where the class name goes, got {self.class_template!r}")
        for name, low in (("fold", 1), ("frames", 1), ("eval_clips", 1), ("epochs", 1), ("batch_size", 1),
                          ("accumulation", 1), ("log_every", 1), ("r_intra", 1), ("r_inter", 1), ("k", 0),
                          ("rho", 0), ("workers", 0), ("eval_every", 0), ("save_every", 0), ("keep_checkpoints", 1),
                          ("stop_after_steps", 0), ("seed", 0)):
            _check_int(name, getattr(self, name), low)
        for name in ("eval_frames", "eval_batch_size", "caption_tokens"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        if self.eval_crops not in (1, 3) or isinstance(self.eval_crops, bool):
            raise ValueError(f"eval_crops must be 1 or 3, got {self.eval_crops!r}")
        for name in ("lr", "eps"):
            _check_real(name, getattr(self, name), low=0.0, open_low=True)
        for name in ("weight_decay", "grad_clip", "alpha", "beta"):
            _check_real(name, getattr(self, name), low=0.0)
        if self.alpha > 1:
            raise ValueError(f"alpha must lie in [0, 1], got {self.alpha}")
        _check_real("warmup", self.warmup, low=0.0)
        if self.warmup >= 1:
            raise ValueError(f"warmup is a fraction of all steps and must lie in [0, 1), got {self.warmup}")
        if (not isinstance(self.betas, tuple) or len(self.betas) != 2
                or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in self.betas)):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {self.decoder!r}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.impl is not None and self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {self.impl!r}")
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
    def trains_anything(self) -> bool:
        """Table 4's first row (k = 0, rho = 0) has no trainable part: the run only evaluates."""
        return self.k > 0 or self.rho > 0

    def resolved(self, cuda_available: bool, local_rank: int = 0) -> "TrainConfig":
        """A copy with the device-dependent ``None`` fields decided (what ``OUT/config.json`` records)."""
        device = self.device or (f"cuda:{local_rank}" if cuda_available else "cpu")
        on_cuda = device.startswith("cuda")
        return dataclasses.replace(
            self,
            device=device,
            precision=self.precision or ("bf16" if on_cuda else "fp32"),
            impl=self.impl or ("fast" if on_cuda else "reference"),
            compile=on_cuda if self.compile is None else self.compile,
            eval_frames=self.eval_frames or self.frames,
            eval_batch_size=self.eval_batch_size or self.batch_size,
            flip=self.use_flip,
            caption_tokens=self.text_tokens,
            train_split=self.splits[0],
            val_split=self.splits[1],
        )

    def to_dict(self) -> Dict[str, Any]:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out

    @classmethod
    def from_dict(cls, values: Dict[str, Any], source: Optional[str] = None) -> "TrainConfig":
        """``source`` (a file name) prefixes error messages."""
        prefix = f"{source}: " if source else ""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{prefix}unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        try:
            return cls(**values)
        except ValueError as exc:
            raise ValueError(f"{prefix}{exc}") from None


def read_toml(path: str) -> Dict[str, Any]:
    """The settings of a TOML config file (top-level keys, or a ``[train]`` table)."""
    import tomllib

    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        with open(path, "rb") as f:
            values = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML ({exc})") from None
    if set(values) == {"train"} and isinstance(values["train"], dict):
        values = values["train"]
    nested = [k for k, v in values.items() if isinstance(v, dict)]
    if nested:
        raise ValueError(f"{path}: unexpected table(s) {', '.join(nested)}; write settings as top-level keys")
    return values


def load_config(path: Optional[str] = None, **overrides) -> TrainConfig:
    """TrainConfig from a TOML file, then ``overrides`` (those that are not None) on top."""
    values = read_toml(path) if path else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig.from_dict(values, source=path)


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
