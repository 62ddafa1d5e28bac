"""Run several methods (cache + decoder, see dllm_cache.methods) on the same problems in one process.

Every problem becomes one row (a JSON-able dict) with what the model wrote, how it was scored and
what it cost:

| key | meaning |
| --- | --- |
| id, method, prompt | the problem, the method spec, the prompt text as given to the model (before any chat template) |
| text | the model's output text |
| prediction, gold, correct | the extracted answer (code for code tasks), the reference, whether it scored |
| detail | code tasks: "passed", "failed: <error>" or "timed out after Ns"; else null |
| latency_s | **the wall time of the batch the problem was generated in** (what a caller who submitted that batch waits for this answer) |
| time_s | latency_s / batch_size: the problem's share of the wall time (they sum to the total) |
| batch_size | problems in that batch |
| nfe, guide_nfe | forward passes of the batch (every problem of a batch sees all of them); AR-verifier passes |
| row_nfe, guide_row_nfe | forward passes until this problem's answer was complete: its cost alone (batch size 1) |
| gen_tokens | answer tokens generated for this problem (non-pad, non-end) |
| flops, position_layers, position_layers_total | the batch's counts divided by batch_size |

`summarize` turns rows back into a `MethodResult`, so a summary can be recomputed from saved rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from dllm_cache.engine import GenerationConfig, generate
from dllm_cache.eval.tasks import TINY_GSM_SEED, Problem, load_task, score_batch
from dllm_cache.methods import parse_method
from dllm_cache.models.loading import DLLM
from dllm_cache.models.tokenizer import encode_prompt

__all__ = [
    "LATENCY_DEFINITION",
    "TINY_GSM_SEED",
    "MethodResult",
    "Problem",
    "compare",
    "load_task",
    "nfe_text",
    "percentile",
    "run_method",
    "summarize",
]

LATENCY_DEFINITION = (
    "latency of a problem = wall time of the generate() call (batch) it was in; p50/p95 over problems"
)


@dataclass
class MethodResult:
    method: str
    cache_args: dict[str, Any]
    n: int
    correct: int
    accuracy: float
    wall_time_s: float  # sum of the batches' wall times
    tokens_per_s: float
    nfe_per_problem: float
    recompute_fraction: float
    flops_per_problem: float
    guide_nfe_per_problem: float = 0.0  # guided decoding: the AR verifier's forward passes
    # Forward passes until each answer was complete (what it costs alone, at batch size 1); the
    # batch's NFE above is set by its slowest row.
    row_nfe_per_problem: float = 0.0
    guide_row_nfe_per_problem: float = 0.0
    speedup: float = 1.0  # wall-clock, vs the first method (normally none)
    latency_p50_s: float = 0.0  # see LATENCY_DEFINITION
    latency_p95_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def nfe_text(nfe: float, guide_nfe: float = 0.0) -> str:
    """A table cell for forward passes: the dLLM's, plus the AR verifier's when there are any."""
    return f"{nfe:.1f}" + (f" (+{guide_nfe:.1f} AR)" if guide_nfe else "")


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between order statistics (numpy's default)."""
    if not values:
        return 0.0
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(
    method: str, rows: Sequence[dict[str, Any]], cache_args: dict[str, Any] | None = None
) -> MethodResult:
    """A method's summary from its per-problem rows (see the module docstring for the row keys)."""
    if cache_args is None:
        m = parse_method(method)
        cache_args = {"cache": m.cache, **m.cache_args, **m.overrides}
    n = len(rows)
    correct = sum(bool(r["correct"]) for r in rows)
    wall = sum(r["time_s"] for r in rows)
    generated = sum(r["gen_tokens"] for r in rows)
    pos_layers = sum(r["position_layers"] for r in rows)
    pos_total = sum(r["position_layers_total"] for r in rows)
    latencies = [r["latency_s"] for r in rows]
    return MethodResult(
        method=method,
        cache_args=cache_args,
        n=n,
        correct=correct,
        accuracy=correct / n if n else 0.0,
        wall_time_s=wall,
        tokens_per_s=generated / wall if wall else 0.0,
        nfe_per_problem=sum(r["nfe"] for r in rows) / n if n else 0.0,
        recompute_fraction=pos_layers / pos_total if pos_total else 1.0,
        flops_per_problem=sum(r["flops"] for r in rows) / n if n else 0.0,
        guide_nfe_per_problem=sum(r.get("guide_nfe", 0) for r in rows) / n if n else 0.0,
        # (rows saved before per-row counts existed fall back to the batch's)
        row_nfe_per_problem=sum(r.get("row_nfe", r["nfe"]) for r in rows) / n if n else 0.0,
        guide_row_nfe_per_problem=sum(r.get("guide_row_nfe", r.get("guide_nfe", 0)) for r in rows) / n
        if n
        else 0.0,
        latency_p50_s=percentile(latencies, 50),
        latency_p95_s=percentile(latencies, 95),
    )


