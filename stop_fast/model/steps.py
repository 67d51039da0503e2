"""SPEC.md steps that the reference and the fast path compute identically (small tensors, plain PyTorch).

The two paths differ only where the fast path fuses work into kernels: the attention map and patch
scoring (steps 3, 5-6), the overlay and packing (steps 7, 11) and the transformer over ragged
sequences (step 11). Everything here is shared so the two paths cannot drift apart.

Precision (SPEC.md, "Numerics"): the scoring chain (CLS logits and A, F, Dyn, S, g, W, v, v^, omega,
c_t) runs in ``chain_dtype`` (fp32, or fp64 for a float64 model) with autocast off, from the tokens the
backbone produced in its own precision; ``scoring_precision`` is the one switch both paths use.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def chain_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the scoring chain for tokens ``x``: fp32, or wider if ``x`` is wider (float64)."""
    return torch.promote_types(x.dtype, torch.float32)


def scoring_precision(x: torch.Tensor):
    """Autocast off (for ``x``'s device) around the scoring chain; callers upcast inputs to ``chain_dtype``."""
    if not torch.is_autocast_enabled(x.device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=x.device.type, enabled=False)


def layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` in ``x``'s dtype, whatever the dtype of the (frozen) affine weights."""
    return F.layer_norm(x, norm.normalized_shape, norm.weight.to(x.dtype), norm.bias.to(x.dtype), norm.eps)


def patch_tokens(visual: nn.Module, frames: torch.Tensor, as_matmul: bool = False) -> torch.Tensor:
    """Step 1: ``Z = [cls + pos_0 ; conv1(frame)_j + pos_j]``, the tokens open_clip builds before ln_pre.

    ``frames`` (F, 3, H, W) -> ``Z`` (F, 1 + N, D). ``as_matmul`` (the fast path) computes conv1 as
    what it is, one matrix product of the non-overlapping patches (see :func:`patch_embedding`).
    """
    if as_matmul:
        x = patch_embedding(visual.conv1, frames)  # (F, N, D)
    else:
        x = visual.conv1(frames).flatten(2).transpose(1, 2)  # (F, D, g, g) -> (F, N, D)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    return torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)


def patch_embedding(conv: nn.Conv2d, frames: torch.Tensor) -> torch.Tensor:
    """``conv(frames)`` as ``(F, N, D)`` for a patchifying convolution (kernel = stride, no padding),
    computed as ONE GEMM: (F N, 3 p^2) patches times the (3 p^2, D) weight.

    The same sums as the convolution (other rounding order). Why: cuDNN's heuristic picks a slow
    non-tensor-core algorithm for CLIP's 32x32 / stride-32 bf16 conv1 (3.3 ms of a 16 ms ViT-B/32
    step at B = 32, T = 12 on an H100), while the GEMM takes ~0.15 ms. Any other convolution runs as is.
    The module itself is not called, so hooks registered on it do not fire.
    """
    p = conv.kernel_size
    if conv.stride != p or conv.padding != (0, 0) or conv.dilation != (1, 1) or conv.groups != 1:
        return conv(frames).flatten(2).transpose(1, 2)
    if torch.is_autocast_enabled(frames.device.type):  # gather the patches in the GEMM's dtype
        frames = frames.to(torch.get_autocast_dtype(frames.device.type))
    f, c, height, width = frames.shape
    gh, gw = height // p[0], width // p[1]
    patches = frames[:, :, : gh * p[0], : gw * p[1]].reshape(f, c, gh, p[0], gw, p[1])
    patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(f, gh * gw, c * p[0] * p[1])  # (c, ky, kx) order, as the weight
    return F.linear(patches, conv.weight.reshape(conv.out_channels, -1), conv.bias)


def first_block_input(visual: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Step 3's ``u = ln_1(ln_pre(Z))`` in ``chain_dtype`` (autocast off): (F, 1 + N, D)."""
    block = visual.transformer.resblocks[0]
    with scoring_precision(z):
        x = z.to(chain_dtype(z))
        return layer_norm(block.ln_1, layer_norm(visual.ln_pre, x))


def difference_features(e: torch.Tensor) -> torch.Tensor:
    """Step 2: ``H_t = [E_t || E_t - E_{t-1}]`` with ``E_0 := E_1``. (B, T, N, D) -> (B, T, N, 2D).

    Built once, in ``chain_dtype`` (the difference of two bf16 tokens is taken in fp32), and shared by
    both Conv3d layers, Prompter_intra and the pooling of step 10.
    """
    b, t, n, d = e.shape
    h = e.new_empty(b, t, n, 2 * d, dtype=chain_dtype(e))
    h[..., :d] = e
    h[:, :1, :, d:] = 0
    if t > 1:  # in place: no temporary of H's size
        h[:, 1:, :, d:] = h[:, 1:, :, :d]
        h[:, 1:, :, d:] -= h[:, :-1, :, :d]
    return h


def selection_gate(score: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """Step 7's gate on the selected patches: ``g_i = K * S[R_i] / sum_{r in R} S[r]``, (..., N), (..., K) -> (..., K)."""
    s_top = score.gather(-1, top)
    return top.shape[-1] * s_top / s_top.sum(dim=-1, keepdim=True)


def frame_variation(w: torch.Tensor, top: Optional[torch.Tensor], beta: float) -> torch.Tensor:
    """Step 8: ``v_t = mean_j |W_t[j]| * (1 + beta * M_t[j])``, M = 1 on the selection ``top`` (None: M = 0).

    ``w`` (..., N), ``top`` (..., K) -> v (...).
    """
    weight = w.abs()
    if top is not None:
        in_top = torch.zeros_like(weight).scatter(-1, top, 1.0)
        weight = weight * (1 + beta * in_top)
    return weight.mean(dim=-1)


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
    Part of the scoring chain: ``chain_dtype``, autocast off.
    """
    dtype = torch.promote_types(chain_dtype(w), h.dtype)
    with scoring_precision(h):
        omega = torch.softmax(w.to(dtype), dim=-1)
        return torch.einsum("btn,btnc->btc", omega, h.to(dtype))


def padded_sequences(z: torch.Tensor, e_tilde: torch.Tensor, inter: Optional[torch.Tensor],
                     counts: torch.Tensor) -> torch.Tensor:
    """Step 11's sequences ``[Z_t[0] ; E~_t ; G_t[:n_t]]``, each padded with zero rows to 1 + N + rho.

    ``z`` (F, 1+N, D) tokens, ``e_tilde`` (F, N, D) overlaid patches, ``inter`` (F, rho, D) candidate
    temporal tokens or None, ``counts`` (F,) n_t -> (F, 1 + N + rho, D) in z's dtype.
    """
    frames, length, width = z.shape
    rho = 0 if inter is None else inter.shape[1]
    seq = z.new_zeros(frames, length + rho, width)
    seq[:, 0] = z[:, 0]
    seq[:, 1:length] = e_tilde
    if inter is not None:
        slot = torch.arange(rho, device=z.device)
        keep = (slot[None, :] < counts[:, None])[..., None]  # (F, rho, 1)
        seq[:, length:] = torch.where(keep, inter.to(seq.dtype), 0.0)
    return seq


def frame_features(visual: nn.Module, cls_tokens: torch.Tensor) -> torch.Tensor:
    """Step 12 per frame: ``f_t = proj(ln_post(CLS_t))``. (..., D) -> (..., embed_dim)."""
    x = visual.ln_post(cls_tokens)
    return x @ visual.proj.to(x.dtype)


def video_feature(per_frame: torch.Tensor) -> torch.Tensor:
    """Step 12: mean over frames, then L2 normalisation. (B, T, E) -> (B, E), in at least fp32."""
    return F.normalize(per_frame.to(chain_dtype(per_frame)).mean(dim=1), dim=-1)
