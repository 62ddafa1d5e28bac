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


def test_tiny_llada_on_tiny_gsm(fifty):
    """Uncached baseline, gen 128, block 32, one token per step, on 50 held-out problems.

    The demo-models issue asks for >= 40 of 50 (measured: 44/50), so a regression in the engine or
    the checkpoint shows up here."""
    llm = load("tiny-llada")
    (none,), rows = compare(
        llm, fifty, ["none"], GenerationConfig(gen_length=128, block_length=32), batch_size=50
    )
    assert none.correct >= 40, f"{none.correct}/50"
    assert sum("####" in r["text"] for r in rows) >= 45
    assert none.nfe_per_problem <= 32  # every answer ends within the first block (early stop)


def test_dllm_cache_exact_at_interval_one_on_the_trained_model(fifty):
    llm = load("tiny-llada")
    cfg = GenerationConfig(gen_length=64, block_length=32)
    methods = ["none", "dllm-cache:prompt_interval=1:response_interval=1"]
    _, rows = compare(llm, fifty[:16], methods, cfg, batch_size=16)
    texts = {}
    for r in rows:
        texts.setdefault(r["id"], set()).add(r["text"])
    assert all(len(t) == 1 for t in texts.values())


# dLLM-Cache that never refreshes: one full pass per block, then cached features only.
NEVER_REFRESHED = "dllm-cache:prompt_interval=1000:response_interval=1000:transfer_ratio=0"


def test_a_too_stale_cache_breaks_pair_answers():
    """Pair problems (two positive numbers with a given sum: the second must agree with the first)
    are where tiny-llada's accuracy falls when a cache is too stale. Uncached decoding solves them;
    a cache never refreshed, or one whose prompt features are kept while the answer is recomputed
    every step, mostly breaks the sum (the model reads the committed first number through the
    prompt's features, which those caches hold from before it was written). At interval 1 the
    cache reproduces the uncached answers exactly."""
    llm = load("tiny-llada")
    problems = load_task("tiny-gsm-pairs", 40)
    methods = ["none", "dllm-cache:prompt_interval=1:response_interval=1", NEVER_REFRESHED]
    methods.append("dllm-cache:response_interval=1")
    (none, exact, never, stale_prompt), rows = compare(
        llm, problems, methods, GenerationConfig(gen_length=32, block_length=32), batch_size=40
    )
    assert none.correct >= 38, f"{none.correct}/40"
    texts = {}
    for r in rows:
        texts.setdefault(r["method"], []).append(r["text"])
    assert texts[methods[0]] == texts[methods[1]]
    assert never.correct <= 25 and stale_prompt.correct <= 25, (never.correct, stale_prompt.correct)