def _prompts(llm: DLLM, batch: list[Problem], config: GenerationConfig) -> tuple[list[Any], GenerationConfig]:
    """Text prompts when the batch agrees on the chat template, else token ids encoded per problem."""
    chats = {config.chat and p.chat for p in batch}
    if len(chats) == 1:
        return [p.prompt for p in batch], replace(config, chat=chats.pop())
    return [encode_prompt(llm.tokenizer, p.prompt, config.chat and p.chat) for p in batch], config


def generate_rows(
    llm: DLLM, batch: list[Problem], method: str, config: GenerationConfig, policy: Any
) -> list[dict[str, Any]]:
    """Generate one batch with one method and score it: one row per problem."""
    prompts, batch_config = _prompts(llm, batch, config)
    out = generate(llm, prompts, batch_config, cache=policy)
    s = out.stats
    k = len(batch)
    end = set(llm.end_token_ids or [llm.config.eos_token_id])
    pad = llm.config.pad_token_id
    answers = out.sequences[:, out.prompt_length :].tolist()
    scores = score_batch(batch, out.texts)
    rows = []
    for i, (p, text, answer, sc) in enumerate(zip(batch, out.texts, answers, scores, strict=True)):
        rows.append(
            {
                "id": p.id,
                "method": method,
                "prompt": p.prompt,
                "text": text,
                "prediction": sc.prediction,
                "gold": p.gold,
                "correct": sc.correct,
                "detail": sc.detail,
                "latency_s": s.wall_time_s,
                "time_s": s.wall_time_s / k,
                "batch_size": k,
                "nfe": s.nfe,
                "guide_nfe": s.guide_nfe,
                "row_nfe": s.row_nfe[i],
                "guide_row_nfe": s.guide_row_nfe[i],
                "gen_tokens": sum(1 for t in answer if t not in end and t != pad),
                "flops": (s.flops + s.guide_flops) / k,
                "position_layers": s.position_layers / k,
                "position_layers_total": s.position_layers_total / k,
            }
        )
    return rows


def run_method(
    llm: DLLM,
    problems: list[Problem],
    method: str,
    config: GenerationConfig,
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
    *,
    on_rows: Callable[[list[dict[str, Any]]], None] | None = None,
) -> tuple[MethodResult, list[dict[str, Any]]]:
    """One method on every problem, in batches; on_rows(rows) after each batch (e.g. to save them)."""
    m = parse_method(method)
    method_config = replace(config, **m.overrides)
    rows: list[dict[str, Any]] = []
    for start in range(0, len(problems), batch_size):
        batch = problems[start : start + batch_size]
        batch_rows = generate_rows(llm, batch, method, method_config, m.policy())
        rows += batch_rows
        if on_rows is not None:
            on_rows(batch_rows)
        if on_batch is not None:
            on_batch(len(batch))
    return summarize(method, rows, {"cache": m.cache, **m.cache_args, **m.overrides}), rows


def set_speedups(results: list[MethodResult]) -> None:
    """Wall-clock speed-ups against the first method."""
    if not results:
        return
    base = results[0].wall_time_s
    for r in results:
        r.speedup = base / r.wall_time_s if r.wall_time_s else 0.0


def compare(
    llm: DLLM,
    problems: list[Problem],
    methods: list[str],
    config: GenerationConfig,
    batch_size: int = 32,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[list[MethodResult], list[dict[str, Any]]]:
    """Every method on the same problems; speed-ups are wall-clock ratios against the first method."""
    for m in methods:
        parse_method(m)
    results, rows = [], []
    for m in methods:
        r, per_problem = run_method(llm, problems, m, config, batch_size, on_batch)
        results.append(r)
        rows += per_problem
    set_speedups(results)
    return results, rows
