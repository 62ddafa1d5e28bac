"""Token sampling and ranking shared by the decoders (float64 where the references use it)."""

from __future__ import annotations

from collections.abc import Sequence
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
    """Rank the current block as the published samplers rank it: with torch.topk over one row per
    prompt, that prompt alone and unpadded (len(prompt) + gen_length entries, the block's scores at
    their place in it, -inf everywhere else).

    torch.topk breaks exact ties (several confidences of exactly 1.0 in fp32, equal fp32 entropies)
    neither by index nor stably: which tied entries it returns depends on the row's length, their
    place in it and k (and on the device: CPU and CUDA kernels differ, as they do for the reference
    itself). Ranking the same values laid out the same way, with the same k, picks what the
    reference picks; a stable sort (lowest index first) does not.

    Sync-free: k, the layout and the masked counts are host numbers. In the engine they come from
    the `context` (a GenerationContext: each prompt's length, the current block, each row's masked
    count in it as of the engine's one host read per step). A decoder driven by hand, without a
    context, ranks the block alone (offset 0, length N) and reads the masked counts from the mask.
    """

    def __init__(self, context: Any = None) -> None:
        self.context = context

    def masked_counts(self, masked: Tensor) -> list[int]:
        """Each row's masked positions in the current block, on the host."""
        if self.context is None:
            return masked.sum(1).tolist()  # driven by hand: no step contract to keep
        return list(self.context.block_masked)

    def layout(self, n_rows: int, block: int) -> tuple[list[int], list[int]]:
        """(offsets, lengths): where each row's block starts in its reference row, and that row's length."""
        ctx = self.context
        if ctx is None:
            return [0] * n_rows, [block] * n_rows
        gen_length = ctx.x.shape[1] - ctx.prompt_length
        offsets = [p + ctx.block_start for p in ctx.prompt_lengths]
        return offsets, [p + gen_length for p in ctx.prompt_lengths]

    def topk(self, scores: Tensor, k: Sequence[int]) -> Tensor:
        """Bool [B, N]: the entries of scores [B, N] that torch.topk(k[b]) picks from row b's
        reference row (k[b] may exceed the finite scores: the -inf ones it then picks are the
        caller's to mask off)."""
        B, N = scores.shape
        offsets, lengths = self.layout(B, N)
        out = torch.zeros((B, N), dtype=torch.bool, device=scores.device)
        for b in range(B):
            kb = min(k[b], lengths[b])
            if kb <= 0:
                continue
            start = offsets[b]
            row = scores.new_full((lengths[b],), float("-inf"))
            row[start : start + N] = scores[b]
            picked = torch.zeros(lengths[b], dtype=torch.bool, device=scores.device)
            picked[row.topk(kb).indices] = True  # long indices: no host read
            out[b] = picked[start : start + N]
        return out
