"""Rules as the published code applies them: Fast-dLLM's factor and threshold rules, its Dream loop."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS

from dllm_cache.decoding.parallel import ThresholdDecoder, factor_rule
from dllm_cache.engine import generate
from dllm_cache.errors import GenerationError

INF = float("-inf")


def _walk(conf: list[float], factor: float) -> int:
    """How many the published walk commits: stop at the first sorted c_n < 1 - factor/(n+1) (the
    first always passes); a stop at the last candidate, or none, commits them all."""
    c = sorted((v for v in conf if v != INF), reverse=True)
    m, stop = len(c), len(c)
    for i in range(1, m):
        if c[i] < 1 - factor / (i + 2):
            stop = i
            break
    return m if stop >= m - 1 else stop


def test_factor_rule_edge_cases():
    # factor 1: thresholds 0.5, 0.667, 0.75, 0.8 for n = 1..4
    rows = [
        [0.99, 0.5, 0.8, 0.7, INF],  # sorted .99 .8 .7 .5: stops at n=3 (0.7 < 0.75): commit 2
        [0.99, 0.9, 0.8, 0.1, INF],  # only the last candidate fails: all 4 (ours before: 3)
        [0.1, INF, 0.2, INF, INF],  # two candidates left: both, whatever their confidence
        [INF, 0.01, INF, INF, INF],  # one candidate
        [0.3, 0.2, 0.1, INF, INF],  # stops at n=2 of 3, which is the next-to-last: commit 1
        [INF] * 5,  # nothing left
    ]
    got = factor_rule(torch.tensor(rows, dtype=torch.float64), 1.0)
    assert got.tolist() == [
        [True, False, True, False, False],
        [True, True, True, True, False],
        [True, False, True, False, False],
        [False, True, False, False, False],
        [True, False, False, False, False],
        [False] * 5,
    ]


def test_factor_rule_follows_the_published_walk():
    g = torch.Generator().manual_seed(0)
    for factor in (0.5, 1.0, 2.0):
        conf = 1 - torch.rand(400, 12, generator=g, dtype=torch.float64) ** 3 * 0.6
        conf[torch.rand(400, 12, generator=g) < 0.3] = INF
        chosen = factor_rule(conf, factor)
        for row, pick in zip(conf.tolist(), chosen, strict=True):
            assert int(pick.sum()) == _walk(row, factor)
            values = torch.tensor(row, dtype=torch.float64)
            if pick.any() and (~pick).any():  # the committed ones are the most confident
                assert values[pick].min() >= values[~pick].max()


def test_threshold_keeps_confidences_equal_to_the_threshold():
    conf = torch.tensor([[0.5, 0.5, 0.2, INF], [0.2, 0.1, INF, INF]], dtype=torch.float64)
    assert ThresholdDecoder(0.5).rule(conf).tolist() == [
        [True, True, False, False],
        [True, False, False, False],  # nothing reaches it: the most confident alone
    ]


def test_dream_threshold_commits_the_block_start_alone_at_a_blocks_first_step(dream, llada):
    kw = dict(gen_length=16, block_length=8, record_steps=True, early_stop=False)
    out = generate(dream, PROMPTS, decoder="threshold", threshold=0.05, **kw)
    blocks_seen, parallel = set(), False
    for rec in out.step_records:
        if rec.block not in blocks_seen:  # the block's first step: its first position, in every row
            blocks_seen.add(rec.block)
            assert rec.positions == [[rec.block * 8]] * len(PROMPTS)
        parallel |= any(len(row) > 1 for row in rec.positions)
    assert blocks_seen == {0, 1} and parallel  # later steps apply the threshold
    # LLaDA's published loop has no such rule: at 0.05 its first step commits several positions.
    first = generate(llada, PROMPTS, decoder="threshold", threshold=0.05, **kw).step_records[0]
    assert any(len(row) > 1 for row in first.positions)
    with pytest.raises(GenerationError, match="unknown model family 'qwen'"):
        ThresholdDecoder(0.9, family="qwen")
