"""Static-shape denoising forwards, replayed as CUDA graphs.

On a GPU a cached step of an 8B model is mostly launch overhead: thousands of small kernels from a
Python loop over layers. A CUDA graph records those launches once and replays them with one call,
which needs every tensor the step touches at a fixed address with a fixed shape. `StepForward`
supplies that around `Transformer.forward_active`:

- the active rows are padded up to a bucket (`active.bucket`: 8, 12, 16, 24, 32, ...) with the
  feature cache's scratch slot (`active.pad_rows`: padding computes a copy of a real row and writes
  where nothing reads), so a generation sees a handful of shapes, not one per step;
- inputs are copied into static buffers (the sequence, the rows, the logit rows); the feature cache
  and the sequence layout already live for the whole generation;
- per (bucket, logit shape, policy key) the forward is captured once and replayed (CUDA); the host
  counts of a forward (ForwardStats) are those of its capture, added at each replay; what a policy
  observes inside the forward (d2cache's attention) is handed to it again from the graph's outputs.

Modes: "eager" (the reference: forward_active as called), "static" (buckets and buffers, run eagerly:
what a graph replays, runnable anywhere; tests compare it with eager), "cuda-graph".

Reuse across generations (`acquire` / `release`): the buffers and graphs of a static or graphed
StepForward stay with the model, keyed by the policy's settings, the batch and sequence shape and
the prompt length; the next generate() with the same key takes them (the new layout is copied into
the old buffers, the feature cache zeroed), so a server capturing once per (policy, bucket, batch)
replays from then on. At most POOL_SIZE are kept per model (least recently used first out); one in
use is not shared (a concurrent generation with the same key builds its own).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from dllm_cache.models.active import CachePolicy, FeatureCache, ForwardStats, bucket, pad_rows
from dllm_cache.models.transformer import SequenceLayout, Transformer

MODES = ("eager", "static", "cuda-graph")
POOL_SIZE = 4  # StepForwards (buffers, feature cache, graphs) kept per model for later generations


def step_mode(graphs: bool | str, device: torch.device) -> str:
    """GenerationConfig.graphs -> a mode: True/"auto" = CUDA graphs on CUDA, eager elsewhere."""
    if graphs is False or graphs == "off":
        return "eager"
    if graphs is True or graphs == "auto":
        return "cuda-graph" if device.type == "cuda" else "eager"
    if graphs not in MODES:
        raise ValueError(f"graphs must be true/false, auto, off or one of {', '.join(MODES)}; got {graphs!r}")
    if graphs == "cuda-graph" and device.type != "cuda":
        raise ValueError(f"graphs='cuda-graph' needs a CUDA device, the model is on {device}")
    return str(graphs)


@dataclasses.dataclass
class _Captured:
    graph: Any  # torch.cuda.CUDAGraph
    rows: Tensor | None
    logit_rows: Tensor
    logits: Tensor
    stats: ForwardStats  # host counts of one forward with this key
    observed: list[tuple[int, Tensor | None, Tensor]]  # (layer, rows, probs) to hand to the policy


class StepForward:
    """`forward_active` for one generation, in one of MODES (see the module docstring)."""

    def __init__(
        self,
        model: Transformer,
        layout: SequenceLayout,
        cache: FeatureCache | None,
        policy: CachePolicy | None,
        stats: ForwardStats,
        mode: str = "eager",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown step mode {mode!r} (choose {', '.join(MODES)})")
        self.model, self.layout, self.cache, self.policy, self.stats = model, layout, cache, policy, stats
        self.mode = mode
        self.x: Tensor | None = None  # the static copy of the model input
        self.rows: dict[int, Tensor] = {}  # per bucket
        self.logit_rows: dict[tuple[int, ...], Tensor] = {}
        self.graphs: dict[tuple, _Captured | None] = {}  # None: capture failed, run eagerly
        self.pool: Any = None
        self.replays = 0
        self.generations = 1  # generate() calls served (reuse across calls: `acquire`)
        self.pool_key: tuple | None = None

    def __call__(self, x: Tensor, rows: Tensor | None, logit_rows: Tensor) -> Tensor:
        if self.mode == "eager":
            return self._forward(x, rows, logit_rows)
        if rows is not None:
            rows = pad_rows(rows, bucket(rows.shape[1], x.shape[1]), x.shape[1])
        x, rows, logit_rows = self._static_inputs(x, rows, logit_rows)
        if self.mode == "static":
            return self._forward(x, rows, logit_rows)
        key = (None if rows is None else rows.shape[1], tuple(logit_rows.shape), self._policy_key())
        if key not in self.graphs:
            return self._capture(key, x, rows, logit_rows)
        captured = self.graphs[key]
        if captured is None:
            return self._forward(x, rows, logit_rows)
        captured.graph.replay()
        self.replays += 1
        _add_counts(self.stats, captured.stats)
        observe = getattr(self.policy, "observe_attention", None)
        for layer, obs_rows, probs in captured.observed:
            observe(layer, obs_rows, probs)  # type: ignore[misc]
        return captured.logits

    def _forward(self, x: Tensor, rows: Tensor | None, logit_rows: Tensor) -> Tensor:
        return self.model.forward_active(
            x, self.layout, self.cache, self.policy, rows, logit_rows, self.stats
        )

    def _policy_key(self) -> tuple:
        key = getattr(self.policy, "graph_key", None)
        return tuple(key()) if key is not None else ()

    def _static_inputs(
        self, x: Tensor, rows: Tensor | None, logit_rows: Tensor
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        if self.x is None:
            self.x = torch.empty_like(x)
        self.x.copy_(x)
        if rows is not None:
            k = rows.shape[1]
            if k not in self.rows:
                self.rows[k] = torch.empty_like(rows)
            self.rows[k].copy_(rows)
            rows = self.rows[k]
        shape = tuple(logit_rows.shape)
        if shape not in self.logit_rows:
            self.logit_rows[shape] = torch.empty_like(logit_rows)
        self.logit_rows[shape].copy_(logit_rows)
        return self.x, rows, self.logit_rows[shape]

    def _capture(self, key: tuple, x: Tensor, rows: Tensor | None, logit_rows: Tensor) -> Tensor:
        """First forward with this key: run it (on a side stream, as capture requires), then record it."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        before = dataclasses.replace(self.stats)
        with torch.cuda.stream(side):
            logits = self._forward(x, rows, logit_rows)
        torch.cuda.current_stream().wait_stream(side)
        counts = _difference(self.stats, before)
        after = dataclasses.replace(self.stats)
        observed: list[tuple[int, Tensor | None, Tensor]] = []
        policy_observes = "observe_attention" in vars(type(self.policy)) if self.policy is not None else False
        if policy_observes:
            self.policy.observe_attention = lambda layer, r, p: observed.append((layer, r, p))  # type: ignore[union-attr]
        try:
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                static_logits = self._forward(x, rows, logit_rows)
            self.graphs[key] = _Captured(graph, rows, logit_rows, static_logits, counts, observed)
        except RuntimeError as e:  # an op that cannot be captured: this key runs eagerly
            warnings.warn(
                f"CUDA graph capture failed for step shape {key}: {e}; running it eagerly", stacklevel=2
            )
            self.graphs[key] = None
        finally:
            if policy_observes:
                del self.policy.observe_attention  # type: ignore[union-attr]
            _restore(self.stats, after)  # the capture computed nothing: its counts do not count
        return logits


