"""SPEC.md steps that the reference and the fast path compute identically (small tensors, plain PyTorch).

The two paths differ only where the fast path fuses work into kernels: the attention map and patch
scoring (steps 3, 5-6), the overlay and packing (steps 7, 11) and the transformer over ragged
sequences (step 11). Everything here is shared so the two paths cannot drift apart.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def patch_tokens(visual: nn.Module, frames: torch.Tensor) -> torch.Tensor:
    """Step 1: ``Z = [cls + pos_0 ; conv1(frame)_j + pos_j]``, the tokens open_clip builds before ln_pre.

    ``frames`` (F, 3, H, W) -> ``Z`` (F, 1 + N, D).
    """
    x = visual.conv1(frames)  # (F, D, g, g)
    x = x.flatten(2).transpose(1, 2)  # (F, N, D)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    return torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)


def difference_features(e: torch.Tensor) -> torch.Tensor:
    """Step 2: ``H_t = [E_t || E_t - E_{t-1}]`` with ``E_0 := E_1``. (B, T, N, D) -> (B, T, N, 2D)."""
    previous = torch.cat([e[:, :1], e[:, :-1]], dim=1)
    return torch.cat([e, e - previous], dim=-1)


def normalised_variation(v: torch.Tensor, eps: float) -> torch.Tensor:
    """Step 8's per-video min-max over t = 2..T: (B, T) -> v^ (B, T) in [0, 1], with v^_1 := 0.

    ``v[:, 0]`` is ignored. With T <= 2 there is nothing to compare, so v^ is all zero.
    """
    tail = v[:, 1:]
    if tail.shape[1] == 0:
        return torch.zeros_like(v)
    low = tail.min(dim=1, keepdim=True).values
    high = tail.max(dim=1, keepdim=True).values
    tail_hat = (tail - low) / (high - low + eps)
    return torch.cat([torch.zeros_like(v[:, :1]), tail_hat], dim=1)


@torch.no_grad()
def token_counts(v_hat: torch.Tensor, rho: int) -> torch.Tensor:
    """Step 9: ``n_t = ceil(rho * v^_t)`` in 0..rho (int32, no gradient); ``n_1 = 0`` since ``v^_1 = 0``."""
    return torch.ceil(rho * v_hat).clamp_(0, rho).to(torch.int32)


def pooled_changes(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Step 10's ``c_t = sum_j softmax_j(W_t)[j] * H_t[j]``: (B, T, N), (B, T, N, 2D) -> (B, T, 2D).

    ``H_t = [E_t || E_t - E_{t-1}]``, so this is exactly SPEC's ``[sum omega E || sum omega (E - E_prev)]``.
    Computed in at least fp32, like the rest of the scoring chain.
    """
    dtype = torch.promote_types(w.dtype, torch.float32)
    omega = torch.softmax(w.to(dtype), dim=-1)
    return torch.einsum("btn,btnc->btc", omega, h.to(dtype))


def frame_features(visual: nn.Module, cls_tokens: torch.Tensor) -> torch.Tensor:
    """Step 12 per frame: ``f_t = proj(ln_post(CLS_t))``. (..., D) -> (..., embed_dim)."""
    x = visual.ln_post(cls_tokens)
    return x @ visual.proj.to(x.dtype)


def video_feature(per_frame: torch.Tensor) -> torch.Tensor:
    """Step 12: mean over frames, then L2 normalisation. (B, T, E) -> (B, E), in at least fp32."""
    return F.normalize(per_frame.to(torch.promote_types(per_frame.dtype, torch.float32)).mean(dim=1), dim=-1)
