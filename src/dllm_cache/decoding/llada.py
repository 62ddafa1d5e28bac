"""LLaDA's reference sampler: a fixed number of tokens per step, chosen by low confidence or at random."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dllm_cache.decoding.base import Commit
from dllm_cache.decoding.sampling import ReferenceRows, gumbel_argmax
from dllm_cache.errors import GenerationError

REMASKING = ("low_confidence", "random")


def tokens_per_step(masked: int, steps: int) -> list[int]:
    """floor(masked/steps) each step and one more in the first (masked mod steps) steps."""
    base, extra = divmod(masked, steps)
    return [base + (i < extra) for i in range(steps)]


class LLaDADecoder:
    """Each row commits tokens_per_step(its masked count at the block start) positions per step: the
    most confident (an fp32 softmax, as the published sampler computes it from fp32 logits) or random
    ones. Ranked as torch.topk ranks them over each prompt's own row (ReferenceRows), so exact ties
    (several confidences of 1.0 in fp32) go the way they go in the published code on the same device."""

    name = "llada"
    dynamic = False

    def __init__(self, remasking: str = "low_confidence", temperature: float = 0.0) -> None:
        if remasking not in REMASKING:
            raise GenerationError(f"unknown remasking {remasking!r} (choose {', '.join(REMASKING)})")
        if temperature < 0:
            raise GenerationError(f"temperature must be >= 0, got {temperature}")
        self.remasking, self.temperature = remasking, temperature
        self.rows = ReferenceRows()
        self.schedule: list[list[int]] = []  # per row: tokens to commit at each step of the block

    def begin_generation(self, context: Any) -> None:
        self.rows = ReferenceRows(context)

    def start_block(self, masked: Tensor, steps: int) -> None:
        self.schedule = [tokens_per_step(m, steps) for m in self.rows.masked_counts(masked)]

    def step(self, logits: Tensor, masked: Tensor, step_in_block: int, generator: torch.Generator) -> Commit:
        tokens = gumbel_argmax(logits, self.temperature, generator)
        if self.remasking == "low_confidence":
            probs = logits.float().softmax(-1)
            conf = probs.gather(-1, tokens[..., None]).squeeze(-1)
        else:
            conf = torch.rand(masked.shape, dtype=torch.float64, device=masked.device, generator=generator)
        conf = conf.masked_fill(~masked, float("-inf"))
        k = [row[step_in_block] for row in self.schedule]
        return Commit(self.rows.topk(conf, k) & masked, tokens, conf)
