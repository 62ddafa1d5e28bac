"""`dllm-cache bench`: a method x model x task grid -> markdown table, JSON and a Pareto plot (PNG).

A small TOML file names the grid (see bench_default.toml, shipped with the package):

    models = ["tiny-llada", "tiny-dream"]      # checkpoint directories or embedded model names
    tasks = ["tiny-gsm"]                        # tiny-gsm, gsm8k, math500, humaneval, mbpp
    methods = ["none", "dllm-cache", "fast-dllm-dual-parallel"]   # presets or method specs
    limit = 50                                  # problems per task (omit: the task's default)
    gen_length = 64
    steps = 64                                  # omit: gen_length (one token per step)
    block_length = 32                           # omit: the family's default
    batch_size = 32
    device = "auto"                             # auto | cpu | cuda | cuda:N
    dtype = "auto"
    data_dir = "/data/evalsets"                 # task data (omit: the copy bundled with the package)
    fewshot = 0                                 # omit: zero-shot chat for chat models, else the task's
    chat = true                                 # false: ignore the models' chat templates

Each (model, task) runs every method on the same problems with `runner.compare` (speed-ups are
wall-clock ratios against the first method). A point is on the Pareto front of its (model, task)
when no other method there is at least as accurate and at least as fast, and strictly better in one.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from dllm_cache.errors import DllmCacheError

DEFAULT_CONFIG = "bench_default.toml"


@dataclass
class BenchConfig:
    models: list[str]
    tasks: list[str]
    methods: list[str]
    limit: int | None = None
    gen_length: int = 128
    steps: int | None = None
    block_length: int | None = None
    batch_size: int = 32
    device: str = "auto"
    dtype: str = "auto"
    data_dir: str | None = None
    fewshot: int | None = None
    chat: bool = True
    source: str = field(default="", compare=False)  # where the config was read from

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "source"}


_LISTS = ("models", "tasks", "methods")
_INTS = ("limit", "gen_length", "steps", "block_length", "batch_size")
_STRS = ("device", "dtype", "data_dir")


def _toml_loads(text: str, where: str) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise DllmCacheError("reading a bench config on Python 3.10 needs: pip install tomli") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise DllmCacheError(f"{where}: invalid TOML ({e})") from None


def parse_config(raw: dict[str, Any], where: str = "bench config") -> BenchConfig:
    """A parsed TOML table -> BenchConfig; every wrong key or type is named."""
    known = {f.name for f in dataclasses.fields(BenchConfig)} - {"source"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise DllmCacheError(f"{where}: unknown key {unknown[0]!r} (valid: {', '.join(sorted(known))})")
    for key in _LISTS:
        if key not in raw:
            raise DllmCacheError(f"{where}: missing {key!r} (a list of names)")
        value = raw[key]
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            raise DllmCacheError(f"{where}: {key!r} must be a non-empty list of strings")
        raw = {**raw, key: [v.strip() for v in value]}
    for key in _INTS:
        value = raw.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise DllmCacheError(f"{where}: {key!r} must be a positive integer, got {value!r}")
    for key in _STRS:
        if key in raw and not isinstance(raw[key], str):
            raise DllmCacheError(f"{where}: {key!r} must be a string, got {raw[key]!r}")
    fewshot = raw.get("fewshot")
    if fewshot is not None and (isinstance(fewshot, bool) or not isinstance(fewshot, int) or fewshot < 0):
        raise DllmCacheError(f"{where}: 'fewshot' must be an integer >= 0, got {fewshot!r}")
    if "chat" in raw and not isinstance(raw["chat"], bool):
        raise DllmCacheError(f"{where}: 'chat' must be true or false, got {raw['chat']!r}")
    return BenchConfig(**raw, source=where)


def load_config(path: str | Path | None = None) -> BenchConfig:
    """Read a bench TOML file; None: the default grid shipped with the package."""
    if path is None:
        text = resources.files("dllm_cache.eval").joinpath(DEFAULT_CONFIG).read_text()
        return parse_config(_toml_loads(text, DEFAULT_CONFIG), f"(default) {DEFAULT_CONFIG}")
    p = Path(path)
    if not p.is_file():
        raise DllmCacheError(f"bench config not found: {p}")
    return parse_config(_toml_loads(p.read_text(), str(p)), str(p))


def validate(config: BenchConfig) -> None:
    """Everything that can be checked before loading a model: methods, tasks and their data files,
    few-shot counts, model paths."""
    from dllm_cache.eval.tasks import check_task_data, resolve_prompting
    from dllm_cache.methods import parse_method
    from dllm_cache.models.loading import resolve_model_dir

    for m in config.methods:
        parse_method(m)
    for t in config.tasks:
        resolve_prompting(t, config.fewshot, False)
        check_task_data(t, config.data_dir)
    for name in config.models:
        resolve_model_dir(name)


def count_problems(config: BenchConfig) -> int:
    """Problems the whole grid generates (for a progress bar)."""
    from dllm_cache.eval.tasks import load_task

    per_model = sum(
        len(load_task(t, config.limit, data_dir=config.data_dir, fewshot=config.fewshot, chat=False))
        for t in config.tasks
    )
    return per_model * len(config.models) * len(config.methods)


@dataclass
class BenchResult:
    config: BenchConfig
    rows: list[dict[str, Any]]  # one per (model, task, method): MethodResult fields + model, task, pareto
    outputs: list[dict[str, Any]]  # per problem: runner's rows + model, task
    environment: dict[str, Any]


def run_bench(
    config: BenchConfig,
    log: Callable[[str], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> BenchResult:
    """Run the whole grid; one model is loaded at a time."""
    import torch

    from dllm_cache.engine import GenerationConfig
    from dllm_cache.eval.runner import compare
    from dllm_cache.eval.tasks import load_task
    from dllm_cache.models.loading import load

    validate(config)
    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise DllmCacheError(f"device {device!r} requested but CUDA is not available")
    gen = GenerationConfig(gen_length=config.gen_length, steps=config.steps, block_length=config.block_length)
    rows: list[dict[str, Any]] = []
    outputs: list[dict[str, Any]] = []
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for model_name in config.models:
        llm = load(model_name, dtype=config.dtype, device=device)
        # The prompt format follows the model: zero-shot chat when it has a chat template.
        chat_model = config.chat and bool(getattr(llm.tokenizer, "chat_template", None))
        for task in config.tasks:
            problems = load_task(
                task, config.limit, data_dir=config.data_dir, fewshot=config.fewshot, chat=chat_model
            )
            if log is not None:
                log(f"{model_name} / {task}: {len(problems)} problems x {len(config.methods)} methods")
            results, per_problem = compare(llm, problems, config.methods, gen, config.batch_size, on_batch)
            group = [{"model": model_name, "task": task, **r.to_dict()} for r in results]
            for row, on_front in zip(group, pareto_mask(group), strict=True):
                row["pareto"] = on_front
            rows += group
            outputs += [{"model": model_name, "task": task, **r} for r in per_problem]
        del llm
    env = {
        "started": started,
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "dllm_cache": _version(),
        "command": " ".join(sys.argv),
    }
    return BenchResult(config, rows, outputs, env)


def _version() -> str:
    from dllm_cache import __version__

    return __version__


def pareto_mask(rows: Sequence[dict[str, Any]], x: str = "tokens_per_s", y: str = "accuracy") -> list[bool]:
    """True for rows no other row dominates (>= on both x and y, > on one); both maximised."""
    out = []
    for i, a in enumerate(rows):
        dominated = any(
            b[x] >= a[x] and b[y] >= a[y] and (b[x] > a[x] or b[y] > a[y])
            for j, b in enumerate(rows)
            if j != i
        )
        out.append(not dominated)
    return out


def markdown_table(result: BenchResult) -> str:
    """One markdown table of every row; `*` marks the Pareto front of its (model, task)."""
    from dllm_cache.eval.runner import nfe_text

    c = result.config
    lines = [
        f"gen {c.gen_length}, steps {c.steps or c.gen_length}, block {c.block_length or 'default'}, "
        f"batch {c.batch_size}, limit {c.limit or 'task default'}, device {result.environment['device']}",
        "",
        "| model | task | method | accuracy | tokens/s | NFE (batch) | NFE/answer | recomputed | GFLOPs/problem "
        "| speed-up | Pareto |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result.rows:
        nfe = nfe_text(r["nfe_per_problem"], r.get("guide_nfe_per_problem", 0.0))
        row_nfe = nfe_text(r.get("row_nfe_per_problem", 0.0), r.get("guide_row_nfe_per_problem", 0.0))
        lines.append(
            f"| {r['model']} | {r['task']} | {r['method']} | {r['accuracy']:.1%} ({r['correct']}/{r['n']}) | "
            f"{r['tokens_per_s']:.1f} | {nfe} | {row_nfe} | {r['recompute_fraction']:.1%} | "
            f"{r['flops_per_problem'] / 1e9:.2f} | {r['speedup']:.2f}x | {'*' if r['pareto'] else ''} |"
        )
    return "\n".join(lines) + "\n"


def require_matplotlib() -> None:
    """Raise a one-line error naming the extra to install when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise DllmCacheError("the Pareto plot needs matplotlib: pip install 'dllm-cache[bench]'") from None


