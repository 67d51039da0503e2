"""The fast path: SPEC.md steps 1-12 on packed ragged sequences, through ``stop_fast.kernels``.

Differences from the reference path, all of them exact rewrites (same function, other rounding):
- step 1's conv1 is one GEMM of the non-overlapping patches, and the two Conv3d layers of steps 4
  and 8 are one GEMM followed by a shifted sum (cuDNN runs both shapes slowly: see ``patch_embedding``
  and ``conv3x3x3_as_matmul``);
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

Two stages around one host synchronisation: :func:`prompt_frames` (steps 1-10; every size fixed by B
and T) and :func:`encode_packed` (steps 11-12 on the packed rows). The packed buffer's size depends on
the token counts n_t, which live on the device: in eager mode on CUDA the (total, longest) pair is
copied to pinned host memory without blocking as soon as the counts exist, and the host waits for it
only when packing needs the size, after the prompters' work is queued. ``compile_encoder`` compiles
each stage on its own and pads the packed rows to a bucket (:func:`pad_to_bucket`), so the encode
stage has static shapes; compiling ``fast_forward`` whole turns the count into an unbacked size
(``kernels.cu_seqlens_from_counts``) instead.
"""
from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Callable, Dict, NamedTuple, Optional, Tuple

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


# folded_cls_keys per vision tower and token dtype: {visual: {dtype: (frozen state, (keys, bias))}}. Weak
# keys: a backbone that is gone takes its entry with it.
_CLS_KEYS: "weakref.WeakKeyDictionary[torch.nn.Module, Dict[torch.dtype, tuple]]" = weakref.WeakKeyDictionary()


