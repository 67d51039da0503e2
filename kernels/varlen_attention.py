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

Programs of query blocks past a sequence's end return at once; empty sequences launch nothing that
reads or writes. Inputs need only a contiguous last dimension (strided views of a fused QKV
projection work without copies).
"""
from __future__ import annotations

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
def _sequence_bases(cu_ptr, seq, head, q_ptr, k_ptr, v_ptr, sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, num_heads):
    """Where sequence ``seq`` starts, its length, and this head's base pointers into q, k, v.

    The 64-bit bases are scalars per program; tile offsets from them stay 32-bit (sequences are
    short), which saves a register per element. ``row0`` is the offset of the sequence's first
    (token, head) row in the contiguous (total, heads) layouts of out, lse, delta and the gradients.
    """
    start = tl.load(cu_ptr + seq)
    length = tl.load(cu_ptr + seq + 1) - start
    start = start.to(tl.int64)
    row0 = start * num_heads + head
    return (length, row0, q_ptr + start * sq_t + head * sq_h, k_ptr + start * sk_t + head * sk_h,
            v_ptr + start * sv_t + head * sv_h)


@jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, cu_ptr,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h,
    num_heads, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    head = tl.program_id(2)
    length, row0, q_ptr, k_ptr, v_ptr = _sequence_bases(
        cu_ptr, tl.program_id(1), head, q_ptr, k_ptr, v_ptr, sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, num_heads)
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
        s = tl.dot(q, k, input_precision=PRECISION) * scale_log2  # (BLOCK_M, BLOCK_N), log2 units
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l = l * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + key[:, None] * sv_t + dims[None, :], mask=key_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
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
    num_heads, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    head = tl.program_id(2)
    length, row0, q_ptr, k_ptr, v_ptr = _sequence_bases(
        cu_ptr, tl.program_id(1), head, q_ptr, k_ptr, v_ptr, sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, num_heads)
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
        st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * (scale * 1.4426950408889634)
        pt = tl.exp2(st - lse[None, :])
        pt = tl.where(row_ok[None, :] & key_ok[:, None], pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (dO V^T)^T
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
    out = keys[:, None] * (num_heads * HEAD_DIM) + dims[None, :]
    tl.store(dk_ptr + out, (dk * scale).to(dk_ptr.dtype.element_ty), mask=key_ok[:, None])
    tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=key_ok[:, None])


@jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, cu_ptr,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h,
    num_heads, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    head = tl.program_id(2)
    length, row0, q_ptr, k_ptr, v_ptr = _sequence_bases(
        cu_ptr, tl.program_id(1), head, q_ptr, k_ptr, v_ptr, sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, num_heads)
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
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * (scale * 1.4426950408889634)
        p = tl.exp2(s - lse[:, None])
        p = tl.where(row_ok[:, None] & key_ok[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(dq_ptr + rows[:, None] * (num_heads * HEAD_DIM) + dims[None, :],
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=row_ok[:, None])


# --------------------------------------------------------------------------- launch configuration
def _config(head_dim: int, dtype: torch.dtype) -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages), chosen from ptxas reports for sm_90 (no spills).

    16-bit inputs: 64 x 64 blocks over 8 warps cover a ViT-B/32 frame (50-62 tokens) in one step
    (162 / 208 / 139 registers for forward / dK dV / dQ at head dim 64); head dim 128 takes 32 x 32.
    fp32 inputs are the accuracy path (tests, float32 users): IEEE fp32 dots on 16 x 16 blocks.
    Triton's interpreter runs programs one after another and ignores registers, so there every dtype
    takes 64 x 64 blocks (the fewest programs); the block loops are the same code either way.
    """
    if interpreter_enabled():
        return 64, 64, 4, 1
    if dtype == torch.float32:
        return 16, 16, 4, 2
    if head_dim == 128:
        return 32, 32, 4, 2
    return 64, 64, 8, 2


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs get IEEE fp32 dots (tf32 would lose precision against PyTorch's fp32 attention);
    # 16-bit inputs ignore this setting
    return "ieee"


def _strides(t: torch.Tensor) -> Tuple[int, int]:
    return t.stride(0), t.stride(1)


def _launch_forward(q, k, v, cu_seqlens, max_seqlen, scale):
    total, heads, head_dim = q.shape
    out = torch.empty(total, heads, head_dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(total, heads, dtype=torch.float32, device=q.device)
    num_seqs = cu_seqlens.numel() - 1
    if total == 0 or num_seqs == 0 or max_seqlen == 0:
        return out, lse
    block_m, block_n, warps, stages = _config(head_dim, q.dtype)
    grid = (triton.cdiv(max_seqlen, block_m), num_seqs, heads)
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, cu_seqlens, *_strides(q), *_strides(k), *_strides(v),
        heads, scale * LOG2E,
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=_precision(q.dtype),
        num_warps=warps, num_stages=stages,
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
    block_m, block_n, warps, stages = _config(head_dim, q.dtype)
    common = dict(HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=_precision(q.dtype),
                  num_warps=warps, num_stages=stages)
    strides = (*_strides(q), *_strides(k), *_strides(v))
    _attn_bwd_dkdv_kernel[(triton.cdiv(max_seqlen, block_n), num_seqs, heads)](
        q, k, v, do, lse, delta, dk, dv, cu_seqlens, *strides, heads, scale, **common)
    _attn_bwd_dq_kernel[(triton.cdiv(max_seqlen, block_m), num_seqs, heads)](
        q, k, v, do, lse, delta, dq, cu_seqlens, *strides, heads, scale, **common)
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
    probs = scores.softmax(dim=-1).nan_to_num(0.0)  # rows of padded queries are all -inf
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
        check_inputs: also check the values of cu_seqlens and max_seqlen, which costs a host sync.
            With False the caller promises them; shapes, dtypes and devices are always checked.
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
    """Forward and both backward kernels for every head dim and dtype."""
    cases = []
    types = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    strides = {name: "i32" for name in ("sq_t", "sq_h", "sk_t", "sk_h", "sv_t", "sv_h")}
    for head_dim in HEAD_DIMS:
        for dtype, t in types.items():
            block_m, block_n, warps, stages = _config(head_dim, dtype)
            consts = dict(HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
                          PRECISION=_precision(dtype))
            cexpr = {name: "constexpr" for name in consts}
            p = f"*{t}"
            fwd = {"q_ptr": p, "k_ptr": p, "v_ptr": p, "o_ptr": p, "lse_ptr": "*fp32", "cu_ptr": "*i32",
                   **strides, "num_heads": "i32", "scale_log2": "fp32", **cexpr}
            dkdv = {"q_ptr": p, "k_ptr": p, "v_ptr": p, "do_ptr": p, "lse_ptr": "*fp32", "delta_ptr": "*fp32",
                    "dk_ptr": p, "dv_ptr": p, "cu_ptr": "*i32", **strides, "num_heads": "i32", "scale": "fp32", **cexpr}
            dq = {"q_ptr": p, "k_ptr": p, "v_ptr": p, "do_ptr": p, "lse_ptr": "*fp32", "delta_ptr": "*fp32",
                  "dq_ptr": p, "cu_ptr": "*i32", **strides, "num_heads": "i32", "scale": "fp32", **cexpr}
            for name, kernel, sig in (("fwd", _attn_fwd_kernel, fwd), ("bwd_dkdv", _attn_bwd_dkdv_kernel, dkdv),
                                      ("bwd_dq", _attn_bwd_dq_kernel, dq)):
                cases.append(CompileCase(f"attn_{name}_d{head_dim}_{t}", kernel, sig, consts,
                                         num_warps=warps, num_stages=stages))
            delta = {"o_ptr": p, "do_ptr": p, "delta_ptr": "*fp32", "rows_total": "i32",
                     "HEAD_DIM": "constexpr", "BLOCK_T": "constexpr"}
            cases.append(CompileCase(f"attn_bwd_delta_d{head_dim}_{t}", _attn_bwd_delta_kernel, delta,
                                     dict(HEAD_DIM=head_dim, BLOCK_T=DELTA_ROWS), num_warps=4))
    return cases
