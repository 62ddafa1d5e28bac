"""`dllm-cache eval` end to end: every method on the same problems, saved, resumable and shardable.

Output folder (``--out-dir``):

* ``run.json``: what the rows were generated with (model, task, prompting, generation settings);
  a rerun with different settings into the same folder is refused, so rows never mix;
* ``<method>.jsonl``: one row per problem (keys: see `dllm_cache.eval.runner`), appended batch by
  batch, so an interrupted run loses at most the batch in flight;
* ``<method>.rank<R>.jsonl``: under torchrun, rank R's shard until rank 0 merges it into
  ``<method>.jsonl`` (after a barrier) and removes it;
* ``summary.json`` and ``summary.md``: recomputed from every saved row of the problems asked for.

A rerun skips the problems a method already has rows for (in the merged file or any shard) and
generates only the rest; when nothing is left it generates nothing and rewrites only the summaries
(with the same numbers).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from dllm_cache.engine import GenerationConfig
from dllm_cache.errors import DllmCacheError
from dllm_cache.eval.distributed import Dist, barrier
from dllm_cache.eval.runner import (
    LATENCY_DEFINITION,
    MethodResult,
    Problem,
    nfe_text,
    run_method,
    set_speedups,
    summarize,
)
from dllm_cache.methods import parse_method
from dllm_cache.models.loading import DLLM, weights_fingerprint

Row = dict[str, Any]


@dataclass
class EvalSpec:
    """What a run is; the fields that decide the outputs are pinned in run.json."""

    model: str  # as the user named it
    model_path: str  # the resolved checkpoint directory
    task: str
    methods: list[str]
    config: GenerationConfig
    batch_size: int
    fewshot: int
    chat: bool

    @cached_property
    def weights(self) -> str | None:
        """The checkpoint's fingerprint, read once per run (check_run and write_run both pin it)."""
        return weights_fingerprint(self.model_path) if Path(self.model_path).is_dir() else None

    def pinned(self) -> dict[str, Any]:
        gen = {k: v for k, v in asdict(self.config).items() if k != "record_steps"}
        return {
            "model_path": self.model_path,
            # Retraining into the same directory must not let a rerun reuse the old model's rows.
            "weights": self.weights,
            "task": self.task,
            "fewshot": self.fewshot,
            "chat": self.chat,
            "generation": gen,
        }


@dataclass
class Hooks:
    """Progress callbacks (a progress bar): total problems to generate, a method starts, a batch is done."""

    on_total: Callable[[int], None] | None = None
    on_method: Callable[[str], None] | None = None
    on_batch: Callable[[int], None] | None = None


@dataclass
class EvalOutcome:
    results: list[MethodResult]
    rows: list[Row]  # every row of the problems asked for, method by method, in problem order
    summary: dict[str, Any]
    generated: dict[str, int] = field(default_factory=dict)  # method -> problems generated this run


def method_filename(method: str) -> str:
    """A file-name-safe stem for a method spec ("dllm-cache:response_interval=4" -> "dllm-cache_response_interval=4")."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", method.strip()) or "method"


def _read_rows(path: Path, method: str) -> list[Row]:
    """Rows of one JSONL file for `method`; a torn last line (an interrupted write) is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("method") == method and "id" in row:
            rows.append(row)
    return rows


