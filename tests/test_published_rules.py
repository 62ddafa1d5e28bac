"""Rules as the published code applies them: Fast-dLLM's factor and threshold rules, its Dream loop,
and the reference samplers' ranking (fp32 confidences, ties broken as torch.topk breaks them)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import PROMPTS, as_llm

from dllm_cache.decoding.dream import DreamDecoder
from dllm_cache.decoding.llada import LLaDADecoder
from dllm_cache.decoding.parallel import ThresholdDecoder, factor_rule
from dllm_cache.engine import generate
from dllm_cache.errors import GenerationError
from dllm_cache.models.loading import save_checkpoint
from dllm_cache.models.random_init import random_model, tiny_config

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


def _context(prompt_length: int, gen_length: int, block_start: int = 0) -> SimpleNamespace:
    """What the engine hands a decoder: one prompt alone, its length, the current block."""
    x = torch.zeros(1, prompt_length + gen_length, dtype=torch.long)
    return SimpleNamespace(
        x=x, prompt_length=prompt_length, prompt_lengths=[prompt_length], block_start=block_start
    )


def test_llada_ranks_fp32_ties_as_torch_topk_over_the_reference_row():
    """Two positions at exactly 1.0 in fp32 (float64 tells them apart): the reference commits the one
    torch.topk picks over its row (prompt + answer, -inf outside the block's masked positions)."""
    P, G, N, V, tied = 9, 16, 8, 8, (2, 5)
    ctx = _context(P, G, block_start=8)
    row = torch.full((P + G,), INF)
    row[P + 8 + torch.tensor(tied)] = 1.0
    row[P + 8 + torch.tensor([0, 3])] = 0.3
    picked = int(row.topk(1).indices) - P - 8
    other = tied[1] if picked == tied[0] else tied[0]
    logits = torch.zeros(1, N, V)
    logits[0, [0, 3], 1] = 1.0  # low confidence
    logits[0, picked, 4] = 30.0  # 1.0 in fp32; in float64 1 - 7e-13
    logits[0, other, 4] = 40.0  # 1.0 in fp32; in float64 closer to 1: float64 ranks it first
    assert logits.softmax(-1).amax(-1)[0, picked] == logits.softmax(-1).amax(-1)[0, other] == 1.0
    masked = torch.zeros(1, N, dtype=torch.bool)
    masked[0, [0, 2, 3, 5]] = True
    decoder = LLaDADecoder()
    decoder.begin_generation(ctx)
    decoder.start_block(masked, steps=4)  # one token per step
    commit = decoder.step(logits, masked, 0, torch.Generator())
    assert commit.positions[0].nonzero().flatten().tolist() == [picked]


@pytest.fixture(scope="module")
def near_uniform_dream(tmp_path_factory):
    """Dream with the default init scale (std 0.02): near-uniform logits, so fp32 entropies tie."""
    path = tmp_path_factory.mktemp("dream-std002") / "dream"
    return as_llm(save_checkpoint(random_model(tiny_config("dream"), seed=1), path))


def _dream_reference(llm, prompt: list[int], gen_length: int, eps: float = 1e-3) -> list[int]:
    """Dream's published entropy sampler, uncached, greedy, one prompt: fp32 negative entropy of each
    masked position, int(masked x (1 - s/t)) positions per step chosen by torch.topk over the whole
    row (prompt positions and committed ones at -inf)."""
    mask = llm.config.mask_token_id
    x = torch.tensor([prompt + [mask] * gen_length])
    t = torch.linspace(1, eps, gen_length + 1)
    for i in range(gen_length):
        m = x == mask
        logits = llm.model(x)
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        probs = logits[m].softmax(-1)
        token = probs.argmax(-1)
        score = (probs * torch.log(probs + 1e-10)).sum(-1)
        n = int(m.sum())
        k = n if i == gen_length - 1 else int(n * (1 - t[i + 1] / t[i]))
        full = torch.full(x.shape, INF)
        full[m] = score
        proposal = torch.full(x.shape, mask)
        proposal[m] = token
        if k > 0:
            idx = full[0].topk(k).indices
            x[0, idx] = proposal[0, idx]
    return x[0, len(prompt) :].tolist()


def test_dream_entropy_ties_go_as_in_the_reference(near_uniform_dream):
    """On these prompts equal fp32 entropies occur; the lowest-index tie-break (ours before) gave
    other tokens on the first three."""
    llm = near_uniform_dream
    for prompt in ([196, 120, 164, 184, 149, 186, 63], [71, 19, 194, 29, 22], [22, 56, 192, 65, 26, 180]):
        out = generate(llm, [prompt], gen_length=16, steps=16, block_length=16, early_stop=False)
        assert out.sequences[0, -16:].tolist() == _dream_reference(llm, prompt, 16)


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
    expected = torch.zeros(6, dtype=torch.bool)
    expected[torch.full((6,), -1.3862943649291992).topk(k).indices] = True
    assert commit.positions[0].tolist() == expected.tolist()
