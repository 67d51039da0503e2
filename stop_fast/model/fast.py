"""The fast path: SPEC.md steps 1-12 on packed ragged sequences, through ``stop_fast.kernels``.

Differences from the reference path, all of them exact rewrites (same function, other rounding):
- step 3 uses the cheap form: the CLS query is folded into the key projection (``folded_cls_keys``,
  computed once per backbone state and cached), and the scoring kernel computes A, Dyn, S, R, g and
  the frame-variation term per frame without writing any N-sized intermediate to memory;
- Prompter_intra runs only on the K selected patches (the overlay is zero elsewhere);
- the overlay, the CLS token and the inter-frame tokens are written straight into one packed
  ``(total_tokens, D)`` buffer with ``cu_seqlens``; no padding, no mask;
- the frozen blocks run as matmuls over all tokens of the batch, attention through varlen attention
  on strided q/k/v views of the fused QKV projection (no copies);
- only the CLS token of the last block is used (step 12), so the last block computes keys and values
  for every token but the query, attention, out-projection and MLP for the CLS rows only.

Host synchronisation: exactly one per call: the packed buffer's size depends on the token counts n_t,
which live on the device. In eager mode on CUDA the (total, longest) pair is copied to pinned host
memory without blocking as soon as the counts exist, and the host waits for it only when packing
needs the size, after the prompters' work is queued; under ``torch.compile`` the same numbers become
unbacked sizes (``kernels.cu_seqlens_from_counts``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .. import kernels
from .prompters import conv_logits
from .steps import (
    chain_dtype,
    difference_features,
    first_block_input,
    frame_features,
    frame_variation,
    layer_norm,
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

# (q, k, v, cu_seqlens, max_seqlen) -> out, each (total_tokens, heads, head_dim)
Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


@torch.no_grad()
def folded_cls_keys(visual, token_dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Step 3's cheap form: ``q_cls,h . k_j,h / sqrt(d) = u_j . keys[h] + bias[h]``.

    The CLS token entering block 1 is ``cls + pos_0`` for every frame, so its query is a constant of
    the frozen model: ``keys[h] = W_k,h^T q_cls,h / sqrt(d)`` (Hh, D), ``bias[h] = q_cls,h . b_k,h / sqrt(d)``.
    ``token_dtype`` is the dtype of the tokens Z (bf16 under bf16 autocast): the CLS token is rounded
    to it exactly as ``patch_tokens`` rounds it, then everything runs in the chain dtype.
    """
    block = visual.transformer.resblocks[0]
    heads = block.attn.num_heads
    token_dtype = token_dtype or visual.class_embedding.dtype
    dtype = chain_dtype(visual.class_embedding.to(token_dtype))
    with scoring_precision(visual.class_embedding):
        cls = (visual.class_embedding.to(token_dtype) + visual.positional_embedding[0].to(token_dtype)).to(dtype)
        u_cls = layer_norm(block.ln_1, layer_norm(visual.ln_pre, cls))
        w_q, w_k, _ = block.attn.in_proj_weight.to(dtype).chunk(3)
        b_q, b_k, _ = block.attn.in_proj_bias.to(dtype).chunk(3)
        width = w_q.shape[0]
        head_dim = width // heads
        q = (w_q @ u_cls + b_q).view(heads, head_dim) / head_dim**0.5  # (Hh, d)
        keys = torch.einsum("hd,hdc->hc", q, w_k.view(heads, head_dim, width))  # (Hh, D)
        bias = (q * b_k.view(heads, head_dim)).sum(-1)  # (Hh,)
    return keys.contiguous(), bias.contiguous()


def _frozen_state(visual) -> tuple:
    """What ``folded_cls_keys`` depends on: storage and version of each frozen tensor it reads."""
    block = visual.transformer.resblocks[0]
    tensors = (visual.class_embedding, visual.positional_embedding, visual.ln_pre.weight, visual.ln_pre.bias,
               block.ln_1.weight, block.ln_1.bias, block.attn.in_proj_weight, block.attn.in_proj_bias)
    return tuple((t.device, t.dtype, t.data_ptr(), t._version) for t in tensors)


