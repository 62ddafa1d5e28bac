"""Dream's reference sampler: a time grid t = linspace(1, eps, steps+1) and four ways to choose."""

from __future__ import annotations

import torch
from torch import Tensor

from dllm_cache.decoding.base import Commit, top_k_per_row
from dllm_cache.decoding.sampling import filter_top_k, filter_top_p, sample_from_probs
from dllm_cache.errors import GenerationError

ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")


class DreamDecoder:
    name = "dream"
    dynamic = False

    def __init__(
        self,
        alg: str = "entropy",
        temperature: float = 0.0,
        top_p: float | None = None,
        top_k: int | None = None,
        alg_temp: float | None = None,
        eps: float = 1e-3,
    ) -> None:
        if alg not in ALGS:
            raise GenerationError(f"unknown alg {alg!r} (choose {', '.join(ALGS)})")
        if temperature < 0:
            raise GenerationError(f"temperature must be >= 0, got {temperature}")
        if top_p is not None and not 0 < top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {top_p}")
        if not 0 < eps < 1:
            raise GenerationError(f"eps must be in (0, 1), got {eps}")
        self.alg, self.temperature, self.top_p, self.top_k = alg, temperature, top_p, top_k
        self.alg_temp, self.eps = alg_temp, eps
        self.timesteps: Tensor | None = None

    def start_block(self, masked: Tensor, steps: int) -> None:
        # float32 like the reference, so the int() truncations of the schedule match it.
        self.timesteps = torch.linspace(1, self.eps, steps + 1, device=masked.device)
        self.steps = steps

    def _sample(self, logits: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """Candidate tokens, their probability, and the full probability rows."""
        if self.temperature > 0:
            logits = logits / self.temperature
        logits = filter_top_k(filter_top_p(logits, self.top_p), self.top_k)
        probs = logits.float().softmax(-1)
        if self.temperature > 0:
            tokens = sample_from_probs(probs, generator)
            conf = probs.gather(-1, tokens[..., None]).squeeze(-1)
        else:
            conf, tokens = probs.max(-1)
        return tokens, conf, probs

    def step(self, logits: Tensor, masked: Tensor, step_in_block: int, generator: torch.Generator) -> Commit:
        assert self.timesteps is not None
        t, s = self.timesteps[step_in_block], self.timesteps[step_in_block + 1]
        last = step_in_block == self.steps - 1
        tokens, conf, probs = self._sample(logits, generator)
        if self.alg == "origin":
            p_transfer = 1.0 if last else 1 - s / t  # a device scalar: no host read
            u = torch.rand(masked.shape, device=masked.device, generator=generator)
            return Commit(masked & (u < p_transfer), tokens, conf)
        if self.alg == "topk_margin":
            top2 = probs.topk(2, dim=-1).values
            conf = top2[..., 0] - top2[..., 1]
        elif self.alg == "entropy":
            conf = (probs * torch.log(probs + 1e-10)).sum(-1)  # negative entropy
        n_masked = masked.sum(dim=1)
        k = n_masked if last else (n_masked.float() * (1 - s / t)).long()
        conf = conf.masked_fill(~masked, float("-inf"))
        if not self.alg_temp:
            return Commit(top_k_per_row(conf, k) & masked, tokens, conf)
        # Sample which positions to commit from softmax(confidence / alg_temp), without replacement,
        # as torch.multinomial does it (the k largest weight / Exp(1) draws), for every row at once
        # (a per-row multinomial reads each row's k on the host). Ranked in log space, where
        # log(weight / q) = conf / alg_temp - log q + a row constant: no weight underflows to 0.
        q = torch.empty_like(conf).exponential_(1, generator=generator)
        return Commit(top_k_per_row(conf / self.alg_temp - q.log(), k) & masked, tokens, conf)
