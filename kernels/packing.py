"""Packed sequence build: ``[Z_t[0] ; E~_t ; G_t[:n_t]]`` of every frame into one ``(total_tokens, D)`` buffer.

SPEC.md steps 7 (overlay) and 11 (packing) in one pass over memory. Frame f's sequence starts at row
``cu_seqlens[f]`` and has ``1 + N + counts[f]`` rows:

    row 0            z[f, 0]                                   (CLS + pos_0)
    row 1 + j        z[f, 1 + j] + gate[f, s] * intra[f, s]     if topk_idx[f, s] == j (fp32, rounded once)
                     z[f, 1 + j]                               otherwise
    row 1 + N + i    inter[f, i]                               for i < counts[f]

Kernel (forward): one program per (frame, block of BLOCK_R rows), looping over D in BLOCK_D chunks.
The row -> slot map of the overlay is found in registers by comparing the block's patch indices with
the frame's k selected indices (a BLOCK_R x BLOCK_K compare), never as an N x k matrix in memory.
Every output row is written exactly once; nothing is zero-filled.

Kernel (backward): the same grid over rows 0 .. N + rho of every frame, so every gradient row is
written exactly once without atomics: dz[f, r] = dx[row]; for a selected patch, d intra[f, s] =
gate * dx[row] and d gate[f, s] = <dx[row], intra[f, s]> (accumulated over the D loop in fp32); rows
of unused inter-frame slots (i >= counts[f]) get zero gradient.

Host synchronisation: ``cu_seqlens_from_counts`` transfers two numbers (total tokens, longest count)
in one copy; that is the fast path's only sync. ``pack_sequences`` itself never syncs unless
``check_inputs=True`` validates index and count values.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from ._triton import jit, tl, triton
from .aot import CompileCase
from .dispatch import use_triton

BLOCK_R = 16
# 16 rows x 128 columns over 8 warps: 16-byte bf16 vectors per thread and ~130-150 registers on sm_90
# (4 warps need ~250 registers: every element carries a 64-bit address).
NUM_WARPS = 8


@jit
def _frame_rows(counts_ptr, cu_ptr, f, rows, N, RHO, HAS_INTER: tl.constexpr):
    """Start row of frame ``f`` in the packed buffer and which of ``rows`` exist (1 + N + n_f of them).
    Counts are clamped to 0..rho so even unchecked input never reads past ``inter``."""
    if HAS_INTER:
        count = tl.minimum(tl.maximum(tl.load(counts_ptr + f), 0), RHO)
    else:
        count = 0
    start = tl.load(cu_ptr + f).to(tl.int64)
    return start, rows < N + 1 + count


@jit
def _slot_of_rows(idx_ptr, gate_ptr, f, rows, K, BLOCK_K: tl.constexpr):
    """For each row 1 + j, the slot s with topk_idx[f, s] == j (if any) and its gate: a
    BLOCK_R x BLOCK_K compare in registers, never an N x k matrix in memory."""
    slots = tl.arange(0, BLOCK_K)
    sel = tl.load(idx_ptr + f * K + slots, mask=slots < K, other=-1)
    hit = (sel[None, :] == (rows[:, None] - 1)) & (slots[None, :] < K)
    has_prompt = tl.sum(hit.to(tl.int32), axis=1) > 0
    slot = tl.minimum(tl.sum(tl.where(hit, slots[None, :], 0), axis=1), K - 1)
    g = tl.load(gate_ptr + f * K + slot, mask=has_prompt, other=0.0).to(tl.float32)
    return has_prompt, slot, g


@jit
def _pack_fwd_kernel(
    z_ptr, counts_ptr, cu_ptr, idx_ptr, gate_ptr, intra_ptr, inter_ptr, x_ptr,
    total_tokens, N, D, K, RHO,
    HAS_INTRA: tl.constexpr, HAS_INTER: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    f = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    start, exists = _frame_rows(counts_ptr, cu_ptr, f, rows, N, RHO, HAS_INTER)
    out_row = start + rows
    valid = exists & (out_row < total_tokens)
    is_z = rows <= N
    is_inter = valid & (rows > N)

    if HAS_INTRA:
        has_prompt, slot, g = _slot_of_rows(idx_ptr, gate_ptr, f, rows, K, BLOCK_K)
        has_prompt = has_prompt & is_z & valid

    z_row = (f * (N + 1) + tl.minimum(rows, N)).to(tl.int64)
    inter_row = (f * RHO + tl.maximum(rows - N - 1, 0)).to(tl.int64)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        cmask = cols[None, :] < D
        val = tl.load(z_ptr + z_row[:, None] * D + cols[None, :], mask=(valid & is_z)[:, None] & cmask, other=0.0)
        val = val.to(tl.float32)
        if HAS_INTRA:
            p_row = (f * K + slot).to(tl.int64)
            p = tl.load(intra_ptr + p_row[:, None] * D + cols[None, :], mask=has_prompt[:, None] & cmask, other=0.0)
            val += g[:, None] * p.to(tl.float32)
        if HAS_INTER:
            t = tl.load(inter_ptr + inter_row[:, None] * D + cols[None, :], mask=is_inter[:, None] & cmask, other=0.0)
            val = tl.where(is_inter[:, None], t.to(tl.float32), val)
        tl.store(x_ptr + out_row[:, None] * D + cols[None, :], val.to(x_ptr.dtype.element_ty), mask=valid[:, None] & cmask)


@jit
def _pack_bwd_kernel(
    dx_ptr, counts_ptr, cu_ptr, idx_ptr, gate_ptr, intra_ptr,
    dz_ptr, dgate_ptr, dintra_ptr, dinter_ptr,
    total_tokens, N, D, K, RHO,
    HAS_INTRA: tl.constexpr, HAS_INTER: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    f = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    start, exists = _frame_rows(counts_ptr, cu_ptr, f, rows, N, RHO, HAS_INTER)
    in_row = start + rows
    readable = exists & (in_row < total_tokens)
    is_z = rows <= N
    is_inter = (rows > N) & (rows < N + 1 + RHO)

    if HAS_INTRA:
        has_prompt, slot, g = _slot_of_rows(idx_ptr, gate_ptr, f, rows, K, BLOCK_K)
        has_prompt = has_prompt & is_z
        g_acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        p_row = (f * K + slot).to(tl.int64)

    z_row = (f * (N + 1) + tl.minimum(rows, N)).to(tl.int64)
    inter_row = (f * RHO + tl.maximum(rows - N - 1, 0)).to(tl.int64)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        cmask = cols[None, :] < D
        dx = tl.load(dx_ptr + in_row[:, None] * D + cols[None, :], mask=readable[:, None] & cmask, other=0.0)
        dx = dx.to(tl.float32)
        tl.store(dz_ptr + z_row[:, None] * D + cols[None, :], dx.to(dz_ptr.dtype.element_ty), mask=is_z[:, None] & cmask)
        if HAS_INTRA:
            p = tl.load(intra_ptr + p_row[:, None] * D + cols[None, :], mask=has_prompt[:, None] & cmask, other=0.0)
            g_acc += tl.sum(dx * p.to(tl.float32), axis=1)
            tl.store(dintra_ptr + p_row[:, None] * D + cols[None, :], (g[:, None] * dx).to(dintra_ptr.dtype.element_ty),
                     mask=has_prompt[:, None] & cmask)
        if HAS_INTER:
            tl.store(dinter_ptr + inter_row[:, None] * D + cols[None, :], dx.to(dinter_ptr.dtype.element_ty),
                     mask=is_inter[:, None] & cmask)
    if HAS_INTRA:
        tl.store(dgate_ptr + f * K + slot, g_acc.to(dgate_ptr.dtype.element_ty), mask=has_prompt)


def _block_d(d: int, dtype: torch.dtype) -> int:
    # 16 bytes per thread and row: 128 columns of a 16-bit dtype, 64 of fp32 (128 fp32 columns spill)
    return min(128 if dtype.itemsize <= 2 else 64, triton.next_power_of_2(d))


def _block_k(k: int) -> int:
    return max(16, triton.next_power_of_2(max(k, 1)))


def _launch_forward(z, counts, cu_seqlens, total_tokens, topk_idx, gate, intra, inter) -> torch.Tensor:
    frames, length, width = z.shape
    n = length - 1
    k = topk_idx.shape[1] if topk_idx is not None else 0
    rho = inter.shape[1] if inter is not None else 0
    x = torch.empty(total_tokens, width, dtype=z.dtype, device=z.device)
    if total_tokens == 0 or frames == 0:
        return x
    dummy = z  # never dereferenced when the matching constexpr flag is off
    grid = (frames, triton.cdiv(n + 1 + rho, BLOCK_R))
    _pack_fwd_kernel[grid](
        z, counts, cu_seqlens,
        topk_idx if k else dummy, gate if k else dummy, intra if k else dummy, inter if rho else dummy,
        x, total_tokens, n, width, max(k, 1), max(rho, 1),
        HAS_INTRA=k > 0, HAS_INTER=rho > 0,
        BLOCK_R=BLOCK_R, BLOCK_D=_block_d(width, z.dtype), BLOCK_K=_block_k(k), num_warps=NUM_WARPS,
    )
    return x


def _launch_backward(dx, z, counts, cu_seqlens, topk_idx, gate, intra, inter):
    frames, length, width = z.shape
    n = length - 1
    k = topk_idx.shape[1] if topk_idx is not None else 0
    rho = inter.shape[1] if inter is not None else 0
    dz = torch.empty_like(z)
    dgate = torch.zeros_like(gate) if k else z.new_empty(0)
    dintra = torch.zeros_like(intra) if k else z.new_empty(0)  # zeros: unselected-by-bad-index slots
    dinter = torch.empty_like(inter) if rho else z.new_empty(0)
    if frames == 0:
        return dz, dgate, dintra, dinter
    dummy = z
    grid = (frames, triton.cdiv(n + 1 + rho, BLOCK_R))
    _pack_bwd_kernel[grid](
        dx.contiguous(), counts, cu_seqlens,
        topk_idx if k else dummy, gate if k else dummy, intra if k else dummy,
        dz, dgate if k else dummy, dintra if k else dummy, dinter if rho else dummy,
        dx.shape[0], n, width, max(k, 1), max(rho, 1),
        HAS_INTRA=k > 0, HAS_INTER=rho > 0,
        BLOCK_R=BLOCK_R, BLOCK_D=_block_d(width, dx.dtype), BLOCK_K=_block_k(k), num_warps=NUM_WARPS,
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
) -> torch.Tensor:
    """The same function in plain PyTorch, differentiable by autograd (float64 included): what runs
    where Triton cannot, and the tests' ground truth."""
    frames, length, width = z.shape
    e = z[:, 1:]
    if topk_idx is not None:
        acc = torch.promote_types(z.dtype, torch.float32)
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
    z: torch.Tensor, counts: torch.Tensor, cu_seqlens: torch.Tensor, total_tokens: int,
    topk_idx: Optional[torch.Tensor], gate: Optional[torch.Tensor],
    intra: Optional[torch.Tensor], inter: Optional[torch.Tensor],
) -> torch.Tensor:
    return _launch_forward(z, counts, cu_seqlens, total_tokens, topk_idx, gate, intra, inter)


