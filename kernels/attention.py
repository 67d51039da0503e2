"""Packed ragged ("varlen") attention, forward and backward, FlashAttention-2 style.

``q, k, v`` hold the tokens of many sequences back to back, ``(total_tokens, heads, head_dim)``;
sequence s owns rows ``cu_seqlens[s] : cu_seqlens[s+1]``. Attention is bidirectional (a ViT) and never
crosses sequences:  ``out_i = sum_j softmax_j(scale * q_i . k_j) v_j`` over j of i's own sequence.
:func:`varlen_attention_qkvpacked` takes the fused projection output ``(total_tokens, 3, heads,
head_dim)`` instead and returns its gradient in one buffer of that shape.

Forward kernel: one program per (query block of BLOCK_M rows, sequence, head). It walks the key blocks
of its own sequence with the online softmax (running max m and sum l, in base 2 so ``exp2`` does the
work), accumulating ``P V`` in fp32; no L x L matrix ever reaches memory. It stores the output and,
per row, the final m (log2 units) and l: the softmax statistics, fp32, ``(2, heads, total_tokens)``
(``return_lse`` turns them into flash-attention's natural-log ``softmax_lse``).

Backward, for sequences that fit one block (up to 64 tokens in 16-bit: every ViT-B/32 frame, 50-62
tokens): one program per (sequence, head) reads q, k, v and dO once and writes dq, dk, dv once (the
single-pass kernel). It recomputes the scores, normalises ``P = softmax`` from them, and forms
``dV = P^T dO``, ``dP = dO V^T``, ``delta_i = sum_j P_ij dP_ij``, ``dS = P * (dP - delta)``,
``dQ = scale dS K`` and ``dK = scale dS^T Q`` in registers. Longer sequences take FlashAttention-2's
route, no atomics: ``delta_i = <dO_i, O_i>`` (a small row-reduction kernel), then one kernel per (key
block, sequence, head) accumulating dK, dV over the query blocks and one per (query block, sequence,
head) accumulating dQ over the key blocks, both recomputing ``P = exp2(s - m) / l`` block by block
from the forward's statistics. In a batch mixing both, each sequence goes to exactly one route.

Backward, sequences of a few blocks (the kernel variant ``attn_bwd_short``, off by default until a GPU
measures it; ``short_backward=True`` or ``STOP_FAST_KERNEL_VARIANTS=attn_bwd_short``). ViT-B/16 frames
(197-209 tokens) are four 64-token blocks: the blockwise route spends three launches (delta, dK dV,
dQ) and recomputes the scores and dP in both of the latter (7 block products per pair of blocks
instead of 5); on the H100 it took 1.27 ms per layer against cuDNN's dense flash backward's 0.73 ms.
The variant gives each (sequence, head) of more than one block and at most SEQ tokens one program
(``_attn_bwd_short_kernel``; SEQ is max_seqlen rounded up to a power of two, at most 256 in 16 bits up
to head dim 64, 128 at head dim 128; fp32: 256 / 128 / 64 at head dims 16 / 32 / 64, none at 128).
All of the sequence's queries form one SEQ-row tile: the prologue loads Q and dO once, the forward's
statistics m, l and delta = <dO, O> for every row (the delta kernel's work, no launch of its own);
then the keys stream through in blocks of BLOCK_N, and per key block, with queries along rows so
that the large products have M = SEQ: S = Q K_j^T, P = exp2(S - m) / l, dV_j = P^T dO,
dP = dO V_j^T, dS = P (dP - delta), dK_j = dS^T Q (dK_j, dV_j complete: written once), and
dQ += dS K_j into a SEQ x head_dim fp32 accumulator that stays in registers for the whole program
and is written once at the end. No atomics and no scratch: the program owns every dQ row of its
(sequence, head). (Atomics would need an fp32 dQ buffer for the whole batch, ~240 MB per ViT-B/16
layer to zero, add into and convert: as much traffic as the kernel's own. Keeping the queries rather
than the keys resident needs one accumulator, dQ, where keys would need two, dK and dV.) The price
is parallelism: 4,608 programs per ViT-B/16 layer (384 frames x 12 heads) against 18,432 for each of
the blockwise pair at 64-token blocks, and one program per SM (106-254 registers, 131-164 KB
of shared memory at head dim 64, SEQ 256), which is why it waits behind a switch: the autotuner picks
BLOCK_N, warps and stages from two or three candidates per shape, every one compiled for sm_90
without spills. P from the forward's statistics and delta from the stored output, as on the
blockwise route: FlashAttention-2's recomputation, which is accurate for sequences longer than one
block (see below); the tests hold its gradients to flash-attention's epsilon at ViT-B/16 lengths.

Accuracy of the backward over short sequences (why the single-pass kernel normalises P itself and
takes delta from P). FlashAttention-2's recomputation, ``P = exp2(s - lse)`` with the forward's
logsumexp and ``delta = <dO, O>`` with the forward's output, is exact in exact arithmetic only: in
floating point the backward's scores are not bit for bit the forward's (another summation order of
``q . k``, another rounding of the scale, an fp32 ``lse = m + log2 l`` rounded at the magnitude of m),
so the recomputed rows of P sum to 1 only within a few ulps, and ``<dO, O>`` is not ``sum_j P_ij dP_ij``
of that P. The rows of dS then do not sum to zero; the leftover ``err * P_ij`` adds
``scale * err * sum_j P_ij k_j`` to dQ (likewise dK) and the normalisation error goes straight into
dV. Over long sequences these errors average out (the weighted mean of k is small); over 1-3 tokens
they are as large as the terms themselves: in fp32 with flash-attention's own test epsilon, dQ and dK
missed the 2x rule by up to 4.6x at lengths 1-3 and 2.2x at 4-8 (measured with the interpreter). The
single-pass kernel computes P as a softmax of the scores it holds and delta from that P and dP, as
PyTorch's softmax backward does: every row of P sums to 1 and every row of dS to 0 up to one
rounding, and the errors match PyTorch's (at most 0.9x of flash-attention's allowance on the same
draws). ``tests/test_varlen_attention.py`` ports flash-attention's varlen lengths, empty sequences
included, and checks both routes against float64 in fp32, fp16 and bf16.

Block sizes: each kernel is autotuned over a small set of (BLOCK_M, BLOCK_N, warps, stages) per dtype
and head dim (``_gpu_candidates``), keyed on max_seqlen rounded up to a power of two; the single-pass
kernel's block is max_seqlen rounded up, its warps are tuned; the short multi-block kernel's
(BLOCK_N, warps, stages) are tuned per query tile (``_SHORT_CANDIDATES``). Every candidate compiles
for sm_90 without spills (``compile_cases`` lists them all for CI). On sm_80 (mma.sync: operands and
accumulators all in registers) 16 of the short kernel's 34 16-bit candidates (head dims 32-128) spill
36-3,008 bytes: it is tuned for sm_90 only, so measure it before switching it on on an A100. Under
Triton's interpreter, which runs programs one after another and ignores registers, each set
collapses to one config. The interpreter gets bfloat16 wrong (garbage ``tl.dot``, truncating
downcasts); the kernels' ``INTERPRETER`` flag routes dots and 16-bit roundings through
``_triton.dot`` / ``_triton.round_to``, which compute there what a GPU computes, and change nothing
in compiled kernels.

Robustness: programs of query blocks past a sequence's end return at once, and empty sequences read
and write nothing. Each program clamps its sequence's bounds into ``[0, total_tokens]``, so even
``cu_seqlens`` that were not checked (``check_inputs=False``) never send a kernel outside the tensors
(a bound past the end is read as total_tokens). A ``max_seqlen`` below the longest sequence (likewise
refused only when checked) leaves that sequence's later output rows, and its gradients, unwritten.
Inputs need only a contiguous last dimension (strided views of a fused QKV projection work without
copies); outputs and gradients are contiguous.
"""
from __future__ import annotations

