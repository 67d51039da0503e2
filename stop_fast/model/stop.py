"""STOP: a frozen CLIP with spatial-temporal dynamic prompts, and its public methods."""
from __future__ import annotations

import os
from typing import Dict, Iterable, List, Optional, Tuple, Union

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from ..config import IMPLS, LOGIT_SCALE, STOPConfig
from .prompters import DynamicsConv, InterPrompter, IntraPrompter
from .reference import reference_forward
from .steps import video_feature

BACKBONE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class STOP(nn.Module):
    """STOP (CVPR 2025) over a frozen open_clip model.

    Holds the frozen backbone (``clip``) and the four trainable parts that SPEC.md defines:
    ``conv_intra`` and ``prompter_intra`` (absent when ``k == 0``), ``conv_inter`` and
    ``prompter_inter`` (absent when ``rho == 0``).

    Precision: the backbone computes in its own dtype (``backbone_dtype``: fp32 unless
    :meth:`cast_backbone` changed it) or under the caller's autocast; the scoring chain always runs
    in fp32 with autocast off (SPEC.md, "Numerics"); the trainable parts keep their own dtype (fp32).
    """

    def __init__(self, config: STOPConfig, clip: nn.Module):
        super().__init__()
        visual = getattr(clip, "visual", None)
        _check_vision_tower(visual)
        _check_architecture(config.model_name, visual)
        grid_h, grid_w = visual.grid_size
        if grid_h != grid_w:
            raise ValueError(f"clip: STOP needs a square patch grid, got {grid_h} x {grid_w}")
        width = visual.conv1.out_channels  # D
        config.validate(num_patches=grid_h * grid_w, width=width)
        self.config = config
        self.clip = clip
        for p in clip.parameters():
            p.requires_grad_(False)
        clip.eval()
        self.grid = grid_h
        self.num_patches = grid_h * grid_w  # N
        self.width = width
        self.image_size = visual.image_size[0]
        self.tokenizer = open_clip.get_tokenizer(config.model_name)
        self.grad_checkpointing = False
        self.register_buffer("_logit_scale", torch.tensor(LOGIT_SCALE), persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _keys: module._drop_caches())

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

    @property
    def backbone_dtype(self) -> torch.dtype:
        """The dtype the frozen backbone's weights are held in (the video is cast to it)."""
        return self.visual.conv1.weight.dtype

    def train(self, mode: bool = True) -> "STOP":
        super().train(mode)
        self.clip.eval()  # the backbone is frozen: never patch dropout or other training behaviour
        return self

    def _apply(self, fn, *args, **kwargs):
        self._drop_caches()  # .to(), .cuda(), .double(), ... change what cached tensors derive from
        return super()._apply(fn, *args, **kwargs)

    def _drop_caches(self) -> None:
        from .fast import forget_cls_keys

        forget_cls_keys(self.visual)

    def cast_backbone(self, dtype: torch.dtype) -> "STOP":
        """Keep the frozen backbone resident in ``dtype`` (e.g. ``torch.bfloat16`` for bf16 training).

        Cast once here, so autocast stops casting the frozen weights on every call (autocast caches
        casts only of weights that require grad). The trainable parts keep their dtype (fp32) and the
        scoring chain still computes in fp32, from the weights as now rounded. Under
        ``torch.autocast(dtype=torch.bfloat16)`` a bf16-resident backbone computes what the fp32 one
        does, except that the weights autocast would have left in fp32 (LayerNorm affine, the first
        block's query/key projection the scoring chain reads) are bf16-rounded too; without autocast
        the backbone computes in ``dtype``. Both paths work after it; ``.to()`` moves it as usual.
        """
        if dtype not in BACKBONE_DTYPES:
            raise ValueError(f"dtype must be one of {[str(d) for d in BACKBONE_DTYPES]}, got {dtype!r}")
        self._drop_caches()
        self.clip.to(dtype)
        return self

    def set_grad_checkpointing(self, enabled: bool = True) -> "STOP":
        """Activation checkpointing of the frozen transformer blocks in both paths (same results).

        Each block's activations are recomputed in the backward instead of stored: for long clips
        (T = 64) memory drops from all blocks' activations to one block's, for about one extra
        forward pass of compute.
        """
        if not isinstance(enabled, bool):
            raise ValueError(f"enabled must be a bool, got {enabled!r}")
        self.grad_checkpointing = enabled
        return self

    def trainable_modules(self) -> Dict[str, nn.Module]:
        names = ("conv_intra", "prompter_intra", "conv_inter", "prompter_inter")
        return {name: getattr(self, name) for name in names if hasattr(self, name)}

    def trainable_parameters(self) -> List[nn.Parameter]:
        """The trainable parameters, as a list (safe to iterate more than once)."""
        return [p for module in self.trainable_modules().values() for p in module.parameters()]

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
    def encode_video(self, video: torch.Tensor, impl: str = "reference", check_inputs: bool = True,
                     selection: Optional[torch.Tensor] = None, counts: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``video`` (B, T, 3, H, W) float, CLIP-normalised, any T >= 1 -> L2-normalised features (B, embed_dim), fp32.

        ``impl``: ``"reference"`` (plain PyTorch, padded frames) or ``"fast"`` (packed tokens through
        ``stop_fast.kernels``; Triton on CUDA or under ``TRITON_INTERPRET=1``, PyTorch elsewhere).
        The video is cast to ``backbone_dtype`` (under autocast the backbone then casts as usual).
        ``check_inputs=False`` skips the value checks (the NaN/Inf scan of the video, the ranges of
        ``selection`` and ``counts``), the checks that cost a host synchronisation; shapes, dtypes
        and devices are always checked.
        ``selection`` (B, T, K) integer patch indices (distinct per frame, 0..N-1) and ``counts``
        (B, T) integers in 0..rho, when given, replace the discrete choices R and n of SPEC.md steps
        6 and 9 (the gate, M and v^ are computed from the given R); e.g. to compare the two paths
        exactly where rounding could flip a near-tie (``explain`` returns both).
        """
        return video_feature(self.encode_frames(video, impl, check_inputs, selection, counts))

    def encode_frames(self, video: torch.Tensor, impl: str = "reference", check_inputs: bool = True,
                      selection: Optional[torch.Tensor] = None, counts: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-frame features ``f_t`` (B, T, embed_dim) before the mean over frames (SPEC step 12).

        Same arguments as :meth:`encode_video`; in the backbone's (or autocast's) dtype.
        """
        video, selection, counts = self.prepare_inputs(video, impl, selection, counts, check_inputs)
        return self.forward_frames(video, impl, selection, counts)

    @torch.no_grad()
    def explain(self, video: torch.Tensor, impl: str = "reference", selection: Optional[torch.Tensor] = None,
                counts: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Intermediate quantities of every frame, from the path ``impl`` itself (for tests and plots).

        Keys (each ``(B, T, ...)``): ``attention`` A, ``dynamics`` Dyn, ``score`` S, ``selected`` R
        (present when k > 0); ``variation`` v^ (when rho > 0); ``counts`` n; ``lengths`` 1 + N + n;
        ``frame_features`` f_t; and ``feature``, the video feature (B, embed_dim). ``selection`` and
        ``counts`` override R and n as in :meth:`encode_video`.
        """
        video, selection, counts = self.prepare_inputs(video, impl, selection, counts, True)
        per_frame, details = self.forward_frames(video, impl, selection, counts, record=True)
        details["frame_features"] = per_frame
        details["feature"] = video_feature(per_frame)
        return details

    def forward_frames(self, video, impl, selection=None, counts=None, record=False, static_shapes=False):
        """Per-frame features by the path ``impl`` of inputs that :meth:`prepare_inputs` returned
        (``record``: also the intermediate quantities, as ``explain`` returns them; ``static_shapes``:
        fast path only, every frame padded to 1 + N + rho tokens; the reference path pads anyway)."""
        if impl == "fast":
            from .fast import fast_forward

            return fast_forward(self, video, selection=selection, counts=counts, record=record,
                                static_shapes=static_shapes)
        return reference_forward(self, video, selection=selection, counts=counts, record=record)

    def tokenize(self, texts: Iterable[str], max_tokens: Optional[int] = None) -> torch.Tensor:
        """Token ids (len(texts), context_length); captions are cut to ``max_tokens`` tokens (EOT kept).

        ``texts``: a list (or any iterable, e.g. a generator) of strings.
        """
        texts = _string_list(texts)
        context = self.clip.context_length if hasattr(self.clip, "context_length") else 77
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 2):
            raise ValueError(f"max_tokens must be an int >= 2 (the start and end tokens) or None, got {max_tokens!r}")
        length = context if max_tokens is None else min(max_tokens, context)
        ids = self.tokenizer(texts, context_length=length)
        if length < context:
            ids = F.pad(ids, (0, context - length))  # the text tower's positional table is `context` long
        return ids

    def encode_text(self, texts: Iterable[str], max_tokens: Optional[int] = None) -> torch.Tensor:
        """Texts through the frozen text tower -> L2-normalised features (len(texts), embed_dim), fp32."""
        device = next(self.clip.parameters()).device
        ids = self.tokenize(texts, max_tokens).to(device)
        return F.normalize(self.clip.encode_text(ids).float(), dim=-1)

    @property
    def logit_scale(self) -> torch.Tensor:
        """The frozen temperature: exactly 100 (SPEC.md), whatever the backbone file holds.

        A 0-dim fp32 tensor on the model's device (``float(model.logit_scale) == 100.0``).
        """
        return self._logit_scale

    # ------------------------------------------------------------------ checks
    def prepare_inputs(self, video, impl, selection=None, counts=None, check_values: bool = True
                       ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Check the inputs of a public entry (``check_values=False``: shapes, dtypes and devices only,
        no host sync); returns the video in ``backbone_dtype`` and the overrides as int64 / int32."""
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        self._check_video(video, check_values=check_values)
        b, t = video.shape[:2]
        if selection is not None:
            selection = self._check_selection(selection, b, t, video.device, check_values)
        if counts is not None:
            counts = self._check_counts(counts, b, t, video.device, check_values)
        return video.to(self.backbone_dtype), selection, counts

    def _check_video(self, video: torch.Tensor, check_values: bool = True) -> None:
        if not isinstance(video, torch.Tensor):
            raise ValueError(f"video must be a torch.Tensor, got {type(video).__name__}")
        if video.dim() != 5:
            raise ValueError(f"video must have shape (B, T, 3, H, W), got rank {video.dim()} shape {tuple(video.shape)}")
        b, t, c, h, w = video.shape
        if c != 3:
            raise ValueError(f"video must have 3 channels in dim 2 (B, T, 3, H, W), got {c}")
        if t == 0:
            raise ValueError("video must hold at least one frame (T >= 1)")
        if (h, w) != (self.image_size, self.image_size):
            raise ValueError(f"video frames must be {self.image_size} x {self.image_size} for {self.config.model_name}, got {h} x {w}")
        if b == 0:
            raise ValueError("video must hold at least one clip (B >= 1)")
        if not video.is_floating_point():
            raise ValueError(f"video must be a float tensor (CLIP-normalised), got {video.dtype}")
        device = next(self.clip.parameters()).device
        if video.device != device:
            raise ValueError(f"video is on {video.device} but the model is on {device}")
        if check_values and not bool(torch.isfinite(video).all()):
            raise ValueError("video contains NaN or Inf values")

    def _check_selection(self, selection, b: int, t: int, device, check_values: bool) -> torch.Tensor:
        k, n = self.config.k, self.num_patches
        if k == 0:
            raise ValueError("selection: this model has k = 0 (no intra-frame prompts), so it selects no patches")
        if not isinstance(selection, torch.Tensor) or selection.dtype.is_floating_point or selection.dtype.is_complex \
                or selection.dtype == torch.bool:
            raise ValueError(f"selection must be an integer tensor (B, T, K), got {getattr(selection, 'dtype', type(selection))}")
        if tuple(selection.shape) != (b, t, k):
            raise ValueError(f"selection must have shape (B, T, K) = {(b, t, k)}, got {tuple(selection.shape)}")
        if selection.device != device:
            raise ValueError(f"selection is on {selection.device} but the model is on {device}")
        selection = selection.to(torch.int64).contiguous()
        if check_values:
            if bool(((selection < 0) | (selection >= n)).any()):
                raise ValueError(f"selection must hold patch indices in 0..N-1 = 0..{n - 1}")
            if k > 1 and bool((selection.sort(dim=-1).values.diff(dim=-1) == 0).any()):
                raise ValueError("selection must name K distinct patches in every frame")
        return selection

    def _check_counts(self, counts, b: int, t: int, device, check_values: bool) -> torch.Tensor:
        rho = self.config.rho
        if not isinstance(counts, torch.Tensor) or counts.dtype.is_floating_point or counts.dtype.is_complex \
                or counts.dtype == torch.bool:
            raise ValueError(f"counts must be an integer tensor (B, T), got {getattr(counts, 'dtype', type(counts))}")
        if tuple(counts.shape) != (b, t):
            raise ValueError(f"counts must have shape (B, T) = {(b, t)}, got {tuple(counts.shape)}")
        if counts.device != device:
            raise ValueError(f"counts is on {counts.device} but the model is on {device}")
        if check_values and bool(((counts < 0) | (counts > rho)).any()):
            raise ValueError(f"counts must lie in 0..rho = 0..{rho}")
        return counts.to(torch.int32).contiguous()


def _string_list(texts) -> List[str]:
    if isinstance(texts, str):
        raise ValueError("texts must be a list of strings, not one string (wrap it: [text])")
    try:
        texts = list(texts)
    except TypeError:
        raise ValueError(f"texts must be a list of strings, got {type(texts).__name__}") from None
    bad = next((s for s in texts if not isinstance(s, str)), None)
    if bad is not None:
        raise ValueError(f"texts must be a list of strings, got an item of type {type(bad).__name__}")
    return texts


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


def _check_architecture(model_name: str, visual) -> None:
    """The vision tower must be the one ``model_name`` names in open_clip (width, layers, heads, patch
    and image size), so that a config, its prompt files and its backbone cannot silently disagree."""
    config = open_clip.get_model_config(model_name)
    if config is None or "vision_cfg" not in config:
        raise ValueError(f"model_name {model_name!r} is not an open_clip model (open_clip.list_models() lists them)")
    cfg = config["vision_cfg"]
    width = cfg.get("width", 768)
    expected = {
        "width": width,
        "layers": cfg.get("layers", 12),
        "heads": width // cfg.get("head_width", 64),
        "patch size": _pair(cfg.get("patch_size", 16)),
        "image size": _pair(cfg.get("image_size", 224)),
    }
    blocks = visual.transformer.resblocks
    actual = {
        "width": visual.conv1.out_channels,
        "layers": len(blocks),
        "heads": blocks[0].attn.num_heads,
        "patch size": _pair(visual.conv1.kernel_size),
        "image size": _pair(visual.image_size),
    }
    differ = [f"{key} {actual[key]} (expected {expected[key]})" for key in expected if actual[key] != expected[key]]
    if differ:
        raise ValueError(f"clip is not the {model_name} architecture that config.model_name names: " + ", ".join(differ))


def _pair(value) -> Tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)
