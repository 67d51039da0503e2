"""Packed sequence build: ``[Z_t[0] ; E~_t ; G_t[:n_t]]`` of every frame into one ``(total_tokens, D)`` buffer.

SPEC.md steps 7 (overlay) and 11 (packing) in one pass over memory. Frame f's sequence starts at row
``cu_seqlens[f]`` and has ``1 + N + counts[f]`` rows:

    row 0            z[f, 0]                                    (CLS + pos_0)
    row 1 + j        z[f, 1 + j] + gate[f, s] * intra[f, s]     if topk_idx[f, s] == j (fp32, rounded once)
                     z[f, 1 + j]                                otherwise
    row 1 + N + i    inter[f, i]  (in z's dtype)                for i < counts[f]

Backward, from the packed gradient dx (fp32 accumulation, each gradient in its input's dtype):

    dz[f, r]        = dx[cu[f] + r]                              r = 0..N
    d intra[f, s]   = gate[f, s] * dx[cu[f] + 1 + topk_idx[f, s]]
    d gate[f, s]    = sum_d dx[cu[f] + 1 + topk_idx[f, s], d] * intra[f, s, d]
    d inter[f, i]   = dx[cu[f] + 1 + N + i]  if i < counts[f], else 0

Kernels. Both run one program per (frame, block of BLOCK_R rows of that frame's 1 + N + rho possible
rows), looping over D in BLOCK_D columns, so every output row is written exactly once: no zero-fill
pass, no atomics. The forward reads z / intra / inter and writes x; the backward reads dx (once) and
intra and writes dz, d intra, d gate and d inter, the unused inter-frame slots with zeros.
Which slot s (if any) selects the patch of row 1 + j is found per program by loading the frame's k
indices and comparing them with the block's rows (a BLOCK_R x BLOCK_K compare in registers), never
through an N x k matrix in memory. If two slots name the same patch (bad input that
``check_inputs=False`` let through), the first one wins, in both directions; the backward's first
row block writes zero gradients for slots that select nothing (duplicates, indices outside 0..N-1),
so those are written exactly once too.

Bandwidth. A pure copy-like kernel: at ViT-B/32 shapes it moves ~2 x 146 MB per direction. Two
things matter and both are visible in the sm_90 compile report: 16-byte vector accesses (``_vec``
tells the compiler that row segments start 16-byte aligned: the launch wrappers guarantee aligned
bases by copying any misaligned view, and Triton marks the widths of the shipped models, multiples of
16, as such), and few registers per thread (many programs in flight per SM): 64-bit scalar bases per
program with 32-bit offsets inside a frame.

Bucketed rows (``rows`` > total_tokens). The compiled encoder pads the packed rows to a bucket of a
few static sizes (``stop_fast.model.fast.pad_to_bucket``); with ``F.pad`` that is a copy of the whole
packed buffer forward and of its gradient backward (bf16, B = 32, T = 12: ~33 MB read and ~33 MB
written each way at ViT-B/32, ~120 MB at ViT-B/16). With ``rows`` the forward kernel allocates the
bucket and writes its zero rows itself: ``PAD`` adds programs past the frames' (grid axis 0 beyond
F), each zeroing BLOCK_R rows from total_tokens; the frames' programs are unchanged. The backward
kernel reads only the frames' rows of the (rows, D) gradient, so it takes the encoder's gradient as
it comes, without the slice copy. The fast path packs this way under the kernel variant
``pack_bucketed`` (``STOP_FAST_KERNEL_VARIANTS=pack_bucketed``), off by default until a GPU measures it.

Robustness with ``check_inputs=False``: counts are clamped to 0..rho, the k indices only ever match
rows 1..N, output rows outside 0..total_tokens-1 are masked, so no bad value makes a kernel read or
write out of bounds (it only makes the result wrong).

Host synchronisation: ``cu_seqlens_from_counts`` transfers two numbers (total tokens, longest count)
in one copy; that is the fast path's only sync. ``pack_sequences`` itself never syncs unless
``check_inputs=True`` validates index, count and offset values.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from ._triton import jit, round_to, tl, triton
from .aot import CompileCase, pointers
from .dispatch import interpreter_enabled, use_triton

BLOCK_R = 16
# 16 rows x 128 (16-bit) or 64 (fp32) columns over 8 warps: one 16-byte vector per thread and tensor.
# Measured with ptxas for sm_90 at the launch's specialisation: 30-48 registers in the aligned
# variants, no spills; 4 warps (two vectors per thread) left a 4-byte spill with fp16 tokens and fp32
# prompts.
NUM_WARPS = 8
# Triton's default pipelining depth, as the measured launches had it; compile_cases uses the same value
NUM_STAGES = 3
# every 16-bit or fp32 row of a width divisible by 8 starts on a 16-byte boundary
ALIGN_BYTES = 16


@jit
def _vec(ptrs, ALIGNED: tl.constexpr):
    """Promise the compiler that each row segment of ``ptrs`` starts 16-byte aligned (true when the
    base pointer is, which the wrappers ensure, and the row pitch D * itemsize is a multiple of 16),
    so that loads and stores become 16-byte vectors."""
    if ALIGNED:
        ptrs = tl.multiple_of(ptrs, [1, 16])
    return ptrs


@jit
def _frame_rows(counts_ptr, cu_ptr, f, rows, N, RHO, HAS_INTER: tl.constexpr):
    """Start row of frame ``f`` in the packed buffer and which of ``rows`` exist (1 + N + n_f of them).
    Counts are clamped to 0..rho so that even unchecked input never reads past ``inter``."""
    if HAS_INTER:
        count = tl.minimum(tl.maximum(tl.load(counts_ptr + f), 0), RHO)
    else:
        count = 0
    start = tl.load(cu_ptr + f).to(tl.int64)
    return start, rows < N + 1 + count


@jit
def _slot_of_rows(idx_ptr, f, rows, N, K, BLOCK_K: tl.constexpr):
    """For each row 1 + j, the first slot s with topk_idx[f, s] == j, if any (clamped into 0..K-1
    where there is none, so that a masked address stays in bounds). The k indices are compared with
    the rows BLOCK_K at a time, so any k works with one compiled kernel."""
    patch = rows - 1
    is_patch = (patch >= 0) & (patch < N)
    slot = tl.zeros_like(rows) + K
    for s0 in range(0, K, BLOCK_K):
        slots = s0 + tl.arange(0, BLOCK_K)
        sel = tl.load(idx_ptr + f * K + slots, mask=slots < K, other=-1)
        hit = (sel[None, :] == patch[:, None]) & (slots[None, :] < K) & is_patch[:, None]
        slot = tl.minimum(slot, tl.min(tl.where(hit, slots[None, :], K), axis=1))
    return slot < K, tl.minimum(slot, K - 1)


@jit
def _zero_orphan_slots(idx_ptr, dgate_ptr, dintra_ptr, f, N, K, D,
                       BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    """Zero gradients for the slots that select no row: an index outside 0..N-1, or a patch that an
    earlier slot already selects. Only bad input has such slots; they must still be written once."""
    for s0 in range(0, K, BLOCK_R):
        slots = s0 + tl.arange(0, BLOCK_R)
        in_k = slots < K
        sel = tl.load(idx_ptr + f * K + slots, mask=in_k, other=0)
        dup = tl.zeros([BLOCK_R], dtype=tl.int32)
        for e0 in range(0, s0 + BLOCK_R, BLOCK_K):
            earlier = e0 + tl.arange(0, BLOCK_K)
            prev = tl.load(idx_ptr + f * K + earlier, mask=earlier < K, other=-1)
            same = (prev[None, :] == sel[:, None]) & (earlier[None, :] < slots[:, None])
            dup = tl.maximum(dup, tl.max(same.to(tl.int32), axis=1))
        orphan = in_k & ((sel < 0) | (sel >= N) | (dup > 0))
        tl.store(dgate_ptr + f * K + slots, tl.zeros([BLOCK_R], dtype=tl.float32), mask=orphan)
        o_row = (f * K + slots).to(tl.int64)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            tl.store(dintra_ptr + o_row[:, None] * D + cols[None, :],
                     tl.zeros([BLOCK_R, BLOCK_D], dtype=dintra_ptr.dtype.element_ty),
                     mask=orphan[:, None] & (cols[None, :] < D))


@jit
def _zero_rows(x_ptr, first, end, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ALIGNED: tl.constexpr):
    """Zeros into rows ``first .. first + BLOCK_R`` of x that lie below ``end`` (the bucket's padding)."""
    rows = tl.arange(0, BLOCK_R)
    ok = first + rows < end
    x_ptr += first * D
    zero = tl.zeros([BLOCK_R, BLOCK_D], dtype=x_ptr.dtype.element_ty)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        tl.store(_vec(x_ptr + rows[:, None] * D + cols[None, :], ALIGNED), zero, mask=ok[:, None] & (cols[None, :] < D))


@jit
def _pack_fwd_kernel(
    z_ptr, counts_ptr, cu_ptr, idx_ptr, gate_ptr, intra_ptr, inter_ptr, x_ptr,
    total_tokens, N, D, K, RHO, frames, rows_out,
    HAS_INTRA: tl.constexpr, HAS_INTER: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, ALIGNED: tl.constexpr,
    INTERPRETER: tl.constexpr, PAD: tl.constexpr,
):
    f = tl.program_id(0)
    if PAD:  # programs past the frames write the zero rows total_tokens .. rows_out (kernel variant "pack_bucketed")
        if f >= frames:
            block = (f - frames) * tl.num_programs(1) + tl.program_id(1)
            _zero_rows(x_ptr, total_tokens + block.to(tl.int64) * BLOCK_R, rows_out, D, BLOCK_R, BLOCK_D, ALIGNED)
            return
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    start, exists = _frame_rows(counts_ptr, cu_ptr, f, rows, N, RHO, HAS_INTER)
    out_row = start + rows
    valid = exists & (out_row >= 0) & (out_row < total_tokens)
    from_z = valid & (rows <= N)
    from_inter = valid & (rows > N)
    # 64-bit scalar bases per program, 32-bit offsets within the frame: no 64-bit address per element
    frame = f.to(tl.int64)
    x_ptr += start * D
    z_ptr += frame * (N + 1) * D
    z_off = tl.minimum(rows, N) * D
    if HAS_INTRA:
        has_prompt, slot = _slot_of_rows(idx_ptr, f, rows, N, K, BLOCK_K)
        has_prompt = has_prompt & from_z
        g = tl.load(gate_ptr + f * K + slot, mask=has_prompt, other=0.0)
        intra_ptr += frame * K * D
        p_off = slot * D
    if HAS_INTER:
        inter_ptr += frame * RHO * D
        inter_off = tl.maximum(rows - N - 1, 0) * D

    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        cmask = cols[None, :] < D
        val = tl.load(_vec(z_ptr + z_off[:, None] + cols[None, :], ALIGNED), mask=from_z[:, None] & cmask, other=0.0)
        if HAS_INTRA:
            p = tl.load(_vec(intra_ptr + p_off[:, None] + cols[None, :], ALIGNED),
                        mask=has_prompt[:, None] & cmask, other=0.0)
            val = round_to(val.to(tl.float32) + g[:, None] * p.to(tl.float32), x_ptr.dtype.element_ty, INTERPRETER)
        if HAS_INTER:
            t = tl.load(_vec(inter_ptr + inter_off[:, None] + cols[None, :], ALIGNED),
                        mask=from_inter[:, None] & cmask, other=0.0)
            val = tl.where(from_inter[:, None], t, val)
        tl.store(_vec(x_ptr + rows[:, None] * D + cols[None, :], ALIGNED), val, mask=valid[:, None] & cmask)


@jit
def _pack_bwd_kernel(
    dx_ptr, counts_ptr, cu_ptr, idx_ptr, gate_ptr, intra_ptr,
    dz_ptr, dgate_ptr, dintra_ptr, dinter_ptr,
    total_tokens, N, D, K, RHO,
    HAS_INTRA: tl.constexpr, HAS_INTER: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, ALIGNED: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    f = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    start, exists = _frame_rows(counts_ptr, cu_ptr, f, rows, N, RHO, HAS_INTER)
    in_row = start + rows
    readable = exists & (in_row >= 0) & (in_row < total_tokens)
    to_z = rows <= N
    to_inter = (rows > N) & (rows < N + 1 + RHO)
    frame = f.to(tl.int64)
    dx_ptr += start * D
    dz_ptr += frame * (N + 1) * D
    z_off = tl.minimum(rows, N) * D
    if HAS_INTRA:
        has_prompt, slot = _slot_of_rows(idx_ptr, f, rows, N, K, BLOCK_K)
        has_prompt = has_prompt & to_z
        g = tl.load(gate_ptr + f * K + slot, mask=has_prompt, other=0.0)
        intra_rows = intra_ptr + frame * K * D  # this frame's k prompts, and their gradients
        dintra_rows = dintra_ptr + frame * K * D
        p_off = slot * D
        g_acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    if HAS_INTER:
        dinter_ptr += frame * RHO * D
        inter_off = tl.maximum(rows - N - 1, 0) * D

    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        cmask = cols[None, :] < D
        dx = tl.load(_vec(dx_ptr + rows[:, None] * D + cols[None, :], ALIGNED), mask=readable[:, None] & cmask, other=0.0)
        tl.store(_vec(dz_ptr + z_off[:, None] + cols[None, :], ALIGNED), dx, mask=to_z[:, None] & cmask)
        if HAS_INTER:
            tl.store(_vec(dinter_ptr + inter_off[:, None] + cols[None, :], ALIGNED), dx, mask=to_inter[:, None] & cmask)
        if HAS_INTRA:
            p = tl.load(_vec(intra_rows + p_off[:, None] + cols[None, :], ALIGNED),
                        mask=has_prompt[:, None] & cmask, other=0.0)
            dx32 = dx.to(tl.float32)
            g_acc += tl.sum(dx32 * p.to(tl.float32), axis=1)
            tl.store(_vec(dintra_rows + p_off[:, None] + cols[None, :], ALIGNED),
                     round_to(g[:, None] * dx32, dintra_ptr.dtype.element_ty, INTERPRETER),
                     mask=has_prompt[:, None] & cmask)
    if HAS_INTRA:
        tl.store(dgate_ptr + f * K + slot, g_acc, mask=has_prompt)
        if tl.program_id(1) == 0:
            _zero_orphan_slots(idx_ptr, dgate_ptr, dintra_ptr, f, N, K, D, BLOCK_R, BLOCK_D, BLOCK_K)


BLOCK_K = 8  # topk indices compared with a row block 8 at a time (k = 6 by default)


def _block_d(dtype: torch.dtype) -> int:
    # 16 rows x BLOCK_D over 8 warps = one 16-byte vector per thread: 128 columns of a 16-bit dtype,
    # 64 of fp32. D is a runtime argument (a constexpr D lets the compiler unroll the column loop and
    # hoist its loads: 250+ registers), so one compiled kernel serves every width.
    return 128 if dtype.itemsize <= 2 else 64


def _row_aligned(width: int, *dtypes: torch.dtype) -> bool:
    return all(width * dt.itemsize % ALIGN_BYTES == 0 for dt in dtypes)


def _aligned(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t`` itself, or a fresh (aligned) copy of a view that starts off a 16-byte boundary: the
    kernels' vector accesses rely on aligned bases. Fresh allocations always are."""
    if t is None or t.data_ptr() % ALIGN_BYTES == 0:
        return t
    return t.clone()


def _launch_forward(z, counts, cu_seqlens, total_tokens, rows, topk_idx, gate, intra, inter) -> torch.Tensor:
    """x (rows, D): the packed frames in rows 0 .. total_tokens, zeros below (rows > total_tokens:
    the kernel variant "pack_bucketed"; extra programs past the frames write the zero rows)."""
    frames, length, width = z.shape
    n = length - 1
    k = topk_idx.shape[1] if topk_idx is not None else 0
    rho = inter.shape[1] if inter is not None else 0
    pad = rows - total_tokens
    if total_tokens == 0 or frames == 0 or width == 0:
        return torch.zeros(rows, width, dtype=z.dtype, device=z.device)
    x = torch.empty(rows, width, dtype=z.dtype, device=z.device)
    z, intra, inter = _aligned(z), _aligned(intra), _aligned(inter)
    dummy = z  # never dereferenced when the matching constexpr flag is off
    blocks = triton.cdiv(length + rho, BLOCK_R)
    pad_programs = triton.cdiv(triton.cdiv(pad, BLOCK_R), blocks) if pad > 0 else 0
    _pack_fwd_kernel[(frames + pad_programs, blocks)](
        z, counts, cu_seqlens,
        topk_idx if k else dummy, gate if k else dummy, intra if k else dummy, inter if rho else dummy,
        x, total_tokens, n, width, max(k, 1), max(rho, 1), frames, rows,
        HAS_INTRA=k > 0, HAS_INTER=rho > 0,
        BLOCK_R=BLOCK_R, BLOCK_D=_block_d(z.dtype), BLOCK_K=BLOCK_K,
        ALIGNED=_row_aligned(width, z.dtype, *([intra.dtype] if k else [])), INTERPRETER=interpreter_enabled(),
        PAD=pad > 0, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    return x


def _launch_backward(dx, z, counts, cu_seqlens, topk_idx, gate, intra, inter):
    """The gradients of z, gate, intra, inter from dx: (total_tokens, D), or (rows, D) with the
    bucket's padding rows, which no frame reads (their gradient is dropped, no copy of dx)."""
    frames, length, width = z.shape
    n = length - 1
    k = topk_idx.shape[1] if topk_idx is not None else 0
    rho = inter.shape[1] if inter is not None else 0
    # every element of these is written by the kernel exactly once
    dz = torch.empty_like(z)
    dgate = torch.empty_like(gate) if k else z.new_empty(0)
    dintra = torch.empty_like(intra) if k else z.new_empty(0)
    dinter = torch.empty_like(inter) if rho else z.new_empty(0)
    if frames == 0 or width == 0:
        return dz, dgate.zero_(), dintra, dinter
    dx, intra = _aligned(dx.contiguous()), _aligned(intra)
    dummy = z
    grid = (frames, triton.cdiv(length + rho, BLOCK_R))
    _pack_bwd_kernel[grid](
        dx, counts, cu_seqlens,
        topk_idx if k else dummy, gate if k else dummy, intra if k else dummy,
        dz, dgate if k else dummy, dintra if k else dummy, dinter if rho else dummy,
        dx.shape[0], n, width, max(k, 1), max(rho, 1),
        HAS_INTRA=k > 0, HAS_INTER=rho > 0,
        BLOCK_R=BLOCK_R, BLOCK_D=_block_d(z.dtype), BLOCK_K=BLOCK_K,
        ALIGNED=_row_aligned(width, z.dtype, *([intra.dtype] if k else [])), INTERPRETER=interpreter_enabled(),
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    return dz, dgate, dintra, dinter


# --------------------------------------------------------------------------- PyTorch semantics
def pack_sequences_reference(
    z: torch.Tensor,
    counts: torch.Tensor,
    cu_seqlens: torch.Tensor,
    total_tokens: int,
    topk_idx: Optional[torch.Tensor] = None,
    gate: Optional[torch.Tensor] = None,
    intra: Optional[torch.Tensor] = None,
    inter: Optional[torch.Tensor] = None,
    *,
    check_inputs: bool = True,
    rows: Optional[int] = None,
) -> torch.Tensor:
    """The same function in plain PyTorch, differentiable by autograd (float64 included): what runs
    where Triton cannot, and the tests' ground truth. Same signature as :func:`pack_sequences`."""
    if check_inputs:
        _validate(z, counts, cu_seqlens, total_tokens, topk_idx, gate, intra, inter, True)
    rows = _check_rows(rows, total_tokens)
    x = _pack_torch(z, counts, topk_idx, gate, intra, inter)
    return F.pad(x, (0, 0, 0, rows - total_tokens)) if rows != total_tokens else x


def _pack_torch(z, counts, topk_idx, gate, intra, inter) -> torch.Tensor:
    frames, length, width = z.shape
    e = z[:, 1:]
    if topk_idx is not None:
        acc = torch.promote_types(z.dtype, torch.float32)  # fp32, or fp64 for float64 ground truth
        overlay = torch.zeros(frames, length - 1, width, dtype=acc, device=z.device)
        overlay = overlay.scatter(1, topk_idx[..., None].expand(-1, -1, width), gate[..., None].to(acc) * intra.to(acc))
        e = (e.to(acc) + overlay).to(z.dtype)
    seq = torch.cat([z[:, :1], e], dim=1)  # (F, 1+N, D)
    if inter is None:
        return seq.reshape(frames * length, width)
    full = torch.cat([seq, inter.to(z.dtype)], dim=1)  # (F, 1+N+rho, D)
    keep = torch.arange(full.shape[1], device=z.device)[None, :] < (length + counts.long())[:, None]
    return full[keep]


# --------------------------------------------------------------------------- custom ops + autograd (Triton)
@torch.library.custom_op("stop_fast::pack_sequences", mutates_args=())
def _pack_op(
    z: torch.Tensor, counts: torch.Tensor, cu_seqlens: torch.Tensor, total_tokens: int, rows: int,
    topk_idx: Optional[torch.Tensor], gate: Optional[torch.Tensor],
    intra: Optional[torch.Tensor], inter: Optional[torch.Tensor],
) -> torch.Tensor:
    return _launch_forward(z, counts, cu_seqlens, total_tokens, rows, topk_idx, gate, intra, inter)


@_pack_op.register_fake
def _(z, counts, cu_seqlens, total_tokens, rows, topk_idx, gate, intra, inter):
    return z.new_empty(rows, z.shape[-1])


@torch.library.custom_op("stop_fast::pack_sequences_backward", mutates_args=())
def _pack_backward_op(
    dx: torch.Tensor, z: torch.Tensor, counts: torch.Tensor, cu_seqlens: torch.Tensor,
    topk_idx: Optional[torch.Tensor], gate: Optional[torch.Tensor],
    intra: Optional[torch.Tensor], inter: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_backward(dx, z, counts, cu_seqlens, topk_idx, gate, intra, inter)


@_pack_backward_op.register_fake
def _(dx, z, counts, cu_seqlens, topk_idx, gate, intra, inter):
    empty = z.new_empty(0)
    return (
        torch.empty_like(z),
        torch.empty_like(gate) if gate is not None else empty,
        torch.empty_like(intra) if intra is not None else empty,
        torch.empty_like(inter) if inter is not None else empty,
    )


def _setup_context(ctx, inputs, output):
    z, counts, cu_seqlens, _, _, topk_idx, gate, intra, inter = inputs
    # z itself is not needed by the backward, only its shape and dtype: save a 0-stride stand-in
    ctx.save_for_backward(z.new_empty(()).expand(z.shape), counts, cu_seqlens, topk_idx, gate, intra, inter)


def _backward(ctx, dx):
    z, counts, cu_seqlens, topk_idx, gate, intra, inter = ctx.saved_tensors
    dz, dgate, dintra, dinter = _pack_backward_op(dx, z, counts, cu_seqlens, topk_idx, gate, intra, inter)
    return (
        dz, None, None, None, None, None,
        dgate if gate is not None else None,
        dintra if intra is not None else None,
        dinter if inter is not None else None,
    )


_pack_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public entry points
def cu_seqlens_from_counts(
    counts: torch.Tensor, tokens_per_frame: int, max_count: Optional[int] = None
) -> Tuple[torch.Tensor, int, int]:
    """``cu_seqlens`` for frames of ``tokens_per_frame + counts[f]`` tokens.

    Args:
        counts: (F,) integer tensor n_f, on the compute device.
        tokens_per_frame: 1 + N, the tokens every frame has before its inter-frame prompts.
        max_count: a static bound on ``counts`` (rho); when given, ``max_seqlen`` is
            ``tokens_per_frame + max_count`` instead of the batch's actual longest sequence.
    Returns:
        ``(cu_seqlens, total_tokens, max_seqlen)``: int32 (F+1,) on the counts' device with
        ``cu[0] = 0``; the packed token count and the longest sequence as Python ints.

    Host synchronisation: the two numbers (total tokens, longest count) come over in ONE transfer of a
    2-element tensor; this is the single host sync of a fast-path step (the size of the packed buffer
    depends on counts that live on the device).
    """
    if not isinstance(counts, torch.Tensor) or counts.dim() != 1 or counts.dtype.is_floating_point \
            or counts.dtype.is_complex or counts.dtype == torch.bool:
        raise ValueError(f"counts must be a 1-D integer tensor, got {getattr(counts, 'dtype', type(counts))} "
                         f"of shape {tuple(getattr(counts, 'shape', ()))}")
    if not isinstance(tokens_per_frame, int) or tokens_per_frame < 1:
        raise ValueError(f"tokens_per_frame must be a positive int (1 + N), got {tokens_per_frame!r}")
    if max_count is not None and (not isinstance(max_count, int) or max_count < 0):
        raise ValueError(f"max_count must be a non-negative int, got {max_count!r}")
    lengths = counts.to(torch.int64) + tokens_per_frame
    cu = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=counts.device)
    torch.cumsum(lengths, 0, out=cu[1:])
    longest = counts.max().to(torch.int64) if counts.numel() else cu[0]
    total, top = torch.stack([cu[-1], longest]).tolist()  # the one host sync
    # Under torch.compile (capture_scalar_outputs) these are unbacked SymInts: tell the compiler they
    # are sizes, so shape arithmetic on them needs no guard.
    torch._check(total >= 0)
    torch._check(top >= 0)
    if max_count is not None and isinstance(top, int) and top > max_count:
        raise ValueError(f"max_count = {max_count} is below the largest count {top}")
    max_seqlen = tokens_per_frame + (max_count if max_count is not None else top)
    return cu.to(torch.int32), total, max_seqlen


def pack_sequences(
    z: torch.Tensor,
    counts: torch.Tensor,
    cu_seqlens: torch.Tensor,
    total_tokens: int,
    topk_idx: Optional[torch.Tensor] = None,
    gate: Optional[torch.Tensor] = None,
    intra: Optional[torch.Tensor] = None,
    inter: Optional[torch.Tensor] = None,
    *,
    check_inputs: bool = True,
    rows: Optional[int] = None,
) -> torch.Tensor:
    """Write ``[Z_t[0] ; E~_t ; G_t[:n_t]]`` of every frame into one packed ``(total_tokens, D)`` tensor.

    Args:
        z: (F, N+1, D) float tokens ``[CLS; E]`` with positional embeddings; sets the output dtype.
        counts: (F,) integer inter-frame token counts n_t in 0..rho (all 0 when ``inter`` is None).
        cu_seqlens: (F+1,) int32 sequence starts, from :func:`cu_seqlens_from_counts`.
        total_tokens: ``cu_seqlens[-1]`` as a Python int.
        topk_idx, gate, intra: (F, k) int64 distinct patch indices in 0..N-1, (F, k) float gates,
            (F, k, D) float prompts for those patches; all None when intra-frame prompts are off.
        inter: (F, rho, D) float inter-frame prompt tokens; None when inter-frame prompts are off.
        check_inputs: also validate values (index ranges and repeats, counts, cu_seqlens against
            counts and total_tokens), which costs host syncs. Shapes, dtypes, devices and contiguity
            are always checked. With False, bad values give a wrong result but never an
            out-of-bounds access.
        rows: the output's row count, >= total_tokens (default: total_tokens). Rows from
            total_tokens on are zeros that the same kernel writes (a bucket's padding, see
            ``stop_fast.model.fast.bucket_rows``: the kernel variant ``pack_bucketed`` packs straight
            into the bucket instead of padding with ``F.pad``, a copy forward and backward fewer);
            their gradient is dropped.
    Returns:
        (rows, D) in z's dtype. Differentiable w.r.t. z, gate, intra and inter.
    """
    _validate(z, counts, cu_seqlens, total_tokens, topk_idx, gate, intra, inter, check_inputs)
    rows = _check_rows(rows, total_tokens)
    if z.dtype == torch.float64 or not use_triton(z):
        return pack_sequences_reference(z, counts, cu_seqlens, total_tokens, topk_idx, gate, intra, inter,
                                        check_inputs=False, rows=rows)
    # The kernels take gates in fp32, prompts in z's dtype or fp32 and temporal tokens in z's dtype,
    # so a few compiled variants cover every dtype mix. These casts are exact where the semantics
    # round anyway (the overlay is computed in fp32; inter is cast to z's dtype), and autograd casts
    # the gradients back to each input's dtype.
    counts = counts.to(torch.int32)
    if gate is not None:
        gate = gate.to(torch.float32)
        if intra.dtype != z.dtype:
            intra = intra.to(torch.float32)
    if inter is not None:
        inter = inter.to(z.dtype)
    return _pack_op(z, counts, cu_seqlens, total_tokens, rows, topk_idx, gate, intra, inter)


def gather_rows(x: torch.Tensor, cu_seqlens: torch.Tensor, *, check_inputs: bool = True) -> torch.Tensor:
    """The first row of every packed sequence, ``x[cu_seqlens[:-1]]`` (the CLS tokens): (F, D).

    A plain index_select (differentiable by autograd), no kernel of its own.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D packed tensor (total_tokens, D), got {getattr(x, 'shape', type(x))}")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 \
            or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be a 1-D int32/int64 tensor of F+1 offsets, got "
                         f"{getattr(cu_seqlens, 'dtype', type(cu_seqlens))} {tuple(getattr(cu_seqlens, 'shape', ()))}")
    if cu_seqlens.device != x.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device}, but x is on {x.device}")
    starts = cu_seqlens[:-1].long()
    if check_inputs and starts.numel() and (starts.min() < 0 or starts.max() >= x.shape[0]):
        raise ValueError(f"cu_seqlens[:-1] must index rows of x (0..{x.shape[0] - 1})")
    return x.index_select(0, starts)


def _check_rows(rows, total_tokens):
    """``rows`` as given (an int or SymInt >= total_tokens), or total_tokens when None."""
    if rows is None:
        return total_tokens
    if isinstance(rows, bool) or not isinstance(rows, (int, torch.SymInt)) or rows < total_tokens:
        raise ValueError(f"rows must be an int >= total_tokens = {total_tokens}, got {rows!r}")
    return rows


def _describe(t) -> str:
    return f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def _validate(z, counts, cu_seqlens, total_tokens, topk_idx, gate, intra, inter, check_values: bool) -> None:
    """Every check that needs no host sync, then (``check_values``) those that do; a ValueError
    naming the argument, before any launch."""
    if not isinstance(z, torch.Tensor) or z.dim() != 3 or not z.is_floating_point():
        raise ValueError(f"z must be a float tensor (F, N+1, D), got {_describe(z)}")
    frames, length, width = z.shape
    if length < 1:
        raise ValueError("z must hold at least the CLS row (N+1 >= 1)")
    device = z.device
    if not isinstance(counts, torch.Tensor) or counts.shape != (frames,) or counts.dtype.is_floating_point \
            or counts.dtype.is_complex or counts.dtype == torch.bool:
        raise ValueError(f"counts must be an integer tensor of shape ({frames},), got {_describe(counts)}")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.shape != (frames + 1,) or cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be an int32 tensor of shape ({frames + 1},), got {_describe(cu_seqlens)}")
    if isinstance(total_tokens, bool) or not isinstance(total_tokens, (int, torch.SymInt)) or total_tokens < 0:
        raise ValueError(f"total_tokens must be a non-negative int, got {total_tokens!r}")
    given = [t is not None for t in (topk_idx, gate, intra)]
    if any(given) and not all(given):
        missing = [name for name, g in zip(("topk_idx", "gate", "intra"), given) if not g]
        raise ValueError(f"topk_idx, gate and intra must be given together (or all None); missing {', '.join(missing)}")
    tensors = {"z": z, "counts": counts, "cu_seqlens": cu_seqlens}
    if topk_idx is not None:
        if not isinstance(topk_idx, torch.Tensor) or topk_idx.dim() != 2 or topk_idx.shape[0] != frames \
                or topk_idx.dtype != torch.int64:
            raise ValueError(f"topk_idx must be int64 of shape ({frames}, k), got {_describe(topk_idx)}")
        k = topk_idx.shape[1]
        if k > length - 1:
            raise ValueError(f"topk_idx selects k = {k} patches but z has N = {length - 1}")
        if not isinstance(gate, torch.Tensor) or gate.shape != (frames, k) or not gate.is_floating_point():
            raise ValueError(f"gate must be a float tensor of shape ({frames}, {k}), got {_describe(gate)}")
        if not isinstance(intra, torch.Tensor) or intra.shape != (frames, k, width) or not intra.is_floating_point():
            raise ValueError(f"intra must be a float tensor of shape ({frames}, {k}, {width}), got {_describe(intra)}")
        tensors.update(topk_idx=topk_idx, gate=gate, intra=intra)
    if inter is not None:
        if not isinstance(inter, torch.Tensor) or inter.dim() != 3 or inter.shape[0] != frames \
                or inter.shape[2] != width or not inter.is_floating_point():
            raise ValueError(f"inter must be a float tensor of shape ({frames}, rho, {width}), got {_describe(inter)}")
        tensors.update(inter=inter)
    for name, t in tensors.items():
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, but z is on {device}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if not check_values:
        return
    rho = inter.shape[1] if inter is not None else 0
    if frames and (counts.min() < 0 or counts.max() > rho):
        raise ValueError(f"counts must lie in 0..{rho} ({'rho' if inter is not None else 'inter is None'})")
    if topk_idx is not None and topk_idx.numel():
        if topk_idx.min() < 0 or topk_idx.max() >= length - 1:
            raise ValueError(f"topk_idx values must lie in 0..{length - 2}")
        if (topk_idx.sort(dim=1).values.diff(dim=1) == 0).any():
            raise ValueError("topk_idx must not repeat a patch within a frame")
    expected = torch.zeros(frames + 1, dtype=torch.int64, device=device)
    torch.cumsum(counts.to(torch.int64) + length, 0, out=expected[1:])
    if not torch.equal(expected, cu_seqlens.to(torch.int64)):
        raise ValueError("cu_seqlens does not match counts (cu_seqlens[f+1] - cu_seqlens[f] must be N+1+counts[f], from 0)")
    if int(expected[-1]) != total_tokens:
        raise ValueError(f"total_tokens = {total_tokens} but cu_seqlens ends at {int(expected[-1])}")


# --------------------------------------------------------------------------- shipped configurations
def compile_cases() -> List[CompileCase]:
    """Every configuration the kernels launch with. The width D is a runtime argument, so ViT-B (768),
    ViT-L (1024) and stop-tiny (128) share the ALIGNED=True kernels; ALIGNED=False serves widths whose
    rows are not a multiple of 16 bytes. For each token dtype: prompts in the token dtype or fp32,
    each on/off combination of the two prompt kinds, forward and backward."""
    types = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    cases = []
    for dtype, t in types.items():
        variants = [(True, True, dtype), (True, False, dtype), (False, True, None), (False, False, None)]
        if dtype != torch.float32:
            variants += [(True, True, torch.float32), (True, False, torch.float32)]
        for has_intra, has_inter, intra_dtype in variants:
            for aligned in (True, False):
                p = types[intra_dtype] if intra_dtype is not None else t
                constexprs = dict(HAS_INTRA=has_intra, HAS_INTER=has_inter, BLOCK_R=BLOCK_R,
                                  BLOCK_D=_block_d(dtype), BLOCK_K=BLOCK_K, ALIGNED=aligned, INTERPRETER=False)
                cexpr = {name: "constexpr" for name in constexprs}
                ints = {"total_tokens": "i32", "N": "i32", "D": "i32", "K": "i32", "RHO": "i32"}
                fwd_ints = {**ints, "frames": "i32", "rows_out": "i32"}
                tag = f"{t}_intra{p if has_intra else 0}_inter{int(has_inter)}_{'aligned' if aligned else 'any'}"
                fwd = {"z_ptr": f"*{t}", "counts_ptr": "*i32", "cu_ptr": "*i32", "idx_ptr": "*i64",
                       "gate_ptr": "*fp32", "intra_ptr": f"*{p}", "inter_ptr": f"*{t}", "x_ptr": f"*{t}",
                       **fwd_ints, **cexpr, "PAD": "constexpr"}
                bwd = {"dx_ptr": f"*{t}", "counts_ptr": "*i32", "cu_ptr": "*i32", "idx_ptr": "*i64",
                       "gate_ptr": "*fp32", "intra_ptr": f"*{p}", "dz_ptr": f"*{t}", "dgate_ptr": "*fp32",
                       "dintra_ptr": f"*{p}", "dinter_ptr": f"*{t}", **ints, **cexpr}
                # the forward also with PAD (kernel variant "pack_bucketed": zero rows up to the bucket)
                for name, kernel, sig, extra in (("fwd", _pack_fwd_kernel, fwd, dict(PAD=False)),
                                                 ("fwd", _pack_fwd_kernel, fwd, dict(PAD=True)),
                                                 ("bwd", _pack_bwd_kernel, bwd, {})):
                    # the wrappers pass 16-byte aligned bases; D (128, 768, 1024) is a multiple of 16
                    # where rows are aligned
                    cases.append(CompileCase(f"pack_{name}_{tag}" + ("_pad" if extra.get("PAD") else ""), kernel, sig,
                                             {**constexprs, **extra}, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
                                             aligned=pointers(sig) + (("D",) if aligned else ())))
    return cases
