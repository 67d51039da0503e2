"""The reference path: SPEC.md steps 1-12 in plain PyTorch, readable beside SPEC.md.

This is the ground truth for every test of the fast path. Frames of different lengths are padded to
the longest one and padded keys are masked, so attention never crosses frames (each frame is its own
row of the batch) and never sees padding.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

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
def attention_map(visual, z: torch.Tensor) -> torch.Tensor:
    """Step 3 (paper Eq. 2): the CLS row of the frozen first block's attention, averaged over heads.

    ``u = ln_1(ln_pre(Z))``; ``A[j] = mean_h softmax_{j'}(q_cls,h . k_j',h / sqrt(d))[j]`` over all
    N + 1 keys, keeping the N patch entries. (F, 1 + N, D) -> (F, N), at least fp32. No gradient.
    """
    block = visual.transformer.resblocks[0]
    heads = block.attn.num_heads
    dtype = torch.promote_types(z.dtype, torch.float32)
    u = block.ln_1(visual.ln_pre(z)).to(dtype)  # (F, 1+N, D)
    width = u.shape[-1]
    w_q, w_k, _ = block.attn.in_proj_weight.to(dtype).chunk(3)
    b_q, b_k, _ = block.attn.in_proj_bias.to(dtype).chunk(3)
    q = (u[:, 0] @ w_q.T + b_q).view(-1, heads, width // heads)  # (F, h, d)
    k = (u @ w_k.T + b_k).view(u.shape[0], u.shape[1], heads, width // heads)  # (F, 1+N, h, d)
    logits = torch.einsum("fhd,fjhd->fhj", q, k) / (width // heads) ** 0.5
    return logits.softmax(dim=-1).mean(dim=1)[:, 1:]


def top_k_stable(score: torch.Tensor, k: int) -> torch.Tensor:
    """Step 6: indices of the k largest scores, largest first, exact ties to the lower index."""
    return torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :k]


def run_transformer_padded(visual, sequences: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Step 11 on padded sequences: ``ln_pre``, every frozen block with padded keys masked.

    ``sequences`` (F, L, D) with frame f valid on its first ``lengths[f]`` rows -> CLS tokens (F, D).
    """
    f, length, _ = sequences.shape
    heads = visual.transformer.resblocks[0].attn.num_heads
    padded_key = torch.arange(length, device=sequences.device)[None, :] >= lengths[:, None]  # (F, L)
    mask = torch.zeros(f, length, dtype=torch.float32, device=sequences.device)
    mask = mask.masked_fill(padded_key, float("-inf"))
    mask = mask[:, None, None, :].expand(f, heads, length, length).reshape(f * heads, length, length)
    x = visual.ln_pre(sequences)
    for block in visual.transformer.resblocks:
        x = block(x, attn_mask=mask)
    return x[:, 0]


def reference_forward(
    model: "STOP", video: torch.Tensor, record: bool = False
) -> Tuple[torch.Tensor, Optional[Dict[str, torch.Tensor]]]:
    """SPEC.md steps 1-12 for a batch: ``video`` (B, T, 3, H, W) -> per-frame features (B, T, E).

    With ``record`` also returns the intermediate quantities of every frame (see ``STOP.explain``).
    """
    cfg = model.config
    visual = model.visual
    b, t = video.shape[:2]
    n = model.num_patches

    # 1-2. patch embeddings and difference features
    z = patch_tokens(visual, video.flatten(0, 1))  # (B*T, 1+N, D)
    e = z[:, 1:].unflatten(0, (b, t))  # (B, T, N, D)
    h = difference_features(e)  # (B, T, N, 2D)

    # 3-7. discriminative patches and intra-frame prompts
    e_tilde = e
    in_top_k = torch.zeros(b, t, n, device=video.device)  # M
    details: Dict[str, torch.Tensor] = {}
    if cfg.intra_enabled:
        a = attention_map(visual, z).unflatten(0, (b, t))  # (B, T, N), no grad
        dyn = torch.softmax(model.conv_intra(h), dim=-1)  # Eq. 3-4
        score = (1 - cfg.alpha) * a + cfg.alpha * dyn  # Eq. 5
        top = top_k_stable(score.detach(), cfg.k)  # R, (B, T, K)
        in_top_k = in_top_k.scatter(-1, top, 1.0)
        s_top = score.gather(-1, top)
        gate = cfg.k * s_top / s_top.sum(dim=-1, keepdim=True)  # g on R
        gate_full = torch.zeros_like(score).scatter(-1, top, gate)  # g * M
        prompts = model.prompter_intra(h)  # P, (B, T, N, D)
        e_tilde = e + (gate_full[..., None] * prompts).to(e.dtype)  # Eq. 7
        details.update(attention=a, dynamics=dyn, score=score, selected=top)

    # 8-10. frame variation, token counts and inter-frame prompts
    counts = torch.zeros(b, t, dtype=torch.int32, device=video.device)
    if cfg.inter_enabled:
        w = model.conv_inter(h)  # (B, T, N)
        v = (w.abs() * (1 + cfg.beta * in_top_k)).mean(dim=-1)  # (B, T)
        v_hat = normalised_variation(v, cfg.variation_eps)
        counts = token_counts(v_hat, cfg.rho)  # n_t
        temporal = model.prompter_inter(pooled_changes(w, h), v_hat)  # (B, T, rho, D)
        details.update(variation=v_hat)
    details.update(counts=counts)

    # 11. ragged sequences [Z_t[0] ; E~_t ; G_t[:n_t]], padded to the longest
    lengths = 1 + n + counts.flatten()  # (B*T,)
    longest = 1 + n + (cfg.rho if cfg.inter_enabled else 0)
    seq = z.new_zeros(b * t, longest, z.shape[-1])
    seq[:, 0] = z[:, 0]
    seq[:, 1 : 1 + n] = e_tilde.flatten(0, 1)
    if cfg.inter_enabled:
        slot = torch.arange(cfg.rho, device=video.device)
        keep = (slot[None, :] < counts.flatten()[:, None])[..., None]  # (B*T, rho, 1)
        seq[:, 1 + n :] = torch.where(keep, temporal.flatten(0, 1).to(seq.dtype), 0.0)
    cls = run_transformer_padded(visual, seq, lengths)

    # 12. per-frame features (the caller averages and normalises)
    per_frame = frame_features(visual, cls).unflatten(0, (b, t))
    if record:
        details["lengths"] = lengths.unflatten(0, (b, t))
        return per_frame, details
    return per_frame, None
