"""Certainty-prior decoding (d2Cache's decoding companion): commit masked tokens by
confidence x certainty density, which makes decoding quasi left-to-right.

The certainty density of a position is a Gaussian smoothing (sigma positions) of "already decoded"
over the positions of a span (the current block here, the whole answer for d2cache's selection);
see `dllm_cache.scoring.certainty_density` for the edges.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dllm_cache.decoding.base import Commit, computed
from dllm_cache.decoding.parallel import candidates
from dllm_cache.errors import GenerationError
from dllm_cache.scoring import certainty_density, top_k_per_row


class CertaintyPriorDecoder:
    """Each step commits the masked positions with the highest confidence x certainty density.

    As many tokens per step as the reference schedule (ceil(masked / steps)), and dynamic: with a
    cache that computes only some masked rows (d2cache), only those are candidates and the block
    takes as many steps as it needs (at least one token each).
    """

    name = "certainty"
    dynamic = True

    def __init__(self, sigma: float = 10.0, temperature: float = 0.0) -> None:
        if not sigma > 0:
            raise GenerationError(f"certainty decoder: sigma must be > 0, got {sigma}")
        if temperature < 0:
            raise GenerationError(f"temperature must be >= 0, got {temperature}")
        self.sigma, self.temperature = float(sigma), temperature
        self.per_step: Tensor | None = None

    def start_block(self, masked: Tensor, steps: int) -> None:
        self.per_step = (masked.sum(1) + steps - 1) // steps

    def step(self, logits: Tensor, masked: Tensor, step_in_block: int, generator: torch.Generator) -> Commit:
        assert self.per_step is not None
        tokens, conf, _ = candidates(logits, self.temperature, generator)
        # Masked rows a cache did not compute (NaN logits) are undecoded but not candidates.
        ready = masked & computed(logits)
        score = conf * certainty_density(~masked, self.sigma)
        score = score.masked_fill(~ready, float("-inf"))
        k = torch.minimum(self.per_step.clamp(min=1), ready.sum(1))
        return Commit(top_k_per_row(score, k) & ready, tokens, score)