def plot_pareto(rows: Sequence[dict[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Accuracy (y) vs tokens/s (x, log scale): one panel per (model, task), one labelled point per
    method (same colour in every panel), the Pareto front as a dashed staircase."""
    require_matplotlib()
    # The object API with the Agg canvas: no pyplot, no global backend switch, no display needed.
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    if not rows:
        raise DllmCacheError("nothing to plot: no benchmark rows")
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["task"]), []).append(r)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cmap = matplotlib.colormaps["tab10" if len(methods) <= 10 else "tab20"]
    colour = {m: cmap(i % cmap.N) for i, m in enumerate(methods)}
    n = len(groups)
    ncols = min(n, 2)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(6.4 * ncols, 4.6 * nrows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, ((model, task), group) in zip(axes.flat, groups.items(), strict=False):
        xs = [max(r["tokens_per_s"], 1e-3) for r in group]
        ys = [100 * r["accuracy"] for r in group]
        for r, x, y in zip(group, xs, ys, strict=True):
            on_front = r.get("pareto", False)
            ax.scatter(
                x,
                y,
                color=colour[r["method"]],
                s=60 if on_front else 36,
                edgecolors="black" if on_front else "none",
                zorder=3,
                label=r["method"],
            )
            ax.annotate(r["method"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7, zorder=4)
        front = sorted((x, y) for r, x, y in zip(group, xs, ys, strict=True) if r.get("pareto"))
        if front:
            fx, fy = zip(*front, strict=True)
            ax.step(fx, fy, where="pre", linestyle="--", color="gray", linewidth=1, zorder=2)
        ax.set_xscale("log")
        # Plain numbers; within a decade label 2x and 5x as well (the range is often under one decade).
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
        ax.set_xlabel("tokens/s (log scale)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{model} · {task} · n={group[0]['n']}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        lo, hi = min(ys), max(ys)
        pad = max(1.0, 0.1 * (hi - lo))
        ax.set_ylim(max(-1.0, lo - pad), min(101.0, hi + pad))
        ax.set_xlim(min(xs) / 1.5, max(xs) * 2.0)  # room for the labels
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    handles = [Line2D([], [], marker="o", linestyle="", color=colour[m], label=m) for m in methods] + [
        Line2D([], [], linestyle="--", color="gray", label="Pareto front")
    ]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    legend_rows = math.ceil(len(handles) / 4)
    fig.tight_layout(rect=(0, 0.04 * legend_rows / nrows + 0.02, 1, 0.95 if title else 1))
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def write_outputs(result: BenchResult, out_dir: str | Path, plot: bool = True) -> dict[str, Path]:
    """bench.md, bench.json (config, environment, rows), outputs.jsonl (per problem), pareto.png."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DllmCacheError(f"cannot create output directory {out}: {e.strerror}") from None
    paths = {
        "markdown": out / "bench.md",
        "json": out / "bench.json",
        "outputs": out / "outputs.jsonl",
    }
    paths["markdown"].write_text(markdown_table(result))
    paths["json"].write_text(
        json.dumps(
            {"config": result.config.to_dict(), "environment": result.environment, "rows": result.rows},
            indent=2,
        )
        + "\n"
    )
    paths["outputs"].write_text("".join(json.dumps(r) + "\n" for r in result.outputs))
    if plot:
        c = result.config
        title = f"gen {c.gen_length}, steps {c.steps or c.gen_length}, {result.environment['device']}"
        paths["plot"] = plot_pareto(result.rows, out / "pareto.png", title)
    return paths