def cls_keys(model: "STOP", token_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """``folded_cls_keys`` of the model's backbone for tokens of ``token_dtype``, computed once and
    reused until the backbone's weights move, change dtype or are edited in place (``STOP`` also
    calls :func:`forget_cls_keys` on ``.to()``, ``cast_backbone`` and ``load_state_dict``, where a
    freed storage could come back at the same address)."""
    visual = model.visual
    cache = _CLS_KEYS.get(visual)
    if torch.compiler.is_compiling():  # traced code cannot read storage pointers; use what eager cached
        cached = cache.get(token_dtype) if cache else None
        return cached[1] if cached is not None else folded_cls_keys(visual, token_dtype)
    state = _frozen_state(visual)
    cached = cache.get(token_dtype) if cache else None
    if cached is None or cached[0] != state:
        cached = (state, folded_cls_keys(visual, token_dtype))
        _CLS_KEYS[visual] = {**(cache or {}), token_dtype: cached}
    return cached[1]


def forget_cls_keys(visual: torch.nn.Module) -> None:
    """Drop the cached ``folded_cls_keys`` of a vision tower (its frozen weights are about to change)."""
    _CLS_KEYS.pop(visual, None)


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


def packed_attention(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                     attention: Optional[Attention] = None) -> torch.Tensor:
    """``qkv`` (total_tokens, 3, heads, head_dim) -> attention output (total_tokens, heads, head_dim).

    The one place the packed blocks call attention: the qkv-packed kernel entry takes the fused
    projection output itself (and its backward writes one (total, 3, heads, head_dim) gradient);
    ``attention`` (a benchmark's or test's ``(q, k, v, cu_seqlens, max_seqlen)`` callable) replaces it."""
    if attention is None:
        return kernels.varlen_attention_qkvpacked(qkv, cu_seqlens, max_seqlen, check_inputs=False)
    q, k, v = qkv.unbind(1)  # strided views, last dim contiguous: no copies
    return attention(q, k, v, cu_seqlens, max_seqlen)


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


class Prompted(NamedTuple):
    """Steps 1-10 of every frame: what packing needs. F = B T frames."""

    z: torch.Tensor  # (F, 1+N, D) tokens
    counts: torch.Tensor  # (F,) int32 n_t
    top: Optional[torch.Tensor]  # (F, K) int64 R_t, None without intra-frame prompts
    gate: Optional[torch.Tensor]  # (F, K) g_t
    intra: Optional[torch.Tensor]  # (F, K, D) P_t on the selected patches
    inter: Optional[torch.Tensor]  # (F, rho, D) candidate inter-frame tokens, None without them


def prompt_frames(model: "STOP", video: torch.Tensor, selection: Optional[torch.Tensor] = None,
                  counts: Optional[torch.Tensor] = None, details: Optional[Dict[str, torch.Tensor]] = None,
                  start_sizes: bool = False) -> Tuple[Prompted, Optional[PackedSizes]]:
    """Steps 1-10: tokens, scores, R, g, n and both prompts of every frame; no data-dependent size.

    ``details`` (a dict) receives what ``STOP.explain`` reports, from this path's own values.
    ``start_sizes`` (eager only): start the token count's device-to-host copy as soon as the counts
    exist, before the prompters' work is queued, and return it as a :class:`PackedSizes`.
    """
    cfg = model.config
    visual = model.visual
    b, t = video.shape[:2]
    frames = b * t

    # 1-2. patch embeddings (conv1 as one GEMM) and difference features (H in chain dtype, built once)
    z = patch_tokens(visual, video.flatten(0, 1), as_matmul=True)  # (F, 1+N, D)
    h = difference_features(z[:, 1:].unflatten(0, (b, t)))  # (B, T, N, 2D)
    parts = model.trainable_modules()
    convs = [parts[name] for name in ("conv_intra", "conv_inter") if name in parts]
    logits = conv_logits(convs, h, as_matmul=True) if convs else []  # F (intra) and W (inter), one GEMM
    dyn_logits = logits[0].flatten(0, 1).contiguous() if cfg.intra_enabled else None  # (F, N)
    w = logits[-1] if cfg.inter_enabled else None  # (B, T, N)

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
            if details is not None:
                details.update(attention=scores.attn, dynamics=scores.dyn, score=score, selected=top)
        frame_counts = torch.zeros(frames, dtype=torch.int32, device=video.device)
        if cfg.inter_enabled:
            if variation is None:  # k = 0: no top-K set, M = 0
                variation = frame_variation(w.flatten(0, 1), None, cfg.beta)
            v_hat = normalised_variation(variation.view(b, t), cfg.variation_eps)  # (B, T)
            frame_counts = (token_counts(v_hat, cfg.rho) if counts is None else counts).flatten().to(torch.int32)
            if details is not None:
                details["variation"] = v_hat
    sizes = None
    if start_sizes and not torch.compiler.is_compiling():
        sizes = PackedSizes(frame_counts, 1 + model.num_patches)  # prompter work queues behind the copy

    # 7, 10. prompts (in the precision the caller chose: autocast applies)
    intra = inter = None
    if cfg.intra_enabled:
        h_top = h.flatten(0, 1).gather(1, top[..., None].expand(-1, -1, h.shape[-1]))  # (F, K, 2D)
        intra = model.prompter_intra(h_top)  # P on the selected patches only, (F, K, D)
    if cfg.inter_enabled:
        inter = model.prompter_inter(pooled_changes(w, h), v_hat).flatten(0, 1)  # (F, rho, D)
    return Prompted(z, frame_counts, top, gate, intra, inter), sizes


def encode_packed(model: "STOP", x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, starts: torch.Tensor,
                  lengths: torch.Tensor, attention: Optional[Attention] = None) -> torch.Tensor:
    """Steps 11-12 on packed sequences: ``x`` (rows, D) before ln_pre -> per-frame features (F, E).

    Frame f is the ``lengths[f]`` rows from ``starts[f]``; rows of no frame (padding) form sequences
    of their own in ``cu_seqlens`` and are never read by a frame. ``max_seqlen`` bounds every sequence.
    """
    visual = model.visual
    x = visual.ln_pre(x)
    blocks = visual.transformer.resblocks
    checkpointed = model.grad_checkpointing and torch.is_grad_enabled()
    for block in blocks[:-1]:
        if checkpointed:
            x = checkpoint(packed_block, block, x, cu_seqlens, max_seqlen, attention, use_reentrant=False)
        else:
            x = packed_block(block, x, cu_seqlens, max_seqlen, attention)
    longest = 1 + model.num_patches + model.config.rho
    if checkpointed:
        cls = checkpoint(cls_block, blocks[-1], x, starts, lengths, longest, use_reentrant=False)
    else:
        cls = cls_block(blocks[-1], x, starts, lengths, longest)  # (F, D)
    return frame_features(visual, cls)


# Bucketed packing (the compiled encoder): padding rows split into this many sequences, so each is
# at most one frame long and attention's per-sequence work stays that of a frame.
BUCKET_SEQUENCES = 8
# Frames per bucket step: the bucket is a multiple of (frames // FRAMES_PER_STEP) frames' worth of
# rows (1 to BUCKET_SEQUENCES frames), so padding adds at most ~2.5% rows from 48 frames up (ViT-B/32:
# (1 + N + rho) / (48 (1 + N))) and less than one frame's worth below.
FRAMES_PER_STEP = 48


def bucket_rows(total: int, longest: int, frames: int) -> int:
    """The packed row count ``total`` of ``frames`` frames, rounded up to a multiple of ``m * longest``
    with ``m = clamp(frames // FRAMES_PER_STEP, 1, BUCKET_SEQUENCES)``: about 48 rho / longest buckets
    over every possible total up to 384 frames (at most ten at ViT-B/32, rho = 12), frames rho /
    (8 longest) above, where the multiple stops growing."""
    multiple = min(max(frames // FRAMES_PER_STEP, 1), BUCKET_SEQUENCES) * longest
    return -(-total // multiple) * multiple


def pad_to_bucket(x: torch.Tensor, cu_seqlens: torch.Tensor, longest: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Zero rows after the packed ``x`` up to :func:`bucket_rows`, as ``BUCKET_SEQUENCES`` sequences of
    at most ``longest`` rows each (some may be empty): ``(x_padded, cu_seqlens_padded)``.

    Every shape then depends only on the bucket, so a compiled encoder specialises on a few static
    sizes instead of one data-dependent size (with which inductor's kernels ran ~2x slower). The
    padding's offsets are computed on the device from two Python ints: no host-to-device copy.
    """
    total = x.shape[0]
    pad = bucket_rows(total, longest, cu_seqlens.shape[0] - 1) - total
    return F.pad(x, (0, 0, 0, pad)), _bucket_cu_seqlens(cu_seqlens, total, total + pad)


def _bucket_cu_seqlens(cu_seqlens: torch.Tensor, total: int, rows: int) -> torch.Tensor:
    """``cu_seqlens`` with the padding rows ``total .. rows`` as ``BUCKET_SEQUENCES`` sequences."""
    piece, extra = divmod(rows - total, BUCKET_SEQUENCES)  # the first `extra` pieces get one row more
    i = torch.arange(1, BUCKET_SEQUENCES + 1, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    ends = total + piece * i + i.clamp(max=extra)
    return torch.cat([cu_seqlens, ends])


def fast_forward(
    model: "STOP",
    video: torch.Tensor,
    *,
    selection: Optional[torch.Tensor] = None,
    counts: Optional[torch.Tensor] = None,
    attention: Optional[Attention] = None,
    record: bool = False,
    static_shapes: bool = False,
    prompt: Callable = prompt_frames,
    encode: Callable = encode_packed,
    bucket: bool = False,
):
    """``video`` (B, T, 3, H, W) -> per-frame features (B, T, E), the same function as the reference.

    ``selection`` (B, T, K) int64 and ``counts`` (B, T) int override R and n (already validated by
    ``STOP``). ``attention``: a callable ``(q, k, v, cu_seqlens, max_seqlen) -> out``, each
    (total_tokens, heads, head_dim), used in every block but the last instead of stop_fast's varlen
    kernel (the last block attends from the CLS rows only, see ``cls_block``). With ``record`` returns
    ``(per_frame, details)``, details as ``STOP.explain`` describes them, from this path's own values.
    ``static_shapes``: pad every frame to 1 + N + rho tokens (``static_layout``; ~11% more tokens at
    ViT-B/32 with rho = 12) so that no size depends on the data: no host sync at all, and under ``torch.compile``
    every shape is static, which CUDA graphs (``mode="reduce-overhead"``) need.

    The two stages around the one host sync, ``prompt`` (:func:`prompt_frames`) and ``encode``
    (:func:`encode_packed`), may be replaced by compiled versions of themselves; with ``bucket`` the
    packed rows are padded to :func:`bucket_rows` first (``compile_encoder`` does both).
    """
    b, t = video.shape[:2]
    n = model.num_patches
    rho = model.config.rho
    details: Optional[Dict[str, torch.Tensor]] = {} if record else None
    p, sizes = prompt(model, video, selection, counts, details, start_sizes=not static_shapes)
    lengths = p.counts.long() + 1 + n
    if static_shapes:
        cu_seqlens, _, max_seqlen, starts = static_layout(p.counts, 1 + n, rho)
        e_tilde = p.z[:, 1:]
        if p.intra is not None:  # the overlay as the packing kernel computes it: fp32, rounded once
            index = p.top[..., None].expand(-1, -1, p.z.shape[-1])
            e_tilde = e_tilde.to(p.gate.dtype).scatter_add(1, index, p.gate[..., None] * p.intra.to(p.gate.dtype))
            e_tilde = e_tilde.to(p.z.dtype)
        x = padded_sequences(p.z, e_tilde, p.inter, p.counts).flatten(0, 1)  # (F * L, D)
    else:
        if sizes is None:  # the prompt stage ran compiled
            sizes = PackedSizes(p.counts, 1 + n)
        cu_seqlens, total, max_seqlen = sizes.wait()  # the one host sync
        rows = None  # kernel variant "pack_bucketed": packing writes the bucket's zero rows (no F.pad copy)
        if bucket and kernels.dispatch.variant_enabled("pack_bucketed"):
            rows = bucket_rows(total, 1 + n + rho, b * t)
        x = kernels.pack_sequences(p.z, p.counts, cu_seqlens, total, p.top, p.gate, p.intra, p.inter,
                                   check_inputs=False, rows=rows)
        starts = cu_seqlens[:-1].long()
        if bucket:
            max_seqlen = 1 + n + rho  # static, like every other size of the encode stage
            if rows is None:
                x, cu_seqlens = pad_to_bucket(x, cu_seqlens, max_seqlen)
            else:
                cu_seqlens = _bucket_cu_seqlens(cu_seqlens, total, rows)
    per_frame = encode(model, x, cu_seqlens, max_seqlen, starts, lengths, attention).unflatten(0, (b, t))
    if not record:
        return per_frame
    details = {k: v if k == "variation" else v.unflatten(0, (b, t)) for k, v in details.items()}
    details["counts"] = p.counts.view(b, t)
    details["lengths"] = lengths.to(torch.int32).view(b, t)
    return per_frame, details
