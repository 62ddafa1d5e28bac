"""Fast-dLLM prefix/dual, dKV-Cache, threshold/factor parallel decoding, early answer commit."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS

from dllm_cache.cache import DKVCache, DualCache, PrefixCache, make_policy
from dllm_cache.cache.base import rows_from_mask
from dllm_cache.decoding.parallel import factor_rule
from dllm_cache.engine import generate
from dllm_cache.errors import GenerationError

KW = dict(gen_length=16, steps=16, block_length=8)
EXACT = {
    "prefix": lambda: PrefixCache(refresh_interval=1),
    "dual": lambda: DualCache(refresh_interval=1),
    "dkv-decode": lambda: DKVCache("decode", refresh_interval=1),
    "dkv-greedy": lambda: DKVCache("greedy", refresh_interval=1),
}


@pytest.mark.parametrize("fixture", ["llada", "dream"])
@pytest.mark.parametrize("policy", list(EXACT))
@pytest.mark.parametrize("decoder", ["reference", "threshold"])
def test_refresh_every_step_reproduces_the_uncached_tokens(fixture, policy, decoder, request):
    llm = request.getfixturevalue(fixture)
    kw = dict(KW, decoder=decoder, threshold=0.3)
    base = generate(llm, PROMPTS, **kw)
    cached = generate(llm, PROMPTS, cache=EXACT[policy](), **kw)
    assert torch.equal(base.sequences, cached.sequences)


@pytest.mark.parametrize("fixture", ["llada", "dream"])
@pytest.mark.parametrize("name", ["prefix", "dual", "dkv"])
def test_default_policies_skip_rows_and_stay_batch_independent(fixture, name, request):
    llm = request.getfixturevalue(fixture)
    batch = generate(llm, PROMPTS, cache=name, **KW)
    assert batch.stats.recompute_fraction < 0.7
    for b, p in enumerate(PROMPTS):
        assert generate(llm, [p], cache=name, **KW).tokens[0] == batch.tokens[b]


def test_prefix_and_dual_active_rows(llada):
    """Rows per step: all at a block's first step; then block+suffix (prefix) or block (dual)."""
    P = max(len(p) for p in PROMPTS)
    G, B, layers = 16, len(PROMPTS), llada.config.n_layers
    for policy, later_rows in [(PrefixCache(), [16, 8]), (DualCache(), [8, 8])]:
        out = generate(llada, PROMPTS, cache=policy, gen_length=G, steps=8, block_length=8, early_stop=False)
        # 2 blocks x 4 steps: first step of each block full (P + G rows), 3 others partial
        expected = sum((P + G) + 3 * later for later in later_rows) * layers * B
        assert out.stats.position_layers == expected


class _Recording:
    """Wraps a policy and records the active rows it chose each step."""

    def __init__(self, inner):
        self.inner, self.rows, self.committed = inner, [], []
        self.name, self.per_layer, self.uses_cache = inner.name, inner.per_layer, inner.uses_cache

    def begin_step(self, state):
        rows = self.inner.begin_step(state)
        self.rows.append(None if rows is None else rows.clone())
        return rows

    def select(self, layer, view):
        return self.inner.select(layer, view)

    def end_step(self, state):
        self.committed.append(state.just_committed.clone())
        self.inner.end_step(state)


def test_dkv_delays_caching_by_one_step(llada):
    rec = _Recording(DKVCache("decode", refresh_interval=100))
    generate(llada, PROMPTS[:1], cache=rec, gen_length=16, steps=16, block_length=16, early_stop=False)
    for n in range(1, 15):
        committed_now = rec.committed[n].nonzero()[:, 1].tolist()  # committed at step n
        next_rows, later_rows = (
            set(rec.rows[n + 1][0].tolist()),
            set(rec.rows[n + 2][0].tolist()) if n + 2 < 16 else set(),
        )
        assert all(c in next_rows for c in committed_now)  # recomputed once with the token in place
        assert not any(c in later_rows for c in committed_now)  # then served from the cache


