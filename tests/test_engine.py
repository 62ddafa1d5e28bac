"""The denoising loop with the reference samplers (uncached)."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS

from dllm_cache.decoding.dream import ALGS
from dllm_cache.decoding.llada import tokens_per_step
from dllm_cache.engine import _finish_rows, generate


@pytest.mark.parametrize("fixture", ["llada", "dream"])
def test_batch_of_mixed_lengths_equals_each_prompt_alone(fixture, request):
    llm = request.getfixturevalue(fixture)
    kw = dict(gen_length=16, steps=16, block_length=8)
    batch = generate(llm, PROMPTS, **kw)
    for b, p in enumerate(PROMPTS):
        alone = generate(llm, [p], **kw)
        assert alone.tokens[0] == batch.tokens[b]
        assert torch.equal(alone.sequences[0, -16:], batch.sequences[b, -16:])


@pytest.mark.parametrize("fixture", ["llada", "dream"])
def test_per_row_nfe_is_what_each_prompt_costs_alone(fixture, request):
    llm = request.getfixturevalue(fixture)
    # A low threshold commits several tokens per step, so rows finish their blocks at different steps.
    kw = dict(gen_length=16, block_length=8, decoder="threshold", threshold=0.4)
    batch = generate(llm, PROMPTS, **kw)
    alone = [generate(llm, [p], **kw).stats.nfe for p in PROMPTS]
    assert batch.stats.row_nfe == alone
    # The batch waits, block by block, for its slowest row in that block.
    assert batch.stats.nfe >= max(alone) and len(set(alone)) > 1
    assert batch.stats.guide_row_nfe == [0] * len(PROMPTS)


def test_tokens_per_step_schedule():
    assert tokens_per_step(10, 4) == [3, 3, 2, 2]
    assert tokens_per_step(7, 4) == [2, 2, 2, 1]
    assert tokens_per_step(3, 4) == [1, 1, 1, 0]


def test_per_step_commit_counts(llada):
    out = generate(
        llada, PROMPTS, gen_length=16, steps=8, block_length=8, early_stop=False, record_steps=True
    )
    assert out.stats.nfe == 8 == len(out.step_records)
    for rec in out.step_records:
        blk = rec.block
        for row in rec.positions:
            assert len(row) == 2 and all(blk * 8 <= p < (blk + 1) * 8 for p in row)
    # every answer position committed exactly once
    for b in range(len(PROMPTS)):
        seen = sorted(p for rec in out.step_records for p in rec.positions[b])
        assert seen == list(range(16))


def _first_step_expectation(llm, prompt, gen, shift):
    model = llm.model
    x = torch.tensor([prompt + [llm.config.mask_token_id] * gen])
    logits = model(x)[0]
    if shift:  # Dream: row i-1 predicts position i
        logits = torch.cat([logits[:1], logits[:-1]])
    probs = logits[len(prompt) :].double().softmax(-1)
    conf, tok = probs.max(-1)
    j = int(conf.argmax())
    return j, int(tok[j])


@pytest.mark.parametrize("fixture,shift", [("llada", False), ("dream", True)])
def test_first_commit_uses_the_right_logit_row(fixture, shift, request):
    llm = request.getfixturevalue(fixture)
    prompt = PROMPTS[0]
    out = generate(
        llm, [prompt], gen_length=8, steps=8, block_length=8, record_steps=True, alg="maskgit_plus"
    )
    # Dream's time grid commits int(8 * (1 - t1/t0)) = 0 tokens at its first step, like the reference.
    first = next(r for r in out.step_records if r.positions[0])
    expected = _first_step_expectation(llm, prompt, 8, shift)
    assert (first.positions[0], first.tokens[0]) == ([expected[0]], [expected[1]])
    if shift:  # the unshifted reading would have chosen differently for this model
        assert _first_step_expectation(llm, prompt, 8, False) != expected


def test_cfg_first_step_matches_guidance_formula(llada):
    model, prompt, gen, scale = llada.model, PROMPTS[0], 8, 1.5
    mask = llada.config.mask_token_id
    x = torch.tensor([prompt + [mask] * gen])
    un = torch.tensor([[mask] * len(prompt) + [mask] * gen])
    cond, uncond = model(x)[0, len(prompt) :], model(un)[0, len(prompt) :]
    guided = uncond + (scale + 1) * (cond - uncond)
    conf, tok = guided.double().softmax(-1).max(-1)
    j = int(conf.argmax())
    out = generate(
        llada, [prompt], gen_length=gen, steps=gen, block_length=gen, cfg_scale=scale, record_steps=True
    )
    assert out.step_records[0].positions[0] == [j] and out.step_records[0].tokens[0] == [int(tok[j])]
    assert out.stats.nfe == 2 * out.stats.steps


def test_seeded_sampling_is_reproducible(llada, dream):
    for llm in (llada, dream):
        kw = dict(gen_length=16, steps=16, block_length=16, temperature=1.0)
        a = generate(llm, PROMPTS, seed=3, **kw)
        b = generate(llm, PROMPTS, seed=3, **kw)
        c = generate(llm, PROMPTS, seed=4, **kw)
        assert torch.equal(a.sequences, b.sequences)
        assert not torch.equal(a.sequences, c.sequences)


def test_random_remasking_is_seeded(llada):
    kw = dict(gen_length=16, steps=16, remasking="random", record_steps=True)
    a, b = generate(llada, PROMPTS, seed=1, **kw), generate(llada, PROMPTS, seed=1, **kw)
    assert [r.positions for r in a.step_records] == [r.positions for r in b.step_records]


@pytest.mark.parametrize("alg", ALGS)
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_dream_algorithms_fill_every_position(dream, alg, temperature):
    out = generate(
        dream,
        PROMPTS,
        gen_length=12,
        steps=12,
        alg=alg,
        temperature=temperature,
        top_p=0.95,
        early_stop=False,
        seed=0,
    )
    assert not (out.sequences == dream.config.mask_token_id).any()
    assert out.stats.steps <= 12


def test_dream_alg_temp_samples_positions(dream):
    out = generate(dream, PROMPTS, gen_length=12, steps=6, alg="entropy", alg_temp=0.5, early_stop=False)
    assert not (out.sequences == dream.config.mask_token_id).any()


def test_early_stop_fills_after_end_token():
    mask, eos, eot = 9, 0, 5
    x = torch.tensor(
        [
            [1, 2, 3, eot, mask, mask],  # answer complete up to eot -> finished
            [1, 2, mask, eot, mask, mask],  # a mask before the end token -> not yet
            [1, 2, 3, 4, mask, mask],  # no end token
        ]
    )
    filled = _finish_rows(x, 2, mask, torch.tensor([eos, eot]), eos)
    assert x.tolist() == [[1, 2, 3, eot, eos, eos], [1, 2, mask, eot, mask, mask], [1, 2, 3, 4, mask, mask]]
    assert filled.sum() == 2


def test_uncached_stats(llada):
    out = generate(llada, PROMPTS, gen_length=16, steps=16, early_stop=False)
    s = out.stats
    assert s.nfe == 16 and s.recompute_fraction == 1.0 and s.cache_bytes == 0
    assert s.flops > 0 and s.wall_time_s > 0 and s.peak_memory_bytes > 0
    assert s.generated_tokens == sum(1 for row in out.sequences[:, -16:].tolist() for t in row if t != 0)


def test_dream_alg_temp_samples_k_positions_by_weight():
    """alg_temp near 0 commits the top-k by confidence (the greedy rule); a large one samples k
    positions almost uniformly (different seeds, different positions; always k of them)."""
    from dllm_cache.decoding.dream import DreamDecoder

    logits = torch.randn(2, 10, 50, generator=torch.Generator().manual_seed(0)) * 3
    masked = torch.ones(2, 10, dtype=torch.bool)
    masked[1, :4] = False

    def commit(alg_temp, seed):
        d = DreamDecoder("entropy", alg_temp=alg_temp)
        d.start_block(masked, 2)
        return d.step(logits, masked, 0, torch.Generator().manual_seed(seed)).positions

    greedy = commit(None, 0)
    assert torch.equal(commit(1e-4, 0), greedy) and torch.equal(commit(1e-4, 1), greedy)
    samples = [commit(100.0, seed) for seed in range(8)]
    assert all(torch.equal(s.sum(1), greedy.sum(1)) and not (s & ~masked).any() for s in samples)
    assert len({tuple(s.flatten().tolist()) for s in samples}) > 1
