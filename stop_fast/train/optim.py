"""AdamW over the trainable parameters and the warm-up + cosine schedule (SPEC.md "Tasks and losses")."""
from __future__ import annotations

import math
from typing import List

import torch


def build_optimizer(params: List[torch.nn.Parameter], config) -> torch.optim.AdamW:
    """AdamW with the config's lr, betas, eps and weight decay on ``params`` (the trainable list only).

    Weight decay applies to every trainable tensor: STOP's trainable parts are small prompters and
    convolutions trained from scratch, and SPEC.md names one decay for all of them."""
    if not params:
        raise ValueError("no trainable parameters: with k = 0 and rho = 0 there is nothing to optimise")
    fused = all(p.is_cuda for p in params)  # one kernel per step on the GPU; the default foreach on the CPU
    return torch.optim.AdamW(params, lr=config.lr, betas=tuple(config.betas), eps=config.eps,
                             weight_decay=config.weight_decay, fused=fused or None)


def warmup_cosine(step: int, total: int, warmup_steps: int) -> float:
    """Learning-rate factor of optimiser step ``step`` (0-based): linear warm-up over ``warmup_steps``
    (the first step already moves, at 1 / warmup_steps), then half a cosine from 1 down to 0 at ``total``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup: float) -> torch.optim.lr_scheduler.LambdaLR:
    """``warmup`` is the warm-up's fraction of all ``total_steps`` (0.1 in SPEC.md)."""
    warmup_steps = int(round(warmup * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total_steps, warmup_steps))
