"""torchrun support: process group set-up, the feature gather of InfoNCE, evaluation gathers, DDP.

One process per GPU (NCCL) or per CPU worker (gloo), started by ``torchrun``, which sets RANK,
WORLD_SIZE and LOCAL_RANK. Only the trainable parameters are wrapped for gradient averaging: the
frozen backbone is identical on every rank and is never broadcast or synchronised.
"""
from __future__ import annotations

import dataclasses
import os
from typing import List

import torch
import torch.distributed as dist
from torch import nn


@dataclasses.dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


_OWNED = False  # whether setup() created the process group (and teardown() should destroy it)


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(cuda: bool) -> Dist:
    """Join the process group torchrun describes (NCCL with CUDA, gloo otherwise); a single process
    without torchrun gets rank 0 of 1 and no process group."""
    if not launched_by_torchrun():
        return Dist()
    info = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    global _OWNED
    if info.world_size > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
        _OWNED = True
    return info


def teardown() -> None:
    """Destroy the process group if :func:`setup` created it (a caller's own group is left alone)."""
    global _OWNED
    if _OWNED and dist.is_initialized():
        dist.destroy_process_group()
    _OWNED = False


def gather_with_local_grad(x: torch.Tensor, info: Dist) -> torch.Tensor:
    """All ranks' ``x`` concatenated in rank order; only this rank's part carries gradient.

    Every rank then computes the same global InfoNCE loss, and the gradient reaching its own features
    is exactly the single-process gradient of that loss w.r.t. them; DDP's average over ranks divides
    it by the world size, which the caller undoes (see ``Trainer``)."""
    if not info.enabled:
        return x
    parts = [torch.empty_like(x) for _ in range(info.world_size)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[info.rank] = x
    return torch.cat(parts)


def gather_rows(x: torch.Tensor, info: Dist) -> torch.Tensor:
    """Evaluation: every rank's rows (equal counts, the loaders pad) concatenated, without gradient."""
    if not info.enabled:
        return x
    parts = [torch.empty_like(x) for _ in range(info.world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def average(x: torch.Tensor, info: Dist) -> torch.Tensor:
    if info.enabled:
        x = x.clone()
        dist.all_reduce(x)
        x /= info.world_size
    return x


def any_rank(flag: bool, info: Dist, device) -> bool:
    """True when ``flag`` is true on any rank (a stop request must end every rank at the same step)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def wrap_ddp(module: nn.Module, info: Dist, device: torch.device) -> nn.Module:
    """DDP over the parameters that require gradients; frozen ones are neither broadcast nor synchronised."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    frozen: List[str] = [name for name, p in module.named_parameters() if not p.requires_grad]
    frozen += [name for name, _ in module.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(module, frozen)
    # every buffer is ignored above, so DDP has none to broadcast (no broadcast_buffers argument needed)
    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
