"""d2Cache: dual adaptive caching with a two-stage selection of the rows to recompute.

K, V of every row are cached; each step only a selected set of rows runs through the network (the
same set at every layer; the others are skipped and only their cached K, V are read). The first step
of a generation is a full forward. After each step the next step's rows are chosen:

1. masked rows, scored by last known confidence x certainty density (decoding/certainty.py): the
   top `current_k`, searched from the current block's start up to the first block boundary that
   holds at least `current_k` masked rows, always with at least one row of the current block. A
   masked row whose logits were never computed has confidence 0 (ties go to the leftmost rows);
2. every row committed at this step (its token just changed);
3. among the remaining prompt / decoded rows, the smallest set whose attention-rollout importance
   reaches the mass `rollout_p`. Rollout: per layer the head-averaged attention of the active queries
   with an identity residual, (A + I) / 2 (a row that was not computed passes its importance
   through unchanged), multiplied over layers; importance = column sums over the active queries;
4. inflation: a gap of at most `inflate_w` rows between two selected rows is selected too.
For Dream the row before a selected masked row (which predicts it) is selected too (the paper says
"instead"; keeping the masked row itself makes the recompute-everything setting exact).

Masked rows outside the selection get no logits, so pair it with a dynamic decoder (`certainty`,
the d2Cache paper's certainty-prior decoding, or `threshold` / `factor`), or raise `current_k` to the
block length. `current_k >= gen length` with `rollout_p = 1` recomputes every row: exact.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dllm_cache.cache.base import StepState, rows_from_mask, shifted_left
from dllm_cache.decoding.base import top_k_per_row
from dllm_cache.decoding.certainty import certainty_density
from dllm_cache.errors import GenerationError
from dllm_cache.models.active import LayerView


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
        # ties (never-seen rows have confidence 0) go to the leftmost rows
        position_bonus = torch.arange(L, 0, -1, device=masked.device, dtype=torch.float64) * 1e-12
        score = (score + position_bonus).masked_fill(~candidates, float("-inf"))
        k = torch.clamp(candidates.sum(1), max=self.current_k)
        chosen = top_k_per_row(score, k) & candidates
        # at least one masked row of the current block
        in_block = candidates.clone()
        in_block[:, : state.block_start] = False
        in_block[:, state.block_end :] = False
        missing = in_block.any(1) & ~(chosen & in_block).any(1)
        best = score.masked_fill(~in_block, float("-inf")).argmax(1, keepdim=True)
        chosen = chosen | torch.zeros_like(chosen).scatter(1, best, missing[:, None])
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
        importance = rollout_importance(self.attention, masked.shape)
        importance = importance.masked_fill(~candidates, 0.0)
        total = importance.sum(1, keepdim=True).clamp(min=1e-30)
        share, order = (importance / total).sort(dim=1, descending=True)
        before = share.cumsum(1) - share  # mass of the more important rows
        take = (before < self.rollout_p) & (share > 0)
        return torch.zeros_like(take).scatter(1, order, take)


def rollout_importance(attention: list[tuple[Tensor | None, Tensor]], shape: torch.Size) -> Tensor:
    """Column sums, over the last layer's active queries, of the attention rollout
    prod_l (A_l + I) / 2, where A_l has the head-averaged probabilities on the rows computed at layer
    l and identity rows elsewhere. attention: per layer (rows [B, k] or None = all, probs [B, k, L])."""
    B, L = shape
    last_rows, _ = attention[-1]
    v = torch.zeros((B, L), dtype=torch.float64, device=attention[-1][1].device)
    if last_rows is None:
        v.fill_(1.0)
    else:
        v.scatter_(1, last_rows, 1.0)  # (idempotent for repeated rows)
    # v <- v M_l from the last layer down, M_l = I + active rows' ((A_l)_i - e_i) / 2
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
