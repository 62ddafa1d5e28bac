"""trace.html: one self-contained page (the data and a small script inline; nothing is fetched)."""

from __future__ import annotations

import html
import json
from importlib import resources
from typing import Any

from dllm_cache.errors import DllmCacheError


def render_page(traces: list[dict[str, Any]]) -> str:
    """The page for one trace, or for two side by side (`dllm-cache trace compare`)."""
    if not 1 <= len(traces) <= 2:
        raise DllmCacheError(f"a trace page shows one or two traces, got {len(traces)}")
    if len(traces) == 2:
        check_comparable(*traces)
    template = resources.files("dllm_cache.trace").joinpath("page.html").read_text(encoding="utf-8")
    # "</" inside the JSON would close the <script> element early; "<\/" is the same JSON string.
    data = json.dumps(traces, allow_nan=False, separators=(",", ":")).replace("</", "<\\/")
    title = f"{traces[0]['model']}: " + " vs ".join(t["method"] for t in traces)
    return template.replace("__TITLE__", html.escape(title)).replace("__TRACES_JSON__", data)


def check_comparable(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Two traces can be put side by side only for the same prompts and answer length."""
    for key in ("gen_length",):
        if a[key] != b[key]:
            raise DllmCacheError(f"cannot compare traces with different {key}: {a[key]} vs {b[key]}")
    prompts_a = [r["prompt_tokens"] for r in a["rows"]]
    prompts_b = [r["prompt_tokens"] for r in b["rows"]]
    if prompts_a != prompts_b:
        raise DllmCacheError("cannot compare traces of different prompts (or of different tokenizers)")
