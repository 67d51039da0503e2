"""STOPConfig: every symbol of SPEC.md with its default, and the checks that keep it meaningful."""
from __future__ import annotations

import dataclasses
import math

# Prompter_inter's output layer has r_inter * rho * D weights (and as many gradients and AdamW
# moments, all fp32: 16 bytes each). 2**28 of them is 4 GiB of training state for one layer, about
# 50x the default (512 * 12 * 768); past that a single GPU runs out of memory.
MAX_INTER_OUTPUT_WEIGHTS = 2**28
# The two implementations of SPEC.md's forward pass (``STOP.encode_video(impl=...)``).
IMPLS = ("reference", "fast")
# SPEC.md: OpenAI CLIP's trained (clamped) temperature, whatever the backbone file holds.
LOGIT_SCALE = 100.0


@dataclasses.dataclass
class STOPConfig:
    """Hyper-parameters of STOP (SPEC.md, "Notation and defaults").

    ``k = 0`` switches the intra-frame (spatial) prompts off and ``rho = 0`` the inter-frame (temporal)
    prompts; the parts a switch removes are not created.
    """

    model_name: str = "ViT-B-32"  # open_clip vision tower; N, D, heads are read off it
    num_frames: int = 12  # T the data side samples by default; the model accepts any T >= 1
    k: int = 6  # K: patches per frame that get an intra-frame prompt
    alpha: float = 0.4  # weight of temporal dynamics against attention in the patch score
    beta: float = 4.0  # extra weight of discriminative patches in the frame variation
    rho: int = 12  # most inter-frame prompt tokens one frame can get
    r_intra: int = 128  # bottleneck width of Prompter_intra
    r_inter: int = 512  # bottleneck width of Prompter_inter
    slot_init_std: float = 0.02  # std of the inter-frame slot embedding e
    variation_eps: float = 1e-6  # the epsilon of the per-video min-max normalisation (step 8)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, num_patches: int | None = None, width: int | None = None) -> None:
        """Raise ``ValueError`` naming the first bad field; ``num_patches`` (N) also bounds ``k``, and
        the backbone ``width`` (D) bounds ``r_inter * rho * D``, Prompter_inter's output layer."""
        _check_int("num_frames", self.num_frames, low=1)
        _check_int("k", self.k, low=0)
        _check_int("rho", self.rho, low=0)
        _check_int("r_intra", self.r_intra, low=1)
        _check_int("r_inter", self.r_inter, low=1)
        _check_real("alpha", self.alpha)
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {self.alpha}")
        _check_real("beta", self.beta)
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        _check_real("slot_init_std", self.slot_init_std)
        _check_real("variation_eps", self.variation_eps)
        if self.variation_eps <= 0:
            raise ValueError(f"variation_eps must be > 0, got {self.variation_eps}")
        if not isinstance(self.model_name, str) or not self.model_name:
            raise ValueError(f"model_name must be an open_clip model name, got {self.model_name!r}")
        if num_patches is not None and self.k > num_patches:
            raise ValueError(
                f"k must be at most N = {num_patches} (patches per frame of {self.model_name}), got {self.k}"
            )
        if width is not None and self.r_inter * self.rho * width > MAX_INTER_OUTPUT_WEIGHTS:
            raise ValueError(
                f"rho = {self.rho} and r_inter = {self.r_inter} are too large for width D = {width}: "
                f"Prompter_inter's output layer would hold r_inter * rho * D = {self.r_inter * self.rho * width:,} "
                f"weights (at most {MAX_INTER_OUTPUT_WEIGHTS:,}: with its gradient and AdamW state that is "
                "4 GiB for one layer); lower rho or r_inter"
            )

    @property
    def intra_enabled(self) -> bool:
        return self.k > 0

    @property
    def inter_enabled(self) -> bool:
        return self.rho > 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "STOPConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown STOPConfig field(s): {', '.join(unknown)}")
        return cls(**values)


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def _check_real(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
