"""Token sampling shared by the decoders (float64 where the references use it)."""

from __future__ import annotations

import torch
from torch import Tensor


def gumbel_argmax(logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    """LLaDA's sampler: argmax of exp(logits) / (-log u)^temperature in float64; plain argmax at 0."""
    if temperature == 0:
        return logits.argmax(-1)
    logits64 = logits.to(torch.float64)
    u = torch.rand(logits64.shape, dtype=torch.float64, device=logits.device, generator=generator)
    return (logits64.exp() / (-torch.log(u)) ** temperature).argmax(-1)


def filter_top_p(logits: Tensor, top_p: float | None) -> Tensor:
    """Nucleus filtering: keep the smallest set of tokens whose probability reaches top_p."""
    if top_p is None or top_p >= 1:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    remove = cum > top_p
    remove[..., 1:] = remove[..., :-1].clone()  # keep the token that crosses the threshold
    remove[..., 0] = False
    mask = torch.zeros_like(remove).scatter(-1, order, remove)
    return logits.masked_fill(mask, torch.finfo(logits.dtype).min)


def filter_top_k(logits: Tensor, top_k: int | None) -> Tensor:
    if top_k is None or top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = logits.topk(top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def sample_from_probs(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])
