"""Elastic-Cache (Nguyen-Tri, Ranjan, Shen 2025, "Attention Is All You Need for KV Cache in Diffusion
LLMs", arXiv 2510.14973): when to refresh from an attention-aware drift test, where from its depth.

The paper's three observations and how each is used here (a per-layer policy: every row's residual
stream is carried, rows not recomputed at a layer add that layer's cached contributions):
1. distant MASK rows act as a length bias: only a sliding *prediction window* of the `window` (beta)
   leftmost masked answer positions is recomputed; the masked rows beyond it keep their cached
   features ("off-window MASK caches") and may not be committed this step (their logits are hidden;
   a dynamic decoder such as threshold parallel decoding, as the paper uses, or window >= block);
2. KV drift grows with depth: a refresh recomputes every row from the first drifting layer onward
   and keeps the shallower layers' cached features;
3. the most-attended row drifts least, so its drift is a conservative trigger: per layer the row
   that the window's queries attend to most (column sums of the head-averaged attention, over the
   rows outside the window) is tracked; it is recomputed at every layer of the next step with the
   window, and its fresh V at each layer is compared (cosine) with its cached V. The first layer
   where the similarity falls below `gamma` is where the refresh starts.
Rows just committed are recomputed too (their tokens changed; dKV-Cache's delayed caching).

Where we differ from the paper, on purpose: the paper tests and refreshes within one step (a host
decision per layer). The step here reads the host once (tests/test_sync_free.py): the drift measured
during step n picks the first refreshed layer of step n + 1, read with the step's one host read
(`row_bound`). The paper's test compares attention weights toward the tracked tokens across steps;
ours compares the tracked row's cached and fresh V (the feature the cache holds), as the issue
specifies. Per batch row: each row has its own tracked rows and refresh depth; rows that refresh
less pad the shared shape with the scratch slot, so a row's result does not depend on its batch.

`surprise=TAU` adds our surprise refresh (cache/surprise.py): a row that commits a token with
confidence <= TAU recomputes every layer at the next step, which the one-step-late drift test cannot.

`gamma >= 1` refreshes every layer at every step (with window >= the block length: the uncached
output exactly). The paper's defaults: gamma 0.9, window 16, threshold parallel decoding at 0.9
(preset `elastic-cache`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dllm_cache.cache.base import StepState, rows_from_mask, shifted_left
from dllm_cache.cache.surprise import SurpriseSignal, attach_surprise
from dllm_cache.errors import GenerationError
from dllm_cache.models.active import LayerView, bucket, gather_rows


class ElasticCache:
    name = "elastic-cache"
    per_layer = True
    uses_cache = True

    def __init__(self, gamma: float = 0.9, window: int = 16, surprise: float | None = None) -> None:
        try:
            self.gamma, self.window = float(gamma), int(window)
        except (TypeError, ValueError):
            raise GenerationError("elastic-cache: gamma must be a number and window an integer") from None
        if not 0.0 <= self.gamma:
            raise GenerationError(f"elastic-cache: gamma must be >= 0 (1 = always refresh), got {self.gamma}")
        if self.window < 1:
            raise GenerationError(f"elastic-cache: window must be >= 1, got {self.window}")
        self._state: StepState | None = None
        # Our surprise refresh (cache/surprise.py) on top: a row that just committed a token with
        # confidence <= surprise recomputes every layer at the next step, before any drift shows.
        # (row_bound stays ours: the step's one read also carries the window's rows and refresh depth)
        self._signal: SurpriseSignal | None = attach_surprise(
            self, "elastic-cache", surprise, row_bound=False
        )

    def describe(self) -> dict:
        out = {"name": self.name, "gamma": self.gamma, "window": self.window}
        return out if self.surprise is None else {**out, "surprise": self.surprise}

    def check_decoder(self, decoder: object, block_length: int) -> None:
        """Called before generation: masked rows outside the window get no logits."""
        if not getattr(decoder, "dynamic", False) and self.window < block_length:
            raise GenerationError(
                f"cache elastic-cache predicts only window={self.window} masked positions per step, fewer "
                f"than the block length {block_length}: use a dynamic decoder (--decoder threshold; "
                f"--preset elastic-cache) or window >= {block_length}"
            )

    # -- per-step state ------------------------------------------------------------------------------

    def _allocate(self, state: StepState, n_layers: int) -> None:
        """Buffers updated in place, so a captured CUDA graph of the forward reads the current ones."""
        B, L = state.masked.shape
        device = state.masked.device
        self.n_layers = n_layers
        self.tracked = torch.zeros((B, n_layers), dtype=torch.long, device=device)  # most-attended rows
        self.next_tracked = torch.zeros_like(self.tracked)
        self.similarity = torch.ones((B, n_layers), device=device)  # this step's drift test
        self.first_refresh = torch.zeros(B, dtype=torch.long, device=device)  # per row, this step
        self.query = torch.ones((B, L), dtype=torch.bool, device=device)  # window + tracked + committed
        self.in_window = torch.ones((B, L), dtype=torch.bool, device=device)  # positions predictable
        self.k = L  # host: query rows per batch row (bucketed)
        self.refresh_from = 0  # host: first layer at which any row refreshes
        self._rows: Tensor | None = None

    def _window(self, masked: Tensor, prompt_end: int) -> Tensor:
        """[B, L] bool: the `window` leftmost masked answer positions of each row."""
        answer_masked = masked.clone()
        answer_masked[:, :prompt_end] = False
        return answer_masked & (answer_masked.long().cumsum(1) <= self.window)

    def _query(self, masked: Tensor, just_committed: Tensor, window: Tensor, shift: bool) -> Tensor:
        query = window | just_committed
        if shift:  # Dream: row i-1 produces the logits of position i
            query = query | shifted_left(window)
        return query.scatter(1, self.tracked, True)

    def begin_step(self, state: StepState) -> Tensor | None:
        self._state = state
        self._rows = None
        if self._signal is not None:
            self._signal.begin_step(state)
        if state.step == 0:
            self._started = False
        window = self._window(state.masked, state.prompt_end)
        if not self._started:
            return None  # buffers are allocated at the first select (the model's depth is known then)
        self.in_window.copy_(window)
        self.query.copy_(self._query(state.masked, state.just_committed, window, state.shift))
        budget = state.row_budget
        if isinstance(budget, tuple):
            count, self.refresh_from = budget
            self.k = bucket(count, state.seq_len)
        else:  # no host read was made for us (not through the engine): count here
            self.k = bucket(int(self.query.sum(1).max()), state.seq_len)
            self.refresh_from = int(self.first_refresh.min())
        self.similarity.fill_(1.0)
        self.next_tracked.copy_(self.tracked)
        return None  # per-layer selection

    def graph_key(self) -> tuple[int, int]:
        """Besides shapes, what changes the coming forward's work: rows per layer and refresh depth."""
        return (self.k, self.refresh_from) if self._started else (-1, -1)

    def hidden_logits(self, positions: Tensor) -> Tensor:
        """Masked positions outside the window may not be committed this step."""
        if not self._started:
            return torch.zeros_like(positions, dtype=torch.bool)
        return ~self.in_window.gather(1, positions)

    def select(self, layer: int, view: LayerView) -> Tensor | None:
        state = self._state
        assert state is not None, "begin_step must be called first"
        if not self._started:
            if layer == 0:
                self._allocate(state, len(view.cache.k))
            return None  # the generation's first step: every row at every layer
        # The drift test: the tracked row's fresh V at this layer against the V cached for it.
        tracked = self.tracked[:, layer : layer + 1]
        fresh = view.values(tracked)  # [B, Hkv, 1, hd]
        old = gather_rows(view.cache.v[layer], tracked, dim=2)
        self.similarity[:, layer] = F.cosine_similarity(
            fresh.flatten(1).float(), old.flatten(1).float(), dim=-1
        )
        if layer >= self.refresh_from:
            # Rows whose refresh starts here or earlier recompute every row; the others their queries.
            refresh = (self.first_refresh <= layer)[:, None]
            return rows_from_mask(self.query | refresh, state.seq_len)
        if self._rows is None:
            self._rows = rows_from_mask(self.query, self.k)
        return self._rows

    def observe_attention(self, layer: int, rows: Tensor | None, probs: Tensor) -> None:
        """Track the row outside the window that this layer's window queries attend to most."""
        if not self._started:
            if layer == self.n_layers - 1:
                self._started = True  # the first full step is done; from now on the window decodes
            # every query of the full first step but the left padding (which no query attends to)
            real = probs.sum(1) > 0
            weight, outside = real.float(), real
        else:
            assert rows is not None
            # only the queries' attention counts; padding slots (index L, the scratch slot) do not
            L = self.query.shape[1]
            weight = self.query.float().gather(1, rows.clamp(max=L - 1)) * (rows < L)
            outside = ~self.query
        column = torch.einsum("bk,bkl->bl", weight, probs.float())
        column = column.masked_fill(~outside, -1.0)
        self.next_tracked[:, layer] = column.argmax(1)

    def end_step(self, state: StepState) -> None:
        if not hasattr(self, "tracked"):
            return
        drift = self.similarity < self.gamma
        first = torch.where(drift.any(1), drift.long().argmax(1), self.n_layers)
        if self.gamma >= 1.0:
            first = torch.zeros_like(first)
        if self._signal is not None:
            self._signal.end_step(state)
            first = first.masked_fill(self._signal.rows(), 0)
        self.first_refresh.copy_(first)
        self.tracked.copy_(self.next_tracked)

    def row_bound(self, masked: Tensor, just_committed: Tensor) -> Tensor:
        """The next step's query rows per batch row (before bucketing) and its first refreshed layer."""
        state = self._state
        if state is None or not hasattr(self, "tracked"):
            return masked.new_tensor([masked.shape[1], 0], dtype=torch.long)
        window = self._window(masked, state.prompt_end)
        count = self._query(masked, just_committed, window, state.shift).sum(1).max()
        return torch.stack([count, self.first_refresh.min()]).long()


__all__ = ["ElasticCache"]
