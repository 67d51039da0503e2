"""Packed ragged ("varlen") attention, forward and backward, FlashAttention-2 style.

``q, k, v`` hold the tokens of many sequences back to back, ``(total_tokens, heads, head_dim)``;
sequence s owns rows ``cu_seqlens[s] : cu_seqlens[s+1]``. Attention is bidirectional (a ViT) and never
crosses sequences:  ``out_i = sum_j softmax_j(scale * q_i . k_j) v_j`` over j of i's own sequence.

Forward kernel: one program per (query block of BLOCK_M rows, sequence, head). It walks the key blocks
of its own sequence with the online softmax (running max m and sum l, in base 2 so ``exp2`` does the
work), accumulating ``P V`` in fp32; no L x L matrix ever reaches memory. It stores the output and the
row's logsumexp (fp32, in log2 units, so the backward recomputes P bit for bit as the forward did).

Backward: ``delta_i = <dO_i, O_i>`` (a small row-reduction kernel), then two kernels, no atomics:
- per (key block, sequence, head): recompute ``P = exp(scale q k^T - lse)`` block by block over the
  sequence's queries and accumulate ``dV += P^T dO`` and ``dK += scale * dS^T Q`` with
  ``dS = P * (dO V^T - delta)``;
- per (query block, sequence, head): the same recomputation, accumulating ``dQ += scale * dS K``.
ViT sequences are short (50 to ~270 tokens), so one or a few blocks cover a sequence and the
recomputation is cheap next to the atomics or extra memory that sharing it would cost.

Block sizes: each kernel is autotuned over a small set of (BLOCK_M, BLOCK_N, warps, stages) per dtype
and head dim (``_gpu_candidates``), keyed on max_seqlen rounded up to a power of two. Every candidate
compiles for sm_90 without spills (``compile_cases`` lists them all for CI). One spills on sm_80: the
16-bit dK dV kernel at 64 x 64, head dim 64 (255 registers + 88 bytes); it is the natural tile for
ViT-B/32 frames on the H100, and on an A100 the autotuner weighs it against three spill-free
alternatives. Under Triton's interpreter, which runs programs one after another and ignores
registers, the set collapses to one 64 x 64 config (the fewest programs), so nothing is benchmarked.

Robustness: programs of query blocks past a sequence's end return at once, and empty sequences read
and write nothing. Each program clamps its sequence's bounds into ``[0, total_tokens]``, so even
``cu_seqlens`` that were not checked (``check_inputs=False``) never send a kernel outside the tensors
(a bound past the end is read as total_tokens). A ``max_seqlen`` below the longest sequence (likewise
refused only when checked) leaves that sequence's later query rows unwritten.
Inputs need only a contiguous last dimension (strided views of a fused QKV projection work without
copies); outputs and gradients are contiguous.
"""
from __future__ import annotations

import functools
import math
from typing import List, Optional, Tuple

import torch

from ._triton import jit, tl, triton
from .aot import CompileCase
from .dispatch import interpreter_enabled, use_triton

HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOG2E = 1.4426950408889634
DELTA_ROWS = 64  # (token, head) rows per program of the backward's delta pass


@jit
def _sequence_bases(cu_ptr, seq, head, total, q_ptr, k_ptr, v_ptr, sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, num_heads):
    """Where sequence ``seq`` starts, its length, and this head's base pointers into q, k, v.

    The bounds are clamped into [0, total] so that unchecked cu_seqlens cannot send a program outside
    the tensors. The 64-bit bases are scalars per program; tile offsets from them stay 32-bit
    (sequences are short), which saves a register per element. ``row0`` is the offset of the
    sequence's first (token, head) row in the contiguous (total, heads) layouts of out, lse, delta
    and the gradients.
    """
    start = tl.minimum(tl.maximum(tl.load(cu_ptr + seq), 0), total)
    end = tl.minimum(tl.maximum(tl.load(cu_ptr + seq + 1), start), total)
    length = end - start
    start = start.to(tl.int64)
    row0 = start * num_heads + head
    return (length, row0, q_ptr + start * sq_t + head * sq_h, k_ptr + start * sk_t + head * sk_h,
            v_ptr + start * sv_t + head * sv_h)