@_pack_op.register_fake
def _(z, counts, cu_seqlens, total_tokens, topk_idx, gate, intra, inter):
    return z.new_empty(total_tokens, z.shape[-1])


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
    z, counts, cu_seqlens, _, topk_idx, gate, intra, inter = inputs
    ctx.save_for_backward(z, counts, cu_seqlens, topk_idx, gate, intra, inter)


def _backward(ctx, dx):
    z, counts, cu_seqlens, topk_idx, gate, intra, inter = ctx.saved_tensors
    dz, dgate, dintra, dinter = _pack_backward_op(dx, z, counts, cu_seqlens, topk_idx, gate, intra, inter)
    return (
        dz, None, None, None, None,
        dgate if gate is not None else None,
        dintra if intra is not None else None,
        dinter if inter is not None else None,
    )


_pack_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public entry points
def cu_seqlens_from_counts(
    counts: torch.Tensor, tokens_per_frame: int, max_count: Optional[int] = None
) -> Tuple[torch.Tensor, int, int]:
    """``cu_seqlens`` (int32, on the counts' device) for frames of ``tokens_per_frame + counts[f]`` tokens.

    Returns ``(cu_seqlens, total_tokens, max_seqlen)``. The two host numbers come over in ONE transfer,
    the single host synchronisation of a fast-path step. ``max_count`` gives a static ``max_seqlen``.
    """
    if counts.dim() != 1 or counts.dtype.is_floating_point or counts.dtype == torch.bool:
        raise ValueError(f"counts must be a 1-D integer tensor, got {counts.dtype} of shape {tuple(counts.shape)}")
    lengths = counts.to(torch.int64) + tokens_per_frame
    cu = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=counts.device)
    torch.cumsum(lengths, 0, out=cu[1:])
    longest = counts.max().to(torch.int64) if counts.numel() else torch.zeros((), dtype=torch.int64, device=counts.device)
    total, top = torch.stack([cu[-1], longest]).tolist()
    # Under torch.compile (capture_scalar_outputs) these are unbacked SymInts: tell the compiler they
    # are sizes, so shape arithmetic on them needs no guard.
    torch._check(total >= 0)
    torch._check(top >= 0)
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
) -> torch.Tensor:
    """Write ``[Z_t[0] ; E~_t ; G_t[:n_t]]`` of every frame into one packed ``(total_tokens, D)`` tensor.

    Args:
        z: (F, N+1, D) float tokens ``[CLS; E]`` with positional embeddings.
        counts: (F,) int32 inter-frame token counts n_t (0 when ``inter`` is None).
        cu_seqlens: (F+1,) int32 sequence starts, from :func:`cu_seqlens_from_counts`.
        total_tokens: ``cu_seqlens[-1]`` as a Python int.
        topk_idx, gate, intra: (F, k) int64 selected patches, (F, k) float gates, (F, k, D) prompts for
            those patches; all None when intra-frame prompts are off.
        inter: (F, rho, D) inter-frame prompt tokens; None when inter-frame prompts are off.
        check_inputs: also validate index and count values (costs a host sync); shapes, dtypes and
            devices are always checked.
    Differentiable w.r.t. z, gate, intra and inter.
    """
    _validate(z, counts, cu_seqlens, total_tokens, topk_idx, gate, intra, inter, check_inputs)
    if z.dtype == torch.float64 or not use_triton(z):
        return pack_sequences_reference(z, counts, cu_seqlens, total_tokens, topk_idx, gate, intra, inter)
    return _pack_op(z, counts, cu_seqlens, total_tokens, topk_idx, gate, intra, inter)


