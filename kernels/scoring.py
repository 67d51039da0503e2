"""Fused patch scoring: attention map, dynamics, score, top-K, gate and frame variation per frame.

SPEC.md steps 3-6, the gate of step 7 and the variation term of step 8, for F frames at once:

    logits[h, j] = u[j] . keys[h] + bias[h]                 j = 0..N (CLS included), the cheap form of
                                                             step 3 (the caller folds q_cls and 1/sqrt(d))
    A[j]   = mean_h softmax_j'(logits[h, :])[j]             j = 1..N
    Dyn    = softmax(dyn_logits)                             (Conv3d_intra's logits)
    S      = (1 - alpha) * A + alpha * Dyn
    R      = the k largest S, largest first, exact ties to the lower index;  M = 1 on R
    g[i]   = k * S[R_i] / sum_{r in R} S[r]
    v      = mean_j |W[j]| * (1 + beta * M[j])              (W: Conv3d_inter's logits)

Kernel (forward): one program per frame. The (N+1) x D tile of ``u`` streams through in BLOCK_D
chunks into a ``tl.dot`` with the keys (fp32 accumulation, tf32x3 on tensor cores, i.e. fp32
accuracy); everything of size N then stays in registers: per-head softmax over the N+1 keys, the
mean over heads, Dyn, S, then k rounds of "take the maximum, lowest index on ties, mask it" that
leave a rank per row. Gate, selected indices and variation are scattered out by rank. Reading ``u``
is nearly all of the memory traffic. A, Dyn and S are written out (3 x 4 bytes per patch against the
2 x D bytes of ``u``): tests and plots use A and S, the backward needs Dyn and S.

Kernel (forward, split: the kernel variant ``scoring_split``, off by default until a GPU measures it;
``split=True`` or ``STOP_FAST_KERNEL_VARIANTS=scoring_split``).
The one-program-per-frame forward does not fill a GPU at ViT-B/16 (N = 196): 384 frames make 384
programs of 16 warps at ~100 registers, about one per SM, each streaming its 197 x 768 tile of ``u``
through 48 dependent chunks, so few bytes are in flight per SM (H100: 0.70 ms per step, slower than
eager PyTorch's 0.49 ms). Nearly all the work is the logits GEMV ``u . keys^T``, which does not care
about frame boundaries; everything after it is O(N) per frame. So the split forward runs two kernels:
pass 1 treats ``u`` as one (F (N+1), D) matrix and gives each program BLOCK_M = 64 consecutive rows
(1,182 programs of 4 warps at ViT-B/16, several per SM: the loads of many programs overlap), writing
the fp32 logits with the bias added, (F (N+1), heads): 48 bytes a row against the 1,536 bytes of bf16
``u`` it read. Pass 2 is one light program per frame (4 warps; 8 past 256 rows) that loads its
(N+1) x heads logits and runs exactly the original kernel's tail (one shared ``_frame_selection``:
softmax per head, mean, Dyn, S, k rounds of arg-max with the lowest index on ties, gate, variation).
Same function, same dot precision (tf32x3); only the order of the column chunks in the dot differs
(32 columns a step instead of 16 or 32), so results agree to rounding and R agrees wherever the
K-th and (K+1)-th scores are not a near-tie. The backward kernel is the same for both forwards. For
small N (ViT-B/32's 49 patches: 1,536 programs of 8 warps) the one-pass kernel already fills the
GPU; the split variant serves every N but targets N = 196 and up.

Kernel (backward): one program per frame, registers only, visiting the k slots 16 at a time. With G = sum_{r in R} S[r] and upstream
dg, dv:  dS[R_i] = k dg_i / G - k (sum_j dg_j S[R_j]) / G^2,  dDyn = alpha dS,
d dyn_logits = Dyn * (dDyn - <Dyn, dDyn>),  dW[j] = dv / N * sign(W[j]) * (1 + beta M[j]).
Nothing flows into A (frozen upstream).
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Tuple

import torch

from ._triton import jit, round_to, tl, triton
from .aot import CompileCase, pointers
from .dispatch import interpreter_enabled, use_triton, variant_enabled


class PatchScores(NamedTuple):
    attn: torch.Tensor  # A (F, N) fp32
    dyn: torch.Tensor  # Dyn (F, N) fp32
    score: torch.Tensor  # S (F, N) fp32
    topk_idx: torch.Tensor  # R (F, k) int64, largest score first
    gate: torch.Tensor  # g (F, k) fp32
    variation: Optional[torch.Tensor]  # v (F,) fp32, None without inter_logits


@jit
def _frame_selection(
    logits, f, rows, patch, head_ok,
    dyn_logits_ptr, w_ptr, attn_ptr, dyn_ptr, score_ptr, topk_ptr, gate_ptr, var_ptr,
    N, H, K, alpha, beta,
    HAS_W: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Everything of frame ``f`` after its CLS logits ``(BLOCK_N, BLOCK_H)`` (rows past N+1 at -inf):
    A, Dyn, S, top-k with its gate, and the variation, stored by rank. Shared by both forwards."""
    # A: per-head softmax over the N+1 keys, averaged over the real heads
    m = tl.max(logits, axis=0)
    p = tl.exp(logits - m[None, :])
    p = p / tl.sum(p, axis=0)[None, :]
    attn = tl.sum(tl.where(head_ok[None, :], p, 0.0), axis=1) / H

    # Dyn and S over the N patches
    out_off = f * N + rows - 1
    dl = tl.load(dyn_logits_ptr + out_off, mask=patch, other=float("-inf")).to(tl.float32)
    e = tl.exp(dl - tl.max(dl, axis=0))
    e = tl.where(patch, e, 0.0)
    dyn = e / tl.sum(e, axis=0)
    score = (1.0 - alpha) * attn + alpha * dyn
    tl.store(attn_ptr + out_off, attn, mask=patch)
    tl.store(dyn_ptr + out_off, dyn, mask=patch)
    tl.store(score_ptr + out_off, score, mask=patch)

    # top-k: k rounds of arg-max with the lowest index on ties; each selected row keeps its rank
    work = tl.where(patch, score, float("-inf"))
    rank = tl.full([BLOCK_N], -1, dtype=tl.int32)
    for i in range(0, K):
        best = tl.max(work, axis=0)
        pick = tl.min(tl.where(work == best, rows, BLOCK_N), axis=0)
        rank = tl.where(rows == pick, i, rank)
        work = tl.where(rows == pick, float("-inf"), work)
    selected = rank >= 0
    total = tl.sum(tl.where(selected, score, 0.0), axis=0)
    slot = f * K + tl.maximum(rank, 0)
    tl.store(topk_ptr + slot, (rows - 1).to(tl.int64), mask=selected)
    tl.store(gate_ptr + slot, K * score / total, mask=selected)

    if HAS_W:
        w = tl.load(w_ptr + out_off, mask=patch, other=0.0).to(tl.float32)
        weight = tl.where(selected, 1.0 + beta, 1.0)
        tl.store(var_ptr + f, tl.sum(tl.abs(w) * weight, axis=0) / N)