# Kernel arguments shared by the attention kernels: ``total`` (tokens) bounds the clamping above;
# ``seq_bucket`` (max_seqlen rounded up to a power of two) is read only by the autotuner, as its key.
@jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, cu_ptr,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h,
    num_heads, total, seq_bucket, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    head = tl.program_id(2)
    length, row0, q_ptr, k_ptr, v_ptr = _sequence_bases(
        cu_ptr, tl.program_id(1), head, total, q_ptr, k_ptr, v_ptr, sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, num_heads)
    if pid_m * BLOCK_M >= length:
        return
    o_ptr += row0 * HEAD_DIM
    lse_ptr += row0
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < length
    q = tl.load(q_ptr + rows[:, None] * sq_t + dims[None, :], mask=row_ok[:, None], other=0.0)

    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for n0 in range(0, length, BLOCK_N):
        key = n0 + cols
        key_ok = key < length
        k = tl.load(k_ptr + key[None, :] * sk_t + dims[:, None], mask=key_ok[None, :], other=0.0)
        # fp32 inputs get IEEE fp32 dots: tf32 would lose to PyTorch's fp32 attention; 16-bit ignores it
        s = tl.dot(q, k, input_precision="ieee") * scale_log2  # (BLOCK_M, BLOCK_N), log2 units
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: every block holds at least one real key
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l = l * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + key[:, None] * sv_t + dims[None, :], mask=key_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m = m_new
    out = acc / l[:, None]
    tl.store(o_ptr + rows[:, None] * (num_heads * HEAD_DIM) + dims[None, :], out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None])
    # logsumexp in log2 units: the backward recomputes P with the very same exp2 as this loop
    tl.store(lse_ptr + rows * num_heads, m + tl.log2(l), mask=row_ok)


