"""Token sampling and ranking shared by the decoders (float64 where the references use it)."""

from __future__ import annotations

from typing import Any

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


class ReferenceRows:
    """Where the published samplers rank: one row per prompt of length len(prompt) + gen_length
    (each prompt alone, unpadded), -inf outside the positions being ranked, ranked with torch.topk.

    torch.topk breaks exact ties (several confidences of exactly 1.0 in fp32, equal entropies)
    by an order that depends on the row's length, the positions' place in it and k, not by index;
    ranking the same values laid out the same way picks the same tied positions as the reference.
    `context` is the engine's GenerationContext (prompt lengths, current block); without one (a
    decoder driven by hand) the block's row is ranked alone."""

    def __init__(self, context: Any = None) -> None:
        self.context = context

    def topk(self, scores: Tensor, k: Tensor) -> Tensor:
        """Bool [B, N]: each row's k[b] highest of scores [B, N] (the current block), as
        torch.topk(k[b]) over that row's reference layout picks them."""
        B, N = scores.shape
        out = torch.zeros((B, N), dtype=torch.bool, device=scores.device)
        ctx = self.context
        for b, kb in enumerate(k.tolist()):
            if kb <= 0:
                continue
            if ctx is not None and ctx.prompt_lengths:
                gen_length = ctx.x.shape[1] - ctx.prompt_length
                offset = ctx.prompt_lengths[b] + ctx.block_start
                row = scores.new_full((ctx.prompt_lengths[b] + gen_length,), float("-inf"))
                row[offset : offset + N] = scores[b]
            else:
                offset, row = 0, scores[b]
            picked = row.topk(min(kb, row.shape[0])).indices - offset
            out[b, picked[(picked >= 0) & (picked < N)]] = True
        return out