class RowStore:
    """Per-method JSONL files in an output folder, for one rank of `dist`."""

    def __init__(self, out_dir: Path, dist: Dist) -> None:
        self.out_dir = out_dir
        self.dist = dist

    def merged_path(self, method: str) -> Path:
        return self.out_dir / f"{method_filename(method)}.jsonl"

    def shard_paths(self, method: str) -> list[Path]:
        stem = method_filename(method)
        return sorted(self.out_dir.glob(f"{glob_escape(stem)}.rank*.jsonl"))

    def own_path(self, method: str) -> Path:
        if not self.dist.active:
            return self.merged_path(method)
        return self.out_dir / f"{method_filename(method)}.rank{self.dist.rank}.jsonl"

    def saved(self, method: str) -> dict[str, Row]:
        """id -> row over the merged file and every shard (the first row of an id wins)."""
        out: dict[str, Row] = {}
        for path in [self.merged_path(method), *self.shard_paths(method)]:
            for row in _read_rows(path, method):
                out.setdefault(row["id"], row)
        return out

    def append(self, method: str, rows: list[Row]) -> None:
        path = self.own_path(method)
        with path.open("a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def merge(self, method: str, order: list[str]) -> list[Row]:
        """Fold the shards into the merged file (problems in `order` first, in that order) and remove them."""
        shards = self.shard_paths(method)
        rows = self.saved(method)
        if shards:
            rank = {pid: i for i, pid in enumerate(order)}
            ordered = sorted(rows.values(), key=lambda r: rank.get(r["id"], len(rank)))
            path = self.merged_path(method)
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text(
                "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered), encoding="utf-8"
            )
            tmp.replace(path)
            for s in shards:
                s.unlink()
        return [rows[pid] for pid in order if pid in rows]

    def check_run(self, spec: EvalSpec) -> None:
        path = self.out_dir / "run.json"
        if not path.is_file():
            return
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise DllmCacheError(f"{path} is not valid JSON: remove it or use another --out-dir") from None
        new = spec.pinned()
        for key, value in new.items():
            if key == "generation":
                diff = [k for k, v in value.items() if old.get(key, {}).get(k, v) != v]
                if diff:
                    k = diff[0]
                    raise DllmCacheError(
                        f"{self.out_dir} holds a run with {k}={old[key][k]!r}, not {value[k]!r}: "
                        "use another --out-dir"
                    )
            elif key == "weights" and old.get(key, value) != value:
                raise DllmCacheError(
                    f"{self.out_dir} holds rows generated with other weights than those now in "
                    f"{spec.model_path} (the checkpoint changed): use another --out-dir"
                )
            elif old.get(key, value) != value:
                raise DllmCacheError(
                    f"{self.out_dir} holds a run with {key}={old[key]!r}, not {value!r}: use another --out-dir"
                )

    def write_run(self, spec: EvalSpec) -> None:
        path = self.out_dir / "run.json"
        pinned = spec.pinned()
        if path.is_file():
            old = json.loads(path.read_text(encoding="utf-8"))
            if {k: old.get(k) for k in pinned} == pinned:
                return
        path.write_text(json.dumps(pinned, indent=2) + "\n", encoding="utf-8")


def check_saved_problems(saved: dict[str, Row], problems: list[Problem], out_dir: Path | None) -> None:
    """Refuse to resume from rows of other problems under the same ids (e.g. a regenerated task)."""
    for p in problems:
        row = saved.get(p.id)
        if row is not None and (row.get("prompt", p.prompt), row.get("gold", p.gold)) != (p.prompt, p.gold):
            raise DllmCacheError(
                f"{out_dir} holds a row for {p.id} with another prompt or gold answer than the task "
                "now gives (the task's problems changed): use another --out-dir"
            )


def glob_escape(s: str) -> str:
    return re.sub(r"([*?\[\]])", r"[\1]", s)


def run_eval(
    llm: DLLM,
    problems: list[Problem],
    spec: EvalSpec,
    out_dir: Path | None = None,
    dist: Dist | None = None,
    hooks: Hooks | None = None,
) -> EvalOutcome | None:
    """Run (or resume) every method of `spec` on `problems`; on rank 0 the outcome, elsewhere None.

    Under torchrun (`dist.active`) each rank takes problems r, r+N, ... and writes its own shard;
    rank 0 merges after a barrier. `out_dir` is then required (a folder every rank can reach).
    """
    dist = dist or Dist()
    hooks = hooks or Hooks()
    for m in spec.methods:
        parse_method(m)
    if spec.batch_size < 1:
        raise DllmCacheError(f"--batch-size must be positive, got {spec.batch_size}")
    if not spec.methods:
        raise DllmCacheError("no methods given (--cache none,dllm-cache,...)")
    if len(set(spec.methods)) != len(spec.methods):
        raise DllmCacheError(f"a method is listed twice: {','.join(spec.methods)}")
    if dist.active and out_dir is None:
        raise DllmCacheError("--out-dir is required under torchrun (each rank writes its shard there)")
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        raise DllmCacheError("problem ids are not unique")
    store = RowStore(out_dir, dist) if out_dir is not None else None
    if store is not None:
        if dist.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
        barrier(dist)
        store.check_run(spec)
        barrier(dist)  # every rank has read run.json before rank 0 (re)writes it
        if dist.is_main:
            store.write_run(spec)

    share = dist.shard(problems)
    todo: dict[str, list[Problem]] = {}
    for m in spec.methods:
        done = store.saved(m) if store is not None else {}
        check_saved_problems(done, share, out_dir)
        todo[m] = [p for p in share if p.id not in done]
    if hooks.on_total is not None:
        hooks.on_total(sum(len(t) for t in todo.values()))

    fresh: dict[str, list[Row]] = {}
    for m in spec.methods:
        if hooks.on_method is not None:
            hooks.on_method(m)
        if not todo[m]:
            fresh[m] = []
            continue
        on_rows = (lambda rows, m=m: store.append(m, rows)) if store is not None else None
        _, fresh[m] = run_method(
            llm, todo[m], m, spec.config, spec.batch_size, hooks.on_batch, on_rows=on_rows
        )
    barrier(dist)
    if not dist.is_main:
        return None

    results, all_rows = [], []
    for m in spec.methods:
        if store is not None:
            rows = store.merge(m, ids)
        else:
            by_id = {r["id"]: r for r in fresh[m]}
            rows = [by_id[i] for i in ids if i in by_id]
        results.append(summarize(m, rows))
        all_rows += rows
    set_speedups(results)
    summary = summary_dict(spec, len(problems), results)
    if store is not None:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        (out_dir / "summary.md").write_text(summary_markdown(spec, len(problems), results), encoding="utf-8")
    return EvalOutcome(results, all_rows, summary, {m: len(fresh[m]) for m in spec.methods})


def summary_dict(spec: EvalSpec, n: int, results: list[MethodResult]) -> dict[str, Any]:
    return {
        "model": spec.model,
        "task": spec.task,
        "n": n,
        "fewshot": spec.fewshot,
        "chat": spec.chat,
        "batch_size": spec.batch_size,
        "generation": {k: v for k, v in asdict(spec.config).items() if k != "record_steps"},
        "latency_definition": LATENCY_DEFINITION,
        "results": [r.to_dict() for r in results],
    }


SUMMARY_COLUMNS = (
    "method",
    "accuracy",
    "tokens/s",
    "latency p50 (s)",
    "latency p95 (s)",
    "NFE (batch)",
    "NFE/answer",
    "recomputed",
    "GFLOPs/problem",
    "speed-up",
)
# The same columns, named short enough for an 80-column terminal; the batch NFE is left out there
# (summary.md and summary.json have it).
SHORT_COLUMNS = (
    "method",
    "accuracy",
    "tok/s",
    "p50 s",
    "p95 s",
    "NFE/ans",
    "recomp.",
    "GFLOPs",
    "speed-up",
)


def summary_cells(r: MethodResult, short: bool = False) -> list[str]:
    """One table row of a method's summary, as text (`short`: the terminal's, without counts or
    batch NFE)."""
    batch_nfe = [] if short else [nfe_text(r.nfe_per_problem, r.guide_nfe_per_problem)]
    return [
        r.method,
        f"{r.accuracy:.1%}" if short else f"{r.accuracy:.1%} ({r.correct}/{r.n})",
        f"{r.tokens_per_s:.1f}",
        f"{r.latency_p50_s:.2f}",
        f"{r.latency_p95_s:.2f}",
        *batch_nfe,
        nfe_text(r.row_nfe_per_problem, r.guide_row_nfe_per_problem),
        f"{r.recompute_fraction:.1%}",
        f"{r.flops_per_problem / 1e9:.2f}",
        f"{r.speedup:.2f}x",
    ]


def summary_title(spec: EvalSpec, n: int) -> str:
    prompting = "chat" if spec.chat else f"{spec.fewshot}-shot"
    return f"{spec.task} · {spec.model} · {n} problems · {prompting} · gen {spec.config.gen_length}"


def summary_markdown(spec: EvalSpec, n: int, results: list[MethodResult]) -> str:
    c = spec.config
    lines = [
        f"# {summary_title(spec, n)}",
        "",
        f"gen_length {c.gen_length}, steps {c.steps or c.gen_length}, block_length {c.block_length or 'default'}, "
        f"batch size {spec.batch_size}.",
        "",
        "| " + " | ".join(SUMMARY_COLUMNS) + " |",
        "| " + " | ".join("---" if i == 0 else "---:" for i in range(len(SUMMARY_COLUMNS))) + " |",
    ]
    for r in results:
        cells = [x.replace("|", "\\|") for x in summary_cells(r)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Latency: {LATENCY_DEFINITION}. tokens/s: generated answer tokens / summed batch wall time. "
        "Speed-up: summed wall time of the first method / this method's. NFE (batch): forward passes of the batch a problem was in "
        "(set by its slowest answer); NFE/answer: passes until the problem's own answer was complete.",
        "",
    ]
    return "\n".join(lines)