@jit
def _attn_bwd_delta_kernel(o_ptr, do_ptr, delta_ptr, rows_total, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr):
    """delta[r] = <dO[r], O[r]> over the (token, head) rows of the contiguous layouts, fp32."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    dims = tl.arange(0, HEAD_DIM)
    ok = rows < rows_total
    offs = rows.to(tl.int64)[:, None] * HEAD_DIM + dims[None, :]
    o = tl.load(o_ptr + offs, mask=ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(do_ptr + offs, mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(delta_ptr + rows, tl.sum(o * do, axis=1), mask=ok)


@jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, cu_ptr,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h,
    num_heads, total, seq_bucket, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    head = tl.program_id(2)
    length, row0, q_ptr, k_ptr, v_ptr = _sequence_bases(
        cu_ptr, tl.program_id(1), head, total, q_ptr, k_ptr, v_ptr, sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, num_heads)
    if pid_n * BLOCK_N >= length:
        return
    do_ptr += row0 * HEAD_DIM
    dk_ptr += row0 * HEAD_DIM
    dv_ptr += row0 * HEAD_DIM
    lse_ptr += row0
    delta_ptr += row0
    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    key_ok = keys < length
    k = tl.load(k_ptr + keys[:, None] * sk_t + dims[None, :], mask=key_ok[:, None], other=0.0)
    v = tl.load(v_ptr + keys[:, None] * sv_t + dims[None, :], mask=key_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for m0 in range(0, length, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < length
        q = tl.load(q_ptr + rows[:, None] * sq_t + dims[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(do_ptr + rows[:, None] * (num_heads * HEAD_DIM) + dims[None, :], mask=row_ok[:, None], other=0.0)
        lse = tl.load(lse_ptr + rows * num_heads, mask=row_ok, other=0.0)
        delta = tl.load(delta_ptr + rows * num_heads, mask=row_ok, other=0.0)
        # P^T (BLOCK_N, BLOCK_M): keys along rows so both accumulations are plain dots
        st = tl.dot(k, tl.trans(q), input_precision="ieee") * (scale * 1.4426950408889634)
        pt = tl.exp2(st - lse[None, :])
        pt = tl.where(row_ok[None, :] & key_ok[:, None], pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision="ieee")
        dpt = tl.dot(v, tl.trans(do), input_precision="ieee")  # (dO V^T)^T
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision="ieee")
    out = keys[:, None] * (num_heads * HEAD_DIM) + dims[None, :]
    tl.store(dk_ptr + out, (dk * scale).to(dk_ptr.dtype.element_ty), mask=key_ok[:, None])
    tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=key_ok[:, None])


@jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, cu_ptr,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h,
    num_heads, total, seq_bucket, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    head = tl.program_id(2)
    length, row0, q_ptr, k_ptr, v_ptr = _sequence_bases(
        cu_ptr, tl.program_id(1), head, total, q_ptr, k_ptr, v_ptr, sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, num_heads)
    if pid_m * BLOCK_M >= length:
        return
    do_ptr += row0 * HEAD_DIM
    dq_ptr += row0 * HEAD_DIM
    lse_ptr += row0
    delta_ptr += row0
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < length
    q = tl.load(q_ptr + rows[:, None] * sq_t + dims[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(do_ptr + rows[:, None] * (num_heads * HEAD_DIM) + dims[None, :], mask=row_ok[:, None], other=0.0)
    lse = tl.load(lse_ptr + rows * num_heads, mask=row_ok, other=0.0)
    delta = tl.load(delta_ptr + rows * num_heads, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for n0 in range(0, length, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        key_ok = keys < length
        k = tl.load(k_ptr + keys[:, None] * sk_t + dims[None, :], mask=key_ok[:, None], other=0.0)
        v = tl.load(v_ptr + keys[:, None] * sv_t + dims[None, :], mask=key_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * (scale * 1.4426950408889634)
        p = tl.exp2(s - lse[:, None])
        p = tl.where(row_ok[:, None] & key_ok[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee")
    tl.store(dq_ptr + rows[:, None] * (num_heads * HEAD_DIM) + dims[None, :],
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=row_ok[:, None])


_KERNELS = {"fwd": _attn_fwd_kernel, "bwd_dkdv": _attn_bwd_dkdv_kernel, "bwd_dq": _attn_bwd_dq_kernel}


# --------------------------------------------------------------------------- launch configuration
# (BLOCK_M, BLOCK_N, num_warps, num_stages) the autotuner picks from, by kernel, input dtype and head dim.
# Chosen from ptxas reports: every entry compiles for sm_90 without spills (CI checks it), and all but
# one for sm_80 too (see compile_cases). 16-bit inputs: 64 x 64 tiles cover a ViT-B/32 frame (50-62
# tokens) in one step; 32-row tiles give twice the programs; 128-row tiles halve the K/V reloads for
# ViT-L/14 frames (~260 tokens); head dim 128 needs smaller tiles to stay in registers. fp32 inputs
# are the accuracy path (tests, float32 users): IEEE fp32 dots on CUDA cores, small tiles.
_CANDIDATES_16BIT = {
    # (kernel, head_dim <= 64) -> configs
    ("fwd", True): [(64, 64, 4, 2), (64, 64, 8, 2), (32, 64, 4, 2), (128, 64, 8, 2)],
    ("fwd", False): [(32, 32, 4, 2), (64, 32, 4, 2), (64, 64, 8, 2), (128, 32, 8, 2)],
    # the one sm_80 spill: dK dV at 64 x 64, 88 bytes; kept for sm_90, where it has none
    ("bwd_dkdv", True): [(64, 64, 8, 2), (32, 64, 8, 2), (64, 32, 8, 2), (32, 32, 4, 2)],
    ("bwd_dkdv", False): [(32, 32, 4, 2), (32, 64, 8, 2), (64, 32, 8, 2), (64, 32, 4, 2)],
    ("bwd_dq", True): [(64, 64, 8, 2), (32, 64, 8, 2), (64, 32, 8, 2), (128, 64, 8, 2)],
    ("bwd_dq", False): [(32, 32, 4, 2), (32, 64, 8, 2), (64, 32, 8, 2), (64, 64, 8, 2)],
}
_INTERPRETER_CONFIG = (64, 64, 4, 1)


def _gpu_candidates(kernel: str, dtype: torch.dtype, head_dim: int) -> List[Tuple[int, int, int, int]]:
    """The configs ``kernel`` ("fwd", "bwd_dkdv", "bwd_dq") is autotuned over on a GPU."""
    if dtype == torch.float32:
        # 32 x 32 tiles: head dim 128 needs 8 warps to hold the fp32 operands; below, 4 warps without
        # pipelining (ptxas spilled 16 bytes of dQ at head dim 32 with two stages)
        return [(16, 16, 4, 2), (32, 32, 4, 1) if head_dim <= 64 else (32, 32, 8, 2)]
    return list(_CANDIDATES_16BIT[(kernel, head_dim <= 64)])


@functools.lru_cache(maxsize=None)
def _tuned(kernel: str, dtype: torch.dtype, head_dim: int):
    """``kernel`` wrapped in triton.autotune over its candidates (one config: no benchmarking)."""
    candidates = [_INTERPRETER_CONFIG] if interpreter_enabled() else _gpu_candidates(kernel, dtype, head_dim)
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
               for bm, bn, w, s in candidates]
    # every output element is overwritten by each trial run, so trials need no reset between them
    return triton.autotune(configs=configs, key=["seq_bucket"])(_KERNELS[kernel])


def _seq_bucket(max_seqlen: int) -> int:
    return triton.next_power_of_2(max(int(max_seqlen), 1))


def _strides(t: torch.Tensor) -> Tuple[int, int]:
    return t.stride(0), t.stride(1)


def _launch_forward(q, k, v, cu_seqlens, max_seqlen, scale):
    total, heads, head_dim = q.shape
    out = torch.empty(total, heads, head_dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(total, heads, dtype=torch.float32, device=q.device)
    num_seqs = cu_seqlens.numel() - 1
    if total == 0 or num_seqs == 0 or max_seqlen == 0:
        return out, lse
    grid = lambda meta: (triton.cdiv(max_seqlen, meta["BLOCK_M"]), num_seqs, heads)  # noqa: E731
    _tuned("fwd", q.dtype, head_dim)[grid](
        q, k, v, out, lse, cu_seqlens, *_strides(q), *_strides(k), *_strides(v),
        heads, total, _seq_bucket(max_seqlen), scale * LOG2E, HEAD_DIM=head_dim,
    )
    return out, lse


def _launch_backward(do, q, k, v, out, lse, cu_seqlens, max_seqlen, scale):
    total, heads, head_dim = q.shape
    do = do.contiguous()
    dq = torch.empty(total, heads, head_dim, dtype=q.dtype, device=q.device)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    num_seqs = cu_seqlens.numel() - 1
    if total == 0 or num_seqs == 0 or max_seqlen == 0:
        return dq, dk, dv
    delta = torch.empty(total, heads, dtype=torch.float32, device=q.device)
    _attn_bwd_delta_kernel[(triton.cdiv(total * heads, DELTA_ROWS),)](
        out, do, delta, total * heads, HEAD_DIM=head_dim, BLOCK_T=DELTA_ROWS, num_warps=4)
    args = (cu_seqlens, *_strides(q), *_strides(k), *_strides(v), heads, total, _seq_bucket(max_seqlen), scale)
    grid_n = lambda meta: (triton.cdiv(max_seqlen, meta["BLOCK_N"]), num_seqs, heads)  # noqa: E731
    _tuned("bwd_dkdv", q.dtype, head_dim)[grid_n](q, k, v, do, lse, delta, dk, dv, *args, HEAD_DIM=head_dim)
    grid_m = lambda meta: (triton.cdiv(max_seqlen, meta["BLOCK_M"]), num_seqs, heads)  # noqa: E731
    _tuned("bwd_dq", q.dtype, head_dim)[grid_m](q, k, v, do, lse, delta, dq, *args, HEAD_DIM=head_dim)
    return dq, dk, dv

# --------------------------------------------------------------------------- PyTorch semantics
def _token_positions(cu_seqlens: torch.Tensor, total: int) -> Tuple[torch.Tensor, torch.Tensor]:
    token = torch.arange(total, device=cu_seqlens.device)
    seq = torch.searchsorted(cu_seqlens[1:].long(), token, right=True)
    return seq, token - cu_seqlens.long()[seq]


def _attention_torch(q, k, v, cu_seqlens, max_seqlen: int, scale: float) -> torch.Tensor:
    """Loop-free PyTorch: scatter the tokens into a padded (S, Lmax) layout, masked softmax, gather back.
    Differentiable by autograd and exact in float64; what runs where Triton cannot."""
    total, heads, head_dim = q.shape
    num_seqs = cu_seqlens.numel() - 1
    seq, pos = _token_positions(cu_seqlens, total)
    acc = torch.promote_types(q.dtype, torch.float32)

    def padded(x):
        buf = x.new_zeros(num_seqs, max_seqlen, heads, head_dim, dtype=acc)
        return buf.index_put((seq, pos), x.to(acc))

    qp, kp, vp = padded(q), padded(k), padded(v)  # (S, L, H, d)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    key_ok = torch.arange(max_seqlen, device=q.device)[None, :] < lengths[:, None]  # (S, L)
    scores = torch.einsum("sihd,sjhd->shij", qp, kp) * scale
    scores = scores.masked_fill(~key_ok[:, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1).nan_to_num(0.0)  # an empty sequence's rows are all -inf: 0, not NaN
    out = torch.einsum("shij,sjhd->sihd", probs, vp)
    return out[seq, pos].to(q.dtype)


def varlen_attention_reference(q, k, v, cu_seqlens, softmax_scale: Optional[float] = None) -> torch.Tensor:
    """Ground truth for the tests: one plain softmax attention per sequence, in the inputs' dtype."""
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b > a:
            s = torch.einsum("ihd,jhd->hij", q[a:b], k[a:b]) * scale
            out[a:b] = torch.einsum("hij,jhd->ihd", s.softmax(dim=-1), v[a:b])
    return out


