"""d2Cache: dual adaptive caching with a two-stage selection of the rows to recompute.

K, V of every row are cached; each step only a selected set of rows runs through the network (the
same set at every layer; the others are skipped and only their cached K, V are read). The first step
of a generation is a full forward. After each step the next step's rows are chosen:

1. masked rows, scored by last known confidence x certainty density over the answer
   (`dllm_cache.scoring.certainty_density`, the published untruncated Gaussian): the top
   `current_k`, searched from the current block's start up to the first block boundary that holds at
   least `current_k` masked rows, the masked rows of the current block ranked before all others (the
   published code adds the maximum score to them). A masked row whose logits were never computed has
   confidence 0; exact ties go to the leftmost rows;
2. every row committed at this step (its token just changed);
3. among the remaining prompt / decoded rows, the smallest set whose attention-rollout importance
   reaches the mass `rollout_p`. Rollout: per layer the head-averaged attention of the active queries
   with an identity residual, (A + I) / 2, where a row that was not computed contributes its identity
   row, multiplied over layers; importance = the column sums of that full product (every real row;
   left padding neither gives nor receives importance);
4. inflation: a gap of at most `inflate_w` rows between two selected rows is selected too.
For Dream the row before a selected masked row (which predicts it) is selected too (the paper says
"instead"; keeping the masked row itself makes the recompute-everything setting exact).

Where the published code and its paper disagree we follow the paper: (i) the published confidence
cache is updated through a copy (boolean indexing), so it keeps the first step's confidences
forever; ours records each masked row's confidence whenever its logits are computed; (ii) the
published loop leaves masked rows that were not computed eligible for commitment (with zero
logits); ours gives them no logits, so only computed rows can be committed. Two choices keep a row's
result independent of its batch: the in-block bonus is per row (the published maximum is over the
whole batch; the ranking is the same), and ties are broken by position rather than by `torch.topk`.

Masked rows outside the selection get no logits, so pair it with a dynamic decoder (`certainty`,
the d2Cache paper's certainty-prior decoding, or `threshold` / `factor`), or raise `current_k` to the
block length. `current_k >= gen length` with `rollout_p = 1` recomputes every row: exact.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dllm_cache.cache.base import StepState, rows_from_mask, shifted_left
from dllm_cache.errors import GenerationError
from dllm_cache.models.active import LayerView
from dllm_cache.scoring import certainty_density, top_k_per_row


class D2Cache:
    name = "d2cache"
    per_layer = False
    uses_cache = True

    def __init__(
        self, current_k: int = 32, rollout_p: float = 0.1, sigma: float = 10.0, inflate_w: int = 4
    ) -> None:
        try:
            self.current_k, self.inflate_w = int(current_k), int(inflate_w)
            self.rollout_p, self.sigma = float(rollout_p), float(sigma)
        except (TypeError, ValueError):
            raise GenerationError(
                "d2cache: current_k and inflate_w must be integers, rollout_p and sigma numbers"
            ) from None
        if self.current_k < 1:
            raise GenerationError(f"d2cache: current_k must be >= 1, got {self.current_k}")
        if not 0.0 <= self.rollout_p <= 1.0:
            raise GenerationError(f"d2cache: rollout_p must be in [0, 1], got {self.rollout_p}")
        if not self.sigma > 0:
            raise GenerationError(f"d2cache: sigma must be > 0, got {self.sigma}")
        if self.inflate_w < 0:
            raise GenerationError(f"d2cache: inflate_w must be >= 0, got {self.inflate_w}")
        self._reset()

    def describe(self) -> dict:
        return {
            "name": self.name,
            "current_k": self.current_k,
            "rollout_p": self.rollout_p,
            "sigma": self.sigma,
            "inflate_w": self.inflate_w,
        }

    def _reset(self) -> None:
        self.next_selected: Tensor | None = None  # [B, L] bool: the rows of the next step
        self.confidence: Tensor | None = None  # [B, L] last known confidence per position
        self.real: Tensor | None = None  # [B, L] bool: not left padding (seen in the first forward)
        self.attention: list[tuple[Tensor | None, Tensor]] = []  # this step's (rows, probs) per layer

    def check_decoder(self, decoder: object, block_length: int) -> None:
        """Called before generation: masked rows may go uncomputed unless the decoder is dynamic."""
        if not getattr(decoder, "dynamic", False) and self.current_k < block_length:
            raise GenerationError(
                f"cache d2cache computes only current_k={self.current_k} masked rows per step, fewer than "
                f"the block length {block_length}: use a dynamic decoder (--decoder certainty, threshold "
                f"or factor; --preset d2cache) or current_k >= {block_length}"
            )

    # -- what the engine and the model report back ------------------------------------------------

    def observe_attention(self, layer: int, rows: Tensor | None, probs: Tensor) -> None:
        if self.real is None and rows is None:
            # The first forward computes every row; padding is what no query can attend to.
            self.real = probs.sum(1) > 0
        self.attention.append((rows, probs))

    def observe_confidence(self, positions: Tensor, confidence: Tensor) -> None:
        """positions [B, r] (sequence columns predicted this step), confidence [B, r] (NaN: none)."""
        if self.confidence is None:
            return
        known = ~confidence.isnan()
        current = self.confidence.gather(1, positions)
        self.confidence.scatter_(1, positions, torch.where(known, confidence.to(current.dtype), current))

    # -- the protocol ------------------------------------------------------------------------------

    def begin_step(self, state: StepState) -> Tensor | None:
        if state.step == 0:
            self._reset()
            self.confidence = torch.zeros(state.masked.shape, dtype=torch.float64, device=state.masked.device)
        self.attention = []
        if self.next_selected is None:
            return None
        if state.row_budget is None:  # counted here (a host read)
            return None if bool(self.next_selected.all()) else rows_from_mask(self.next_selected)
        return rows_from_mask(self.next_selected, state.row_budget)

    def row_bound(self, masked: Tensor, just_committed: Tensor) -> Tensor:
        """The next step's row count (chosen in end_step)."""
        if self.next_selected is None:
            return masked.new_full((), masked.shape[1], dtype=torch.long)
        return self.next_selected.sum(1).max()

    def select(self, layer: int, view: LayerView) -> Tensor | None:
        return None

    def end_step(self, state: StepState) -> None:
        masked = state.masked & ~state.just_committed  # masked rows after this step
        selected = self._masked_rows(state, masked) | state.just_committed
        selected |= self._rollout_rows(masked, selected)
        self.next_selected = inflate(selected, self.inflate_w)

    def _masked_rows(self, state: StepState, masked: Tensor) -> Tensor:
        """Stage 1: the top-current_k masked rows by confidence x certainty density."""
        assert self.confidence is not None
        B, L = masked.shape
        P, block = state.prompt_end, state.block_end - state.block_start
        density = torch.ones((B, L), dtype=torch.float64, device=masked.device)
        density[:, P:] = certainty_density(~masked[:, P:], self.sigma)
        score = self.confidence * density
        # search range: from the block start to the first block boundary with >= current_k masked
        # (per batch row, so a row's choice never depends on the others)
        # (the answer is whole blocks, so L is the last of these bounds)
        bounds = torch.arange(state.block_end, L + 1, block, device=masked.device)
        counts = masked[:, state.block_start :].long().cumsum(1)[:, bounds - state.block_start - 1]
        reached = counts >= self.current_k
        first = torch.where(
            reached.any(1),
            reached.long().argmax(1),
            torch.full_like(reached[:, 0], len(bounds) - 1, dtype=torch.long),
        )
        end = bounds[first]
        idx = torch.arange(L, device=masked.device).expand(B, L)
        candidates = masked & (idx >= state.block_start) & (idx < end[:, None])
        # The current block's masked rows first (the published code adds the maximum score to them),
        # then the best of the rest; exact ties (never-seen rows score 0) go to the leftmost rows.
        k = torch.clamp(candidates.sum(1), max=self.current_k)
        in_block = candidates & (idx >= state.block_start) & (idx < state.block_end)
        k_in = torch.minimum(k, in_block.sum(1))
        chosen = top_k_per_row(score.masked_fill(~in_block, float("-inf")), k_in) & in_block
        beyond = candidates & ~in_block
        chosen |= top_k_per_row(score.masked_fill(~beyond, float("-inf")), k - k_in) & beyond
        if state.shift:  # Dream: row i-1 produces the logits of position i
            chosen = chosen | shifted_left(chosen)
        return chosen

    def _rollout_rows(self, masked: Tensor, selected: Tensor) -> Tensor:
        """Stage 3: the smallest set of clean rows holding `rollout_p` of the rollout importance."""
        candidates = ~masked & ~selected
        if self.rollout_p >= 1.0:
            return candidates
        if self.rollout_p <= 0.0 or not self.attention:
            return torch.zeros_like(masked)
        real = self.real if self.real is not None else torch.ones_like(masked)
        candidates &= real
        importance = rollout_importance(self.attention, real)
        importance = importance.masked_fill(~candidates, 0.0)
        total = importance.sum(1, keepdim=True).clamp(min=1e-30)
        share, order = (importance / total).sort(dim=1, descending=True)
        before = share.cumsum(1) - share  # mass of the more important rows
        take = (before < self.rollout_p) & (share > 0)
        return torch.zeros_like(take).scatter(1, order, take)


