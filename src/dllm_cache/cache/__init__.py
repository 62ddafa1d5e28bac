"""Cache policies: which rows each layer recomputes at each step (docs/architecture.md)."""

from __future__ import annotations

from typing import Any

from dllm_cache.cache.base import CachePolicy, FeatureCache, NoCache, StepState
from dllm_cache.errors import GenerationError

POLICIES: dict[str, type] = {"none": NoCache}


def make_policy(name: str, **kwargs: Any) -> CachePolicy:
    """A fresh policy by name (`none`, ...) with its hyperparameters as keyword arguments."""
    key = name.replace("_", "-")
    if key not in POLICIES:
        raise GenerationError(f"unknown cache policy {name!r} (choose {', '.join(POLICIES)})")
    try:
        return POLICIES[key](**kwargs)
    except TypeError as e:
        raise GenerationError(f"cache policy {key!r}: {e}") from None


__all__ = ["POLICIES", "CachePolicy", "FeatureCache", "NoCache", "StepState", "make_policy"]