# --------------------------------------------------------------------------- custom ops + autograd (Triton)
@torch.library.custom_op("stop_fast::varlen_attention", mutates_args=())
def _attn_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
             max_seqlen: int, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    return _launch_forward(q, k, v, cu_seqlens, max_seqlen, scale)


@_attn_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)


@torch.library.custom_op("stop_fast::varlen_attention_backward", mutates_args=())
def _attn_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                      lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_backward(do, q, k, v, out, lse, cu_seqlens, max_seqlen, scale)


@_attn_backward_op.register_fake
def _(do, q, k, v, out, lse, cu_seqlens, max_seqlen, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.max_seqlen, ctx.scale = max_seqlen, scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _attn_backward_op(dout, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.scale)
    return dq, dk, dv, None, None, None


_attn_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public entry point
def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    softmax_scale: Optional[float] = None,
    *,
    check_inputs: bool = True,
) -> torch.Tensor:
    """Attention within each packed sequence (flash-attention's varlen interface).

    Args:
        q, k, v: (total_tokens, heads, head_dim), one float dtype (fp32, fp16, bf16; float64 runs the
            PyTorch implementation), last dim contiguous; head_dim in (16, 32, 64, 128).
        cu_seqlens: int32 (num_seqs + 1,), from 0, non-decreasing, ending at total_tokens.
        max_seqlen: an upper bound of the longest sequence (sizes the launch grid).
        softmax_scale: default 1 / sqrt(head_dim).
        check_inputs: also check the values of cu_seqlens and max_seqlen, which costs a host sync
            (and a graph break under torch.compile). With False the caller promises them; shapes,
            dtypes and devices are always checked, and the kernels never read or write outside the
            tensors whatever cu_seqlens holds (see the module docstring).
    Returns (total_tokens, heads, head_dim) in q's dtype.
    """
    _validate(q, k, v, cu_seqlens, max_seqlen, softmax_scale, check_inputs)
    scale = float(softmax_scale) if softmax_scale is not None else q.shape[-1] ** -0.5
    if q.dtype in DTYPES and use_triton(q, k, v, cu_seqlens):
        out, _ = _attn_op(q, k, v, cu_seqlens, int(max_seqlen), scale)
        return out
    return _attention_torch(q, k, v, cu_seqlens, int(max_seqlen), scale)