import functools
import math
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from ._triton import dot, jit, round_to, tl, triton
from .aot import CompileCase, pointers
from .dispatch import interpreter_enabled, use_triton, variant_enabled

HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
DELTA_ROWS = 64  # tokens per program of the backward's delta pass (one head each)
DELTA_WARPS, DELTA_STAGES = 4, 1


@jit
def _sequence(cu_ptr, seq, total):
    """Length and first row of sequence ``seq``. The bounds are clamped into [0, total] so that
    unchecked cu_seqlens cannot send a program outside the tensors. The start is 64-bit (bases of
    large tensors); tile offsets from the per-program bases stay 32-bit, a register per element less."""
    start = tl.minimum(tl.maximum(tl.load(cu_ptr + seq), 0), total)
    end = tl.minimum(tl.maximum(tl.load(cu_ptr + seq + 1), start), total)
    return end - start, start.to(tl.int64)


# Arguments shared by the attention kernels: q, k, v are (total, heads, HEAD_DIM) with token strides
# s*_t and head strides s*_h; out and dO are contiguous (total, heads, HEAD_DIM); stats is (2, heads,
# total) fp32 (row max m in log2 units, row sum l), delta (heads, total); the gradients share one
# token stride sg_t and have head stride HEAD_DIM (separate contiguous tensors, or the three slices
# of one (total, 3, heads, HEAD_DIM) buffer). ``total`` bounds the clamping; ``seq_bucket``
# (max_seqlen rounded up to a power of two) is read only by the autotuner, as its key.
@jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, stats_ptr, cu_ptr,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h,
    num_heads, total, seq_bucket, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRETER: tl.constexpr,
):
    pid_m = tl.program_id(0)
    head = tl.program_id(2)
    length, start = _sequence(cu_ptr, tl.program_id(1), total)
    if pid_m * BLOCK_M >= length:
        return
    q_ptr += start * sq_t + head * sq_h
    k_ptr += start * sk_t + head * sk_h
    v_ptr += start * sv_t + head * sv_h
    o_ptr += (start * num_heads + head) * HEAD_DIM
    m_ptr = stats_ptr + head * total + start
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
        s = dot(q, k, INTERPRETER) * scale_log2  # (BLOCK_M, BLOCK_N), log2 units
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: every block holds at least one real key
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l = l * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + key[:, None] * sv_t + dims[None, :], mask=key_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + dot(round_to(p, v.dtype, INTERPRETER), v, INTERPRETER)
        m = m_new
    out = acc / l[:, None]
    tl.store(o_ptr + rows[:, None] * (num_heads * HEAD_DIM) + dims[None, :], round_to(out, o_ptr.dtype.element_ty, INTERPRETER),
             mask=row_ok[:, None])
    # m and l, not m + log2(l): see "Accuracy in fp32" in the module docstring
    tl.store(m_ptr + rows, m, mask=row_ok)
    tl.store(m_ptr + num_heads * total + rows, l, mask=row_ok)


@jit
def _attn_bwd_fused_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, dq_ptr, dk_ptr, dv_ptr, cu_ptr,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sg_t,
    num_heads, total, seq_bucket, scale, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, INTERPRETER: tl.constexpr,
):
    """The whole backward of one (sequence, head) whose sequence fits one BLOCK: one read of q, k, v,
    dO, one write of dq, dk, dv. Longer sequences are left to the blockwise kernels."""
    head = tl.program_id(1)
    length, start = _sequence(cu_ptr, tl.program_id(0), total)
    if (length == 0) | (length > BLOCK):
        return
    q_ptr += start * sq_t + head * sq_h
    k_ptr += start * sk_t + head * sk_h
    v_ptr += start * sv_t + head * sv_h
    do_ptr += (start * num_heads + head) * HEAD_DIM
    g_off = start * sg_t + head * HEAD_DIM
    rows = tl.arange(0, BLOCK)
    dims = tl.arange(0, HEAD_DIM)
    ok = rows < length
    q = tl.load(q_ptr + rows[:, None] * sq_t + dims[None, :], mask=ok[:, None], other=0.0)
    k = tl.load(k_ptr + rows[:, None] * sk_t + dims[None, :], mask=ok[:, None], other=0.0)
    v = tl.load(v_ptr + rows[:, None] * sv_t + dims[None, :], mask=ok[:, None], other=0.0)
    do = tl.load(do_ptr + rows[:, None] * (num_heads * HEAD_DIM) + dims[None, :], mask=ok[:, None], other=0.0)
    # P^T, keys along rows (dV and dK are then plain dots, only dQ needs a transpose), normalised
    # from these very scores: the forward's statistics belong to its own rounding of q k^T
    st = dot(k, tl.trans(q), INTERPRETER) * scale_log2
    st = tl.where(ok[:, None], st, float("-inf"))
    pt = tl.exp2(st - tl.max(st, axis=0)[None, :])
    pt = pt / tl.sum(pt, axis=0)[None, :]
    pt = tl.where(ok[None, :], pt, 0.0)
    dv = dot(round_to(pt, do.dtype, INTERPRETER), do, INTERPRETER)
    dpt = dot(v, tl.trans(do), INTERPRETER)
    delta = tl.sum(pt * dpt, axis=0)  # sum_j P_ij dP_ij over the P this program uses
    dst = pt * (dpt - delta[None, :])
    dk = dot(round_to(dst, q.dtype, INTERPRETER), q, INTERPRETER)
    dq = dot(tl.trans(round_to(dst, k.dtype, INTERPRETER)), k, INTERPRETER)
    g_tile = rows[:, None] * sg_t + dims[None, :]
    tl.store(dq_ptr + g_off + g_tile, round_to(dq * scale, dq_ptr.dtype.element_ty, INTERPRETER), mask=ok[:, None])
    tl.store(dk_ptr + g_off + g_tile, round_to(dk * scale, dk_ptr.dtype.element_ty, INTERPRETER), mask=ok[:, None])
    tl.store(dv_ptr + g_off + g_tile, round_to(dv, dv_ptr.dtype.element_ty, INTERPRETER), mask=ok[:, None])


