"""Elastic-Cache and the surprise refresh: exact at their always-refresh settings, batch-independent,
and refreshing where (and only where) their signals say so."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS

from dllm_cache.cache import ElasticCache, make_policy
from dllm_cache.engine import generate
from dllm_cache.errors import GenerationError
from dllm_cache.methods import parse_method

KW = dict(gen_length=16, steps=16, block_length=8)


# -- Elastic-Cache ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["llada", "dream"])
@pytest.mark.parametrize("decoder", ["reference", "threshold"])
def test_elastic_gamma_one_reproduces_the_uncached_tokens(fixture, decoder, request):
    llm = request.getfixturevalue(fixture)
    kw = dict(KW, decoder=decoder, threshold=0.3)
    base = generate(llm, PROMPTS, **kw)
    cached = generate(llm, PROMPTS, cache=ElasticCache(gamma=1.0, window=8), **kw)
    assert torch.equal(base.sequences, cached.sequences)
    assert cached.stats.recompute_fraction == 1.0


@pytest.mark.parametrize("fixture", ["llada", "dream"])
def test_elastic_default_saves_work_and_rows_are_batch_independent(fixture, request):
    """(With the reference decoder: a dynamic one lets a row finish its block while the batch is
    still in it, which changes what its cache sees meanwhile.)"""
    llm = request.getfixturevalue(fixture)
    batch = generate(llm, PROMPTS, cache=ElasticCache(window=8), **KW)
    assert batch.stats.recompute_fraction < 0.9
    for b, p in enumerate(PROMPTS):
        alone = generate(llm, [p], cache=ElasticCache(window=8), **KW)
        assert alone.tokens[0] == batch.tokens[b]


def _record_elastic(llm, policy: ElasticCache, **kw):
    """Per step: the rows recomputed at each layer and the drift similarities measured."""
    steps: list[dict] = []
    select, end = policy.select, policy.end_step

    def recording_select(layer, view):
        rows = select(layer, view)
        if layer == 0:
            steps.append({"k": [], "first": None, "sim": None})
        steps[-1]["k"].append(view.h.shape[1] if rows is None else rows.shape[1])
        if layer == 0 and hasattr(policy, "first_refresh"):
            steps[-1]["first"] = policy.first_refresh.clone()
        return rows

    def recording_end(state):
        if steps and hasattr(policy, "similarity"):
            steps[-1]["sim"] = policy.similarity.clone()
        end(state)

    policy.select, policy.end_step = recording_select, recording_end
    generate(llm, PROMPTS, cache=policy, **kw)
    return steps


@pytest.mark.parametrize("gamma", [0.0, 0.9, 0.999])
def test_elastic_refreshes_from_the_first_drifting_layer_of_the_previous_step(llada, gamma):
    """Depth-aware refresh: rows whose tracked row drifted (similarity < gamma) at layer l of step n
    recompute every row from layer l on at step n + 1; shallower layers keep the window's rows."""
    kw = dict(KW, decoder="threshold", threshold=0.3)
    steps = _record_elastic(llada, ElasticCache(gamma=gamma, window=4), **kw)
    n_layers, L = llada.config.n_layers, len(steps[0]["k"]) and steps[0]["k"][0]
    assert steps[0]["k"] == [L] * n_layers  # the first step computes everything
    refreshed = 0
    for prev, step in zip(steps[1:], steps[2:], strict=False):
        drift = prev["sim"] < gamma
        first = torch.where(drift.any(1), drift.long().argmax(1), n_layers)
        assert torch.equal(step["first"], first)
        start = int(first.min())
        assert all(k < L for k in step["k"][:start])
        assert all(k == L for k in step["k"][start:])
        refreshed += start < n_layers
    if gamma == 0.0:
        assert refreshed == 0  # a cosine similarity is never below 0 here
    if gamma == 0.999:
        assert refreshed > 0


def test_elastic_window_needs_a_dynamic_decoder(llada):
    with pytest.raises(GenerationError, match="window=4 .*dynamic decoder"):
        generate(llada, PROMPTS, cache=ElasticCache(window=4), **KW)
    with pytest.raises(GenerationError, match="gamma must be >= 0"):
        make_policy("elastic-cache", gamma=-1)
    with pytest.raises(GenerationError, match="window must be >= 1"):
        make_policy("elastic-cache", window=0)
    method = parse_method("elastic-cache")
    assert method.cache_args == {"gamma": 0.9, "window": 16}
    assert method.overrides["decoder"] == "threshold" and method.overrides["threshold"] == 0.9


def test_elastic_commits_only_inside_its_window(llada):
    """Masked positions beyond the window's `window` leftmost ones are never committed in a step."""
    kw = dict(KW, decoder="threshold", threshold=1e-6, record_steps=True)  # commit all it may
    result = generate(llada, PROMPTS, cache=ElasticCache(window=3), **kw)
    for record in result.step_records[1:]:  # the first step is a full forward: no window yet
        assert all(len(p) <= 3 for p in record.positions)


# -- surprise refresh ------------------------------------------------------------------------------

SURPRISE_POLICIES = {
    "dual": dict(),
    "prefix": dict(),
    "freecache": dict(window=4),
    "dllm-cache": dict(response_interval=1, prompt_interval=100),  # the answer side exact every step
}


