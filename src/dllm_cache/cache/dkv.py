"""dKV-Cache: delayed caching of decoded tokens.

A token's K, V settle once it is decoded, but not in the very step it is decoded: a row committed at
step n is recomputed once more at step n+1 (with its token in place) and served from the cache after.
Variants (inactive rows are skipped entirely):
- decode: masked rows + rows committed at the previous step are active; a full refresh every
  `refresh_interval` steps (1 = every step: exact);
- prefill: the prompt is computed once (step 0) and never refreshed; every answer row is active;
- greedy: only the masked rows of the current block and of a `window` after it, plus the rows just
  committed, are active (more aggressive), with the same periodic refresh as decode.
For Dream the row before each masked position (which predicts it) is active too.
"""

from __future__ import annotations

from torch import Tensor

from dllm_cache.cache.base import StepState, column_range, rows_from_mask, shifted_left
from dllm_cache.errors import GenerationError
from dllm_cache.models.active import LayerView

VARIANTS = ("decode", "prefill", "greedy")


class DKVCache:
    name = "dkv"
    per_layer = False
    uses_cache = True

    def __init__(self, variant: str = "decode", refresh_interval: int = 8, window: int = 4) -> None:
        if variant not in VARIANTS:
            raise GenerationError(f"dkv: unknown variant {variant!r} (choose {', '.join(VARIANTS)})")
        try:
            self.refresh_interval, self.window = int(refresh_interval), int(window)
        except (TypeError, ValueError):
            raise GenerationError("dkv: refresh_interval and window must be integers") from None
        if self.refresh_interval < 1:
            raise GenerationError(f"dkv: refresh_interval must be >= 1, got {self.refresh_interval}")
        if self.window < 0:
            raise GenerationError(f"dkv: window must be >= 0, got {self.window}")
        self.variant = variant

    def describe(self) -> dict:
        return {
            "name": self.name,
            "variant": self.variant,
            "refresh_interval": self.refresh_interval,
            "window": self.window,
        }

    def begin_step(self, state: StepState) -> Tensor | None:
        n, B, L = state.step, state.masked.shape[0], state.seq_len
        device = state.masked.device
        if n == 0:
            return None
        if self.variant == "prefill":
            start = state.prompt_end - (1 if state.shift else 0)
            return column_range(B, start, L, device)
        if n % self.refresh_interval == 0:
            return None
        masked = state.masked.clone()
        if self.variant == "greedy":
            limit = min(L, state.block_end + self.window)
            masked[:, limit:] = False
            masked[:, : state.block_start] = False
        active = self._decode_rows(masked, state.just_committed, state.shift)
        active[:, state.block_start] |= ~active.any()  # nothing left to decode in the batch
        return rows_from_mask(active, state.row_budget)

    @staticmethod
    def _decode_rows(masked: Tensor, just_committed: Tensor, shift: bool) -> Tensor:
        active = masked | just_committed
        return active | shifted_left(masked) if shift else active

    def row_bound(self, masked: Tensor, just_committed: Tensor) -> Tensor:
        """At most this many rows next step: the decode set with Dream's shifted rows (a superset for
        LLaDA; greedy's window only takes rows away), at least the one row of an empty batch."""
        return self._decode_rows(masked, just_committed, True).sum(1).max().clamp(min=1)

    def select(self, layer: int, view: LayerView) -> Tensor | None:
        return None

    def end_step(self, state: StepState) -> None:
        pass


__all__ = ["DKVCache"]
