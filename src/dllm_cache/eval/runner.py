"""Run several methods (cache + decoder, see dllm_cache.methods) on the same problems in one process."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

from dllm_cache.demo.tasks import generate_problems
from dllm_cache.engine import GenerationConfig, generate
from dllm_cache.errors import DllmCacheError
from dllm_cache.eval.answers import answers_match, extract_answer
from dllm_cache.methods import parse_method
from dllm_cache.models.loading import DLLM

# The fixed held-out set: split "test" of the generator with this seed.
TINY_GSM_SEED = 1234


@dataclass
class Problem:
    id: str
    prompt: str
    gold: str


def load_task(task: str, limit: int | None = None) -> list[Problem]:
    if task == "tiny-gsm":
        n = limit or 500
        return [
            Problem(f"tiny-gsm/{i}", p.question, p.final)
            for i, p in enumerate(generate_problems(n, "test", TINY_GSM_SEED))
        ]
    raise DllmCacheError(f"unknown task {task!r} (available: tiny-gsm)")


@dataclass
class MethodResult:
    method: str
    cache_args: dict[str, Any]
    n: int
    correct: int
    accuracy: float
    wall_time_s: float
    tokens_per_s: float
    nfe_per_problem: float
    recompute_fraction: float
    flops_per_problem: float
    guide_nfe_per_problem: float = 0.0  # guided decoding: the AR verifier's forward passes
    speedup: float = 1.0  # wall-clock, vs the first method (normally none)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_method(
    llm: DLLM,
    problems: list[Problem],
    method: str,
    config: GenerationConfig,
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[MethodResult, list[dict[str, Any]]]:
    m = parse_method(method)
    method_config = replace(config, **m.overrides)
    rows, correct, wall, generated, nfe, flops, guide_nfe = [], 0, 0.0, 0, 0, 0.0, 0
    pos_layers = pos_total = 0.0
    for start in range(0, len(problems), batch_size):
        batch = problems[start : start + batch_size]
        out = generate(llm, [p.prompt for p in batch], method_config, cache=m.policy())
        s = out.stats
        wall += s.wall_time_s
        generated += s.generated_tokens
        nfe += s.nfe * len(batch)
        guide_nfe += s.guide_nfe * len(batch)
        flops += s.flops + s.guide_flops
        pos_layers += s.position_layers
        pos_total += s.position_layers_total
        for p, text in zip(batch, out.texts, strict=True):
            pred = extract_answer(text)
            ok = answers_match(pred, p.gold)
            correct += ok
            rows.append(
                {
                    "id": p.id,
                    "method": method,
                    "prediction": pred,
                    "gold": p.gold,
                    "correct": ok,
                    "text": text,
                }
            )
        if on_batch is not None:
            on_batch(len(batch))
    n = len(problems)
    return (
        MethodResult(
            method=method,
            cache_args={"cache": m.cache, **m.cache_args, **m.overrides},
            n=n,
            correct=correct,
            accuracy=correct / n,
            wall_time_s=wall,
            tokens_per_s=generated / wall if wall else 0.0,
            nfe_per_problem=nfe / n,
            recompute_fraction=pos_layers / pos_total if pos_total else 1.0,
            flops_per_problem=flops / n,
            guide_nfe_per_problem=guide_nfe / n,
        ),
        rows,
    )


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
    base = results[0].wall_time_s
    for r in results:
        r.speedup = base / r.wall_time_s if r.wall_time_s else 0.0
    return results, rows