@pytest.mark.parametrize("fixture", ["llada", "dream"])
@pytest.mark.parametrize("decoder", ["reference", "threshold"])
@pytest.mark.parametrize("name", list(SURPRISE_POLICIES))
def test_surprise_one_reproduces_the_uncached_tokens(fixture, decoder, name, request):
    """surprise=1: a refresh after every commit, so the cached rows are always current: exact."""
    llm = request.getfixturevalue(fixture)
    kw = dict(KW, decoder=decoder, threshold=0.3)
    base = generate(llm, PROMPTS, **kw)
    cached = generate(llm, PROMPTS, cache=make_policy(name, surprise=1.0, **SURPRISE_POLICIES[name]), **kw)
    assert torch.equal(base.sequences, cached.sequences)
    plain = generate(llm, PROMPTS, cache=make_policy(name, **SURPRISE_POLICIES[name]), **kw)
    assert not torch.equal(base.sequences, plain.sequences)  # without it, the cache is approximate


@pytest.mark.parametrize("fixture", ["llada", "dream"])
@pytest.mark.parametrize("decoder", ["reference", "threshold"])
def test_elastic_with_surprise_one_and_no_drift_test_is_exact(fixture, decoder, request):
    """gamma = 0 (the drift test never fires) + surprise = 1 (every commit refreshes every layer at
    the next step): the surprise refresh alone keeps Elastic-Cache exact."""
    llm = request.getfixturevalue(fixture)
    kw = dict(KW, decoder=decoder, threshold=0.3)
    base = generate(llm, PROMPTS, **kw)
    cached = generate(llm, PROMPTS, cache=ElasticCache(gamma=0.0, window=8, surprise=1.0), **kw)
    assert torch.equal(base.sequences, cached.sequences)
    plain = generate(llm, PROMPTS, cache=ElasticCache(gamma=0.0, window=8), **kw)
    assert not torch.equal(base.sequences, plain.sequences)


@pytest.mark.parametrize("name", ["dual", "dllm-cache"])
def test_surprise_zero_is_the_plain_policy(llada, name):
    base = generate(llada, PROMPTS, cache=make_policy(name), **KW)
    zero = generate(llada, PROMPTS, cache=make_policy(name, surprise=0.0), **KW)
    assert torch.equal(base.sequences, zero.sequences)
    assert zero.stats.position_layers == base.stats.position_layers


@pytest.mark.parametrize("fixture", ["llada", "dream"])
@pytest.mark.parametrize("name", ["dual", "dllm-cache"])
def test_surprise_rows_are_batch_independent(fixture, name, request):
    llm = request.getfixturevalue(fixture)
    batch = generate(llm, PROMPTS, cache=make_policy(name, surprise=0.6), **KW)
    for b, p in enumerate(PROMPTS):
        alone = generate(llm, [p], cache=make_policy(name, surprise=0.6), **KW)
        assert alone.tokens[0] == batch.tokens[b]


@pytest.mark.parametrize("tau", [0.3, 0.6])
def test_dual_surprise_refreshes_exactly_after_low_confidence_commits(llada, tau):
    """A row recomputes every row at step n + 1 iff it committed a token with confidence <= tau at
    step n (and still has masks); otherwise only its block (dual), block starts aside."""
    policy = make_policy("dual", surprise=tau)
    begin = policy.begin_step
    active: list[torch.Tensor | None] = []

    def recording_begin(state):
        rows = begin(state)
        active.append(None if rows is None else rows.clone())
        return rows

    policy.begin_step = recording_begin
    result = generate(llada, PROMPTS, cache=policy, record_steps=True, **KW)
    P = result.prompt_length
    L, block = P + KW["gen_length"], KW["block_length"]
    seen_refresh = seen_plain = 0
    for n, record in enumerate(result.step_records[:-1]):
        rows = active[n + 1]
        if (n + 1) % block == 0:  # a block's first step: a full forward
            assert rows is None
            continue
        for b in range(len(PROMPTS)):
            surprised = any(c <= tau for c in record.confidence[b])
            still_masked = len(result.step_records) > n + 1 and any(
                len(r.positions[b]) for r in result.step_records[n + 1 : (n // block + 1) * block]
            )
            distinct = set(rows[b].tolist()) - {L}  # index L: the scratch slot (padding)
            if surprised and still_masked:
                assert distinct == set(range(L))
                seen_refresh += 1
            else:
                bs = P + (n // block) * block
                assert distinct == set(range(bs, bs + block))
                seen_plain += 1
    assert seen_refresh and seen_plain


def test_surprise_arguments_are_checked():
    for name in ("dual", "prefix", "freecache", "dllm-cache", "elastic-cache"):
        with pytest.raises(GenerationError, match="surprise must be in \\[0, 1\\]"):
            make_policy(name, surprise=1.5)
        with pytest.raises(GenerationError, match="surprise must be a number"):
            make_policy(name, surprise="often")
    assert parse_method("dual-surprise").cache_args == {"surprise": 0.5}
    assert make_policy("dllm-cache", surprise=0.5).describe()["surprise"] == 0.5
