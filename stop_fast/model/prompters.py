"""The four trainable parts of STOP (SPEC.md steps 4, 7, 8, 10). Everything else is frozen CLIP."""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .steps import chain_dtype, scoring_precision


class DynamicsConv(nn.Module):
    """Conv3d_intra / Conv3d_inter: one 3x3x3 convolution over the (T, g, g) grid of difference features.

    Input ``H`` is ``(B, T, N, 2D)`` with N = g * g; the convolution sees it as ``(B, 2D, T, g, g)``
    (channels E first, then E - E_prev; zero padding in time and space) and returns one logit per patch,
    ``(B, T, N)``. Part of the scoring chain: autocast off, in ``chain_dtype`` (see :func:`conv_logits`).
    """

    def __init__(self, width: int, grid: int):
        super().__init__()
        self.grid = grid
        self.conv = nn.Conv3d(2 * width, 1, kernel_size=3, padding=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return conv_logits([self], h)[0]


def conv_logits(convs: Sequence[DynamicsConv], h: torch.Tensor, as_matmul: bool = False) -> List[torch.Tensor]:
    """Several DynamicsConv layers over the same ``H`` as ONE Conv3d with their weights stacked.

    Conv3d_intra and Conv3d_inter read the same input, so one convolution with two output channels
    reads ``H`` once; each channel is the same sum as the layer alone. ``H`` (B, T, N, 2D) is viewed,
    not copied, as a channels-last (B, 2D, T, g, g) tensor. Returns one (B, T, N) logit map per layer.
    ``as_matmul`` (the fast path): the same sums through :func:`conv3x3x3_as_matmul`.
    """
    b, t, n, c = h.shape
    grid = convs[0].grid
    weight = torch.cat([m.conv.weight for m in convs]) if len(convs) > 1 else convs[0].conv.weight
    bias = torch.cat([m.conv.bias for m in convs]) if len(convs) > 1 else convs[0].conv.bias
    dtype = torch.promote_types(chain_dtype(h), weight.dtype)
    with scoring_precision(h):
        if as_matmul:
            out = conv3x3x3_as_matmul(h.to(dtype).view(b, t, grid, grid, c), weight.to(dtype), bias.to(dtype))
        else:
            x = h.to(dtype).view(b, t, grid, grid, c).permute(0, 4, 1, 2, 3)  # (B, 2D, T, g, g), channels last
            out = F.conv3d(x, weight.to(dtype), bias.to(dtype), padding=1)  # (B, len(convs), T, g, g)
    return [out[:, i].reshape(b, t, n) for i in range(len(convs))]


def conv3x3x3_as_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``F.conv3d(x, weight, bias, padding=1)`` for a 3x3x3 kernel with few output channels, as a GEMM
    and a shifted sum: channels-last ``x`` (B, T, g, g, C) -> (B, O, T, g, g).

    ``Y = x @ W`` with W (C, 27 O) gives every (output channel, kernel offset) term of every position
    at once (one read of x, the large operand); output position p then sums ``Y[p + offset - 1, offset]``
    over the 27 offsets, zero outside the grid: on the zero-padded Y, one strided view whose offset
    axes also step through space, and one sum (no two elements of the view share memory, so its
    backward is a plain scatter; 27 slice-adds, or unfold + diagonal views, have far slower
    backwards in eager mode). Same sums as the convolution, other order. Why: with O = 2 outputs
    cuDNN runs a 128x64-tile implicit GEMM, 98% of it padding (0.6 ms forward and 1.2 ms weight
    gradient at ViT-B/32, B = 32, T = 12 on an H100, for 3 GFLOP).
    """
    b, t, gh, gw, c = x.shape
    o = weight.shape[0]
    y = (x.reshape(-1, c) @ weight.permute(0, 2, 3, 4, 1).reshape(o * 27, c).t()).view(b, t, gh, gw, o, 3, 3, 3)
    y = F.pad(y.permute(0, 4, 5, 6, 7, 1, 2, 3), (1, 1, 1, 1, 1, 1))  # (B, O, kt, ky, kx, T+2, g+2, g+2)
    s = y.stride()
    # terms[b, o, t, i, j, kt, ky, kx] = y[b, o, kt, ky, kx, t + kt, i + ky, j + kx]
    terms = y.as_strided((b, o, t, gh, gw, 3, 3, 3),
                         (s[0], s[1], s[5], s[6], s[7], s[2] + s[5], s[3] + s[6], s[4] + s[7]))
    return terms.sum((-3, -2, -1)) + bias.view(1, o, 1, 1, 1)


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