def test_dkv_prefill_computes_the_prompt_once(llada):
    P = max(len(p) for p in PROMPTS)
    out = generate(llada, PROMPTS, cache=DKVCache("prefill"), early_stop=False, **KW)
    L, layers, B = P + 16, llada.config.n_layers, len(PROMPTS)
    assert out.stats.position_layers == (L + 15 * 16) * layers * B


def test_rows_from_mask_pads_with_the_scratch_slot():
    m = torch.tensor([[0, 1, 0, 1, 1], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    assert rows_from_mask(m).tolist() == [[1, 3, 4], [2, 5, 5], [5, 5, 5]]  # 5: the scratch slot


def test_threshold_above_one_commits_one_token_per_step(llada, dream):
    for llm in (llada, dream):
        out = generate(
            llm, PROMPTS, decoder="threshold", threshold=1.01, record_steps=True, early_stop=False, **KW
        )
        assert out.stats.steps == 16
        assert all(len(row) == 1 for rec in out.step_records for row in rec.positions)


def test_threshold_commits_confident_positions_in_parallel(llada):
    out = generate(llada, PROMPTS, decoder="threshold", threshold=0.05, early_stop=False, **KW)
    assert out.stats.steps < 16  # random weights with std 0.5 are peaked enough for 0.05
    assert not (out.sequences == llada.config.mask_token_id).any()


def test_factor_rule_on_constructed_confidences():
    conf = torch.tensor(
        [[0.99, 0.5, 0.8, 0.7, float("-inf")], [0.3, 0.2, 0.1, float("-inf"), float("-inf")]],
        dtype=torch.float64,
    )
    # factor 1: n=1 needs c>=0.5, n=2 c>=0.667, n=3 c>=0.75, n=4 c>=0.8
    # row 0 sorted 0.99, 0.8, 0.7, 0.5 -> n=1 ok, n=2 ok (0.8), n=3 no (0.7<0.75), n=4 no -> 2
    # row 1 sorted 0.3, 0.2, 0.1 -> none satisfied -> at least 1
    assert factor_rule(conf, 1.0).tolist() == [
        [True, False, True, False, False],
        [True, False, False, False, False],
    ]
    # a larger factor admits more: factor 2 -> thresholds 0, 0.333, 0.5, 0.6 -> row 0 passes 3 of 4,
    # and a walk that stops at the last candidate commits them all (as published)
    assert factor_rule(conf, 2.0)[0].tolist() == [True, True, True, True, False]


def test_factor_decoder_fills_the_answer(dream):
    out = generate(dream, PROMPTS, decoder="factor", factor=1.0, early_stop=False, **KW)
    assert not (out.sequences == dream.config.mask_token_id).any()


def test_early_commit_with_a_small_margin_finishes_each_block_at_once(llada):
    out = generate(llada, PROMPTS, early_commit_margin=1e-9, early_stop=False, **KW)
    assert out.stats.steps == 2  # one step per block
    strict = generate(llada, PROMPTS, early_commit_margin=1.0, early_stop=False, **KW)
    assert strict.stats.steps == 16 and torch.equal(
        strict.sequences, generate(llada, PROMPTS, early_stop=False, **KW).sequences
    )


def test_presets_and_bad_arguments(llada):
    from dllm_cache.methods import parse_method

    m = parse_method("fast-dllm-dual-parallel")
    out = generate(llada, PROMPTS, cache=m.policy(), gen_length=16, **{**m.overrides, "block_length": 8})
    assert out.stats.steps <= 16
    with pytest.raises(GenerationError, match="dkv: unknown variant 'fast'"):
        make_policy("dkv", variant="fast")
    with pytest.raises(GenerationError, match="refresh_interval must be >= 1"):
        make_policy("dkv", refresh_interval=0)
    with pytest.raises(GenerationError, match="dual: refresh_interval must be >= 0"):
        make_policy("dual", refresh_interval=-1)
    with pytest.raises(GenerationError, match="threshold must be > 0"):
        generate(llada, PROMPTS, decoder="threshold", threshold=0, **KW)
    with pytest.raises(GenerationError, match="unknown decoder 'beam'"):
        generate(llada, PROMPTS, decoder="beam", **KW)
