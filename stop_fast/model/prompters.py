"""The four trainable parts of STOP (SPEC.md steps 4, 7, 8, 10). Everything else is frozen CLIP."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DynamicsConv(nn.Module):
    """Conv3d_intra / Conv3d_inter: one 3x3x3 convolution over the (T, g, g) grid of difference features.

    Input ``H`` is ``(B, T, N, 2D)`` with N = g * g; the convolution sees it as ``(B, 2D, T, g, g)``
    (channels E first, then E - E_prev; zero padding in time and space) and returns one logit per patch,
    ``(B, T, N)``. It runs outside autocast, in the weights' dtype (fp32): the scoring chain stays fp32 under bf16.
    """

    def __init__(self, width: int, grid: int):
        super().__init__()
        self.grid = grid
        self.conv = nn.Conv3d(2 * width, 1, kernel_size=3, padding=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, n, c = h.shape
        x = h.permute(0, 3, 1, 2).reshape(b, c, t, self.grid, self.grid)  # (B, 2D, T, g, g)
        with torch.autocast(device_type=h.device.type, enabled=False):
            out = self.conv(x.to(self.conv.weight.dtype))  # (B, 1, T, g, g)
        return out.reshape(b, t, n)


class IntraPrompter(nn.Module):
    """Prompter_intra: a per-token bottleneck MLP 2D -> r_intra -> GELU -> D, last layer zero (step 7)."""

    def __init__(self, width: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(2 * width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (..., 2D) -> (..., D)
        return self.up(F.gelu(self.down(h)))


class InterPrompter(nn.Module):
    """Prompter_inter: ``G = (1 + v^) * reshape(W2 GELU(W1 LN(c)), rho x D) + e`` (step 10).

    Returns all ``rho`` candidate tokens of each frame; frame t keeps the first ``n_t`` of them
    (the paper's "selecting a net with output dimension n x D").
    """

    def __init__(self, width: int, bottleneck: int, rho: int, slot_init_std: float):
        super().__init__()
        self.rho = rho
        self.width = width
        self.norm = nn.LayerNorm(2 * width)
        self.down = nn.Linear(2 * width, bottleneck)
        self.up = nn.Linear(bottleneck, rho * width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.slots = nn.Parameter(torch.randn(rho, width) * slot_init_std)  # e

    def forward(self, c: torch.Tensor, v_hat: torch.Tensor) -> torch.Tensor:
        """``c``: (..., 2D) pooled changes, ``v_hat``: (...) normalised variation -> (..., rho, D)."""
        tokens = self.up(F.gelu(self.down(self.norm(c))))
        tokens = tokens.reshape(*c.shape[:-1], self.rho, self.width)
        scale = (1.0 + v_hat)[..., None, None]
        return (scale * tokens + self.slots).to(tokens.dtype)