def _validate(z, counts, cu_seqlens, total_tokens, topk_idx, gate, intra, inter, check_values: bool) -> None:
    if not isinstance(z, torch.Tensor) or z.dim() != 3 or not z.is_floating_point():
        raise ValueError(f"z must be a float tensor (F, N+1, D), got {getattr(z, 'shape', type(z))}")
    frames, length, width = z.shape
    if length < 1:
        raise ValueError("z must hold at least the CLS row (N+1 >= 1)")
    device = z.device
    if not isinstance(counts, torch.Tensor) or counts.shape != (frames,) or counts.dtype != torch.int32:
        raise ValueError(f"counts must be an int32 tensor of shape ({frames},), got "
                         f"{getattr(counts, 'dtype', type(counts))} {tuple(getattr(counts, 'shape', ()))}")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.shape != (frames + 1,) or cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be an int32 tensor of shape ({frames + 1},), got "
                         f"{getattr(cu_seqlens, 'dtype', type(cu_seqlens))} {tuple(getattr(cu_seqlens, 'shape', ()))}")
    if not isinstance(total_tokens, (int, torch.SymInt)) or total_tokens < 0:
        raise ValueError(f"total_tokens must be a non-negative int, got {total_tokens!r}")
    given = [t is not None for t in (topk_idx, gate, intra)]
    if any(given) and not all(given):
        raise ValueError("topk_idx, gate and intra must be given together (or all None)")
    tensors = {"z": z, "counts": counts, "cu_seqlens": cu_seqlens}
    if topk_idx is not None:
        if topk_idx.dim() != 2 or topk_idx.shape[0] != frames or topk_idx.dtype != torch.int64:
            raise ValueError(f"topk_idx must be int64 of shape ({frames}, k), got {topk_idx.dtype} {tuple(topk_idx.shape)}")
        k = topk_idx.shape[1]
        if k > length - 1:
            raise ValueError(f"topk_idx selects k = {k} patches but z has N = {length - 1}")
        if gate.shape != (frames, k) or not gate.is_floating_point():
            raise ValueError(f"gate must be a float tensor of shape ({frames}, {k}), got {gate.dtype} {tuple(gate.shape)}")
        if intra.shape != (frames, k, width) or not intra.is_floating_point():
            raise ValueError(f"intra must be a float tensor of shape ({frames}, {k}, {width}), got {intra.dtype} {tuple(intra.shape)}")
        tensors.update(topk_idx=topk_idx, gate=gate, intra=intra)
    if inter is not None:
        if inter.dim() != 3 or inter.shape[0] != frames or inter.shape[2] != width or not inter.is_floating_point():
            raise ValueError(f"inter must be a float tensor of shape ({frames}, rho, {width}), got {inter.dtype} {tuple(inter.shape)}")
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
        raise ValueError(f"counts must lie in 0..{rho} (rho{'' if inter is not None else ', inter is None'})")
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
    """Every configuration the fast path launches: widths of stop-tiny, ViT-B and ViT-L, each dtype,
    each on/off combination of the two prompt kinds."""
    cases = []
    types = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    for width in (128, 768, 1024):
        for dtype, t in types.items():
            for has_intra in (True, False):
                for has_inter in (True, False):
                    common = dict(HAS_INTRA=has_intra, HAS_INTER=has_inter, BLOCK_R=BLOCK_R,
                                  BLOCK_D=_block_d(width, dtype), BLOCK_K=16)
                    tag = f"d{width}_{t}_intra{int(has_intra)}_inter{int(has_inter)}"
                    fwd_sig = {
                        "z_ptr": f"*{t}", "counts_ptr": "*i32", "cu_ptr": "*i32", "idx_ptr": "*i64",
                        "gate_ptr": "*fp32", "intra_ptr": f"*{t}", "inter_ptr": f"*{t}", "x_ptr": f"*{t}",
                        "total_tokens": "i32", "N": "i32", "D": "i32", "K": "i32", "RHO": "i32",
                        **{name: "constexpr" for name in common},
                    }
                    cases.append(CompileCase(f"pack_fwd_{tag}", _pack_fwd_kernel, fwd_sig, common, num_warps=NUM_WARPS))
                    bwd_sig = {
                        "dx_ptr": f"*{t}", "counts_ptr": "*i32", "cu_ptr": "*i32", "idx_ptr": "*i64",
                        "gate_ptr": "*fp32", "intra_ptr": f"*{t}", "dz_ptr": f"*{t}", "dgate_ptr": "*fp32",
                        "dintra_ptr": f"*{t}", "dinter_ptr": f"*{t}",
                        "total_tokens": "i32", "N": "i32", "D": "i32", "K": "i32", "RHO": "i32",
                        **{name: "constexpr" for name in common},
                    }
                    cases.append(CompileCase(f"pack_bwd_{tag}", _pack_bwd_kernel, bwd_sig, common, num_warps=NUM_WARPS))
    return cases
