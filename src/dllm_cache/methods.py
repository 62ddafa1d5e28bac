"""A *method* = a cache policy + a decoder + generation settings, named or written as a spec.

Spec syntax: `CACHE[:key=value...][+DECODER[:key=value...]]`, e.g. `dllm-cache:response_interval=4`,
`dual+threshold:threshold=0.8`, `none+factor`; or a preset name (`fast-dllm-dual-parallel`).
Decoder arguments are GenerationConfig fields (threshold, factor, early_commit_margin, ...).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from dllm_cache.cache import POLICIES, make_policy
from dllm_cache.cache.base import CachePolicy
from dllm_cache.errors import DllmCacheError


@dataclass
class Method:
    cache: str = "none"
    cache_args: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(
        default_factory=dict
    )  # GenerationConfig fields (decoder, block_length...)

    def policy(self) -> CachePolicy:
        return make_policy(self.cache, **self.cache_args)


# The papers' settings (Fast-dLLM: block 32, threshold 0.9; dKV-Cache: refresh every 8 steps).
PRESETS: dict[str, Method] = {
    "baseline": Method(),
    "dllm-cache": Method("dllm-cache"),
    "fast-dllm-prefix": Method("prefix", overrides={"block_length": 32}),
    "fast-dllm-dual": Method("dual", overrides={"block_length": 32}),
    "fast-dllm-parallel": Method(overrides={"block_length": 32, "decoder": "threshold", "threshold": 0.9}),
    "fast-dllm-prefix-parallel": Method(
        "prefix", overrides={"block_length": 32, "decoder": "threshold", "threshold": 0.9}
    ),
    "fast-dllm-dual-parallel": Method(
        "dual", overrides={"block_length": 32, "decoder": "threshold", "threshold": 0.9}
    ),
    "dkv-decode": Method("dkv", {"variant": "decode", "refresh_interval": 8}),
    "dkv-prefill": Method("dkv", {"variant": "prefill"}),
    "dkv-greedy": Method("dkv", {"variant": "greedy", "refresh_interval": 8}),
    # d2Cache with its certainty-prior decoding; FreeCache and Guided Diffusion with the demo AR guide
    # (for Dream-7B pass a Qwen2.5-Instruct directory as guide_model).
    "d2cache": Method("d2cache", overrides={"decoder": "certainty"}),
    "freecache": Method("freecache", overrides={"block_length": 32}),  # as published (FlashDLM)
    # our earlier FreeCache: every row recomputed at each block's first step
    "freecache-block-refresh": Method("freecache", {"block_refresh": True}, overrides={"block_length": 32}),
    # Elastic-Cache with the paper's defaults (gamma 0.9, window 16, threshold parallel decoding 0.9).
    "elastic-cache": Method(
        "elastic-cache", {"gamma": 0.9, "window": 16}, overrides={"decoder": "threshold", "threshold": 0.9}
    ),
    # Surprise refresh (cache/surprise.py): the fixed-schedule caches plus a refresh of their cached
    # rows after a commit with confidence <= 0.5.
    "dual-surprise": Method("dual", {"surprise": 0.5}, overrides={"block_length": 32}),
    "dual-surprise-parallel": Method(
        "dual", {"surprise": 0.5}, overrides={"block_length": 32, "decoder": "threshold", "threshold": 0.9}
    ),
    "dllm-cache-surprise": Method("dllm-cache", {"surprise": 0.5}),
    "elastic-cache-surprise": Method(
        "elastic-cache",
        {"gamma": 0.9, "window": 16, "surprise": 0.5},
        overrides={"decoder": "threshold", "threshold": 0.9},
    ),
    "guided": Method(overrides={"block_length": 32, "decoder": "guided", "guide_model": "tiny-ar"}),
    "freecache-guided": Method(
        "freecache", overrides={"block_length": 32, "decoder": "guided", "guide_model": "tiny-ar"}
    ),
}


def _kv(spec: str, items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for a in items:
        if "=" not in a:
            raise DllmCacheError(f"method {spec!r}: expected key=value after ':', got {a!r}")
        k, v = a.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def parse_method(spec: str) -> Method:
    """Parse and validate a method spec (errors name the bad part)."""
    from dllm_cache.engine import DECODERS, GenerationConfig

    spec = spec.strip()
    if spec in PRESETS:
        return dataclasses.replace(PRESETS[spec])
    cache_part, _, decoder_part = spec.partition("+")
    name, *cache_items = cache_part.split(":")
    method = Method(name, _kv(spec, cache_items))
    if decoder_part:
        decoder, *dec_items = decoder_part.split(":")
        if decoder not in DECODERS:
            raise DllmCacheError(
                f"method {spec!r}: unknown decoder {decoder!r} (choose {', '.join(DECODERS)})"
            )
        method.overrides = {"decoder": decoder, **_kv(spec, dec_items)}
        fields = {f.name for f in dataclasses.fields(GenerationConfig)}
        for k in method.overrides:
            if k not in fields:
                raise DllmCacheError(f"method {spec!r}: unknown decoder argument {k!r}")
    if name.replace("_", "-") not in POLICIES:  # neither a preset nor a policy: list both
        raise DllmCacheError(
            f"unknown cache policy {name!r} (choose {', '.join(POLICIES)}) "
            f"and no preset of that name (presets: {', '.join(PRESETS)})"
        )
    method.policy()  # validates the cache arguments now, before any work
    return method
