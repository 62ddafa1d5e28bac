"""LLaDA's reference sampler: a fixed number of tokens per step, chosen by low confidence or at random."""

from __future__ import annotations

import torch
from torch import Tensor

from dllm_cache.decoding.base import Commit, top_k_per_row
from dllm_cache.decoding.sampling import gumbel_argmax
from dllm_cache.errors import GenerationError

REMASKING = ("low_confidence", "random")


def tokens_per_step(masked: Tensor, steps: int) -> Tensor:
    """[B, steps]: floor(m/steps) each step and one more in the first (m mod steps) steps."""
    m = masked.sum(dim=1, keepdim=True)
    base = m // steps
    extra = torch.arange(steps, device=masked.device)[None, :] < (m % steps)
    return base + extra.long()


class LLaDADecoder:
    name = "llada"
    dynamic = False

    def __init__(self, remasking: str = "low_confidence", temperature: float = 0.0) -> None:
        if remasking not in REMASKING:
            raise GenerationError(f"unknown remasking {remasking!r} (choose {', '.join(REMASKING)})")
        if temperature < 0:
            raise GenerationError(f"temperature must be >= 0, got {temperature}")
        self.remasking, self.temperature = remasking, temperature
        self.schedule: Tensor | None = None

    def start_block(self, masked: Tensor, steps: int) -> None:
        self.schedule = tokens_per_step(masked, steps)

    def step(self, logits: Tensor, masked: Tensor, step_in_block: int, generator: torch.Generator) -> Commit:
        assert self.schedule is not None
        tokens = gumbel_argmax(logits, self.temperature, generator)
        if self.remasking == "low_confidence":
            probs = logits.to(torch.float64).softmax(-1)
            conf = probs.gather(-1, tokens[..., None]).squeeze(-1)
        else:
            conf = torch.rand(masked.shape, dtype=torch.float64, device=masked.device, generator=generator)
        conf = conf.masked_fill(~masked, float("-inf"))
        commit = top_k_per_row(conf, self.schedule[:, step_in_block]) & masked
        return Commit(commit, tokens, conf)
