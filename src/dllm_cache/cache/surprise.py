"""Surprise refresh: refresh the cached rows after a low-confidence commit, not on a fixed schedule.

Fixed-schedule caches (dLLM-Cache's prompt interval, Fast-dLLM's once-per-block refresh) assume
that committing a token barely moves the features of the rows they keep. That holds for a token the
model was sure of: its features were already what the model expected. It fails for a *free choice*:
the first number of a pair problem ("split 7 stamps into two piles") is one of several right answers,
committed with low confidence, and the model then carries the written number through the prompt's
features (attention is bidirectional), so the second number must see refreshed prompt rows
(docs/benchmarks.md, "pair problems"; docs/refresh_signal.png shows the drift).

The signal, *surprise*: a row is surprised at step n when a token committed at step n had a
confidence (the decoder's top probability at that position) of at most `surprise`. At step n + 1 a
surprised row recomputes the rows its policy would otherwise read from the cache (dllm-cache: the
prompt rows; prefix / dual / freecache: every row outside the recomputed window). The confidence is
known at the end of the step that commits, before the forward that first sees the new token, so the
refresh comes exactly when the cached features go stale, with no extra forward and no lag.

Per batch row: a row that is not surprised pads the refresh slots with the scratch slot
(`rows_from_mask`), so its result never depends on its batch; the batch pays for a refresh when any
of its rows is surprised (the host learns that with the step's one read, `row_bound`).
`surprise=1` refreshes after every commit: the features of every row are then those of the current
sequence at every step, i.e. the uncached output (a row with no commit has an unchanged sequence,
so its cached features are still exact). `surprise=0` never refreshes (the plain policy).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dllm_cache.errors import GenerationError
from dllm_cache.models.active import StepState


def check_surprise(policy: str, surprise: float | None) -> float | None:
    """None (off) or a confidence threshold in [0, 1], with a clear error otherwise."""
    if surprise is None:
        return None
    try:
        value = float(surprise)
    except (TypeError, ValueError):
        raise GenerationError(f"{policy}: surprise must be a number in [0, 1], got {surprise!r}") from None
    if not 0.0 <= value <= 1.0:
        raise GenerationError(f"{policy}: surprise must be in [0, 1], got {value}")
    return value


def attach_surprise(
    policy: Any, name: str, surprise: float | None, row_bound: bool = True
) -> SurpriseSignal | None:
    """Check `surprise` (None = off) and, when on, give `policy` the hooks the engine feeds only to
    a policy that has them: `observe_confidence` and (unless the policy has its own) `row_bound`."""
    policy.surprise = check_surprise(name, surprise)
    if policy.surprise is None:
        return None
    signal = SurpriseSignal(policy.surprise)
    policy.observe_confidence = signal.observe_confidence
    if row_bound:
        policy.row_bound = signal.bound
    return signal


class SurpriseSignal:
    """Per batch row: was a token committed at the last step with confidence <= threshold?"""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.confidence: Tensor | None = None  # [B, L] this step's confidence per predicted position
        self.surprised: Tensor | None = None  # [B] bool: refresh the cached rows at the next step

    def begin_step(self, state: StepState) -> None:
        if state.step == 0:
            # Updated in place from now on: a captured CUDA graph of a per-layer forward (dllm-cache)
            # reads `surprised` at the address it had at capture.
            self.surprised = torch.zeros(state.masked.shape[0], dtype=torch.bool, device=state.masked.device)
            self.confidence = torch.empty(state.masked.shape, device=state.masked.device)
        assert self.confidence is not None
        self.confidence.fill_(float("nan"))  # NaN: not predicted this step (never a surprise)

    def observe_confidence(self, positions: Tensor, confidence: Tensor) -> None:
        """positions [B, r] (sequence columns predicted this step), confidence [B, r]."""
        assert self.confidence is not None, "begin_step must be called first"
        self.confidence.scatter_(1, positions, confidence.to(self.confidence.dtype))

    def end_step(self, state: StepState) -> None:
        assert self.confidence is not None
        # A finished row (nothing masked left) never needs its cache again: its early-stop EOS fill
        # is not a surprise.
        open_rows = (state.masked & ~state.just_committed).any(1)
        low = state.just_committed & (self.confidence <= self.threshold)
        assert self.surprised is not None
        self.surprised.copy_(low.any(1) & open_rows)

    def due(self, state: StepState) -> bool:
        """Host-known (the step's one read, via `bound`): is any row of the batch surprised?"""
        return bool(state.row_budget) if state.row_budget is not None else False

    def bound(self, masked: Tensor, just_committed: Tensor) -> Tensor:
        """The device fact the engine reads once per step: 1 if any row refreshes next step."""
        if self.surprised is None:
            return masked.new_zeros((), dtype=torch.long)
        return self.surprised.any().long()

    def rows(self) -> Tensor:
        """[B] bool: the rows that refresh at this step."""
        assert self.surprised is not None
        return self.surprised


__all__ = ["SurpriseSignal", "check_surprise"]
