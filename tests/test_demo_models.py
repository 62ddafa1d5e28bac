"""The shipped demo checkpoints: they load by name and tiny-llada actually solves tiny GSM."""

from __future__ import annotations

import json

import pytest

from dllm_cache.engine import GenerationConfig
from dllm_cache.eval.runner import compare, load_task
from dllm_cache.models.loading import CHECKPOINTS_DIR, load


@pytest.mark.parametrize(
    "name,arch", [("tiny-llada", "llada"), ("tiny-dream", "dream"), ("tiny-ar", "qwen2")]
)
def test_shipped_checkpoints_load_by_name(name, arch):
    llm = load(name)
    assert llm.config.arch == arch and llm.path == CHECKPOINTS_DIR / name
    raw = json.loads((llm.path / "config.json").read_text())
    assert raw["torch_dtype"] == "float16"
    assert llm.tokenizer is not None and llm.tokenizer.chat_template


def test_dream_and_ar_share_a_vocabulary():
    dream, ar = load("tiny-dream"), load("tiny-ar")
    assert dream.tokenizer.get_vocab() == ar.tokenizer.get_vocab()


@pytest.fixture(scope="module")
def fifty():
    return load_task("tiny-gsm", 50)


def test_tiny_llada_solves_tiny_gsm(fifty):
    """Uncached baseline, gen 128, block 32, one token per step: at least 40 of 50 held-out problems."""
    llm = load("tiny-llada")
    (none,), _ = compare(
        llm, fifty, ["none"], GenerationConfig(gen_length=128, block_length=32), batch_size=50
    )
    assert none.correct >= 40, f"{none.correct}/50"