def _validate(q, k, v, cu_seqlens, max_seqlen, softmax_scale, check_values: bool) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a tensor (total_tokens, heads, head_dim), got {tuple(getattr(t, 'shape', ()))}")
        if t.dtype not in DTYPES + (torch.float64,):
            raise ValueError(f"{name} must be float32, float16 or bfloat16 (float64 runs in PyTorch), got {t.dtype}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k and v must have one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {HEAD_DIMS}, got {q.shape[-1]}")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be a 1-D tensor (num_seqs + 1,), got {tuple(getattr(cu_seqlens, 'shape', ()))}")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device}, but q is on {q.device}")
    if not cu_seqlens.is_contiguous():
        raise ValueError("cu_seqlens must be contiguous")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, (int, torch.SymInt)) or max_seqlen < 0:
        raise ValueError(f"max_seqlen must be a non-negative int, got {max_seqlen!r}")
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and math.isfinite(softmax_scale)):
        raise ValueError(f"softmax_scale must be a finite number, got {softmax_scale!r}")
    if not check_values:
        return
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {bounds[0]}")
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if any(n < 0 for n in lengths):
        raise ValueError("cu_seqlens must be non-decreasing")
    if bounds[-1] != q.shape[0]:
        raise ValueError(f"cu_seqlens must end at total_tokens = {q.shape[0]}, got {bounds[-1]}")
    if lengths and max(lengths) > max_seqlen:
        raise ValueError(f"max_seqlen = {max_seqlen} is shorter than the longest sequence ({max(lengths)})")


