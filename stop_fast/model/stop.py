"""STOP: a frozen CLIP with spatial-temporal dynamic prompts, and its public methods."""
from __future__ import annotations

import json
import os
from typing import Dict, Iterator, List, Optional, Sequence, Union

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from ..config import STOPConfig
from .prompters import DynamicsConv, InterPrompter, IntraPrompter
from .reference import reference_forward
from .steps import video_feature

IMPLS = ("reference", "fast")


class STOP(nn.Module):
    """STOP (CVPR 2025) over a frozen open_clip model.

    Holds the frozen backbone (``clip``) and the four trainable parts that SPEC.md defines:
    ``conv_intra`` and ``prompter_intra`` (absent when ``k == 0``), ``conv_inter`` and
    ``prompter_inter`` (absent when ``rho == 0``).
    """

    def __init__(self, config: STOPConfig, clip: nn.Module):
        super().__init__()
        visual = getattr(clip, "visual", None)
        _check_vision_tower(visual)
        grid_h, grid_w = visual.grid_size
        if grid_h != grid_w:
            raise ValueError(f"clip: STOP needs a square patch grid, got {grid_h} x {grid_w}")
        config.validate(num_patches=grid_h * grid_w)
        self.config = config
        self.clip = clip
        for p in clip.parameters():
            p.requires_grad_(False)
        clip.eval()
        self.grid = grid_h
        self.num_patches = grid_h * grid_w  # N
        self.width = visual.conv1.out_channels  # D
        self.image_size = visual.image_size[0]
        self.tokenizer = open_clip.get_tokenizer(config.model_name) if config.model_name in open_clip.list_models() else None

        if config.intra_enabled:
            self.conv_intra = DynamicsConv(self.width, self.grid)
            self.prompter_intra = IntraPrompter(self.width, config.r_intra)
        if config.inter_enabled:
            self.conv_inter = DynamicsConv(self.width, self.grid)
            self.prompter_inter = InterPrompter(self.width, config.r_inter, config.rho, config.slot_init_std)

    # ------------------------------------------------------------------ parts
    @property
    def visual(self) -> nn.Module:
        return self.clip.visual

    def train(self, mode: bool = True) -> "STOP":
        super().train(mode)
        self.clip.eval()  # the backbone is frozen: never patch dropout or other training behaviour
        return self

    def trainable_modules(self) -> Dict[str, nn.Module]:
        names = ("conv_intra", "prompter_intra", "conv_inter", "prompter_inter")
        return {name: getattr(self, name) for name in names if hasattr(self, name)}

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        for module in self.trainable_modules().values():
            yield from module.parameters()

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def trainable_state_dict(self) -> Dict[str, torch.Tensor]:
        """The trainable part alone, keyed like ``state_dict()`` (e.g. ``conv_intra.conv.weight``)."""
        out = {}
        for name, module in self.trainable_modules().items():
            for key, value in module.state_dict().items():
                out[f"{name}.{key}"] = value.detach().clone()
        return out

    def load_trainable_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        own = self.trainable_state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(
                f"state: trainable weights do not match this STOPConfig (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}); were they saved with other k / rho / widths?"
            )
        for key, value in state.items():
            if own[key].shape != value.shape:
                raise ValueError(f"state: {key} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}")
        for name, module in self.trainable_modules().items():
            prefix = name + "."
            module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})

    def save_prompts(self, path: Union[str, os.PathLike]) -> None:
        """Write the trainable weights, the config and the backbone's fingerprint to a ``.safetensors``
        file, atomically (see :mod:`stop_fast.prompt_file`)."""
        from ..prompt_file import save_prompts

        save_prompts(self, path)

    def load_prompts(self, path: Union[str, os.PathLike], force: bool = False) -> None:
        """Load weights written by :meth:`save_prompts`. A file saved for another config or backbone
        raises ``PromptFileError`` (a ValueError) naming the field; ``force=True`` loads it anyway,
        with a warning."""
        from ..prompt_file import load_prompts

        load_prompts(self, path, force=force)

    # ------------------------------------------------------------------ encoders
    def encode_video(self, video: torch.Tensor, impl: str = "reference", check_inputs: bool = True) -> torch.Tensor:
        """``video`` (B, T, 3, H, W) float, CLIP-normalised -> L2-normalised features (B, embed_dim).

        ``impl``: ``"reference"`` (plain PyTorch, padded frames) or ``"fast"`` (packed tokens through
        ``stop_fast.kernels``; Triton on CUDA or under ``TRITON_INTERPRET=1``, PyTorch elsewhere).
        ``check_inputs=False`` skips the NaN/Inf scan of the video, the one check that costs a host
        synchronisation (shapes and dtypes are always checked).
        """
        return video_feature(self.encode_frames(video, impl=impl, check_inputs=check_inputs))

    def encode_frames(self, video: torch.Tensor, impl: str = "reference", check_inputs: bool = True) -> torch.Tensor:
        """Per-frame features ``f_t`` (B, T, embed_dim) before the mean over frames (SPEC step 12)."""
        self._check_video(video, check_values=check_inputs)
        if impl == "reference":
            per_frame, _ = reference_forward(self, video)
        elif impl == "fast":
            from .fast import fast_forward

            per_frame = fast_forward(self, video)
        else:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        return per_frame

    @torch.no_grad()
    def explain(self, video: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Intermediate quantities of every frame, from the reference path (for tests and plots).

        Keys (each ``(B, T, ...)``): ``attention`` A, ``dynamics`` Dyn, ``score`` S, ``selected`` R
        (present when k > 0); ``variation`` v^ (when rho > 0); ``counts`` n; ``lengths`` 1 + N + n;
        ``frame_features`` f_t; and ``feature``, the video feature (B, embed_dim).
        """
        self._check_video(video)
        per_frame, details = reference_forward(self, video, record=True)
        details["frame_features"] = per_frame
        details["feature"] = video_feature(per_frame)
        return details

    def tokenize(self, texts: Sequence[str], max_tokens: Optional[int] = None) -> torch.Tensor:
        """Token ids (len(texts), context_length); captions are cut to ``max_tokens`` tokens (EOT kept)."""
        if isinstance(texts, str) or not all(isinstance(s, str) for s in texts):
            raise ValueError("texts must be a list of strings")
        context = self.clip.context_length if hasattr(self.clip, "context_length") else 77
        length = context if max_tokens is None else min(max_tokens, context)
        ids = self.tokenizer(list(texts), context_length=length)
        if length < context:
            ids = F.pad(ids, (0, context - length))  # the text tower's positional table is `context` long
        return ids

    def encode_text(self, texts: Sequence[str], max_tokens: Optional[int] = None) -> torch.Tensor:
        """Texts through the frozen text tower -> L2-normalised features (len(texts), embed_dim)."""
        device = next(self.clip.parameters()).device
        ids = self.tokenize(texts, max_tokens).to(device)
        return F.normalize(self.clip.encode_text(ids).float(), dim=-1)

    @property
    def logit_scale(self) -> torch.Tensor:
        """CLIP's frozen temperature, exponentiated (100 for OpenAI's weights)."""
        return self.clip.logit_scale.exp().detach()

    # ------------------------------------------------------------------ checks
    def _check_video(self, video: torch.Tensor, check_values: bool = True) -> None:
        if not isinstance(video, torch.Tensor):
            raise ValueError(f"video must be a torch.Tensor, got {type(video).__name__}")
        if video.dim() != 5:
            raise ValueError(f"video must have shape (B, T, 3, H, W), got rank {video.dim()} shape {tuple(video.shape)}")
        b, t, c, h, w = video.shape
        if c != 3:
            raise ValueError(f"video must have 3 channels in dim 2 (B, T, 3, H, W), got {c}")
        if t != self.config.num_frames:
            raise ValueError(f"video has T = {t} frames, but config.num_frames = {self.config.num_frames}")
        if (h, w) != (self.image_size, self.image_size):
            raise ValueError(f"video frames must be {self.image_size} x {self.image_size} for {self.config.model_name}, got {h} x {w}")
        if b == 0:
            raise ValueError("video must hold at least one clip (B >= 1)")
        if not video.is_floating_point():
            raise ValueError(f"video must be a float tensor (CLIP-normalised), got {video.dtype}")
        if check_values and not bool(torch.isfinite(video).all()):
            raise ValueError("video contains NaN or Inf values")
        device = next(self.clip.parameters()).device
        if video.device != device:
            raise ValueError(f"video is on {video.device} but the model is on {device}")


def _check_vision_tower(visual) -> None:
    """STOP rewires a standard CLIP ViT; refuse architectures whose forward it would not reproduce."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    if not isinstance(visual, VisionTransformer):
        raise ValueError(f"clip: STOP needs an open_clip VisionTransformer vision tower, got {type(visual).__name__}")
    if visual.attn_pool is not None or visual.pool_type != "tok" or visual.final_ln_after_pool:
        raise ValueError("clip: STOP needs CLS-token pooling (pool_type 'tok', no attentional pooler)")
    if visual.proj is None:
        raise ValueError("clip: STOP needs the vision tower's output projection")
    for block in visual.transformer.resblocks:
        if not isinstance(block, ResidualAttentionBlock) or hasattr(block, "ln_1_kv"):
            raise ValueError(f"clip: unsupported transformer block {type(block).__name__}")