def cls_keys(model: "STOP", token_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """``folded_cls_keys`` of the model's backbone for tokens of ``token_dtype``, computed once and
    reused until the backbone's weights move, change dtype or are edited in place (``STOP`` also
    drops the cache on ``.to()`` and ``load_state_dict``)."""
    cache = model._cls_keys_cache
    if torch.compiler.is_compiling():  # traced code cannot read storage pointers; use what eager cached
        cached = cache.get(token_dtype) if cache else None
        return cached[1] if cached is not None else folded_cls_keys(model.visual, token_dtype)
    state = _frozen_state(model.visual)
    cached = cache.get(token_dtype) if cache else None
    if cached is None or cached[0] != state:
        cached = (state, folded_cls_keys(model.visual, token_dtype))
        model._cls_keys_cache = {**(cache or {}), token_dtype: cached}
    return cached[1]


class PackedSizes:
    """``cu_seqlens`` for frames of ``1 + N + n_t`` tokens, and the two host-side sizes packing needs.

    Created as soon as the counts exist: ``cu_seqlens`` stays on the device, and (total tokens,
    longest count) start their one device-to-host copy at once, into pinned memory without blocking on
    CUDA. :meth:`wait` returns ``(cu_seqlens, total_tokens, max_seqlen)``, blocking only for that copy.
    Under ``torch.compile`` it defers to ``kernels.cu_seqlens_from_counts`` (unbacked sizes).
    """

    def __init__(self, counts: torch.Tensor, tokens_per_frame: int):
        self.tokens_per_frame = tokens_per_frame
        self.counts = counts
        self.event = None
        if torch.compiler.is_compiling():
            return
        lengths = counts.to(torch.int64) + tokens_per_frame
        cu = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=counts.device)
        torch.cumsum(lengths, 0, out=cu[1:])
        self.cu_seqlens = cu.to(torch.int32)
        longest = counts.max().to(torch.int64) if counts.numel() else cu[0]
        stats = torch.stack([cu[-1], longest])
        if stats.is_cuda:
            self.host = torch.empty(2, dtype=torch.int64, pin_memory=True)
            self.host.copy_(stats, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = stats

    def wait(self) -> Tuple[torch.Tensor, int, int]:
        if torch.compiler.is_compiling():
            return kernels.cu_seqlens_from_counts(self.counts, self.tokens_per_frame)
        if self.event is not None:
            self.event.synchronize()
        total, longest = self.host.tolist()
        return self.cu_seqlens, total, self.tokens_per_frame + longest


def static_layout(counts: torch.Tensor, tokens_per_frame: int, rho: int) -> Tuple[torch.Tensor, int, int, torch.Tensor]:
    """The static-shape packing: every frame padded to ``L = 1 + N + rho`` rows, no host sync.

    Frame f owns rows ``f L .. f L + 1 + N + n_f``; its padding rows (zeros) form a sequence of their
    own, so attention never mixes them with a frame and every row belongs to a sequence. Returns
    ``(cu_seqlens, total_tokens, max_seqlen, starts)``: (2F + 1,) int32 offsets, F L, L, and the
    frames' first rows (F,) int64; all sizes are Python ints fixed by F, N and rho.
    """
    frames = counts.numel()
    longest = tokens_per_frame + rho
    starts = torch.arange(frames, device=counts.device, dtype=torch.int64) * longest
    ends = starts + tokens_per_frame + counts.to(torch.int64)
    cu = torch.cat([torch.stack([starts, ends], dim=1).flatten(), starts.new_full((1,), frames * longest)])
    return cu.to(torch.int32), frames * longest, longest, starts


# The one place the packed blocks call attention; the qkv-packed entry takes the fused projection
# output itself (and its backward writes one (total, 3, heads, head_dim) gradient).
_QKV_PACKED = getattr(kernels, "varlen_attention_qkvpacked", None)


def packed_attention(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                     attention: Optional[Attention] = None) -> torch.Tensor:
    """``qkv`` (total_tokens, 3, heads, head_dim) -> attention output (total_tokens, heads, head_dim)."""
    if attention is None and _QKV_PACKED is not None:
        return _QKV_PACKED(qkv, cu_seqlens, max_seqlen, check_inputs=False)
    q, k, v = qkv.unbind(1)  # strided views, last dim contiguous: no copies
    if attention is not None:
        return attention(q, k, v, cu_seqlens, max_seqlen)
    return kernels.varlen_attention(q, k, v, cu_seqlens, max_seqlen, check_inputs=False)


def packed_block(block, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                 attention: Optional[Attention] = None) -> torch.Tensor:
    """One frozen open_clip ResidualAttentionBlock on packed tokens (total_tokens, D)."""
    heads = block.attn.num_heads
    total, width = x.shape
    qkv = F.linear(block.ln_1(x), block.attn.in_proj_weight, block.attn.in_proj_bias)
    o = packed_attention(qkv.view(total, 3, heads, width // heads), cu_seqlens, max_seqlen, attention)
    x = x + block.ls_1(block.attn.out_proj(o.reshape(total, width)))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def cls_block(block, x: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, longest: int) -> torch.Tensor:
    """The last frozen block for the CLS rows only: (total_tokens, D) -> CLS outputs (F, D).

    Keys and values come from every token; the query, the attention output, the out-projection and
    the MLP only from the F CLS rows ``starts`` (exact: nothing else of the last block is used).
    Each CLS row attends over its own frame's ``lengths[f]`` tokens, gathered into an (F, ``longest``)
    padded layout with the padding masked (``longest`` is a static bound, 1 + N + rho).
    """
    heads = block.attn.num_heads
    width = x.shape[1]
    head_dim = width // heads
    frames = starts.shape[0]
    w_q, w_kv = block.attn.in_proj_weight[:width], block.attn.in_proj_weight[width:]
    b_q, b_kv = block.attn.in_proj_bias[:width], block.attn.in_proj_bias[width:]
    kv = F.linear(block.ln_1(x), w_kv, b_kv).view(-1, 2, heads, head_dim)  # (total, 2, Hh, d)
    x_cls = x.index_select(0, starts)  # (F, D)
    q = F.linear(block.ln_1(x_cls), w_q, b_q).view(frames, heads, 1, head_dim)
    slot = torch.arange(longest, device=x.device)
    valid = slot[None, :] < lengths[:, None]  # (F, L)
    rows = torch.where(valid, starts[:, None] + slot[None, :], starts[:, None])  # padding reads the CLS row
    kv = kv.index_select(0, rows.flatten()).view(frames, longest, 2, heads, head_dim)
    k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # (F, Hh, L, d) each, strided
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])  # (F, Hh, 1, d)
    x_cls = x_cls + block.ls_1(block.attn.out_proj(o.reshape(frames, width)))
    return x_cls + block.ls_2(block.mlp(block.ln_2(x_cls)))


def fast_forward(
    model: "STOP",
    video: torch.Tensor,
    *,
    selection: Optional[torch.Tensor] = None,
    counts: Optional[torch.Tensor] = None,
    attention: Optional[Attention] = None,
    record: bool = False,
    static_shapes: bool = False,
):
    """``video`` (B, T, 3, H, W) -> per-frame features (B, T, E), the same function as the reference.

    ``selection`` (B, T, K) int64 and ``counts`` (B, T) int override R and n (already validated by
    ``STOP``). ``attention``: a callable ``(q, k, v, cu_seqlens, max_seqlen) -> out``, each
    (total_tokens, heads, head_dim), used in every block but the last instead of stop_fast's varlen
    kernel (the last block attends from the CLS rows only, see ``cls_block``). With ``record`` returns
    ``(per_frame, details)``, details as ``STOP.explain`` describes them, from this path's own values.
    ``static_shapes``: pad every frame to 1 + N + rho tokens (``static_layout``; at ViT-B/32 ~8% more
    tokens) so that no size depends on the data: no host sync at all, and under ``torch.compile``
    every shape is static, which CUDA graphs (``mode="reduce-overhead"``) need.
    """
    cfg = model.config
    visual = model.visual
    b, t = video.shape[:2]
    n = model.num_patches
    frames = b * t

    # 1-2. patch embeddings and difference features (H in chain dtype, built once)
    z = patch_tokens(visual, video.flatten(0, 1))  # (F, 1+N, D)
    h = difference_features(z[:, 1:].unflatten(0, (b, t)))  # (B, T, N, 2D)
    convs = [m for m in (getattr(model, "conv_intra", None), getattr(model, "conv_inter", None)) if m is not None]
    logits = conv_logits(convs, h) if convs else []  # F (intra) and W (inter), one Conv3d
    dyn_logits = logits[0].flatten(0, 1).contiguous() if cfg.intra_enabled else None  # (F, N)
    w = logits[-1] if cfg.inter_enabled else None  # (B, T, N)
    details: Dict[str, torch.Tensor] = {}

    # 3-8. scoring chain: autocast off, chain dtype
    top = gate = variation = None
    with scoring_precision(z):
        if cfg.intra_enabled:
            keys, bias = cls_keys(model, z.dtype)
            scores = kernels.patch_scores(
                first_block_input(visual, z), keys, bias, dyn_logits,
                None if w is None else w.flatten(0, 1).contiguous(), cfg.k, cfg.alpha, cfg.beta, check_inputs=False,
            )
            score = scores.score
            if selection is None:
                top, gate, variation = scores.topk_idx, scores.gate, scores.variation
            else:  # the given R: gate and variation from it (the kernel's own top-K is not used)
                top = selection.flatten(0, 1).contiguous()
                score = (1 - cfg.alpha) * scores.attn + cfg.alpha * torch.softmax(dyn_logits, dim=-1)
                gate = selection_gate(score, top)
                if w is not None:
                    variation = frame_variation(w.flatten(0, 1), top, cfg.beta)
            if record:
                details.update(attention=scores.attn, dynamics=scores.dyn, score=score, selected=top)
        frame_counts = torch.zeros(frames, dtype=torch.int32, device=video.device)
        if cfg.inter_enabled:
            if variation is None:  # k = 0: no top-K set, M = 0
                variation = frame_variation(w.flatten(0, 1), None, cfg.beta)
            v_hat = normalised_variation(variation.view(b, t), cfg.variation_eps)  # (B, T)
            frame_counts = (token_counts(v_hat, cfg.rho) if counts is None else counts).flatten().to(torch.int32)
            if record:
                details["variation"] = v_hat
    if not static_shapes:
        sizes = PackedSizes(frame_counts, 1 + n)  # the size transfer starts now; prompter work queues behind it

    # 7, 10. prompts (in the precision the caller chose: autocast applies)
    intra = inter = None
    if cfg.intra_enabled:
        h_top = h.flatten(0, 1).gather(1, top[..., None].expand(-1, -1, h.shape[-1]))  # (F, K, 2D)
        intra = model.prompter_intra(h_top)  # P on the selected patches only, (F, K, D)
    if cfg.inter_enabled:
        inter = model.prompter_inter(pooled_changes(w, h), v_hat).flatten(0, 1)  # (F, rho, D)

    # 11. packed ragged sequences through the frozen blocks
    if static_shapes:
        cu_seqlens, total, max_seqlen, starts = static_layout(frame_counts, 1 + n, cfg.rho)
        e_tilde = z[:, 1:]
        if intra is not None:  # the overlay as the packing kernel computes it: fp32, rounded once
            index = top[..., None].expand(-1, -1, z.shape[-1])
            e_tilde = e_tilde.to(gate.dtype).scatter_add(1, index, gate[..., None] * intra.to(gate.dtype)).to(z.dtype)
        x = padded_sequences(z, e_tilde, inter, frame_counts).flatten(0, 1)  # (F * L, D)
    else:
        cu_seqlens, total, max_seqlen = sizes.wait()  # the one host sync
        x = kernels.pack_sequences(z, frame_counts, cu_seqlens, total, top, gate, intra, inter, check_inputs=False)
        starts = cu_seqlens[:-1].long()
    x = visual.ln_pre(x)
    blocks = visual.transformer.resblocks
    for block in blocks[:-1]:
        if model.grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(packed_block, block, x, cu_seqlens, max_seqlen, attention, use_reentrant=False)
        else:
            x = packed_block(block, x, cu_seqlens, max_seqlen, attention)
    lengths = frame_counts.long() + 1 + n
    if model.grad_checkpointing and torch.is_grad_enabled():
        cls = checkpoint(cls_block, blocks[-1], x, starts, lengths, 1 + n + cfg.rho, use_reentrant=False)
    else:
        cls = cls_block(blocks[-1], x, starts, lengths, 1 + n + cfg.rho)  # (F, D)

    # 12. per-frame features (the caller averages and normalises)
    per_frame = frame_features(visual, cls).unflatten(0, (b, t))
    if not record:
        return per_frame
    details = {k: v if k == "variation" else v.unflatten(0, (b, t)) for k, v in details.items()}
    details["counts"] = frame_counts.view(b, t)
    details["lengths"] = (1 + n + frame_counts).view(b, t)
    return per_frame, details
