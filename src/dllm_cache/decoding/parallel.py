"""Parallel decoding: commit as many confident tokens per step as the rule allows (Fast-dLLM), and
early answer commit (Prophet). Work with every cache policy and both families."""

from __future__ import annotations

import torch
from torch import Tensor

from dllm_cache.decoding.base import Commit, Decoder, computed
from dllm_cache.decoding.sampling import gumbel_argmax
from dllm_cache.errors import GenerationError


def candidates(
    logits: Tensor, temperature: float, generator: torch.Generator, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor, Tensor]:
    """Candidate tokens, their probability (float64 as Fast-dLLM's LLaDA code; Dream's computes it in
    the logits' dtype) and the full probability rows."""
    tokens = gumbel_argmax(logits, temperature, generator)
    probs = logits.to(dtype).softmax(-1)
    return tokens, probs.gather(-1, tokens[..., None]).squeeze(-1), probs


def _at_least_one(commit: Tensor, conf: Tensor, masked: Tensor) -> Tensor:
    """Rows that still have masks commit at least their most confident position."""
    best = torch.zeros_like(commit).scatter(1, conf.argmax(1, keepdim=True), True)
    return (commit | (best & ~commit.any(1, keepdim=True))) & masked


class _ConfidenceRule:
    """Parallel decoders: candidate tokens by (Gumbel-)argmax, then a rule on their confidences
    decides how many masked positions of the block to commit this step."""

    name = "parallel"
    dynamic = True
    temperature = 0.0
    confidence_dtype = torch.float64

    def start_block(self, masked: Tensor, steps: int) -> None:
        pass

    def rule(self, conf: Tensor) -> Tensor:
        raise NotImplementedError

    def step(self, logits: Tensor, masked: Tensor, step_in_block: int, generator: torch.Generator) -> Commit:
        tokens, conf, _ = candidates(logits, self.temperature, generator, self.confidence_dtype)
        masked = masked & computed(logits)  # rows a cache did not compute are not candidates
        conf = conf.masked_fill(~masked, float("-inf"))
        return Commit(self.rule(conf) & masked, tokens, conf)


FAMILIES = ("llada", "dream")


class ThresholdDecoder(_ConfidenceRule):
    """Commit every masked position of the block whose confidence is >= `threshold`, and at least the
    most confident one (Fast-dLLM's LLaDA rule).

    family="dream" follows Fast-dLLM's published Dream loop instead: at a block's first step (the
    forward that refreshes every row under its caches) it commits the block's first position alone,
    whatever the confidences, and applies the threshold rule from the second step on; confidences are
    computed in fp32 there, as that code does in the logits' dtype."""

    name = "threshold"

    def __init__(self, threshold: float = 0.9, temperature: float = 0.0, family: str = "llada") -> None:
        if not threshold > 0:
            raise GenerationError(f"threshold must be > 0, got {threshold}")
        if family not in FAMILIES:
            raise GenerationError(f"unknown model family {family!r} (choose {', '.join(FAMILIES)})")
        self.threshold, self.temperature, self.family = float(threshold), temperature, family
        if family == "dream":
            self.confidence_dtype = torch.float32

    def rule(self, conf: Tensor) -> Tensor:
        masked = conf > float("-inf")
        return _at_least_one((conf >= self.threshold) & masked, conf, masked)

    def step(self, logits: Tensor, masked: Tensor, step_in_block: int, generator: torch.Generator) -> Commit:
        commit = super().step(logits, masked, step_in_block, generator)
        if self.family != "dream" or step_in_block != 0:
            return commit
        # The block's first position (its leftmost masked one: the same, as nothing in the block is
        # committed before its first step) and nothing else.
        first = masked.long().argmax(1, keepdim=True)
        positions = torch.zeros_like(masked).scatter(1, first, True) & masked
        return Commit(positions, commit.tokens, commit.confidence)


class FactorDecoder(_ConfidenceRule):
    """Fast-dLLM's factor rule (`get_transfer_index_dynamic`): see `factor_rule`."""

    name = "factor"

    def __init__(self, factor: float = 1.0, temperature: float = 0.0) -> None:
        if not factor > 0:
            raise GenerationError(f"factor must be > 0, got {factor}")
        self.factor, self.temperature = float(factor), temperature

    def rule(self, conf: Tensor) -> Tensor:
        return factor_rule(conf, self.factor)


def factor_rule(conf: Tensor, factor: float) -> Tensor:
    """[B, N] confidences (-inf where not a candidate) -> bool mask of the positions to commit.

    As published: with the M candidates sorted c_1 >= c_2 >= ... >= c_M, walk n = 1, 2, ... and stop
    at the first c_n < 1 - factor / (n + 1) (c_1 always passes); the n - 1 positions before the stop
    are committed, except that a walk stopping at the last candidate (or never stopping) commits all
    M. So when only c_M fails, all M are committed, and with two candidates left both always are.
    """
    sorted_conf, order = conf.sort(dim=1, descending=True)
    n = torch.arange(1, conf.shape[1] + 1, device=conf.device, dtype=conf.dtype)
    ok = sorted_conf >= 1 - factor / (n + 1)
    ok[:, 0] = True
    candidates = (conf > float("-inf")).sum(1)
    passed = ok.long().cumprod(1).sum(1).clamp(max=candidates)  # the walk's length before its stop
    take = torch.where(passed >= candidates - 1, candidates, passed)
    chosen = torch.arange(conf.shape[1], device=conf.device)[None, :] < take[:, None]
    return torch.zeros_like(chosen).scatter(1, order, chosen)


class EarlyCommit:
    """Prophet's early answer commit around any decoder: when every masked position of the block has a
    top-1 minus top-2 probability margin >= `margin`, commit them all (argmax) in this step."""

    def __init__(self, inner: Decoder, margin: float = 0.9) -> None:
        if not 0 < margin <= 1:
            raise GenerationError(f"early-commit margin must be in (0, 1], got {margin}")
        self.inner, self.margin = inner, margin
        self.name = f"{inner.name}+early-commit"
        self.dynamic = inner.dynamic
        self.early_commits: Tensor | int = 0  # a device count (no host read per step); int() to read

    def start_block(self, masked: Tensor, steps: int) -> None:
        self.inner.start_block(masked, steps)

    def step(self, logits: Tensor, masked: Tensor, step_in_block: int, generator: torch.Generator) -> Commit:
        commit = self.inner.step(logits, masked, step_in_block, generator)
        top2 = logits.to(torch.float64).softmax(-1).topk(2, dim=-1)
        gap = top2.values[..., 0] - top2.values[..., 1]
        sure = ((gap >= self.margin) | ~masked).all(1, keepdim=True) & masked.any(1, keepdim=True)
        self.early_commits = self.early_commits + sure.sum()
        positions = torch.where(sure, masked, commit.positions)
        tokens = torch.where(sure, top2.indices[..., 0], commit.tokens)
        return Commit(positions, tokens, commit.confidence)
