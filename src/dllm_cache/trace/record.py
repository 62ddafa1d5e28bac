"""Recording a generation: the engine's step records plus, per step, the rows every layer recomputed.

The engine already records what each step committed (`record_steps`); which rows a cache policy
recomputed is known only to the policy, so `RecordingPolicy` wraps it and notes its answers. The
result is the trace dictionary written as trace.json (docs/trace.md describes every field).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import Any

import torch
from torch import Tensor

from dllm_cache.cache import make_policy
from dllm_cache.cache.base import CachePolicy, StepState
from dllm_cache.engine import (
    GenerationConfig,
    GenerationResult,
    Prompt,
    _as_list,
    _check_config,
    encode_prompts,
)
from dllm_cache.engine import generate as engine_generate
from dllm_cache.errors import DllmCacheError
from dllm_cache.models.loading import DLLM
from dllm_cache.models.transformer import LayerView

TRACE_FORMAT = "dllm-cache-trace"
TRACE_VERSION = 1


class RecordingPolicy:
    """A cache policy that behaves exactly like the one it wraps and notes, at every step, which
    sequence rows each layer recomputed ([n_layers, B, L] bool per step)."""

    def __init__(self, inner: CachePolicy, n_layers: int) -> None:
        self.inner = inner
        self.n_layers = n_layers
        self.steps: list[Tensor] = []

    def __getattr__(self, name: str) -> Any:  # name, per_layer, check_decoder, observe_* ...
        return getattr(self.inner, name)

    def begin_step(self, state: StepState) -> Tensor | None:
        rows = self.inner.begin_step(state)
        B, L = state.masked.shape
        if self.inner.per_layer:  # filled layer by layer in select()
            self.steps.append(
                torch.zeros((self.n_layers, B, L), dtype=torch.bool, device=state.masked.device)
            )
        else:  # one set of rows for the whole network
            self.steps.append(_row_mask(rows, B, L, state.masked.device).expand(self.n_layers, B, L))
        return rows

    def select(self, layer: int, view: LayerView) -> Tensor | None:
        active = self.inner.select(layer, view)
        step = self.steps[-1]
        step[layer] = _row_mask(active, *step.shape[1:], step.device)
        return active

    def end_step(self, state: StepState) -> None:
        self.inner.end_step(state)


def _row_mask(rows: Tensor | None, B: int, L: int, device: torch.device) -> Tensor:
    """[B, k] row indices (None: every row) -> [B, L] bool."""
    if rows is None:
        return torch.ones((B, L), dtype=torch.bool, device=device)
    # column L: the scratch slot padding rows name (computed, written nowhere read): not a row
    return torch.zeros((B, L + 1), dtype=torch.bool, device=device).scatter_(1, rows, True)[:, :L]


def _ranges(mask: list[bool]) -> list[list[int]]:
    """[False, True, True, False, True] -> [[1, 3], [4, 5]]: half-open runs of True."""
    out: list[list[int]] = []
    for i, on in enumerate(mask):
        if on and out and out[-1][1] == i:
            out[-1][1] = i + 1
        elif on:
            out.append([i, i + 1])
    return out


def method_name(policy: CachePolicy, decoder: str) -> str:
    """What a person would call the method: `dllm-cache`, `dual+threshold`."""
    return policy.name + ("" if decoder == "reference" else f"+{decoder}")


def traced_generate(
    llm: DLLM,
    prompts: Prompt | Sequence[Prompt],
    config: GenerationConfig | None = None,
    *,
    cache: str | CachePolicy = "none",
    **kwargs: Any,
) -> tuple[GenerationResult, dict[str, Any]]:
    """Generate as `engine.generate` does (same arguments, same tokens) and return the trace too."""
    config = replace(config or GenerationConfig(), record_steps=True)
    decoder = kwargs.pop("decoder", None)
    if isinstance(decoder, str):  # a decoder by name is a config field; an object is passed on
        config, decoder = replace(config, decoder=decoder), None
    config = replace(config, **{k: kwargs.pop(k) for k in list(kwargs) if hasattr(config, k)})
    # Eager forwards: a replayed CUDA graph would not call the policy's per-layer `select`, so the
    # rows it recomputed could not be noted (the tokens are the same in every mode, tested).
    config = replace(config, graphs=False)
    policy = make_policy(cache) if isinstance(cache, str) else cache
    recorder = RecordingPolicy(policy, llm.config.n_layers)
    result = engine_generate(llm, prompts, config, cache=recorder, decoder=decoder, **kwargs)
    name = method_name(policy, getattr(decoder, "name", config.decoder))
    return result, build_trace(llm, prompts, config, name, policy, result, recorder.steps)


def build_trace(
    llm: DLLM,
    prompts: Prompt | Sequence[Prompt],
    config: GenerationConfig,
    method: str,
    policy: CachePolicy,
    result: GenerationResult,
    active: list[Tensor],
) -> dict[str, Any]:
    """The trace.json dictionary of one finished generation (docs/trace.md)."""
    records = result.step_records
    if records is None or len(records) != len(active):
        raise DllmCacheError(
            f"trace: {0 if records is None else len(records)} step records for {len(active)} forwards"
        )
    ids = encode_prompts(llm, prompts, config.chat)
    B, P = len(ids), result.prompt_length
    L = result.sequences.shape[1]
    steps_total, block_length, _ = _check_config(llm, config, P)
    tok = llm.tokenizer
    answers = result.sequences[:, P:].tolist()
    used = sorted({t for row in answers for t in row} | {llm.config.mask_token_id})

    def piece(t: int) -> str:
        return tok.decode([t]) if tok is not None else f"<{t}>"

    rows = []
    for b, (p, prompt) in enumerate(zip(ids, _as_list(prompts), strict=True)):
        rows.append(
            {
                "prompt": prompt if isinstance(prompt, str) else (tok.decode(p) if tok is not None else ""),
                "prompt_tokens": p,
                "prompt_start": P - len(p),
                "answer_tokens": answers[b],
                "tokens": result.tokens[b],
                "text": result.texts[b],
                "nfe": result.stats.row_nfe[b] if result.stats.row_nfe else result.stats.nfe,
            }
        )
    steps = []
    for rec, rows_active in zip(records, active, strict=True):
        per_row = rows_active[:, :B].transpose(0, 1).cpu().tolist()  # [B, layers, L]; CFG rows dropped
        steps.append(
            {
                "step": rec.step,
                "block": rec.block,
                "positions": rec.positions,
                "tokens": rec.tokens,
                "confidence": [[None if math.isnan(c) else c for c in row] for row in rec.confidence],
                "active_rows": [[_ranges(layer) for layer in row] for row in per_row],
            }
        )
    describe = getattr(policy, "describe", None)
    return {
        "format": TRACE_FORMAT,
        "version": TRACE_VERSION,
        "model": llm.path.name,
        "arch": llm.config.arch,
        "n_layers": llm.config.n_layers,
        "method": method,
        "cache": describe() if describe is not None else {"name": policy.name},
        "generation": {k: v for k, v in asdict(config).items() if k != "record_steps"},
        "mask_token_id": llm.config.mask_token_id,
        "end_token_ids": list(llm.end_token_ids or [llm.config.eos_token_id]),
        "prompt_length": P,
        "gen_length": L - P,
        "seq_len": L,
        "block_length": block_length,
        "planned_steps": steps_total,
        "stats": result.stats.to_dict(),
        "vocab": {str(t): piece(t) for t in used},
        "rows": rows,
        "steps": steps,
    }


def replay(trace: dict[str, Any], row: int = 0, upto: int | None = None) -> list[int]:
    """The answer canvas of `row` after the first `upto` steps (all: the final answer), rebuilt from
    the trace's commits alone; the mask id where nothing was committed yet."""
    canvas = [trace["mask_token_id"]] * trace["gen_length"]
    for step in trace["steps"][:upto]:
        for pos, t in zip(step["positions"][row], step["tokens"][row], strict=True):
            if canvas[pos] != trace["mask_token_id"]:
                raise DllmCacheError(f"trace: position {pos} committed twice (step {step['step']})")
            canvas[pos] = t
    return canvas


def recomputed_fraction(trace: dict[str, Any]) -> list[list[float]]:
    """[layers][steps]: the fraction of the sequence's rows each layer recomputed (batch mean)."""
    L, n_layers = trace["seq_len"], trace["n_layers"]
    out = [[0.0] * len(trace["steps"]) for _ in range(n_layers)]
    for s, step in enumerate(trace["steps"]):
        for row in step["active_rows"]:
            for layer, runs in enumerate(row):
                out[layer][s] += sum(e - b for b, e in runs) / L / len(step["active_rows"])
    return out