# --------------------------------------------------------------------------- shipped configurations
def compile_cases() -> List[CompileCase]:
    """Every kernel at every config it can be autotuned to, for every head dim and dtype."""
    cases = []
    types = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    ints = {name: "i32" for name in ("sq_t", "sq_h", "sk_t", "sk_h", "sv_t", "sv_h", "num_heads", "total",
                                     "seq_bucket")}
    cexpr = {"HEAD_DIM": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}
    for head_dim in HEAD_DIMS:
        for dtype, t in types.items():
            p = f"*{t}"
            qkv = {"q_ptr": p, "k_ptr": p, "v_ptr": p}
            grads = {"do_ptr": p, "lse_ptr": "*fp32", "delta_ptr": "*fp32"}
            signatures = {
                "fwd": {**qkv, "o_ptr": p, "lse_ptr": "*fp32", "cu_ptr": "*i32", **ints, "scale_log2": "fp32", **cexpr},
                "bwd_dkdv": {**qkv, **grads, "dk_ptr": p, "dv_ptr": p, "cu_ptr": "*i32", **ints, "scale": "fp32", **cexpr},
                "bwd_dq": {**qkv, **grads, "dq_ptr": p, "cu_ptr": "*i32", **ints, "scale": "fp32", **cexpr},
            }
            for name, sig in signatures.items():
                for bm, bn, warps, stages in _gpu_candidates(name, dtype, head_dim):
                    cases.append(CompileCase(
                        f"attn_{name}_d{head_dim}_{t}_m{bm}n{bn}w{warps}s{stages}", _KERNELS[name], sig,
                        dict(HEAD_DIM=head_dim, BLOCK_M=bm, BLOCK_N=bn), num_warps=warps, num_stages=stages))
            delta = {"o_ptr": p, "do_ptr": p, "delta_ptr": "*fp32", "rows_total": "i32",
                     "HEAD_DIM": "constexpr", "BLOCK_T": "constexpr"}
            cases.append(CompileCase(f"attn_bwd_delta_d{head_dim}_{t}", _attn_bwd_delta_kernel, delta,
                                     dict(HEAD_DIM=head_dim, BLOCK_T=DELTA_ROWS), num_warps=4))
    return cases
