"""Convert a CLIP weights file once to safetensors, a format that holds tensors only.

IN is read as ``--weights`` reads it (OpenAI's TorchScript archives without running them, PyTorch
checkpoints with ``torch.load(weights_only=True)``); ``--trust-weights`` instead loads a TorchScript
archive with ``torch.jit.load``, which runs code stored in the file: use it only for a file you trust.
OUT keeps every tensor, dtype and name, and records IN's sha256, so prompt files trained with IN also
accept OUT.
"""
from __future__ import annotations

import os

from .common import existing_file, output_file

from .errors import CLIError


def add_arguments(p) -> None:
    p.add_argument("input", metavar="IN", help="weights file to convert (OpenAI .pt, open_clip checkpoint, ...)")
    p.add_argument("output", metavar="OUT", help="safetensors file to write")
    p.add_argument("--trust-weights", action="store_true",
                   help="read a TorchScript IN with torch.jit.load, which RUNS CODE stored in it (trusted files only)")


def run(args) -> int:

    existing_file(args.input, "IN")
    output_file(args.output, "OUT")
    if os.path.exists(args.output) and os.path.samefile(args.input, args.output):
        raise CLIError(f"OUT {args.output} is IN; write the converted copy to another file")
    import torch

    from ..backbone import WEIGHTS_FORMAT, check_weights, file_sha256, read_state_dict, weights_format
    from ..io import safetensors_bytes, write_atomic

    kind = weights_format(args.input)
    state = read_state_dict(args.input, trust_torchscript=args.trust_weights)
    check_weights(state, args.input)
    tensors = {k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in state.items()}
    metadata = {"format": WEIGHTS_FORMAT, "source": os.path.basename(args.input),
                "source_sha256": file_sha256(args.input)}
    write_atomic(args.output, safetensors_bytes(tensors, metadata))
    values = sum(t.numel() for t in tensors.values())
    dtypes = ", ".join(sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()}))
    print(f"wrote {args.output}: {len(tensors)} tensors, {values:,} values ({dtypes}) from {args.input} ({kind})")
    return 0
