"""Where the evaluation data lives, and reading it.

The data files (GSM8K, MATH-500, HumanEval, MBPP; about 6 MB, sources and licences in
``datasets/SOURCES.md``) ship inside the package, laid out as ``gsm8k/test.jsonl``,
``humaneval/HumanEval.jsonl.gz``, ... The folder read is, in order of precedence:

1. the ``data_dir`` argument (``dllm-cache eval --data-dir DIR``);
2. the environment variable ``DLLM_CACHE_DATA``;
3. the bundled copy, ``dllm_cache/eval/datasets``.

Shipping the files (rather than fetching them from a hub at run time) keeps evaluation offline and
reproducible: the rows are exactly the ones the benchmarks were measured on.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any

from dllm_cache.errors import DllmCacheError

DATA_ENV = "DLLM_CACHE_DATA"
BUNDLED_DATA_DIR = Path(__file__).resolve().parent / "datasets"


def data_dir(override: str | Path | None = None) -> Path:
    """The data folder: `override`, else $DLLM_CACHE_DATA, else the copy bundled with the package."""
    if override is not None and str(override) != "":
        return Path(override).expanduser()
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    return BUNDLED_DATA_DIR


def data_source(override: str | Path | None = None) -> str:
    """Which data folder a run reads, in words (printed by `dllm-cache eval`)."""
    folder = data_dir(override)
    if override is not None and str(override) != "":
        return f"{folder} (--data-dir)"
    if folder != BUNDLED_DATA_DIR:
        return f"{folder} (${DATA_ENV})"
    return f"the copy bundled with dllm-cache ({folder})"


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
