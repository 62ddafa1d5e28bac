"""Rules as the published code applies them: Fast-dLLM's factor and threshold rules, its Dream loop,
and the reference samplers' ranking (fp32 confidences, exact ties broken as torch.topk breaks them)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import PROMPTS, as_llm

from dllm_cache.cache import DLLMCache, DualCache, PrefixCache
from dllm_cache.decoding.dream import DreamDecoder
from dllm_cache.decoding.llada import LLaDADecoder
from dllm_cache.decoding.parallel import ThresholdDecoder, factor_rule
from dllm_cache.decoding.sampling import ReferenceRows
from dllm_cache.engine import generate
from dllm_cache.errors import GenerationError
from dllm_cache.models.loading import save_checkpoint
from dllm_cache.models.random_init import random_model, tiny_config
from dllm_cache.scoring import top_k_per_row

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


# Prompts of mixed lengths: each prompt's reference row has its own length, and torch.topk's choice
# among ties depends on it.
TIE_PROMPTS = [[63, 113, 91, 141, 159], [139, 124], [103, 137, 73, 103], [185, 23, 23]]


@pytest.fixture(scope="module")
def peaked_llada(tmp_path_factory):
    """LLaDA with large weights (std 4): many positions have probability exactly 1.0 in fp32."""
    path = tmp_path_factory.mktemp("llada-std4") / "llada"
    return as_llm(save_checkpoint(random_model(tiny_config("llada"), seed=1, std=4.0), path))


@pytest.fixture(scope="module")
def near_uniform_dream(tmp_path_factory):
    """Dream with the default init scale (std 0.02): near-uniform logits, so fp32 entropies tie."""
    path = tmp_path_factory.mktemp("dream-std002") / "dream"
    return as_llm(save_checkpoint(random_model(tiny_config("dream"), seed=1), path))


def _llada_reference(llm, prompt: list[int], gen: int, steps: int, block: int) -> tuple[list[int], int]:
    """LLaDA's published sampler (generate.py), greedy, uncached, one prompt alone: per block the
    tokens per step from its masked count; each step the softmax of the (fp32) logits, -inf outside
    the block's masked positions, torch.topk over the whole row. -> (answer, steps with tied picks)."""
    mask = llm.config.mask_token_id
    P, n_blocks = len(prompt), gen // block
    x = torch.tensor([prompt + [mask] * gen])
    ties = 0
    for nb in range(n_blocks):
        end = P + (nb + 1) * block
        m, per = int((x[0, end - block : end] == mask).sum()), steps // n_blocks
        for i in range(per):
            k = m // per + (i < m % per)
            masked = x == mask
            logits = llm.model(x)
            x0 = logits.argmax(-1)
            x0_p = logits.softmax(-1).gather(-1, x0[..., None]).squeeze(-1)
            x0_p[:, end:] = INF
            conf = torch.where(masked, x0_p, INF)
            if k:
                idx = conf[0].topk(k).indices
                ties += int((conf[0] == conf[0, idx].min()).sum()) > 1  # the k-th best is tied
                x[0, idx] = x0[0, idx]
    return x[0, P:].tolist(), ties


def _dream_reference(
    llm, prompt: list[int], gen: int, steps: int, eps: float = 1e-3
) -> tuple[list[int], int]:
    """Dream's published entropy sampler (generation_utils `_sample`), greedy, uncached, one prompt
    alone: fp32 negative entropy of each masked position, int(masked x (1 - s/t)) positions per step
    (all at the last) chosen by torch.topk over the whole row. -> (answer, steps with tied picks)."""
    mask = llm.config.mask_token_id
    x = torch.tensor([prompt + [mask] * gen])
    t = torch.linspace(1, eps, steps + 1)
    ties = 0
    for i in range(steps):
        m = x == mask
        logits = llm.model(x)
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        probs = logits[m].softmax(-1)
        token = probs.argmax(-1)
        score = (probs * torch.log(probs + 1e-10)).sum(-1)
        n = m.sum() / m.shape[0]
        k = int(n * (1 - t[i + 1] / t[i])) if i < steps - 1 else int(n)
        full = torch.full(x.shape, INF)
        full[m] = score
        proposal = torch.full(x.shape, mask)
        proposal[m] = token
        if k > 0:
            idx = full.topk(k).indices[0]
            ties += int((full[0] == full[0, idx].min()).sum()) > 1
            x[0, idx] = proposal[0, idx]
    return x[0, len(prompt) :].tolist(), ties


@pytest.mark.parametrize("cache", ["none", "prefix", "dual", "dllm-cache"])
def test_llada_fp32_ties_go_as_in_the_published_sampler(peaked_llada, cache):
    """Confidences of exactly 1.0 in fp32 tie; the published sampler commits the ones torch.topk
    picks over the prompt's row (before: float64 confidences, then the lowest index, gave other
    tokens on three of these four prompts). Caches at their exact settings keep the order.
    One prompt at a time, as the reference runs (see the Dream test below)."""
    policies = {
        "none": lambda: "none",
        "prefix": lambda: PrefixCache(refresh_interval=1),
        "dual": lambda: DualCache(refresh_interval=1),
        "dllm-cache": lambda: DLLMCache(prompt_interval=1, response_interval=1),
    }
    tied_steps = 0
    for prompt in TIE_PROMPTS:
        kw = dict(gen_length=16, steps=8, block_length=8, early_stop=False)
        out = generate(peaked_llada, [prompt], cache=policies[cache](), **kw)
        expected, ties = _llada_reference(peaked_llada, prompt, 16, 8, 8)
        assert out.sequences[0, -16:].tolist() == expected, prompt
        tied_steps += ties
    assert tied_steps > 0  # the premise: ties were broken


