"""Fast-dLLM's approximate block KV cache: `prefix` and `dual`.

At the first step of every block all rows are computed and their K, V stored. At the block's other
steps only some rows run through the network (the same rows at every layer); the rest are skipped and
read from the cache:
- prefix: the current block and everything after it (the masked suffix) are active; the prefix
  (prompt + earlier blocks) is served from the cache;
- dual: only the current block is active; prefix and suffix K, V come from the block's first step.
For Dream the row before the block (which predicts its first position) is active too.
`refresh_interval` adds full refreshes inside a block every that many steps (1 = every step: exact).

FreeCache is the same machinery with a window: the rows of a sliding window from the block start
(`window` rows, or exactly the current block with `block_boundary=True`) are recomputed at every step
but the first, and the rows outside it are read from the cache. As published (FlashDLM), nothing is
refreshed at a block's start: the prompt's K, V come from the generation's first (full) step and
each finished block's K, V from its last step's forward (computed before that step's commit);
masked rows beyond the window keep their K, V from the last forward that computed them.
`block_refresh=True` is our earlier variant: every row recomputed at each block's first step (as
`prefix` does), which costs one full forward per block and keeps the cached K, V fresher.

`surprise=TAU` (all three; cache/surprise.py) adds refreshes between the scheduled ones: at the step
after a row commits a token with confidence <= TAU, that row recomputes every row (its cached rows
outside the window included). TAU = 1 refreshes after every commit: exact.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dllm_cache.cache.base import StepState, column_range, rows_from_mask
from dllm_cache.cache.surprise import SurpriseSignal, attach_surprise
from dllm_cache.errors import GenerationError
from dllm_cache.models.active import LayerView

MODES = ("prefix", "dual")


class FastDLLMCache:
    per_layer = False
    uses_cache = True

    def __init__(self, mode: str = "dual", refresh_interval: int = 0, surprise: float | None = None) -> None:
        if mode not in MODES:
            raise GenerationError(f"fast-dllm: unknown mode {mode!r} (choose {', '.join(MODES)})")
        try:
            self.refresh_interval = int(refresh_interval)
        except (TypeError, ValueError):
            raise GenerationError(
                f"{mode}: refresh_interval must be an integer, got {refresh_interval!r}"
            ) from None
        if self.refresh_interval < 0:
            raise GenerationError(f"{mode}: refresh_interval must be >= 0 (0 = only at block starts)")
        self.mode = mode
        self.name = mode
        self._signal: SurpriseSignal | None = attach_surprise(self, mode, surprise)

    def describe(self) -> dict:
        out = {"name": self.name, "refresh_interval": self.refresh_interval}
        return out if self.surprise is None else {**out, "surprise": self.surprise}

    def begin_step(self, state: StepState) -> Tensor | None:
        if self._signal is not None:
            self._signal.begin_step(state)
        if self.full_refresh(state):
            return None
        B, device = state.masked.shape[0], state.masked.device
        start, end = state.block_start - (1 if state.shift else 0), self.window_end(state)
        if self._signal is None or not self._signal.due(state):
            return column_range(B, start, end, device)
        # Surprised rows recompute every row; the others their window (padded with the scratch slot).
        active = torch.zeros_like(state.masked)
        active[:, start:end] = True
        active |= self._signal.rows()[:, None]
        return rows_from_mask(active, state.seq_len)

    def full_refresh(self, state: StepState) -> bool:
        """Every row at each block's first step and every `refresh_interval` steps of a block."""
        s = state.step_in_block
        return s == 0 or bool(self.refresh_interval and s % self.refresh_interval == 0)

    def window_end(self, state: StepState) -> int:
        """End (exclusive) of the rows recomputed at the block's other steps."""
        return state.seq_len if self.mode == "prefix" else state.block_end

    def select(self, layer: int, view: LayerView) -> Tensor | None:
        return None

    def end_step(self, state: StepState) -> None:
        if self._signal is not None:
            self._signal.end_step(state)


class PrefixCache(FastDLLMCache):
    def __init__(self, refresh_interval: int = 0, surprise: float | None = None) -> None:
        super().__init__("prefix", refresh_interval, surprise)


class DualCache(FastDLLMCache):
    def __init__(self, refresh_interval: int = 0, surprise: float | None = None) -> None:
        super().__init__("dual", refresh_interval, surprise)


class FreeCache(FastDLLMCache):
    """FreeCache: clean rows cached, a sliding window recomputed, far-right masked rows skipped."""

    def __init__(
        self,
        window: int = 512,
        block_boundary: bool = False,
        refresh_interval: int = 0,
        block_refresh: bool = False,
        surprise: float | None = None,
    ) -> None:
        super().__init__("prefix", refresh_interval, surprise)
        self.name = "freecache"
        try:
            self.window = int(window)
        except (TypeError, ValueError):
            raise GenerationError(f"freecache: window must be an integer, got {window!r}") from None
        if self.window < 1:
            raise GenerationError(f"freecache: window must be >= 1, got {self.window}")
        if not isinstance(block_boundary, bool):
            raise GenerationError(f"freecache: block_boundary must be true or false, got {block_boundary!r}")
        if not isinstance(block_refresh, bool):
            raise GenerationError(f"freecache: block_refresh must be true or false, got {block_refresh!r}")
        self.block_boundary, self.block_refresh = block_boundary, block_refresh

    def describe(self) -> dict:
        return {
            **super().describe(),
            "window": self.window,
            "block_boundary": self.block_boundary,
            "block_refresh": self.block_refresh,
        }

    def full_refresh(self, state: StepState) -> bool:
        """The generation's first step; each block's first step only with `block_refresh`; and
        every `refresh_interval` steps of a block (its first step included: 1 = every step)."""
        s = state.step_in_block
        if state.step == 0 or (self.block_refresh and s == 0):
            return True
        return bool(self.refresh_interval and s % self.refresh_interval == 0)

    def window_end(self, state: StepState) -> int:
        if self.block_boundary:
            return state.block_end
        return min(state.seq_len, max(state.block_end, state.block_start + self.window))
