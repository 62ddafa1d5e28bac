"""Scoring helpers shared by cache policies and decoders (imports only torch).

cache/ and decoding/ are independent of each other; what both need to rank positions lives here,
below both: `top_k_per_row` (each row's k best scores) and `certainty_density` (d2Cache's measure of
how decoded a position's neighbourhood is).
"""

from __future__ import annotations

import torch
from torch import Tensor


def top_k_per_row(scores: Tensor, k: Tensor) -> Tensor:
    """Bool mask of each row's k[b] highest scores (k may differ by row; ties: the lowest index)."""
    order = scores.argsort(dim=1, descending=True, stable=True)
    ranks = torch.arange(scores.shape[1], device=scores.device).expand_as(scores) < k[:, None]
    return torch.zeros_like(ranks).scatter(1, order, ranks)


def certainty_density(decoded: Tensor, sigma: float) -> Tensor:
    """decoded [B, N] bool -> density [B, N]: a Gaussian (sigma positions) average of "decoded".

    As the d2Cache paper's code computes it (an FFT in fp32 there; here the same sums exactly, in
    float64): the span is extended by N positions on each side, the left ones counting as decoded
    (the prompt, earlier blocks) and the right ones as decoded only if the span's last position is
    (an answer that already ends). Position t gets sum_j ext[j] g(t - j) / Z over that extended
    span, with g(d) = exp(-d^2 / (2 sigma^2)) untruncated and Z = sum of g(d) for d in [-3N, 3N)
    (the FFT canvas), so an all-decoded span has density ~1 and nothing is cut at 3 sigma.
    """
    B, N = decoded.shape
    device = decoded.device
    t = torch.arange(N, device=device, dtype=torch.float64)

    def g(d: Tensor) -> Tensor:
        return torch.exp(-(d**2) / (2 * sigma**2))

    z = g(torch.arange(-3 * N, 3 * N, device=device, dtype=torch.float64)).sum()
    outside = torch.arange(1, N + 1, device=device, dtype=torch.float64)  # distance to j = -1..-N
    left = g(t[:, None] + outside[None, :]).sum(1)  # the N positions left of the span
    right = g((N - 1 - t)[:, None] + outside[None, :]).sum(1)  # the N positions right of it
    inside = g(t[:, None] - t[None, :])  # [N, N]
    d = decoded.to(torch.float64)
    return (left + d @ inside + d[:, -1:] * right) / z


__all__ = ["certainty_density", "top_k_per_row"]
