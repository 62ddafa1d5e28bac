"""Dream's reference sampler: a time grid t = linspace(1, eps, steps+1) and four ways to choose."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from dllm_cache.decoding.base import Commit, top_k_per_row
from dllm_cache.decoding.sampling import ReferenceRows, filter_top_k, filter_top_p, sample_from_probs
from dllm_cache.errors import GenerationError

ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")


class DreamDecoder:
    """At step i of a block each row commits int(n * (1 - t_{i+1}/t_i)) of its n masked positions (all
    at the block's last step), computed in fp32 as the published sampler computes it; `origin` draws
    each position independently instead. The positions are the row's k best confidences, ranked as
    torch.topk ranks them over each prompt's own row (ReferenceRows): exact ties (equal fp32
    entropies, common when the logits are near uniform) go the way they go in the published code on
    the same device. With `alg_temp` they are sampled from softmax(confidence / alg_temp) instead.

    Per row, as that prompt alone: the published loop ranks a batch with one k from the batch's mean
    masked count, and its batched torch.topk over padded rows may break ties otherwise; our rows do
    not depend on the batch."""

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
        self.fractions: list[float] = []  # 1 - t_{i+1}/t_i per step, fp32 values, on the host
        self.rows = ReferenceRows()

    def begin_generation(self, context: Any) -> None:
        self.rows = ReferenceRows(context)

    def start_block(self, masked: Tensor, steps: int) -> None:
        # float32 on the model's device like the reference, so the int() truncations of the schedule
        # match it. The grid is the same for every block: read to the host once (at the first block,
        # before any step), so the steps read nothing.
        timesteps = self.timesteps
        if timesteps is None or timesteps.shape[0] != steps + 1 or timesteps.device != masked.device:
            self.timesteps = torch.linspace(1, self.eps, steps + 1, device=masked.device)
            self.fractions = (1 - self.timesteps[1:] / self.timesteps[:-1]).tolist()
        self.steps = steps

    def transfer_counts(self, masked: Tensor, step_in_block: int) -> list[int]:
        """Per row: how many to commit at this step, int(fp32(n * fraction)) as the reference's
        int(num_mask_token * (1 - s / t)) on fp32 tensors (the product of an fp32 fraction and a
        count below 2^24 is exact in a double, so rounding it to fp32 gives the device's product)."""
        counts = self.rows.masked_counts(masked)
        if step_in_block == self.steps - 1:
            return counts
        frac = self.fractions[step_in_block]
        return [int(np.float32(n * frac)) for n in counts]

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
        tokens, conf, probs = self._sample(logits, generator)
        if self.alg == "origin":
            t, s = self.timesteps[step_in_block], self.timesteps[step_in_block + 1]
            last = step_in_block == self.steps - 1
            p_transfer = 1.0 if last else 1 - s / t  # a device scalar: no host read
            u = torch.rand(masked.shape, device=masked.device, generator=generator)
            return Commit(masked & (u < p_transfer), tokens, conf)
        if self.alg == "topk_margin":
            top2 = probs.topk(2, dim=-1).values
            conf = top2[..., 0] - top2[..., 1]
        elif self.alg == "entropy":
            conf = (probs * torch.log(probs + 1e-10)).sum(-1)  # negative entropy
        k = self.transfer_counts(masked, step_in_block)
        conf = conf.masked_fill(~masked, float("-inf"))
        if not self.alg_temp:
            return Commit(self.rows.topk(conf, k) & masked, tokens, conf)
        # Sample which positions to commit from softmax(confidence / alg_temp), without replacement,
        # as torch.multinomial does it (the k largest weight / Exp(1) draws), for every row at once
        # (a per-row multinomial reads each row's k on the host). Ranked in log space, where
        # log(weight / q) = conf / alg_temp - log q + a row constant: no weight underflows to 0.
        q = torch.empty_like(conf).exponential_(1, generator=generator)
        k_rows = torch.tensor(k, device=conf.device)  # host-known counts: a copy to the device, no read
        return Commit(top_k_per_row(conf / self.alg_temp - q.log(), k_rows) & masked, tokens, conf)