@jit
def _scores_fwd_kernel(
    u_ptr, keys_ptr, bias_ptr, dyn_logits_ptr, w_ptr,
    attn_ptr, dyn_ptr, score_ptr, topk_ptr, gate_ptr, var_ptr,
    N, D, H, K, alpha, beta,
    HAS_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    PRECISION: tl.constexpr,
):
    f = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_N)  # token j = 0..N; patch j-1 for j >= 1
    heads = tl.arange(0, BLOCK_H)
    row_ok = rows <= N
    patch = (rows >= 1) & row_ok
    head_ok = heads < H

    # logits[j, h] = u[j] . keys[h]: stream u through in BLOCK_D chunks
    acc = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
    u_base = u_ptr + f * (N + 1) * D
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        u = tl.load(u_base + rows[:, None] * D + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        kt = tl.load(keys_ptr + heads[None, :] * D + cols[:, None], mask=head_ok[None, :] & col_ok[:, None], other=0.0)
        acc = tl.dot(u.to(tl.float32), kt.to(tl.float32), acc, input_precision=PRECISION)
    bias = tl.load(bias_ptr + heads, mask=head_ok, other=0.0).to(tl.float32)
    logits = tl.where(row_ok[:, None], acc + bias[None, :], float("-inf"))
    _frame_selection(logits, f, rows, patch, head_ok,
                     dyn_logits_ptr, w_ptr, attn_ptr, dyn_ptr, score_ptr, topk_ptr, gate_ptr, var_ptr,
                     N, H, K, alpha, beta, HAS_W, BLOCK_N)


@jit
def _scores_logits_kernel(
    u_ptr, keys_ptr, bias_ptr, logits_ptr,
    rows_total, D, H,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr,
):
    """Split forward, pass 1: the CLS logits ``u[r] . keys[h] + bias[h]`` of BLOCK_M consecutive rows of
    the flattened (F (N+1), D) ``u``, whatever frames they belong to, into (F (N+1), H) fp32."""
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    rows = tl.arange(0, BLOCK_M)
    heads = tl.arange(0, BLOCK_H)
    row_ok = row0 + rows < rows_total
    head_ok = heads < H
    u_ptr += row0 * D  # 64-bit base per program, 32-bit offsets in the tile
    acc = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        u = tl.load(u_ptr + rows[:, None] * D + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        kt = tl.load(keys_ptr + heads[None, :] * D + cols[:, None], mask=head_ok[None, :] & col_ok[:, None], other=0.0)
        acc = tl.dot(u.to(tl.float32), kt.to(tl.float32), acc, input_precision=PRECISION)
    bias = tl.load(bias_ptr + heads, mask=head_ok, other=0.0).to(tl.float32)
    logits_ptr += row0 * H
    tl.store(logits_ptr + rows[:, None] * H + heads[None, :], acc + bias[None, :], mask=row_ok[:, None] & head_ok[None, :])


@jit
def _scores_select_kernel(
    logits_ptr, dyn_logits_ptr, w_ptr,
    attn_ptr, dyn_ptr, score_ptr, topk_ptr, gate_ptr, var_ptr,
    N, H, K, alpha, beta,
    HAS_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Split forward, pass 2: one program per frame, from its (N+1, H) logits on, exactly the tail of
    ``_scores_fwd_kernel`` (the same ``_frame_selection``)."""
    f = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_N)
    heads = tl.arange(0, BLOCK_H)
    row_ok = rows <= N
    patch = (rows >= 1) & row_ok
    head_ok = heads < H
    logits_ptr += f * (N + 1) * H
    logits = tl.load(logits_ptr + rows[:, None] * H + heads[None, :], mask=row_ok[:, None] & head_ok[None, :], other=0.0)
    logits = tl.where(row_ok[:, None], logits, float("-inf"))
    _frame_selection(logits, f, rows, patch, head_ok,
                     dyn_logits_ptr, w_ptr, attn_ptr, dyn_ptr, score_ptr, topk_ptr, gate_ptr, var_ptr,
                     N, H, K, alpha, beta, HAS_W, BLOCK_N)


@jit
def _scores_bwd_kernel(
    dgate_ptr, dvar_ptr, dyn_ptr, score_ptr, topk_ptr, w_ptr,
    d_dyn_logits_ptr, dw_ptr,
    N, K, alpha, beta,
    HAS_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INTERPRETER: tl.constexpr,
):
    f = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_N)  # patch index 0..N-1
    row_ok = rows < N
    score = tl.load(score_ptr + f * N + rows, mask=row_ok, other=0.0)
    dyn = tl.load(dyn_ptr + f * N + rows, mask=row_ok, other=0.0)

    # Slots are visited BLOCK_K at a time, so the row/slot compare stays BLOCK_N x BLOCK_K for any k.
    # Pass 1: G = sum S[R_i] and sum_i dg_i S[R_i].
    total = 0.0
    weighted = 0.0
    for k0 in range(0, K, BLOCK_K):
        slots = k0 + tl.arange(0, BLOCK_K)
        slot_ok = slots < K
        sel = tl.load(topk_ptr + f * K + slots, mask=slot_ok, other=-1)
        hit = (rows[:, None] == sel[None, :]) & slot_ok[None, :]
        s_top = tl.sum(tl.where(hit, score[:, None], 0.0), axis=0)
        dg = tl.load(dgate_ptr + f * K + slots, mask=slot_ok, other=0.0).to(tl.float32)
        total += tl.sum(s_top, axis=0)
        weighted += tl.sum(dg * s_top, axis=0)
    # Pass 2: dS[R_i] = k dg_i / G - k weighted / G^2, moved back onto rows.
    d_dyn = tl.zeros([BLOCK_N], dtype=tl.float32)
    selected = tl.zeros([BLOCK_N], dtype=tl.int1)
    for k0 in range(0, K, BLOCK_K):
        slots = k0 + tl.arange(0, BLOCK_K)
        slot_ok = slots < K
        sel = tl.load(topk_ptr + f * K + slots, mask=slot_ok, other=-1)
        hit = (rows[:, None] == sel[None, :]) & slot_ok[None, :]
        dg = tl.load(dgate_ptr + f * K + slots, mask=slot_ok, other=0.0).to(tl.float32)
        ds_top = K * dg / total - K * weighted / (total * total)
        d_dyn += alpha * tl.sum(tl.where(hit, ds_top[None, :], 0.0), axis=1)
        selected = selected | (tl.sum(hit.to(tl.int32), axis=1) > 0)
    d_logits = dyn * (d_dyn - tl.sum(dyn * d_dyn, axis=0))
    tl.store(d_dyn_logits_ptr + f * N + rows, round_to(d_logits, d_dyn_logits_ptr.dtype.element_ty, INTERPRETER),
             mask=row_ok)

    if HAS_W:
        w = tl.load(w_ptr + f * N + rows, mask=row_ok, other=0.0).to(tl.float32)
        dv = tl.load(dvar_ptr + f).to(tl.float32)
        sign = tl.where(w > 0, 1.0, tl.where(w < 0, -1.0, 0.0))
        dw = dv / N * sign * tl.where(selected, 1.0 + beta, 1.0)
        tl.store(dw_ptr + f * N + rows, round_to(dw, dw_ptr.dtype.element_ty, INTERPRETER), mask=row_ok)


def _fwd_blocks(n: int, heads: int, width: int) -> Tuple[int, int, int]:
    block_n = max(16, triton.next_power_of_2(n + 1))
    block_h = max(16, triton.next_power_of_2(heads))
    # tf32x3 dots triple the operand registers: chunks of 32 columns (16 past 64 rows) keep every
    # shipped shape free of spills on sm_90 (see compile_cases and `python -m stop_fast.kernels.aot`).
    block_d = 32 if block_n <= 64 else 16
    return block_n, block_d, block_h


def _num_warps(block_n: int) -> int:
    # measured with ptxas for sm_90: 8 warps up to 128 rows, 16 at 256 (107 registers), and back to 8
    # at 512 rows, where 16 warps would cap registers at 128 and spill
    return 16 if block_n == 256 else 8


# Pipelining depth of both launches (the forward streams u through its D loop): Triton's default, as
# the measured launches had it. compile_cases uses the same value, so that the sm_90 report describes
# the kernels that run.
NUM_STAGES = 3


# The split forward (kernel variant "scoring_split"). Pass 1 over BLOCK_M rows x BLOCK_D columns of u
# per step, 4 warps: 70 registers (bf16 u) / 72 (fp32) on sm_90, 24-32 KB of shared memory, so several
# programs share an SM and ViT-B/16's 384 frames make ~1,200 programs. Wider chunks double the
# registers (64 columns: 124-134) and 128 columns spill. Pass 2 holds one frame's (N+1) x heads tile.
SPLIT_BLOCK_M, SPLIT_BLOCK_D, SPLIT_WARPS = 64, 32, 4


def _select_warps(block_n: int) -> int:
    # ptxas, sm_90: 40-56 registers up to 256 rows over 4 warps; 512 rows need 8 (4 warps: 118-140)
    return 4 if block_n <= 256 else 8


def _launch_forward(u, keys, bias, dyn_logits, w, k, alpha, beta, split=False):
    frames, length, width = u.shape
    n, heads = length - 1, keys.shape[0]
    dev = u.device
    attn = torch.empty(frames, n, dtype=torch.float32, device=dev)
    dyn = torch.empty_like(attn)
    score = torch.empty_like(attn)
    topk = torch.empty(frames, k, dtype=torch.int64, device=dev)
    gate = torch.empty(frames, k, dtype=torch.float32, device=dev)
    var = torch.empty(frames if w is not None else 0, dtype=torch.float32, device=dev)
    if frames == 0:
        return attn, dyn, score, topk, gate, var
    block_n, block_d, block_h = _fwd_blocks(n, heads, width)
    precision = "ieee" if interpreter_enabled() else "tf32x3"
    if split:
        rows = frames * length
        logits = torch.empty(rows, heads, dtype=torch.float32, device=dev)
        _scores_logits_kernel[(triton.cdiv(rows, SPLIT_BLOCK_M),)](
            u, keys, bias, logits, rows, width, heads,
            BLOCK_M=SPLIT_BLOCK_M, BLOCK_D=SPLIT_BLOCK_D, BLOCK_H=block_h, PRECISION=precision,
            num_warps=SPLIT_WARPS, num_stages=NUM_STAGES,
        )
        _scores_select_kernel[(frames,)](
            logits, dyn_logits, w if w is not None else dyn_logits,
            attn, dyn, score, topk, gate, var if w is not None else gate,
            n, heads, k, float(alpha), float(beta),
            HAS_W=w is not None, BLOCK_N=block_n, BLOCK_H=block_h,
            num_warps=_select_warps(block_n), num_stages=NUM_STAGES,
        )
        return attn, dyn, score, topk, gate, var
    _scores_fwd_kernel[(frames,)](
        u, keys, bias, dyn_logits, w if w is not None else dyn_logits,
        attn, dyn, score, topk, gate, var if w is not None else gate,
        n, width, heads, k, float(alpha), float(beta),
        HAS_W=w is not None, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_H=block_h, PRECISION=precision,
        num_warps=_num_warps(block_n), num_stages=NUM_STAGES,
    )
    return attn, dyn, score, topk, gate, var


def _launch_backward(dgate, dvar, dyn, score, topk, w, dyn_logits_dtype, k, alpha, beta):
    frames, n = dyn.shape
    d_logits = torch.empty(frames, n, dtype=dyn_logits_dtype, device=dyn.device)
    dw = torch.empty_like(w) if w is not None else dyn.new_empty(0)
    if frames == 0:
        return d_logits, dw
    block_n = max(16, triton.next_power_of_2(n))
    _scores_bwd_kernel[(frames,)](
        dgate.contiguous(), dvar.contiguous() if w is not None else dgate, dyn, score, topk,
        w if w is not None else dyn, d_logits, dw if w is not None else d_logits,
        n, k, float(alpha), float(beta),
        HAS_W=w is not None, BLOCK_N=block_n, BLOCK_K=16, INTERPRETER=interpreter_enabled(),
        num_warps=_num_warps(block_n), num_stages=NUM_STAGES,
    )
    return d_logits, dw


# --------------------------------------------------------------------------- PyTorch semantics
def patch_scores_reference(u, cls_keys, cls_bias, dyn_logits, inter_logits, k, alpha, beta) -> PatchScores:
    """The same function in plain PyTorch (any float dtype, float64 included), differentiable by
    autograd w.r.t. dyn_logits and inter_logits: what runs where Triton cannot, and the tests' truth.
    Like the kernel (SPEC "Numerics"), the chain is computed in at least fp32 whatever autocast says:
    autocast is off inside and every input is upcast."""
    with torch.autocast(u.device.type, enabled=False):
        return _patch_scores_fp32(u, cls_keys, cls_bias, dyn_logits, inter_logits, k, alpha, beta)


def _patch_scores_fp32(u, cls_keys, cls_bias, dyn_logits, inter_logits, k, alpha, beta) -> PatchScores:
    acc = torch.promote_types(torch.promote_types(u.dtype, dyn_logits.dtype), torch.float32)
    with torch.no_grad():
        logits = torch.einsum("fjd,hd->fhj", u.to(acc), cls_keys.to(acc)) + cls_bias.to(acc)[None, :, None]
        attn = logits.softmax(dim=-1).mean(dim=1)[:, 1:]
    dyn = dyn_logits.to(acc).softmax(dim=-1)
    score = (1 - alpha) * attn + alpha * dyn
    topk = torch.sort(score.detach(), dim=-1, descending=True, stable=True).indices[:, :k].contiguous()
    s_top = score.gather(1, topk)
    gate = k * s_top / s_top.sum(dim=1, keepdim=True)
    variation = None
    if inter_logits is not None:
        in_top = torch.zeros_like(score).scatter(1, topk, 1.0)
        variation = (inter_logits.to(acc).abs() * (1 + beta * in_top)).mean(dim=1)
    return PatchScores(attn, dyn, score, topk, gate, variation)


# --------------------------------------------------------------------------- custom ops + autograd (Triton)
@torch.library.custom_op("stop_fast::patch_scores", mutates_args=())
def _scores_op(
    u: torch.Tensor, cls_keys: torch.Tensor, cls_bias: torch.Tensor, dyn_logits: torch.Tensor,
    inter_logits: Optional[torch.Tensor], k: int, alpha: float, beta: float, split: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_forward(u, cls_keys, cls_bias, dyn_logits, inter_logits, k, alpha, beta, split)


@_scores_op.register_fake
def _(u, cls_keys, cls_bias, dyn_logits, inter_logits, k, alpha, beta, split):
    frames, n = dyn_logits.shape
    acc = torch.promote_types(torch.promote_types(u.dtype, dyn_logits.dtype), torch.float32)
    maps = [u.new_empty(frames, n, dtype=acc) for _ in range(3)]
    return (*maps, u.new_empty(frames, k, dtype=torch.int64), u.new_empty(frames, k, dtype=acc),
            u.new_empty(frames if inter_logits is not None else 0, dtype=acc))


@torch.library.custom_op("stop_fast::patch_scores_backward", mutates_args=())
def _scores_backward_op(
    dgate: torch.Tensor, dvar: torch.Tensor, dyn: torch.Tensor, score: torch.Tensor, topk_idx: torch.Tensor,
    dyn_logits: torch.Tensor, inter_logits: Optional[torch.Tensor], k: int, alpha: float, beta: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    return _launch_backward(dgate, dvar, dyn, score, topk_idx, inter_logits, dyn_logits.dtype, k, alpha, beta)


@_scores_backward_op.register_fake
def _(dgate, dvar, dyn, score, topk_idx, dyn_logits, inter_logits, k, alpha, beta):
    return torch.empty_like(dyn_logits), (torch.empty_like(inter_logits) if inter_logits is not None else dyn.new_empty(0))


def _setup_context(ctx, inputs, output):
    _, _, _, dyn_logits, inter_logits, k, alpha, beta, _ = inputs
    _, dyn, score, topk, _, _ = output
    ctx.save_for_backward(dyn, score, topk, dyn_logits, inter_logits)
    ctx.k, ctx.alpha, ctx.beta = k, alpha, beta
    ctx.has_w = inter_logits is not None
    ctx.mark_non_differentiable(output[0], output[1], output[2], output[3])


def _backward(ctx, _dattn, _ddyn, _dscore, _dtopk, dgate, dvar):
    dyn, score, topk, dyn_logits, inter_logits = ctx.saved_tensors
    if dgate is None:
        dgate = torch.zeros_like(score[:, : ctx.k])
    if dvar is None or (ctx.has_w and dvar.numel() == 0):
        dvar = score.new_zeros(score.shape[0] if ctx.has_w else 0)
    d_logits, dw = _scores_backward_op(dgate, dvar, dyn, score, topk, dyn_logits, inter_logits, ctx.k, ctx.alpha, ctx.beta)
    return None, None, None, d_logits, (dw if ctx.has_w else None), None, None, None, None


_scores_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public entry point
def patch_scores(
    u: torch.Tensor,
    cls_keys: torch.Tensor,
    cls_bias: torch.Tensor,
    dyn_logits: torch.Tensor,
    inter_logits: Optional[torch.Tensor],
    k: int,
    alpha: float,
    beta: float,
    *,
    check_inputs: bool = True,
    split: Optional[bool] = None,
) -> PatchScores:
    """Score the patches of F frames and pick the top k of each (see the module docstring).

    Args:
        u: (F, N+1, D) ``ln_1(ln_pre(Z))`` of the frozen first block, CLS token in row 0.
        cls_keys, cls_bias: (Hh, D), (Hh,): the CLS query folded into the key projection, already
            scaled by 1/sqrt(head_dim).
        dyn_logits: (F, N) Conv3d_intra logits. inter_logits: (F, N) Conv3d_inter logits, or None.
        k: patches to select, 1..N. alpha in [0, 1], beta >= 0.
        check_inputs: also scan the float inputs for NaN/Inf (costs a host sync); shapes, dtypes,
            devices and ranges of the scalars are always checked.
        split: run the two-pass forward (kernel variant ``scoring_split``, see the module docstring);
            None: as ``STOP_FAST_KERNEL_VARIANTS`` says (``dispatch.variant_enabled``), off by default.
            Same results; only the Triton forward differs (the backward kernel is shared).
    Returns :class:`PatchScores`; ``gate`` and ``variation`` carry gradient to ``dyn_logits`` and
    ``inter_logits``; nothing flows into ``u`` or the keys.
    """
    _validate(u, cls_keys, cls_bias, dyn_logits, inter_logits, k, alpha, beta, check_inputs)
    split = variant_enabled("scoring_split", split)
    if torch.float64 in (u.dtype, dyn_logits.dtype) or not use_triton(u):
        return patch_scores_reference(u, cls_keys, cls_bias, dyn_logits, inter_logits, int(k), float(alpha), float(beta))
    attn, dyn, score, topk, gate, var = _scores_op(u, cls_keys, cls_bias, dyn_logits, inter_logits, int(k), float(alpha),
                                                   float(beta), split)
    return PatchScores(attn, dyn, score, topk, gate, var if inter_logits is not None else None)


def _validate(u, keys, bias, dyn_logits, inter_logits, k, alpha, beta, check_values: bool) -> None:
    if not isinstance(u, torch.Tensor) or u.dim() != 3 or not u.is_floating_point():
        raise ValueError(f"u must be a float tensor (F, N+1, D), got {getattr(u, 'dtype', type(u))} {tuple(getattr(u, 'shape', ()))}")
    frames, length, width = u.shape
    n = length - 1
    if n < 1:
        raise ValueError(f"u must hold the CLS row and at least one patch, got N+1 = {length}")
    if not isinstance(keys, torch.Tensor) or keys.dim() != 2 or keys.shape[1] != width or not keys.is_floating_point():
        raise ValueError(f"cls_keys must be a float tensor (heads, {width}), got {tuple(getattr(keys, 'shape', ()))}")
    if not isinstance(bias, torch.Tensor) or bias.shape != (keys.shape[0],) or not bias.is_floating_point():
        raise ValueError(f"cls_bias must be a float tensor ({keys.shape[0]},), got {tuple(getattr(bias, 'shape', ()))}")
    if keys.shape[0] < 1 or keys.shape[0] > 64:
        raise ValueError(f"cls_keys must have 1..64 heads, got {keys.shape[0]}")
    if not isinstance(dyn_logits, torch.Tensor) or dyn_logits.shape != (frames, n) or not dyn_logits.is_floating_point():
        raise ValueError(f"dyn_logits must be a float tensor ({frames}, {n}), got {tuple(getattr(dyn_logits, 'shape', ()))}")
    tensors = {"u": u, "cls_keys": keys, "cls_bias": bias, "dyn_logits": dyn_logits}
    if inter_logits is not None:
        if not isinstance(inter_logits, torch.Tensor) or inter_logits.shape != (frames, n) or not inter_logits.is_floating_point():
            raise ValueError(f"inter_logits must be a float tensor ({frames}, {n}) or None, got {tuple(getattr(inter_logits, 'shape', ()))}")
        tensors["inter_logits"] = inter_logits
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be an int in 1..N = {n}, got {k!r}")
    if not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha!r}")
    if not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta < 0:
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
    for name, t in tensors.items():
        if t.device != u.device:
            raise ValueError(f"{name} is on {t.device}, but u is on {u.device}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if check_values:
        for name, t in tensors.items():
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contains NaN or Inf")


# --------------------------------------------------------------------------- shipped configurations
def _aligned(signature: dict, ints: dict) -> Tuple[str, ...]:
    """What Triton specialises in a launch at these sizes: the (fresh, contiguous) tensors, and the
    int arguments that are multiples of 16 (k = 6, the default)."""
    return pointers(signature) + tuple(name for name, value in ints.items() if value % 16 == 0)


def compile_cases() -> List[CompileCase]:
    """Every launch configuration of the shipped models: (N, heads, D) of stop-tiny, ViT-B/32,
    ViT-B/16 and ViT-L/14 at their native resolution, each u dtype, with and without W, at the
    warps and stages the launches use."""
    cases = []
    shapes = {"tiny": (49, 4, 128), "b32": (49, 12, 768), "b16": (196, 12, 768), "l14": (256, 16, 1024)}
    types = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}
    for model, (n, heads, width) in shapes.items():
        block_n, block_d, block_h = _fwd_blocks(n, heads, width)
        for t, ptr in types.items():
            for has_w in (True, False):
                sig = {
                    "u_ptr": ptr, "keys_ptr": "*fp32", "bias_ptr": "*fp32", "dyn_logits_ptr": "*fp32", "w_ptr": "*fp32",
                    "attn_ptr": "*fp32", "dyn_ptr": "*fp32", "score_ptr": "*fp32", "topk_ptr": "*i64",
                    "gate_ptr": "*fp32", "var_ptr": "*fp32",
                    "N": "i32", "D": "i32", "H": "i32", "K": "i32", "alpha": "fp32", "beta": "fp32",
                    "HAS_W": "constexpr", "BLOCK_N": "constexpr", "BLOCK_D": "constexpr", "BLOCK_H": "constexpr",
                    "PRECISION": "constexpr",
                }
                consts = dict(HAS_W=has_w, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_H=block_h, PRECISION="tf32x3")
                ints = dict(N=n, D=width, H=heads, K=6)
                cases.append(CompileCase(f"scores_fwd_{model}_{t}_w{int(has_w)}", _scores_fwd_kernel, sig, consts,
                                         num_warps=_num_warps(block_n), num_stages=NUM_STAGES,
                                         aligned=_aligned(sig, ints)))
        for has_w in (True, False):
            block = max(16, triton.next_power_of_2(n))
            sig = {
                "dgate_ptr": "*fp32", "dvar_ptr": "*fp32", "dyn_ptr": "*fp32", "score_ptr": "*fp32", "topk_ptr": "*i64",
                "w_ptr": "*fp32", "d_dyn_logits_ptr": "*fp32", "dw_ptr": "*fp32",
                "N": "i32", "K": "i32", "alpha": "fp32", "beta": "fp32",
                "HAS_W": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "INTERPRETER": "constexpr",
            }
            consts = dict(HAS_W=has_w, BLOCK_N=block, BLOCK_K=16, INTERPRETER=False)
            cases.append(CompileCase(f"scores_bwd_{model}_w{int(has_w)}", _scores_bwd_kernel, sig, consts,
                                     num_warps=_num_warps(block), num_stages=NUM_STAGES,
                                     aligned=_aligned(sig, dict(N=n, K=6))))
    # the split forward (kernel variant "scoring_split"): pass 1 depends only on u's dtype and the
    # padded head count, pass 2 on the frame's padded row count
    for block_h in sorted({_fwd_blocks(n, heads, width)[2] for n, heads, width in shapes.values()}):
        for t, ptr in types.items():
            sig = {"u_ptr": ptr, "keys_ptr": "*fp32", "bias_ptr": "*fp32", "logits_ptr": "*fp32",
                   "rows_total": "i32", "D": "i32", "H": "i32",
                   "BLOCK_M": "constexpr", "BLOCK_D": "constexpr", "BLOCK_H": "constexpr", "PRECISION": "constexpr"}
            consts = dict(BLOCK_M=SPLIT_BLOCK_M, BLOCK_D=SPLIT_BLOCK_D, BLOCK_H=block_h, PRECISION="tf32x3")
            cases.append(CompileCase(f"scores_split_logits_{t}_h{block_h}", _scores_logits_kernel, sig, consts,
                                     num_warps=SPLIT_WARPS, num_stages=NUM_STAGES,
                                     aligned=_aligned(sig, dict(D=768))))
    for model, (n, heads, width) in shapes.items():
        block_n, _, block_h = _fwd_blocks(n, heads, width)
        for has_w in (True, False):
            sig = {"logits_ptr": "*fp32", "dyn_logits_ptr": "*fp32", "w_ptr": "*fp32",
                   "attn_ptr": "*fp32", "dyn_ptr": "*fp32", "score_ptr": "*fp32", "topk_ptr": "*i64",
                   "gate_ptr": "*fp32", "var_ptr": "*fp32",
                   "N": "i32", "H": "i32", "K": "i32", "alpha": "fp32", "beta": "fp32",
                   "HAS_W": "constexpr", "BLOCK_N": "constexpr", "BLOCK_H": "constexpr"}
            consts = dict(HAS_W=has_w, BLOCK_N=block_n, BLOCK_H=block_h)
            cases.append(CompileCase(f"scores_split_select_{model}_w{int(has_w)}", _scores_select_kernel, sig, consts,
                                     num_warps=_select_warps(block_n), num_stages=NUM_STAGES,
                                     aligned=_aligned(sig, dict(N=n, H=heads, K=6))))
    return cases
