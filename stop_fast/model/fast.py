"""The fast path: SPEC.md steps 1-12 on packed ragged sequences, through ``stop_fast.kernels``.

Differences from the reference path, all of them exact rewrites:
- step 3 uses the cheap form: the CLS query is folded into the key projection once per call
  (``folded_cls_keys``), and the scoring kernel computes A, Dyn, S, R, g and the frame-variation term
  per frame without writing any N-sized intermediate to memory;
- Prompter_intra runs only on the K selected patches (the overlay is zero elsewhere);
- the overlay, the CLS token and the inter-frame tokens are written straight into one packed
  ``(total_tokens, D)`` buffer with ``cu_seqlens``; no padding, no mask;
- the frozen blocks run as matmuls over all tokens of the batch, attention through varlen attention.

Host synchronisation: exactly one per call, in ``cu_seqlens_from_counts`` (the packed buffer's size
depends on the token counts n_t, which live on the device).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Tuple

import torch
import torch.nn.functional as F

from .. import kernels
from .steps import (
    difference_features,
    frame_features,
    normalised_variation,
    patch_tokens,
    pooled_changes,
    token_counts,
)

if TYPE_CHECKING:  # pragma: no cover
    from .stop import STOP


@torch.no_grad()
def folded_cls_keys(visual) -> Tuple[torch.Tensor, torch.Tensor]:
    """Step 3's cheap form: ``q_cls,h . k_j,h / sqrt(d) = u_j . keys[h] + bias[h]``.

    The CLS token entering block 1 is ``cls + pos_0`` for every frame, so its query is a constant of
    the frozen model: ``keys[h] = W_k,h^T q_cls,h / sqrt(d)`` (Hh, D), ``bias[h] = q_cls,h . b_k,h / sqrt(d)``.
    """
    block = visual.transformer.resblocks[0]
    heads = block.attn.num_heads
    dtype = torch.promote_types(visual.class_embedding.dtype, torch.float32)
    with torch.autocast(device_type=visual.class_embedding.device.type, enabled=False):
        cls = (visual.class_embedding + visual.positional_embedding[0]).to(dtype)
        u_cls = _ln(block.ln_1, _ln(visual.ln_pre, cls))
        w_q, w_k, _ = block.attn.in_proj_weight.to(dtype).chunk(3)
        b_q, b_k, _ = block.attn.in_proj_bias.to(dtype).chunk(3)
        width = w_q.shape[0]
        head_dim = width // heads
        q = (w_q @ u_cls + b_q).view(heads, head_dim) / head_dim**0.5  # (Hh, d)
        keys = torch.einsum("hd,hdc->hc", q, w_k.view(heads, head_dim, width))  # (Hh, D)
        bias = (q * b_k.view(heads, head_dim)).sum(-1)  # (Hh,)
    return keys.contiguous(), bias.contiguous()


def _ln(norm: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight.to(x.dtype), norm.bias.to(x.dtype), norm.eps)


def packed_block(block, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
    """One frozen open_clip ResidualAttentionBlock on packed tokens (total_tokens, D)."""
    heads = block.attn.num_heads
    total, width = x.shape
    qkv = F.linear(block.ln_1(x), block.attn.in_proj_weight, block.attn.in_proj_bias)
    q, k, v = qkv.view(total, 3, heads, width // heads).unbind(1)
    o = kernels.varlen_attention(q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens, max_seqlen,
                                 check_inputs=False)
    x = x + block.ls_1(block.attn.out_proj(o.reshape(total, width)))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def fast_forward(model: "STOP", video: torch.Tensor) -> torch.Tensor:
    """``video`` (B, T, 3, H, W) -> per-frame features (B, T, E), the same function as the reference."""
    cfg = model.config
    visual = model.visual
    b, t = video.shape[:2]
    n = model.num_patches
    frames = b * t

    z = patch_tokens(visual, video.flatten(0, 1))  # (F, 1+N, D)
    h = difference_features(z[:, 1:].unflatten(0, (b, t)))  # (B, T, N, 2D)
    w = model.conv_inter(h) if cfg.inter_enabled else None  # (B, T, N)

    topk_idx = gate = intra = None
    variation = None
    if cfg.intra_enabled:
        block = visual.transformer.resblocks[0]
        u = block.ln_1(visual.ln_pre(z))  # (F, 1+N, D), frozen: no gradient
        keys, bias = folded_cls_keys(visual)
        scores = kernels.patch_scores(
            u, keys, bias, model.conv_intra(h).flatten(0, 1), None if w is None else w.flatten(0, 1),
            cfg.k, cfg.alpha, cfg.beta, check_inputs=False,
        )
        topk_idx, gate, variation = scores.topk_idx, scores.gate, scores.variation
        h_top = h.flatten(0, 1).gather(1, topk_idx[..., None].expand(-1, -1, h.shape[-1]))  # (F, K, 2D)
        intra = model.prompter_intra(h_top)  # P on the selected patches only, (F, K, D)

    counts = torch.zeros(frames, dtype=torch.int32, device=video.device)
    inter = None
    if cfg.inter_enabled:
        if variation is None:  # k = 0: no top-K set, M = 0
            variation = w.abs().mean(dim=-1).flatten()
        v_hat = normalised_variation(variation.view(b, t), cfg.variation_eps)
        counts = token_counts(v_hat, cfg.rho).flatten()
        inter = model.prompter_inter(pooled_changes(w, h), v_hat).flatten(0, 1)  # (F, rho, D)

    cu_seqlens, total, max_seqlen = kernels.cu_seqlens_from_counts(counts, 1 + n)  # the one host sync
    x = kernels.pack_sequences(z, counts, cu_seqlens, total, topk_idx, gate, intra, inter, check_inputs=False)
    x = visual.ln_pre(x)
    for block in visual.transformer.resblocks:
        x = packed_block(block, x, cu_seqlens, max_seqlen)
    cls = x[cu_seqlens[:-1].long()]  # (F, D)
    return frame_features(visual, cls).unflatten(0, (b, t))
