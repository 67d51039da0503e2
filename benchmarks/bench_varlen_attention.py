"""varlen attention against PyTorch SDPA (padded) and FlexAttention (document mask), bf16.

    python benchmarks/bench_varlen_attention.py --out benchmarks/results/varlen_attention.json
    pytest benchmarks/bench_varlen_attention.py --benchmark-enable        (pytest-benchmark cases)

Shapes: STOP on ViT-B/32, a batch of 128 videos x 12 frames = 1536 sequences of 50..62 tokens, 12
heads of 64. FLOPs count only real (unpadded) work: 4 L^2 d per head and sequence forward, 2.5x that
backward. All candidates run side by side in one process.
"""
from __future__ import annotations

import argparse
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench_ms, provenance, require_cuda, write_json  # noqa: E402


def make_inputs(num_seqs=1536, heads=12, head_dim=64, low=50, high=62, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (num_seqs,), generator=g)
    cu = torch.zeros(num_seqs + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    total = int(cu[-1])
    q, k, v = [torch.randn(total, heads, head_dim, generator=g).to("cuda", dtype).requires_grad_() for _ in range(3)]
    return q, k, v, cu.cuda(), lengths, high


def candidates(q, k, v, cu, lengths, max_len):
    """name -> callable returning the output in packed layout (total, heads, head_dim)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from stop_fast.kernels import varlen_attention

    total, heads, head_dim = q.shape
    num_seqs = lengths.numel()
    seq_id = torch.repeat_interleave(torch.arange(num_seqs), lengths).cuda()
    pos = torch.arange(total, device="cuda") - cu[:-1].long()[seq_id]

    def to_padded(x):  # (B, H, L, d)
        buf = x.new_zeros(num_seqs, max_len, heads, head_dim)
        return buf.index_put((seq_id, pos), x).transpose(1, 2)

    def from_padded(x):
        return x.transpose(1, 2)[seq_id, pos]

    key_ok = (torch.arange(max_len)[None, :] < lengths[:, None]).cuda()[:, None, None, :]

    def sdpa_flash():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # no mask possible: attends to padding keys
            return from_padded(torch.nn.functional.scaled_dot_product_attention(to_padded(q), to_padded(k), to_padded(v)))

    def sdpa_masked():
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
            return from_padded(torch.nn.functional.scaled_dot_product_attention(
                to_padded(q), to_padded(k), to_padded(v), attn_mask=key_ok))

    def doc_mask(b, h, qi, ki):
        return seq_id[qi] == seq_id[ki]

    block_mask = create_block_mask(doc_mask, None, None, total, total, device="cuda")
    flex = torch.compile(flex_attention)

    def flex_doc():
        out = flex(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], block_mask=block_mask)
        return out[0].transpose(0, 1)

    return {
        "stop_fast_varlen": lambda: varlen_attention(q, k, v, cu, max_len, check_inputs=False),
        "sdpa_flash_padded_unmasked": sdpa_flash,
        "sdpa_efficient_padded_masked": sdpa_masked,
        "flex_attention_document_mask": flex_doc,
    }


def measure(seed=0):
    q, k, v, cu, lengths, max_len = make_inputs(seed=seed)
    heads, head_dim = q.shape[1], q.shape[2]
    fwd_flops = float(4 * (lengths.double() ** 2).sum() * head_dim * heads)
    do = torch.randn_like(q)
    rows = {}
    for name, fn in candidates(q, k, v, cu, lengths, max_len).items():
        fn()  # compile / warm up
        fwd = bench_ms(fn)

        def fwd_bwd(fn=fn):
            q.grad = k.grad = v.grad = None
            fn().backward(do)

        both = bench_ms(fwd_bwd)
        rows[name] = {
            "forward_ms": fwd, "forward_backward_ms": both,
            "forward_tflops": fwd_flops / fwd / 1e9, "forward_backward_tflops": 3.5 * fwd_flops / both / 1e9,
        }
        print(f"{name:32s} fwd {fwd:7.3f} ms ({rows[name]['forward_tflops']:6.1f} TFLOP/s)   "
              f"fwd+bwd {both:7.3f} ms ({rows[name]['forward_backward_tflops']:6.1f} TFLOP/s)")
    ours = rows["stop_fast_varlen"]["forward_backward_ms"]
    ratios = {f"speedup_vs_{n}": r["forward_backward_ms"] / ours for n, r in rows.items() if n != "stop_fast_varlen"}
    return {"shape": {"num_seqs": lengths.numel(), "lengths": "50..62", "heads": heads, "head_dim": head_dim,
                      "dtype": "bf16", "real_forward_gflop": fwd_flops / 1e9},
            "results": rows, "forward_backward_ratios": ratios}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/varlen_attention.json")
    args = parser.parse_args()
    if not require_cuda("bench_varlen_attention"):
        return 0
    result = measure()
    print({k: round(v, 2) for k, v in result["forward_backward_ratios"].items()})
    write_json(args.out, {**provenance(), **result})
    return 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_varlen_attention_forward_backward(benchmark):
    from stop_fast.kernels import varlen_attention

    q, k, v, cu, lengths, max_len = make_inputs()
    do = torch.randn_like(q)

    def step():
        varlen_attention(q, k, v, cu, max_len, check_inputs=False).backward(do)
        torch.cuda.synchronize()

    benchmark(step)


if __name__ == "__main__":
    sys.exit(main())
