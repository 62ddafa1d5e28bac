"""Cache policies: which rows each layer recomputes at each step (docs/architecture.md)."""

from __future__ import annotations

import inspect
from typing import Any

from dllm_cache.cache.base import CachePolicy, FeatureCache, NoCache, StepState
from dllm_cache.cache.d2cache import D2Cache
from dllm_cache.cache.dkv import DKVCache
from dllm_cache.cache.dllm_cache import DLLMCache
from dllm_cache.cache.elastic import ElasticCache
from dllm_cache.cache.fast_dllm import DualCache, FreeCache, PrefixCache
from dllm_cache.errors import GenerationError

POLICIES: dict[str, type] = {
    "none": NoCache,
    "dllm-cache": DLLMCache,
    "prefix": PrefixCache,
    "dual": DualCache,
    "dkv": DKVCache,
    "d2cache": D2Cache,
    "freecache": FreeCache,
    "elastic-cache": ElasticCache,
}


def make_policy(name: str, **kwargs: Any) -> CachePolicy:
    """A fresh policy by name (`none`, ...) with its hyperparameters as keyword arguments."""
    key = name.replace("_", "-")
    if key not in POLICIES:
        raise GenerationError(f"unknown cache policy {name!r} (choose {', '.join(POLICIES)})")
    cls = POLICIES[key]
    params = [p for p in inspect.signature(cls).parameters if p != "self"]
    for arg in kwargs:
        if arg not in params:
            valid = ", ".join(params) or "none"
            raise GenerationError(f"cache policy {key!r} has no argument {arg!r} (valid: {valid})")
    return cls(**kwargs)


__all__ = [
    "POLICIES",
    "CachePolicy",
    "D2Cache",
    "DKVCache",
    "DLLMCache",
    "ElasticCache",
    "DualCache",
    "FeatureCache",
    "FreeCache",
    "PrefixCache",
    "NoCache",
    "StepState",
    "make_policy",
]
