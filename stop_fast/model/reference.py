"""The reference path: SPEC.md steps 1-12 in plain PyTorch, readable beside SPEC.md.

This is the ground truth for every test of the fast path. Frames of different lengths are padded to
the longest one and padded keys are masked, so attention never crosses frames (each frame is its own
row of the batch) and never sees padding.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Optional

import torch
from torch.utils.checkpoint import checkpoint

from .steps import (
    difference_features,
    first_block_input,
    frame_features,
    frame_variation,
    normalised_variation,
    padded_sequences,
    patch_tokens,
    pooled_changes,
    scoring_precision,
    selection_gate,
    token_counts,
)

if TYPE_CHECKING:  # pragma: no cover
    from .stop import STOP


@torch.no_grad()
def attention_map(visual, z: torch.Tensor) -> torch.Tensor:
    """Step 3 (paper Eq. 2): the CLS row of the frozen first block's attention, averaged over heads.

    ``u = ln_1(ln_pre(Z))``; ``A[j] = mean_h softmax_{j'}(q_cls,h . k_j',h / sqrt(d))[j]`` over all
    N + 1 keys, keeping the N patch entries. (F, 1 + N, D) -> (F, N), in ``chain_dtype`` with autocast
    off (part of the scoring chain). No gradient.
    """
    block = visual.transformer.resblocks[0]
    heads = block.attn.num_heads
    u = first_block_input(visual, z)  # (F, 1+N, D)
    dtype = u.dtype
    width = u.shape[-1]
    with scoring_precision(z):
        w_q, w_k, _ = block.attn.in_proj_weight.to(dtype).chunk(3)
        b_q, b_k, _ = block.attn.in_proj_bias.to(dtype).chunk(3)
        q = (u[:, 0] @ w_q.T + b_q).view(-1, heads, width // heads)  # (F, h, d)
        k = (u @ w_k.T + b_k).view(u.shape[0], u.shape[1], heads, width // heads)  # (F, 1+N, h, d)
        logits = torch.einsum("fhd,fjhd->fhj", q, k) / (width // heads) ** 0.5
        return logits.softmax(dim=-1).mean(dim=1)[:, 1:]


def top_k_stable(score: torch.Tensor, k: int) -> torch.Tensor:
    """Step 6: indices of the k largest scores, largest first, exact ties to the lower index."""
    return torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :k]


def run_transformer_padded(visual, sequences: torch.Tensor, lengths: torch.Tensor,
                           grad_checkpointing: bool = False) -> torch.Tensor:
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
        if grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(block, x, None, None, mask, use_reentrant=False)
        else:
            x = block(x, attn_mask=mask)
    return x[:, 0]


def reference_forward(
    model: "STOP",
    video: torch.Tensor,
    *,
    selection: Optional[torch.Tensor] = None,
    counts: Optional[torch.Tensor] = None,
    record: bool = False,
):
    """SPEC.md steps 1-12 for a batch: ``video`` (B, T, 3, H, W) -> per-frame features (B, T, E).

    ``selection`` (B, T, K) int64 and ``counts`` (B, T) int, when given, replace R and n (validated by
    ``STOP``). With ``record`` returns ``(per_frame, details)``, the intermediate quantities of every
    frame (see ``STOP.explain``).
    """
    cfg = model.config
    visual = model.visual
    b, t = video.shape[:2]
    n = model.num_patches

    # 1-2. patch embeddings and difference features
    z = patch_tokens(visual, video.flatten(0, 1))  # (B*T, 1+N, D)
    e = z[:, 1:].unflatten(0, (b, t))  # (B, T, N, D)
    h = difference_features(e)  # (B, T, N, 2D), chain dtype

    # 3-6, 8. the scoring chain: autocast off, chain dtype
    top = None
    details: Dict[str, torch.Tensor] = {}
    with scoring_precision(z):
        if cfg.intra_enabled:
            a = attention_map(visual, z).unflatten(0, (b, t))  # (B, T, N), no grad
            dyn = torch.softmax(model.conv_intra(h), dim=-1)  # Eq. 3-4
            score = (1 - cfg.alpha) * a + cfg.alpha * dyn  # Eq. 5
            top = top_k_stable(score.detach(), cfg.k) if selection is None else selection  # R, (B, T, K)
            gate = selection_gate(score, top)  # g on R
            details.update(attention=a, dynamics=dyn, score=score, selected=top)
        if cfg.inter_enabled:
            w = model.conv_inter(h)  # (B, T, N)
            v_hat = normalised_variation(frame_variation(w, top, cfg.beta), cfg.variation_eps)  # Eq. 8-10
            if counts is None:
                counts = token_counts(v_hat, cfg.rho)  # n_t
            details.update(variation=v_hat)
    counts = torch.zeros(b, t, dtype=torch.int32, device=video.device) if counts is None else counts.to(torch.int32)
    details.update(counts=counts)

    # 7. intra-frame prompts on the selected patches, added in fp32 and rounded once to E's dtype
    e_tilde = e
    if cfg.intra_enabled:
        prompts = model.prompter_intra(h)  # P, (B, T, N, D)
        gate_full = torch.zeros_like(score).scatter(-1, top, gate)  # g * M
        e_tilde = (e.to(gate.dtype) + gate_full[..., None] * prompts.to(gate.dtype)).to(e.dtype)  # Eq. 7

    # 10. inter-frame prompts
    if cfg.inter_enabled:
        temporal = model.prompter_inter(pooled_changes(w, h), v_hat)  # (B, T, rho, D)

    # 11. ragged sequences [Z_t[0] ; E~_t ; G_t[:n_t]], padded to the longest
    lengths = 1 + n + counts.flatten()  # (B*T,)
    temporal = temporal.flatten(0, 1) if cfg.inter_enabled else None
    seq = padded_sequences(z, e_tilde.flatten(0, 1), temporal, counts.flatten())  # (B*T, 1+N+rho, D)
    cls = run_transformer_padded(visual, seq, lengths, model.grad_checkpointing)

    # 12. per-frame features (the caller averages and normalises)
    per_frame = frame_features(visual, cls).unflatten(0, (b, t))
    if record:
        details["lengths"] = lengths.unflatten(0, (b, t))
        return per_frame, details
    return per_frame
