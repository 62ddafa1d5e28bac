"""Where the evaluation data lives, and reading it.

The data files (GSM8K, MATH-500, HumanEval, MBPP) are not shipped in the package. They are read
from a data folder laid out as ``gsm8k/test.jsonl``, ``humaneval/HumanEval.jsonl.gz``, ... (see
``shared/data/SOURCES.md`` of the project). The folder is, in order of precedence:

1. the ``data_dir`` argument (``dllm-cache eval --data-dir DIR``);
2. the environment variable ``DLLM_CACHE_DATA``;
3. ``shared/data`` beside the project checkout (``<checkout>/../shared/data``), which is where it
   is during development.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any

from dllm_cache.errors import DllmCacheError

DATA_ENV = "DLLM_CACHE_DATA"
# src/dllm_cache/eval/data.py -> parents[3] is the checkout; the data sits beside it.
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[3].parent / "shared" / "data"


def data_dir(override: str | Path | None = None) -> Path:
    """The data folder: `override`, else $DLLM_CACHE_DATA, else the checkout's ../shared/data."""
    if override is not None and str(override) != "":
        return Path(override).expanduser()
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    return DEFAULT_DATA_DIR


def data_file(relative: str, override: str | Path | None = None) -> Path:
    """The path of one data file, or a one-line error naming it and how to point to the folder."""
    path = data_dir(override) / relative
    if not path.is_file():
        raise DllmCacheError(
            f"missing data file {path} (point to the data folder with --data-dir DIR or {DATA_ENV}=DIR)"
        )
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a .jsonl or .jsonl.gz file; a malformed line is an error naming the file and line."""
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DllmCacheError(f"{path}:{i}: not valid JSON ({e.msg})") from None
    return rows