def rollout_importance(attention: list[tuple[Tensor | None, Tensor]], real: Tensor) -> Tensor:
    """Column sums of the attention rollout prod_l (A_l + I) / 2 over every real row, where A_l has
    the head-averaged probabilities on the rows computed at layer l and identity rows elsewhere.
    attention: per layer (rows [B, k] or None = all, probs [B, k, L]); real [B, L] bool (not padding).
    """
    # v <- v M_l from the last layer down, M_l = I + active rows' ((A_l)_i - e_i) / 2
    v = real.to(torch.float64)
    for rows, probs in reversed(attention):
        p = probs.to(torch.float64)
        if rows is None:
            v = 0.5 * v + 0.5 * torch.einsum("bk,bkl->bl", v, p)
        else:
            # a row listed twice (padding of rows_from_mask) counts once
            repeats = torch.zeros_like(v).scatter_add(1, rows, torch.ones_like(rows, dtype=v.dtype))
            w = v.gather(1, rows) / repeats.gather(1, rows)
            active = (repeats > 0).to(v.dtype)
            v = v - 0.5 * v * active + 0.5 * torch.einsum("bk,bkl->bl", w, p)
    return v


def inflate(selected: Tensor, width: int) -> Tensor:
    """Also select every gap of <= `width` unselected rows between two selected rows."""
    if width <= 0:
        return selected
    B, L = selected.shape
    idx = torch.arange(L, device=selected.device).expand(B, L)
    prev = torch.where(selected, idx, torch.full_like(idx, -1)).cummax(1).values
    nxt = torch.where(selected, idx, torch.full_like(idx, L)).flip(1).cummin(1).values.flip(1)
    gap = nxt - prev - 1
    return selected | ((prev >= 0) & (nxt < L) & (gap <= width))


__all__ = ["D2Cache", "inflate", "rollout_importance"]
