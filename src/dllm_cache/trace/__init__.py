"""See the denoising: per-step traces of what was committed and what each layer recomputed.

`generate(llm, prompts, ..., trace="out/")` (also `dllm_cache.generate`) writes out/trace.json (the
raw data, docs/trace.md), out/trace.html (a self-contained page) and out/trace.png (matplotlib).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dllm_cache.engine import GenerationConfig, GenerationResult, Prompt
from dllm_cache.engine import generate as engine_generate
from dllm_cache.errors import DllmCacheError
from dllm_cache.models.loading import DLLM
from dllm_cache.trace.figure import figure_size, require_matplotlib, write_figure
from dllm_cache.trace.page import render_page
from dllm_cache.trace.record import TRACE_FORMAT, recomputed_fraction, replay, traced_generate

TRACE_FILES = ("trace.json", "trace.html", "trace.png")


def generate(
    llm: DLLM,
    prompts: Prompt | Sequence[Prompt],
    config: GenerationConfig | None = None,
    *,
    trace: str | Path | None = None,
    **kwargs: Any,
) -> GenerationResult:
    """`engine.generate` (same arguments, same tokens); with `trace=DIR` also writes the trace files
    there (trace.json, trace.html, trace.png)."""
    if trace is None:
        return engine_generate(llm, prompts, config, **kwargs)
    require_matplotlib()  # before the work, not after it
    result, data = traced_generate(llm, prompts, config, **kwargs)
    write_trace(data, Path(trace))
    return result


def write_trace(data: dict[str, Any], out_dir: Path) -> list[Path]:
    """trace.json, trace.html and trace.png of one trace into `out_dir` (created)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DllmCacheError(f"--trace wants a directory, but {out_dir} is a file")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / name for name in TRACE_FILES]
    paths[0].write_text(json.dumps(data, allow_nan=False), encoding="utf-8")
    paths[1].write_text(render_page([data]), encoding="utf-8")
    write_figure(data, paths[2])
    return paths


def load_trace(path: str | Path) -> dict[str, Any]:
    """A trace from its directory or its trace.json, checked to be one."""
    path = Path(path)
    file = path / "trace.json" if path.is_dir() else path
    if not file.is_file():
        raise DllmCacheError(f"no trace at {path} (expected a trace directory or its trace.json)")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DllmCacheError(f"{file} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != TRACE_FORMAT:
        raise DllmCacheError(f'{file} is not a dllm-cache trace (no "format": "{TRACE_FORMAT}")')
    return data


def write_compare(a: str | Path, b: str | Path, out: Path) -> Path:
    """One page with two traces side by side (shared slider; positions whose tokens differ outlined)."""
    page = render_page([load_trace(a), load_trace(b)])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out


__all__ = [
    "TRACE_FILES",
    "figure_size",
    "generate",
    "load_trace",
    "recomputed_fraction",
    "render_page",
    "replay",
    "traced_generate",
    "write_compare",
    "write_trace",
]