@jit
def _attn_bwd_delta_kernel(o_ptr, do_ptr, delta_ptr, num_heads, total,
                           HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr):
    """delta[head, token] = <dO[token, head], O[token, head]> in fp32, for BLOCK_T tokens of one head:
    rows of HEAD_DIM contiguous values in, one contiguous run of delta out."""
    head = tl.program_id(1)
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    dims = tl.arange(0, HEAD_DIM)
    ok = tokens < total
    offs = (tokens.to(tl.int64) * num_heads + head)[:, None] * HEAD_DIM + dims[None, :]
    o = tl.load(o_ptr + offs, mask=ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(do_ptr + offs, mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(delta_ptr + head * total + tokens, tl.sum(o * do, axis=1), mask=ok)


@jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, stats_ptr, delta_ptr, dk_ptr, dv_ptr, cu_ptr,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sg_t,
    num_heads, total, seq_bucket, short, scale, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRETER: tl.constexpr,
):
    pid_n = tl.program_id(0)
    head = tl.program_id(2)
    length, start = _sequence(cu_ptr, tl.program_id(1), total)
    # sequences of up to ``short`` tokens are the single-pass kernel's
    if (pid_n * BLOCK_N >= length) | (length <= short):
        return
    q_ptr += start * sq_t + head * sq_h
    k_ptr += start * sk_t + head * sk_h
    v_ptr += start * sv_t + head * sv_h
    do_ptr += (start * num_heads + head) * HEAD_DIM
    m_ptr = stats_ptr + head * total + start
    l_ptr = m_ptr + num_heads * total
    delta_ptr += head * total + start
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
        m = tl.load(m_ptr + rows, mask=row_ok, other=0.0)
        inv_l = 1.0 / tl.load(l_ptr + rows, mask=row_ok, other=1.0)
        delta = tl.load(delta_ptr + rows, mask=row_ok, other=0.0)
        # P^T (BLOCK_N, BLOCK_M): keys along rows so both accumulations are plain dots
        pt = tl.exp2(dot(k, tl.trans(q), INTERPRETER) * scale_log2 - m[None, :]) * inv_l[None, :]
        pt = tl.where(row_ok[None, :] & key_ok[:, None], pt, 0.0)
        dv += dot(round_to(pt, do.dtype, INTERPRETER), do, INTERPRETER)
        dpt = dot(v, tl.trans(do), INTERPRETER)  # (dO V^T)^T
        dst = pt * (dpt - delta[None, :])
        dk += dot(round_to(dst, q.dtype, INTERPRETER), q, INTERPRETER)
    g_off = start * sg_t + head * HEAD_DIM
    g_tile = keys[:, None] * sg_t + dims[None, :]
    tl.store(dk_ptr + g_off + g_tile, round_to(dk * scale, dk_ptr.dtype.element_ty, INTERPRETER), mask=key_ok[:, None])
    tl.store(dv_ptr + g_off + g_tile, round_to(dv, dv_ptr.dtype.element_ty, INTERPRETER), mask=key_ok[:, None])


@jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, stats_ptr, delta_ptr, dq_ptr, cu_ptr,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sg_t,
    num_heads, total, seq_bucket, short, scale, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRETER: tl.constexpr,
):
    pid_m = tl.program_id(0)
    head = tl.program_id(2)
    length, start = _sequence(cu_ptr, tl.program_id(1), total)
    if (pid_m * BLOCK_M >= length) | (length <= short):
        return
    q_ptr += start * sq_t + head * sq_h
    k_ptr += start * sk_t + head * sk_h
    v_ptr += start * sv_t + head * sv_h
    do_ptr += (start * num_heads + head) * HEAD_DIM
    m_ptr = stats_ptr + head * total + start
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < length
    q = tl.load(q_ptr + rows[:, None] * sq_t + dims[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(do_ptr + rows[:, None] * (num_heads * HEAD_DIM) + dims[None, :], mask=row_ok[:, None], other=0.0)
    m = tl.load(m_ptr + rows, mask=row_ok, other=0.0)
    inv_l = 1.0 / tl.load(m_ptr + num_heads * total + rows, mask=row_ok, other=1.0)
    delta = tl.load(delta_ptr + head * total + start + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for n0 in range(0, length, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        key_ok = keys < length
        k = tl.load(k_ptr + keys[:, None] * sk_t + dims[None, :], mask=key_ok[:, None], other=0.0)
        v = tl.load(v_ptr + keys[:, None] * sv_t + dims[None, :], mask=key_ok[:, None], other=0.0)
        p = tl.exp2(dot(q, tl.trans(k), INTERPRETER) * scale_log2 - m[:, None]) * inv_l[:, None]
        p = tl.where(row_ok[:, None] & key_ok[None, :], p, 0.0)
        dp = dot(do, tl.trans(v), INTERPRETER)
        ds = p * (dp - delta[:, None])
        dq += dot(round_to(ds, k.dtype, INTERPRETER), k, INTERPRETER)
    dq_ptr += start * sg_t + head * HEAD_DIM
    tl.store(dq_ptr + rows[:, None] * sg_t + dims[None, :], round_to(dq * scale, dq_ptr.dtype.element_ty, INTERPRETER), mask=row_ok[:, None])


@jit
def _attn_bwd_short_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, stats_ptr, dq_ptr, dk_ptr, dv_ptr, cu_ptr,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sg_t,
    num_heads, total, seq_bucket, lo, scale, scale_log2,
    HEAD_DIM: tl.constexpr, SEQ: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRETER: tl.constexpr,
):
    """The whole backward of one (sequence, head) whose sequence has more than ``lo`` tokens (the
    single-pass kernel's) and at most SEQ: all its queries form one SEQ-row tile, its keys stream
    through in blocks of BLOCK_N, and dQ accumulates in registers (kernel variant "attn_bwd_short")."""
    head = tl.program_id(1)
    length, start = _sequence(cu_ptr, tl.program_id(0), total)
    if (length <= lo) | (length > SEQ):
        return
    q_ptr += start * sq_t + head * sq_h
    k_ptr += start * sk_t + head * sk_h
    v_ptr += start * sv_t + head * sv_h
    o_off = (start * num_heads + head) * HEAD_DIM  # out and dO: contiguous (total, heads, HEAD_DIM)
    o_ptr += o_off
    do_ptr += o_off
    m_ptr = stats_ptr + head * total + start
    rows = tl.arange(0, SEQ)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < length
    o_tile = rows[:, None] * (num_heads * HEAD_DIM) + dims[None, :]
    # delta_i = <dO_i, O_i> (FlashAttention-2's; the blockwise route's delta kernel, here in the prologue)
    o = tl.load(o_ptr + o_tile, mask=row_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(do_ptr + o_tile, mask=row_ok[:, None], other=0.0)
    delta = tl.sum(o * do.to(tl.float32), axis=1)
    m = tl.load(m_ptr + rows, mask=row_ok, other=0.0)
    inv_l = 1.0 / tl.load(m_ptr + num_heads * total + rows, mask=row_ok, other=1.0)
    q = tl.load(q_ptr + rows[:, None] * sq_t + dims[None, :], mask=row_ok[:, None], other=0.0)
    dq = tl.zeros([SEQ, HEAD_DIM], dtype=tl.float32)
    g_off = start * sg_t + head * HEAD_DIM
    for n0 in range(0, length, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        key_ok = keys < length
        k = tl.load(k_ptr + keys[:, None] * sk_t + dims[None, :], mask=key_ok[:, None], other=0.0)
        v = tl.load(v_ptr + keys[:, None] * sv_t + dims[None, :], mask=key_ok[:, None], other=0.0)
        # P (SEQ, BLOCK_N), queries along rows: S, dP and dQ, the products with M = SEQ, are the large
        # ones (with keys along rows, as in the dK dV kernel, no 256-query tile at head dim 16 compiled
        # for sm_90 without spills)
        p = tl.exp2(dot(q, tl.trans(k), INTERPRETER) * scale_log2 - m[:, None]) * inv_l[:, None]
        p = tl.where(row_ok[:, None] & key_ok[None, :], p, 0.0)
        dv = dot(tl.trans(round_to(p, do.dtype, INTERPRETER)), do, INTERPRETER)
        dp = dot(do, tl.trans(v), INTERPRETER)
        ds = p * (dp - delta[:, None])
        dk = dot(tl.trans(round_to(ds, q.dtype, INTERPRETER)), q, INTERPRETER)
        dq += dot(round_to(ds, k.dtype, INTERPRETER), k, INTERPRETER)
        g_tile = keys[:, None] * sg_t + dims[None, :]
        tl.store(dk_ptr + g_off + g_tile, round_to(dk * scale, dk_ptr.dtype.element_ty, INTERPRETER), mask=key_ok[:, None])
        tl.store(dv_ptr + g_off + g_tile, round_to(dv, dv_ptr.dtype.element_ty, INTERPRETER), mask=key_ok[:, None])
    tl.store(dq_ptr + g_off + rows[:, None] * sg_t + dims[None, :], round_to(dq * scale, dq_ptr.dtype.element_ty, INTERPRETER),
             mask=row_ok[:, None])


_KERNELS = {"fwd": _attn_fwd_kernel, "bwd_fused": _attn_bwd_fused_kernel,
            "bwd_dkdv": _attn_bwd_dkdv_kernel, "bwd_dq": _attn_bwd_dq_kernel, "bwd_short": _attn_bwd_short_kernel}


# --------------------------------------------------------------------------- launch configuration
# (BLOCK_M, BLOCK_N, num_warps, num_stages) the autotuner picks from, by kernel, input dtype and head dim.
# Chosen from ptxas reports: every entry compiles for sm_90 without spills (CI checks it). 16-bit
# inputs: 64 x 64 tiles cover a ViT-B/32 frame (50-62 tokens) in one step; 32-row tiles give twice
# the programs; 128-row tiles halve the K/V reloads for ViT-L/14 frames (~260 tokens); head dim 128
# needs smaller tiles to stay in registers. fp32 inputs are the accuracy path (tests, float32 users):
# IEEE fp32 dots on CUDA cores, small tiles.
_CANDIDATES_16BIT = {
    # (kernel, head_dim <= 64) -> configs
    ("fwd", True): [(64, 64, 4, 2), (64, 64, 8, 2), (32, 64, 4, 2), (128, 64, 8, 2)],
    ("fwd", False): [(32, 32, 4, 2), (64, 32, 4, 2), (64, 64, 8, 2), (128, 32, 8, 2)],
    ("bwd_dkdv", True): [(64, 64, 8, 2), (32, 64, 8, 2), (64, 32, 8, 2), (32, 32, 4, 2)],
    ("bwd_dkdv", False): [(32, 32, 4, 2), (32, 64, 8, 2), (64, 32, 8, 2), (64, 32, 4, 2)],
    ("bwd_dq", True): [(64, 64, 8, 2), (32, 64, 8, 2), (64, 32, 8, 2), (128, 64, 8, 2)],
    ("bwd_dq", False): [(32, 32, 4, 2), (32, 64, 8, 2), (64, 32, 8, 2), (64, 64, 8, 2)],
}
_INTERPRETER_CONFIG = (64, 64, 4, 1)

# The single-pass backward: the longest sequence it takes, by (16-bit, head_dim), and the (warps,
# stages) it is tuned over at each block size (the block is max_seqlen rounded up to 16, 32 or 64).
# From ptxas (sm_90, the launch's specialisation): 16-bit at 64 rows and head dim 64 needs 150
# registers over 4 warps (three CTAs per SM) and 126 over 8; at head dim 128, 4 warps spill and 8
# take 142. fp32 (IEEE dots on CUDA cores) holds 32 rows up to head dim 64 (8 warps; 64 rows would
# need 255+ registers) and 16 rows at head dim 128.
_FUSED_LIMIT = {(True, 16): 64, (True, 32): 64, (True, 64): 64, (True, 128): 64,
                (False, 16): 32, (False, 32): 32, (False, 64): 32, (False, 128): 16}


# The short multi-block backward (kernel variant "attn_bwd_short"): (16-bit, head_dim, SEQ) -> the
# (BLOCK_N, num_warps, num_stages) it is autotuned over, SEQ being the query tile (max_seqlen rounded up
# to a power of two, from twice the single-pass limit up to the largest SEQ listed). From ptxas, sm_90,
# the launch's specialisation: every entry compiles without spills, registers in the comments. The
# fp32 dots (IEEE, CUDA cores) hold 64 rows at head dim 64; at head dim 128 no fp32 tile above the
# single pass's 16 rows fits without spilling, so fp32 at head dim 128 keeps the blockwise kernels.
# Head dim 128 in 16 bits stops at 128 rows: 256 would need 278+ KB of shared memory.
_SHORT_CANDIDATES = {
    (True, 16, 128): [(16, 4, 2), (32, 8, 2)],
    (True, 16, 256): [(16, 8, 2), (32, 8, 2), (64, 8, 2)],
    (True, 32, 128): [(16, 4, 2), (32, 8, 2)],
    (True, 32, 256): [(16, 8, 2), (32, 8, 2), (64, 8, 2)],
    (True, 64, 128): [(32, 8, 2), (64, 8, 2)],
    (True, 64, 256): [(16, 8, 2), (32, 16, 2), (64, 8, 2)],
    (True, 128, 128): [(16, 8, 2), (32, 8, 2)],
    (False, 16, 64): [(16, 4, 1)],
    (False, 16, 128): [(16, 8, 1)],
    (False, 16, 256): [(16, 8, 1)],
    (False, 32, 64): [(16, 4, 1)],
    (False, 32, 128): [(16, 8, 1), (16, 16, 1)],
    (False, 64, 64): [(16, 8, 1)],
}


def _short_limit(dtype: torch.dtype, head_dim: int) -> int:
    """The longest sequence the short multi-block backward takes (0: it takes none)."""
    return max((seq for sixteen, d, seq in _SHORT_CANDIDATES if sixteen == (dtype != torch.float32) and d == head_dim),
               default=0)


def _short_seqs(dtype: torch.dtype, head_dim: int) -> List[int]:
    sixteen = dtype != torch.float32
    return sorted(seq for s16, d, seq in _SHORT_CANDIDATES if s16 == sixteen and d == head_dim)


def _short_seq(dtype: torch.dtype, head_dim: int, max_seqlen: int) -> int:
    """The query tile of a launch: max_seqlen rounded up to a power of two, at most the limit."""
    return min(_short_limit(dtype, head_dim), triton.next_power_of_2(max(int(max_seqlen), 1)))


def _gpu_short_candidates(dtype: torch.dtype, head_dim: int, seq: int) -> List[Tuple[int, int, int]]:
    return list(_SHORT_CANDIDATES[(dtype != torch.float32, head_dim, seq)])


def _gpu_candidates(kernel: str, dtype: torch.dtype, head_dim: int) -> List[Tuple[int, int, int, int]]:
    """The configs ``kernel`` ("fwd", "bwd_dkdv", "bwd_dq") is autotuned over on a GPU."""
    if dtype == torch.float32:
        # 32 x 32 tiles: head dim 128 needs 8 warps to hold the fp32 operands. The pipelining depth that
        # leaves dQ without spills depends on the head dim (ptxas: 8 bytes at head dim 32 with two
        # stages, 36 bytes at 128 with one)
        if head_dim <= 64:
            return [(16, 16, 4, 1), (32, 32, 4, 1)]
        return [(16, 16, 4, 2), (32, 32, 8, 2)]
    return list(_CANDIDATES_16BIT[(kernel, head_dim <= 64)])


def _fused_limit(dtype: torch.dtype, head_dim: int) -> int:
    """Sequences up to this many tokens take the single-pass backward."""
    return _FUSED_LIMIT[(dtype != torch.float32, head_dim)]


def _fused_blocks(dtype: torch.dtype, head_dim: int) -> List[int]:
    limit = _fused_limit(dtype, head_dim)
    return [b for b in (16, 32, 64, 128) if b <= limit]


def _fused_block(dtype: torch.dtype, head_dim: int, max_seqlen: int) -> int:
    return min(_fused_limit(dtype, head_dim), max(16, triton.next_power_of_2(max(int(max_seqlen), 1))))


def _gpu_fused_candidates(dtype: torch.dtype, head_dim: int, block: int) -> List[Tuple[int, int]]:
    """(num_warps, num_stages) the single-pass kernel is tuned over (no loop: one stage)."""
    if dtype == torch.float32:
        return [(4, 1)] if block <= 16 else [(8, 1)]
    if block < 64:
        return [(4, 1)]
    return [(8, 1)] if head_dim > 64 else [(4, 1), (8, 1)]


@functools.lru_cache(maxsize=None)
def _tuned(kernel: str, dtype: torch.dtype, head_dim: int, block: int = 0):
    """``kernel`` wrapped in triton.autotune over its candidates (one config: no benchmarking)."""
    if kernel == "bwd_fused":
        candidates = [(4, 1)] if interpreter_enabled() else _gpu_fused_candidates(dtype, head_dim, block)
        configs = [triton.Config({}, num_warps=w, num_stages=s) for w, s in candidates]
    elif kernel == "bwd_short":  # block: the query tile SEQ; the interpreter takes the first candidate
        candidates = _gpu_short_candidates(dtype, head_dim, block)[: 1 if interpreter_enabled() else None]
        configs = [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s) for bn, w, s in candidates]
    else:
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
    stats = torch.empty(2, heads, total, dtype=torch.float32, device=q.device)
    num_seqs = cu_seqlens.numel() - 1
    if total == 0 or num_seqs == 0 or max_seqlen == 0:
        return out, stats
    grid = lambda meta: (triton.cdiv(max_seqlen, meta["BLOCK_M"]), num_seqs, heads)  # noqa: E731
    _tuned("fwd", q.dtype, head_dim)[grid](
        q, k, v, out, stats, cu_seqlens, *_strides(q), *_strides(k), *_strides(v),
        heads, total, _seq_bucket(max_seqlen), scale * LOG2E, HEAD_DIM=head_dim, INTERPRETER=interpreter_enabled(),
    )
    return out, stats


def _launch_backward(do, q, k, v, out, stats, cu_seqlens, max_seqlen, scale, dq, dk, dv, short_variant=False) -> None:
    """Write the gradients into dq, dk, dv: (total, heads, head_dim) with one token stride and head
    stride head_dim (three tensors, or the slices of one (total, 3, heads, head_dim) buffer).
    ``short_variant``: sequences between one block and the short kernel's limit take
    ``_attn_bwd_short_kernel`` (kernel variant "attn_bwd_short"); only longer ones the blockwise kernels."""
    total, heads, head_dim = q.shape
    num_seqs = cu_seqlens.numel() - 1
    if total == 0 or num_seqs == 0 or max_seqlen == 0:
        return
    do = do.contiguous()
    interpreted = interpreter_enabled()
    common = (cu_seqlens, *_strides(q), *_strides(k), *_strides(v), dq.stride(0), heads, total, _seq_bucket(max_seqlen))
    short = _fused_limit(q.dtype, head_dim)
    block = _fused_block(q.dtype, head_dim, max_seqlen)
    _tuned("bwd_fused", q.dtype, head_dim, block)[(num_seqs, heads)](
        q, k, v, do, dq, dk, dv, *common, scale, scale * LOG2E, HEAD_DIM=head_dim, BLOCK=block, INTERPRETER=interpreted)
    if max_seqlen <= short:
        return
    if short_variant and _short_limit(q.dtype, head_dim) > short:
        seq = _short_seq(q.dtype, head_dim, max_seqlen)
        _tuned("bwd_short", q.dtype, head_dim, seq)[(num_seqs, heads)](
            q, k, v, out, do, stats, dq, dk, dv, *common, short, scale, scale * LOG2E,
            HEAD_DIM=head_dim, SEQ=seq, INTERPRETER=interpreted)
        short = seq  # the blockwise kernels take only what is longer still
        if max_seqlen <= short:
            return
    # sequences longer than one block: FlashAttention-2's two kernels, which skip the short ones
    delta = torch.empty(heads, total, dtype=torch.float32, device=q.device)
    _attn_bwd_delta_kernel[(triton.cdiv(total, DELTA_ROWS), heads)](
        out, do, delta, heads, total, HEAD_DIM=head_dim, BLOCK_T=DELTA_ROWS,
        num_warps=DELTA_WARPS, num_stages=DELTA_STAGES)
    grid_n = lambda meta: (triton.cdiv(max_seqlen, meta["BLOCK_N"]), num_seqs, heads)  # noqa: E731
    _tuned("bwd_dkdv", q.dtype, head_dim)[grid_n](
        q, k, v, do, stats, delta, dk, dv, *common, short, scale, scale * LOG2E, HEAD_DIM=head_dim, INTERPRETER=interpreted)
    grid_m = lambda meta: (triton.cdiv(max_seqlen, meta["BLOCK_M"]), num_seqs, heads)  # noqa: E731
    _tuned("bwd_dq", q.dtype, head_dim)[grid_m](
        q, k, v, do, stats, delta, dq, *common, short, scale, scale * LOG2E, HEAD_DIM=head_dim, INTERPRETER=interpreted)


def _lse_from_stats(stats: torch.Tensor) -> torch.Tensor:
    """flash-attention's softmax_lse from the kernels' (m, l): natural-log logsumexp of the scaled
    scores, (heads, total_tokens) fp32."""
    return (stats[0] + torch.log2(stats[1])) * LN2


# --------------------------------------------------------------------------- PyTorch semantics
def _token_positions(cu_seqlens: torch.Tensor, total: int) -> Tuple[torch.Tensor, torch.Tensor]:
    token = torch.arange(total, device=cu_seqlens.device)
    seq = torch.searchsorted(cu_seqlens[1:].long(), token, right=True)
    return seq, token - cu_seqlens.long()[seq]


def _attention_torch(q, k, v, cu_seqlens, max_seqlen: int, scale: float, need_lse: bool = True
                     ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Loop-free PyTorch: scatter the tokens into a padded (S, Lmax) layout, masked softmax, gather back.
    Differentiable by autograd and exact in float64; what runs where Triton cannot. Computes in
    ``promote_types(dtype, float32)`` whatever autocast says, as the kernels do. Returns the output
    in q's dtype and the (detached) logsumexp, (heads, total_tokens), or None without ``need_lse``:
    then the padded attention is PyTorch's fused SDPA (on a CPU much faster, forward and backward, than
    the explicit softmax, which is kept for the logsumexp)."""
    total, heads, head_dim = q.shape
    num_seqs = cu_seqlens.numel() - 1
    seq, pos = _token_positions(cu_seqlens, total)
    # a position past max_seqlen (a broken check_inputs=False promise) is kept inside its sequence
    pos = pos.clamp(max=max(max_seqlen - 1, 0))
    # each token's row in the padded (S * Lmax) layout: one index, so the scatter and the gather are
    # index_copy / index_select (their backwards are each other, far cheaper than 2-D index_put's)
    rows = seq * max_seqlen + pos
    acc = torch.promote_types(q.dtype, torch.float32)

    def padded(x):  # (total, H, d) -> (S, Lmax, H, d), zeros past each sequence's end
        buf = x.new_zeros(num_seqs * max_seqlen, heads, head_dim, dtype=acc)
        return buf.index_copy_(0, rows, x.to(acc)).view(num_seqs, max_seqlen, heads, head_dim)

    def unpadded(y):  # (S, Lmax, H, d) -> (total, H, d) in q's dtype
        return y.reshape(num_seqs * max_seqlen, heads, head_dim).index_select(0, rows).to(q.dtype)

    with torch.autocast(q.device.type, enabled=False):
        qp, kp, vp = padded(q), padded(k), padded(v)
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        key_ok = torch.arange(max_seqlen, device=q.device)[None, :] < lengths[:, None]  # (S, L)
        if not need_lse:
            # an empty sequence has no row to read back; unmasking its (zero) keys keeps its softmax
            # finite on every SDPA backend (not all turn a fully masked row into zeros)
            keep = (key_ok | (lengths == 0)[:, None])[:, None, None, :]
            out = F.scaled_dot_product_attention(qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2),
                                                 attn_mask=keep, scale=scale).transpose(1, 2)
            return unpadded(out), None
        scores = torch.einsum("sihd,sjhd->shij", qp, kp) * scale
        scores = scores.masked_fill(~key_ok[:, None, None, :], float("-inf"))
        probs = scores.softmax(dim=-1).nan_to_num(0.0)  # an empty sequence's rows are all -inf: 0, not NaN
        out = torch.einsum("shij,sjhd->sihd", probs, vp)
        lse = scores.detach().logsumexp(dim=-1)  # (S, H, L)
    return unpadded(out), lse[seq, :, pos].t()


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
# ``short_backward`` (kernel variant "attn_bwd_short") changes only the backward's launches; the forward
# op takes it so that autograd hands it on.
@torch.library.custom_op("stop_fast::varlen_attention", mutates_args=())
def _attn_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
             max_seqlen: int, scale: float, short_backward: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    return _launch_forward(q, k, v, cu_seqlens, max_seqlen, scale)


@_attn_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale, short_backward):
    total, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty(2, heads, total, dtype=torch.float32)


@torch.library.custom_op("stop_fast::varlen_attention_backward", mutates_args=())
def _attn_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                      stats: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float,
                      short_backward: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    _launch_backward(do, q, k, v, out, stats, cu_seqlens, max_seqlen, scale, dq, dk, dv, short_backward)
    return dq, dk, dv


@_attn_backward_op.register_fake
def _(do, q, k, v, out, stats, cu_seqlens, max_seqlen, scale, short_backward):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale, short_backward = inputs
    out, stats = output
    ctx.save_for_backward(q, k, v, out, stats, cu_seqlens)
    ctx.max_seqlen, ctx.scale, ctx.short_backward = max_seqlen, scale, short_backward
    ctx.mark_non_differentiable(stats)


def _backward(ctx, dout, _dstats):
    q, k, v, out, stats, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _attn_backward_op(dout, q, k, v, out, stats, cu_seqlens, ctx.max_seqlen, ctx.scale, ctx.short_backward)
    return dq, dk, dv, None, None, None, None


_attn_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("stop_fast::varlen_attention_qkvpacked", mutates_args=())
def _qkvpacked_op(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float, short_backward: bool
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    q, k, v = qkv.unbind(1)  # strided views, no copies
    return _launch_forward(q, k, v, cu_seqlens, max_seqlen, scale)


@_qkvpacked_op.register_fake
def _(qkv, cu_seqlens, max_seqlen, scale, short_backward):
    total, _, heads, head_dim = qkv.shape
    return qkv.new_empty(total, heads, head_dim), qkv.new_empty(2, heads, total, dtype=torch.float32)


@torch.library.custom_op("stop_fast::varlen_attention_qkvpacked_backward", mutates_args=())
def _qkvpacked_backward_op(do: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, stats: torch.Tensor,
                           cu_seqlens: torch.Tensor, max_seqlen: int, scale: float, short_backward: bool) -> torch.Tensor:
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    _launch_backward(do, *qkv.unbind(1), out, stats, cu_seqlens, max_seqlen, scale, *dqkv.unbind(1), short_backward)
    return dqkv


@_qkvpacked_backward_op.register_fake
def _(do, qkv, out, stats, cu_seqlens, max_seqlen, scale, short_backward):
    return qkv.new_empty(qkv.shape)


def _setup_context_qkvpacked(ctx, inputs, output):
    qkv, cu_seqlens, max_seqlen, scale, short_backward = inputs
    out, stats = output
    ctx.save_for_backward(qkv, out, stats, cu_seqlens)
    ctx.max_seqlen, ctx.scale, ctx.short_backward = max_seqlen, scale, short_backward
    ctx.mark_non_differentiable(stats)


def _backward_qkvpacked(ctx, dout, _dstats):
    qkv, out, stats, cu_seqlens = ctx.saved_tensors
    dqkv = _qkvpacked_backward_op(dout, qkv, out, stats, cu_seqlens, ctx.max_seqlen, ctx.scale, ctx.short_backward)
    return dqkv, None, None, None, None


_qkvpacked_op.register_autograd(_backward_qkvpacked, setup_context=_setup_context_qkvpacked)


# --------------------------------------------------------------------------- public entry points
Result = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    softmax_scale: Optional[float] = None,
    check_inputs: bool = True,
    return_lse: bool = False,
    short_backward: Optional[bool] = None,
) -> Result:
    """Attention within each packed sequence (flash-attention's varlen interface, self-attention).

    Args:
        q, k, v: (total_tokens, heads, head_dim), one float dtype (fp32, fp16, bf16; float64 runs the
            PyTorch implementation), last dim contiguous; head_dim in (16, 32, 64, 128).
        cu_seqlens: int32 (num_seqs + 1,), from 0, non-decreasing, ending at total_tokens.
        max_seqlen: an upper bound of the longest sequence (sizes the launch grid).
        softmax_scale: keyword only; default 1 / sqrt(head_dim). (flash-attention's positional
            ``dropout_p`` must not land here: a port passing ``0.0`` positionally gets a TypeError.)
        check_inputs: also check the values of cu_seqlens and max_seqlen, which costs a host sync
            (and a graph break under torch.compile). With False the caller promises them; shapes,
            dtypes and devices are always checked, and the kernels never read or write outside the
            tensors whatever cu_seqlens holds (see the module docstring).
        return_lse: also return the logsumexp, as flash-attention's ``softmax_lse``.
        short_backward: the backward of sequences longer than one block and up to a few (ViT-B/16
            frames) runs as one program per (sequence, head) (kernel variant ``attn_bwd_short``, see
            the module docstring); None: as ``STOP_FAST_KERNEL_VARIANTS`` says, off by default. Same
            gradients (to rounding); the forward is unchanged.
    Returns:
        out (total_tokens, heads, head_dim) in q's dtype; with ``return_lse``, ``(out, lse)`` where
        ``lse[h, t] = log sum_j exp(scale * q[t, h] . k[j, h])`` over the keys j of t's sequence:
        natural log, fp32 (float64 for float64 inputs), laid out (heads, total_tokens) like
        flash-attention's varlen ``softmax_lse``. lse carries no gradient.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, 3, "(total_tokens, heads, head_dim)")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k and v must have one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    scale = _check_common(q, cu_seqlens, max_seqlen, softmax_scale, check_inputs)
    max_seqlen = _as_int(max_seqlen)
    short_backward = variant_enabled("attn_bwd_short", short_backward)
    if q.dtype in DTYPES and use_triton(q, k, v, cu_seqlens):
        out, stats = _attn_op(q, k, v, cu_seqlens, max_seqlen, scale, short_backward)
        return (out, _lse_from_stats(stats)) if return_lse else out
    out, lse = _attention_torch(q, k, v, cu_seqlens, max_seqlen, scale, need_lse=return_lse)
    return (out, lse) if return_lse else out


def varlen_attention_qkvpacked(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    softmax_scale: Optional[float] = None,
    check_inputs: bool = True,
    return_lse: bool = False,
    short_backward: Optional[bool] = None,
) -> Result:
    """:func:`varlen_attention` of ``qkv.unbind(1)``, for a fused QKV projection's output.

    ``qkv`` is (total_tokens, 3, heads, head_dim) (e.g. ``linear(x, in_proj_weight).view(total, 3,
    heads, head_dim)``), last dim contiguous; the kernels read q, k, v as strided views of it (no
    copies), and its gradient is written into one (total_tokens, 3, heads, head_dim) tensor (no
    cat/stack), as flash-attention's ``flash_attn_varlen_qkvpacked_func`` does. Other arguments and
    the result as in :func:`varlen_attention`.
    """
    _check_tensor("qkv", qkv, 4, "(total_tokens, 3, heads, head_dim)")
    if qkv.shape[1] != 3:
        raise ValueError(f"qkv must be (total_tokens, 3, heads, head_dim), got {tuple(qkv.shape)}")
    scale = _check_common(qkv[:, 0], cu_seqlens, max_seqlen, softmax_scale, check_inputs)
    max_seqlen = _as_int(max_seqlen)
    short_backward = variant_enabled("attn_bwd_short", short_backward)
    if qkv.dtype in DTYPES and use_triton(qkv, cu_seqlens):
        out, stats = _qkvpacked_op(qkv, cu_seqlens, max_seqlen, scale, short_backward)
        return (out, _lse_from_stats(stats)) if return_lse else out
    out, lse = _attention_torch(*qkv.unbind(1), cu_seqlens, max_seqlen, scale, need_lse=return_lse)
    return (out, lse) if return_lse else out


def _as_int(n):
    return n if isinstance(n, torch.SymInt) else int(n)


def _check_tensor(name: str, t, dims: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != dims:
        raise ValueError(f"{name} must be a tensor {layout}, got {tuple(getattr(t, 'shape', ()))}")
    if t.dtype not in DTYPES + (torch.float64,):
        raise ValueError(f"{name} must be float32, float16 or bfloat16 (float64 runs in PyTorch), got {t.dtype}")
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension")


def _check_common(q, cu_seqlens, max_seqlen, softmax_scale, check_values: bool) -> float:
    """Checks shared by both entries (q: a (total, heads, head_dim) view); returns the scale."""
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
    if softmax_scale is not None and (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float))
                                      or not math.isfinite(softmax_scale)):
        raise ValueError(f"softmax_scale must be a finite number, got {softmax_scale!r}")
    if check_values:
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
    return float(softmax_scale) if softmax_scale is not None else q.shape[-1] ** -0.5


# --------------------------------------------------------------------------- shipped configurations
def _signature(kernel, ptr: str) -> dict:
    """Triton types of ``kernel``'s arguments: tensors of the input dtype ``ptr`` except the fp32
    statistics and the int32 offsets, fp32 scales, i32 ints, and its constexprs."""
    import inspect

    params = inspect.signature(getattr(kernel, "fn", kernel)).parameters
    sig = {}
    for name, p in params.items():
        if p.annotation is not inspect.Parameter.empty:  # tl.constexpr
            sig[name] = "constexpr"
        elif name in ("stats_ptr", "delta_ptr"):
            sig[name] = "*fp32"
        elif name == "cu_ptr":
            sig[name] = "*i32"
        elif name.endswith("_ptr"):
            sig[name] = ptr
        elif name.startswith("scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _aligned(signature: dict) -> Tuple[str, ...]:
    """What Triton specialises in the model's launches: fresh or qkv-sliced tensors (16-byte aligned
    for every head dim here) and token/head strides, which are multiples of head_dim >= 16."""
    return pointers(signature) + tuple(n for n in signature if n.startswith("s") and n[2:] in ("_t", "_h"))


def compile_cases() -> List[CompileCase]:
    """Every kernel at every config it can be autotuned to, for every head dim and dtype."""
    cases = []
    types = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    for head_dim in HEAD_DIMS:
        for dtype, t in types.items():
            for name in ("fwd", "bwd_dkdv", "bwd_dq"):
                sig = _signature(_KERNELS[name], f"*{t}")
                for bm, bn, warps, stages in _gpu_candidates(name, dtype, head_dim):
                    cases.append(CompileCase(
                        f"attn_{name}_d{head_dim}_{t}_m{bm}n{bn}w{warps}s{stages}", _KERNELS[name], sig,
                        dict(HEAD_DIM=head_dim, BLOCK_M=bm, BLOCK_N=bn, INTERPRETER=False),
                        num_warps=warps, num_stages=stages, aligned=_aligned(sig)))
            sig = _signature(_attn_bwd_fused_kernel, f"*{t}")
            for block in _fused_blocks(dtype, head_dim):
                for warps, stages in _gpu_fused_candidates(dtype, head_dim, block):
                    cases.append(CompileCase(
                        f"attn_bwd_fused_d{head_dim}_{t}_b{block}w{warps}s{stages}", _attn_bwd_fused_kernel, sig,
                        dict(HEAD_DIM=head_dim, BLOCK=block, INTERPRETER=False), num_warps=warps, num_stages=stages,
                        aligned=_aligned(sig)))
            sig = _signature(_attn_bwd_short_kernel, f"*{t}")  # kernel variant "attn_bwd_short"
            for seq in _short_seqs(dtype, head_dim):
                for bn, warps, stages in _gpu_short_candidates(dtype, head_dim, seq):
                    cases.append(CompileCase(
                        f"attn_bwd_short_d{head_dim}_{t}_s{seq}n{bn}w{warps}s{stages}", _attn_bwd_short_kernel, sig,
                        dict(HEAD_DIM=head_dim, SEQ=seq, BLOCK_N=bn, INTERPRETER=False), num_warps=warps,
                        num_stages=stages, aligned=_aligned(sig)))
            cases.append(CompileCase(f"attn_bwd_delta_d{head_dim}_{t}", _attn_bwd_delta_kernel,
                                     _signature(_attn_bwd_delta_kernel, f"*{t}"),
                                     dict(HEAD_DIM=head_dim, BLOCK_T=DELTA_ROWS),
                                     num_warps=DELTA_WARPS, num_stages=DELTA_STAGES,
                                     aligned=("o_ptr", "do_ptr", "delta_ptr")))
    return cases