def _pool(model: Transformer) -> OrderedDict[tuple, StepForward]:
    pool = getattr(model, "_step_forwards", None)
    if pool is None:
        pool = OrderedDict()
        model._step_forwards = pool  # plain attribute: not a parameter, not saved with the weights
    return pool


def acquire(
    model: Transformer,
    layout: SequenceLayout,
    make_cache: Callable[[], FeatureCache | None],
    policy: CachePolicy | None,
    stats: ForwardStats,
    mode: str,
    prompt_length: int,
) -> StepForward:
    """The StepForward for one generation: eager, a fresh one; otherwise the model's pooled one for
    this (policy settings, batch x length, prompt length) if there is one free (its layout buffers
    take this layout, its cache is zeroed, its graphs replay), else a new one. `release` it after."""
    if mode == "eager":
        return StepForward(model, layout, make_cache(), policy, stats, mode)
    describe = getattr(policy, "describe", None)
    if describe is not None:
        settings = repr(sorted(describe().items()))
    else:  # no policy (the guide's AR forward) or one without settings
        settings = getattr(policy, "name", "")
    key = (mode, type(policy).__name__, settings, tuple(layout.key_mask.shape), prompt_length)
    forward = _pool(model).pop(key, None)
    if forward is None:
        forward = StepForward(model, layout, make_cache(), policy, stats, mode)
        forward.pool_key = key
        return forward
    for old, new in zip(
        (forward.layout.key_mask, forward.layout.cos, forward.layout.sin),
        (layout.key_mask, layout.cos, layout.sin),
        strict=True,
    ):
        old.copy_(new)
    if forward.cache is not None:
        forward.cache.zero_()
    forward.policy, forward.stats = policy, stats
    forward.generations += 1
    return forward


def release(forward: StepForward) -> None:
    """Back to the model's pool (static and graphed modes): the next generation with its key reuses it."""
    if forward.pool_key is None:
        return
    pool = _pool(forward.model)
    pool[forward.pool_key] = forward
    pool.move_to_end(forward.pool_key)
    while len(pool) > POOL_SIZE:
        pool.popitem(last=False)


def _difference(now: ForwardStats, before: ForwardStats) -> ForwardStats:
    return ForwardStats(
        now.forwards - before.forwards,
        now.position_layers - before.position_layers,
        now.position_layers_total - before.position_layers_total,
        now.flops - before.flops,
    )


def _add_counts(stats: ForwardStats, counts: ForwardStats) -> None:
    stats.forwards += counts.forwards
    stats.position_layers += counts.position_layers
    stats.position_layers_total += counts.position_layers_total
    stats.flops += counts.flops


def _restore(stats: ForwardStats, saved: ForwardStats) -> None:
    stats.forwards, stats.position_layers = saved.forwards, saved.position_layers
    stats.position_layers_total, stats.flops = saved.position_layers_total, saved.flops