@pytest.mark.parametrize(("steps", "cache"), [(16, "none"), (8, "none"), (16, "dual"), (8, "dllm-cache")])
def test_dream_entropy_ties_go_as_in_the_published_sampler(near_uniform_dream, steps, cache):
    """Equal fp32 entropies tie; the published sampler commits the ones torch.topk picks over the
    prompt's row (the lowest-index tie-break, ours before, gave other tokens on two of these four
    prompts at either step count).
    One prompt at a time, as the reference runs: on these extreme models whether two scores tie
    can hang on the last bit, and a padded batch's forward rounds differently (a numerics matter,
    not the ranking's: test_reference_rows_rank_each_prompt_in_its_own_row covers a batch)."""
    llm = near_uniform_dream
    policies = {
        "none": lambda: "none",
        "dual": lambda: DualCache(refresh_interval=1),
        "dllm-cache": lambda: DLLMCache(prompt_interval=1, response_interval=1),
    }
    tied_steps = 0
    for prompt in TIE_PROMPTS:
        kw = dict(gen_length=16, steps=steps, block_length=16, early_stop=False)
        out = generate(llm, [prompt], cache=policies[cache](), **kw)
        expected, ties = _dream_reference(llm, prompt, 16, steps)
        assert out.sequences[0, -16:].tolist() == expected, prompt
        tied_steps += ties
    assert tied_steps > 0


def test_llada_decoder_ranks_fp32_confidences_without_a_context():
    """Driven by hand (no engine): two positions at exactly 1.0 in fp32 (float64 tells them apart)
    go as torch.topk picks among them over the block's own row, and the schedule comes from the
    mask (four masked positions over four steps: one each)."""
    N, V, tied = 8, 8, (2, 5)
    row = torch.full((N,), INF)
    row[list(tied)] = 1.0
    row[[0, 3]] = 0.3
    picked = int(row.topk(1).indices)
    other = tied[1] if picked == tied[0] else tied[0]
    logits = torch.zeros(1, N, V)
    logits[0, [0, 3], 1] = 1.0  # low confidence
    logits[0, picked, 4] = 30.0  # 1.0 in fp32; in float64 1 - 6e-13
    logits[0, other, 4] = 40.0  # 1.0 in fp32; in float64 closer to 1: float64 ranks it first
    assert logits.softmax(-1).amax(-1)[0, picked] == logits.softmax(-1).amax(-1)[0, other] == 1.0
    masked = torch.zeros(1, N, dtype=torch.bool)
    masked[0, [0, 2, 3, 5]] = True
    decoder = LLaDADecoder()
    decoder.start_block(masked, steps=4)
    assert decoder.schedule == [[1, 1, 1, 1]]
    commit = decoder.step(logits, masked, 0, torch.Generator())
    assert commit.positions[0].nonzero().flatten().tolist() == [picked]


def test_dream_decoder_without_a_context_ranks_the_block_alone():
    """Driven by hand (no engine), ties go as torch.topk over the block's own row."""
    conf_logits = torch.zeros(1, 6, 4)  # six identical rows: every entropy ties
    masked = torch.ones(1, 6, dtype=torch.bool)
    decoder = DreamDecoder(alg="entropy")
    decoder.start_block(masked, steps=2)
    commit = decoder.step(conf_logits, masked, 1, torch.Generator())  # last step: all six
    assert commit.positions.all()
    decoder.start_block(masked, steps=3)
    commit = decoder.step(conf_logits, masked, 0, torch.Generator())
    k = int(6 * (1 - decoder.timesteps[1] / decoder.timesteps[0]))
    assert k > 0 and decoder.transfer_counts(masked, 0) == [k]
    expected = torch.zeros(6, dtype=torch.bool)
    expected[torch.full((6,), -1.3862943649291992).topk(k).indices] = True
    assert commit.positions[0].tolist() == expected.tolist()


def test_reference_rows_rank_each_prompt_in_its_own_row():
    """In a batch, each row's block is ranked by torch.topk at its place in that prompt's own row
    (len(prompt) + G, -inf elsewhere), with that row's k; among ties this is not the lowest index."""
    G, N, block_start = 16, 8, 8
    prompt_lengths, k = [5, 2, 9], [3, 2, 5]
    P = max(prompt_lengths)
    context = SimpleNamespace(
        x=torch.zeros(3, P + G), prompt_length=P, prompt_lengths=prompt_lengths, block_start=block_start
    )
    scores = torch.ones(3, N)  # every masked score tied
    scores[0, 6] = scores[2, 1] = INF  # committed already
    scores[1, 3] = 0.5
    got = ReferenceRows(context).topk(scores, k)
    for b, length in enumerate(prompt_lengths):
        row = torch.full((length + G,), INF)
        offset = length + block_start
        row[offset : offset + N] = scores[b]
        expected = torch.zeros(length + G, dtype=torch.bool)
        expected[row.topk(k[b]).indices] = True
        assert got[b].tolist() == expected[offset : offset + N].tolist(), b
    assert not torch.equal(got, top_k_per_row(scores, torch.tensor(k)))
