"""Attention alone: stop_fast's varlen kernel against every ragged-attention route PyTorch offers.

    python benchmarks/run.py --only attention --out results.json       (all cases of this module)
    pytest benchmarks/test_bench.py -k attention --benchmark-enable     (pytest-benchmark cases)

Problems (bf16 on CUDA, fp32 on a CPU), lengths uniform like STOP's frames (1 + N + n_t, n_t in 0..12):
- ``vit_b32``: 1536 sequences (128 videos x 12 frames) of 50..62 tokens, 12 heads of 64;
- ``vit_b16``: 384 sequences (32 x 12) of 197..209 tokens, 12 heads of 64.
Implementations, each on the layout it needs (no re-packing inside the timed region, except what the
implementation itself must do per call):
- ``stop_fast``: ``stop_fast.kernels.varlen_attention`` on packed (total, heads, d) q, k, v;
- ``stop_fast_qkvpacked``: ``varlen_attention_qkvpacked`` on the fused (total, 3, heads, d) QKV output
  (when the installed stop_fast has it);
- ``torch_varlen_attn``: ``torch.nn.attention.varlen.varlen_attn`` (PyTorch's own flash varlen), when
  the installed torch has it;
- ``flex_document_mask``: FlexAttention (compiled) over all tokens as one sequence with a document
  mask; the block mask is built inside the timed region, as a model must for every batch;
- ``sdpa_nested_jagged``: SDPA on nested jagged tensors built from the packed tokens (views);
- ``sdpa_padded_masked``: SDPA on the batch padded to the longest sequence, key-padding mask;
- ``sdpa_padded_flash_unmasked``: SDPA's flash backend on the padded batch without a mask: wrong on
  purpose (it attends to padding), the speed bound of any padded layout.
Reported: median / p10 / p90 ms; GB/s of the bytes the op must move at least (q, k, v read and o
written forward; forward + backward also reads o, dO and writes dq, dk, dv: 12 tensors of
total x heads x d), as a fraction of the copy bandwidth measured in the same run (the op is
memory-bound at these lengths); TFLOP/s on real (unpadded) work; and the forward's largest error
against fp32 truth on the real rows.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable, Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Case, CaseGroup, Unavailable, run_group  # noqa: E402

PROBLEMS = {  # name: (sequences, shortest, longest)
    "vit_b32": (1536, 50, 62),
    "vit_b16": (384, 197, 209),
}
QUICK_PROBLEMS = {"vit_b32_small": (16, 50, 62)}
HEADS, HEAD_DIM = 12, 64


# --------------------------------------------------------------------------- packed implementations
# Each takes packed q, k, v (total, heads, d), int32 cu_seqlens and the longest length, and returns
# the packed output: the signature of ``fast_forward(..., attention=...)``, so the whole-model
# benchmark plugs the same functions into STOP.
def stop_fast_attention(q, k, v, cu_seqlens, max_seqlen):
    from stop_fast.kernels import varlen_attention

    return varlen_attention(q, k, v, cu_seqlens, max_seqlen, check_inputs=False)


def require_torch_varlen() -> None:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        raise Unavailable(f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn") from None


def torch_varlen_attention(q, k, v, cu_seqlens, max_seqlen):
    from torch.nn.attention.varlen import varlen_attn

    # positional only: the keyword arguments changed between torch releases
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)


class FlexDocumentAttention:
    """FlexAttention over the packed tokens as one sequence, a token attending only within its frame.

    The block mask depends on the batch's token counts, so it is built per batch: per call, or with
    ``reuse_per_batch`` once per ``cu_seqlens`` tensor (every layer of one forward passes the same
    one), which is what a model would do.
    """

    def __init__(self, reuse_per_batch: bool = False):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        # compiled, so the (total x total) mask is evaluated block by block and never materialised
        self._create = torch.compile(create_block_mask)
        self._attend = torch.compile(flex_attention)
        self.reuse = reuse_per_batch
        self._cu = self._mask = None

    def block_mask(self, cu_seqlens: torch.Tensor, total: int):
        if self.reuse and self._cu is cu_seqlens:
            return self._mask
        positions = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
        seq_id = torch.searchsorted(cu_seqlens, positions, right=True) - 1

        def document(b, h, q_idx, kv_idx):
            return seq_id[q_idx] == seq_id[kv_idx]

        mask = self._create(document, None, None, total, total, device=cu_seqlens.device)
        if self.reuse:
            self._cu, self._mask = cu_seqlens, mask
        return mask

    def __call__(self, q, k, v, cu_seqlens, max_seqlen):
        mask = self.block_mask(cu_seqlens, q.shape[0])
        one = [t.transpose(0, 1).contiguous()[None] for t in (q, k, v)]  # (1, heads, total, d)
        return self._attend(*one, block_mask=mask)[0].transpose(0, 1)


def sdpa_nested_jagged(q, k, v, cu_seqlens, max_seqlen):
    offsets = cu_seqlens.long()

    def nested(x):  # (total, heads, d) -> (sequences, heads, j, d), a view of x
        return torch.nested.nested_tensor_from_jagged(x, offsets=offsets, max_seqlen=max_seqlen).transpose(1, 2)

    out = F.scaled_dot_product_attention(nested(q), nested(k), nested(v))
    return out.transpose(1, 2).values()


# --------------------------------------------------------------------------- problem and candidates
def make_problem(device: torch.device, sequences: int, low: int, high: int, seed: int = 0) -> Dict[str, Any]:
    """Packed q, k, v, dO (bf16 on CUDA, fp32 on a CPU), cu_seqlens and the lengths, seeded."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (sequences,), generator=g)
    cu = torch.zeros(sequences + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    total = int(cu[-1])
    qkv = torch.randn(total, 3, HEADS, HEAD_DIM, generator=g).to(device, dtype)
    do = torch.randn(total, HEADS, HEAD_DIM, generator=g).to(device, dtype)
    return {"qkv": qkv, "do": do, "cu": cu.to(device), "lengths": lengths, "max_len": int(lengths.max()),
            "total": total, "dtype": dtype, "device": device}


def _padding(p):
    """(sequence id, position) of every packed row, to scatter into and gather from a padded batch."""
    seq_id = torch.repeat_interleave(torch.arange(p["lengths"].numel()), p["lengths"]).to(p["device"])
    pos = torch.arange(p["total"], device=p["device"]) - p["cu"][:-1].long()[seq_id]
    return seq_id, pos


def to_padded(p, x: torch.Tensor) -> torch.Tensor:
    """Packed (total, heads, d) -> (sequences, heads, longest, d), zeros in the padding."""
    seq_id, pos = _padding(p)
    buf = x.new_zeros(p["lengths"].numel(), p["max_len"], *x.shape[1:])
    return buf.index_put((seq_id, pos), x).transpose(1, 2).contiguous()


def from_padded(p, x: torch.Tensor) -> torch.Tensor:
    seq_id, pos = _padding(p)
    return x.transpose(1, 2)[seq_id, pos]


class Candidate:
    """One implementation on its own layout: leaf tensors, a forward over them, dO in that layout,
    and how to read its output back as packed rows (for the error check)."""

    def __init__(self, leaves: List[torch.Tensor], forward: Callable[..., torch.Tensor], grad_out: torch.Tensor,
                 unpack: Callable[[torch.Tensor], torch.Tensor] = lambda o: o, correct: bool = True):
        self.leaves = [t.detach().clone().requires_grad_() for t in leaves]
        self._forward, self.grad_out, self.unpack, self.correct = forward, grad_out, unpack, correct

    def forward(self) -> torch.Tensor:
        return self._forward(*self.leaves)

    def inference(self) -> torch.Tensor:
        with torch.no_grad():
            return self.forward()

    def forward_backward(self) -> None:
        for t in self.leaves:
            t.grad = None
        self.forward().backward(self.grad_out)


def candidates(p) -> Dict[str, Callable[[], Candidate]]:
    """name -> builder (lazy: one failing to build or run does not stop the others)."""
    qkv, do, cu, max_len = p["qkv"], p["do"], p["cu"], p["max_len"]
    q, k, v = (t.contiguous() for t in qkv.unbind(1))

    def packed(fn):
        return lambda: Candidate([q, k, v], lambda a, b, c: fn(a, b, c, cu, max_len), do)

    def qkvpacked():
        try:
            from stop_fast.kernels import varlen_attention_qkvpacked
        except ImportError:
            raise Unavailable("this stop_fast has no kernels.varlen_attention_qkvpacked") from None

        return Candidate([qkv], lambda t: varlen_attention_qkvpacked(t, cu, max_len, check_inputs=False), do)

    def torch_varlen():
        require_torch_varlen()
        return packed(torch_varlen_attention)()

    def padded(flash_unmasked: bool):
        def build():
            from torch.nn.attention import SDPBackend, sdpa_kernel

            keep = (torch.arange(max_len)[None, :] < p["lengths"][:, None]).to(p["device"])[:, None, None, :]

            def run(a, b, c):
                if flash_unmasked:  # no mask: flash cannot take one
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        return F.scaled_dot_product_attention(a, b, c)
                return F.scaled_dot_product_attention(a, b, c, attn_mask=keep)

            return Candidate([to_padded(p, t) for t in (q, k, v)], run, to_padded(p, do),
                             unpack=lambda o: from_padded(p, o), correct=not flash_unmasked)
        return build

    builders = {
        "stop_fast": packed(stop_fast_attention),
        "stop_fast_qkvpacked": qkvpacked,
        "torch_varlen_attn": torch_varlen,
        "flex_document_mask": lambda: packed(FlexDocumentAttention())(),
        "sdpa_nested_jagged": packed(sdpa_nested_jagged),
        "sdpa_padded_masked": padded(False),
        "sdpa_padded_flash_unmasked": padded(True),
    }
    return builders


def fp32_truth(p) -> torch.Tensor:
    q, k, v = (to_padded(p, t.float()) for t in p["qkv"].unbind(1))
    keep = (torch.arange(p["max_len"])[None, :] < p["lengths"][:, None]).to(p["device"])[:, None, None, :]
    with torch.no_grad():
        return from_padded(p, F.scaled_dot_product_attention(q, k, v, attn_mask=keep))


# --------------------------------------------------------------------------- cases for run.py
SKIP_ON_CPU = {
    "flex_document_mask": "FlexAttention compiles a CPU kernel for minutes; run it on a GPU",
    "torch_varlen_attn": "varlen_attn runs flash attention kernels: CUDA only",
    "sdpa_padded_flash_unmasked": "the flash backend is CUDA only",
}


def cases(ctx) -> List[CaseGroup]:
    """One interleaved group per problem and step, every implementation a member (FlexAttention, which
    compiles, is the least important under a time budget)."""
    problems = QUICK_PROBLEMS if ctx.quick else PROBLEMS
    out = []
    for name, (sequences, low, high) in problems.items():
        state: Dict[str, Any] = {}

        def problem(name=name, sequences=sequences, low=low, high=high, state=state):
            if "p" not in state:
                state["p"] = make_problem(ctx.device, sequences, low, high)
                state["truth"] = fp32_truth(state["p"])
                state["candidates"] = {}  # one per implementation, shared by its two steps (one compile)
            return state

        for step in ("forward", "forward_backward"):
            members = {}
            for impl in candidates_names():
                flex = impl == "flex_document_mask"  # compiles: after the others under a time budget
                members[impl] = Case(f"attention/{name}/{impl}/{step}", None, estimate_s=40 if flex else 8,
                                     priority=1 if flex else 0)
            group = f"attention/{name}/{step}"
            out.append(CaseGroup(group, members, lambda names, step=step, problem=problem, group=group: run_group(
                group, names, lambda impl: prepare(ctx, problem, impl, step), ctx.device,
                {**ctx.op_timing, "flush_l2": True})))
    return out


def candidates_names() -> List[str]:
    return ["stop_fast", "stop_fast_qkvpacked", "torch_varlen_attn", "flex_document_mask", "sdpa_nested_jagged",
            "sdpa_padded_masked", "sdpa_padded_flash_unmasked"]


def prepare(ctx, problem, impl: str, step: str):
    """``impl``'s timed callable at ``step`` (built, warmed up and checked against fp32) and the
    function that turns its timing into the record; a ``skipped`` record where it cannot run."""
    if ctx.device.type == "cpu" and impl in SKIP_ON_CPU:
        return {"skipped": SKIP_ON_CPU[impl]}
    state = problem()
    p, truth = state["p"], state["truth"]
    if impl not in state["candidates"]:
        state["candidates"][impl] = candidates(p)[impl]()
    c = state["candidates"][impl]
    c.forward_backward()  # compile, autotune, warm up
    err = float((c.unpack(c.inference()).float() - truth).abs().max())
    fn = c.inference if step == "forward" else c.forward_backward  # the forward alone without autograd

    def finish(timing: Dict[str, Any]) -> Dict[str, Any]:
        lengths = p["lengths"].double()
        unit = p["total"] * HEADS * HEAD_DIM * p["qkv"].element_size()  # one packed tensor, bytes
        nbytes = (4 if step == "forward" else 12) * unit
        flops = 4 * float((lengths**2).sum()) * HEADS * HEAD_DIM * (1 if step == "forward" else 3.5)
        seconds = timing["median_ms"] / 1e3
        copy = ctx.ceilings.get("copy_gbs")
        result = {**timing, "sequences": int(lengths.numel()), "lengths": [int(lengths.min()), int(lengths.max())],
                  "total_tokens": p["total"], "heads": HEADS, "head_dim": HEAD_DIM,
                  "dtype": str(p["dtype"]).split(".")[-1], "min_bytes": nbytes, "gbs": nbytes / seconds / 1e9,
                  "tflops": flops / seconds / 1e12, "forward_max_abs_err_vs_fp32": err,
                  "correct_by_construction": c.correct}
        if copy:
            result["fraction_of_copy_bandwidth"] = result["gbs"] / copy
        return result

    return fn, finish
