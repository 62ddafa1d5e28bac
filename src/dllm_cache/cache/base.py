"""The cache-policy side of the active-rows contract and the baseline policy `none`.

The contract itself (FeatureCache, StepState, the CachePolicy protocol, the row helpers) lives in
models/active.py, below both the model and the policies; it is handed on here for the policies.
"""

from __future__ import annotations

from torch import Tensor

from dllm_cache.models.active import (
    CachePolicy,
    FeatureCache,
    LayerView,
    StepState,
    column_range,
    rows_from_mask,
    shifted_left,
)

__all__ = [
    "CachePolicy",
    "FeatureCache",
    "LayerView",
    "NoCache",
    "StepState",
    "column_range",
    "rows_from_mask",
    "shifted_left",
]


class NoCache:
    """Every row of every layer is active at every step: the baseline."""

    name = "none"
    per_layer = False
    uses_cache = False

    def begin_step(self, state: StepState) -> Tensor | None:
        return None

    def select(self, layer: int, view: LayerView) -> Tensor | None:
        return None

    def end_step(self, state: StepState) -> None:
        pass

    def describe(self) -> dict:
        return {"name": self.name}
