"""dLLM-Cache: exactness at interval 1, rho limits, selection, batching, accounting."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS

from dllm_cache.cache import DLLMCache, make_policy
from dllm_cache.cache.base import FeatureCache, StepState
from dllm_cache.engine import generate
from dllm_cache.errors import GenerationError
from dllm_cache.models.transformer import ForwardStats, gather_rows

KW = dict(gen_length=16, steps=16, block_length=8)


@pytest.mark.parametrize("fixture", ["llada", "dream"])
@pytest.mark.parametrize(
    "policy_kwargs",
    [
        dict(prompt_interval=1, response_interval=1),  # everything refreshed every step
        dict(prompt_interval=1, response_interval=100, transfer_ratio=1.0),  # rho = 1: every answer row
    ],
    ids=["interval-1", "rho-1"],
)
def test_exact_settings_reproduce_the_uncached_tokens(fixture, policy_kwargs, request):
    llm = request.getfixturevalue(fixture)
    base = generate(llm, PROMPTS, **KW)
    cached = generate(llm, PROMPTS, cache=DLLMCache(**policy_kwargs), **KW)
    assert torch.equal(base.sequences, cached.sequences)


@pytest.mark.parametrize("fixture", ["llada", "dream"])
def test_stale_cache_changes_tokens_and_saves_work(fixture, request):
    """The default preset really reuses features: fewer position-layers, and (random weights) other tokens."""
    llm = request.getfixturevalue(fixture)
    base = generate(llm, PROMPTS, **KW)
    cached = generate(llm, PROMPTS, cache="dllm-cache", **KW)
    # the tiny test models have few layers, so layer 0 (recomputed in full) is a large share
    assert cached.stats.recompute_fraction < 0.7
    assert not torch.equal(base.sequences, cached.sequences)


@pytest.mark.parametrize("fixture", ["llada", "dream"])
def test_each_row_of_a_batch_is_independent(fixture, request):
    llm = request.getfixturevalue(fixture)
    policy = dict(prompt_interval=5, response_interval=3, transfer_ratio=0.25)
    batch = generate(llm, PROMPTS, cache=DLLMCache(**policy), **KW)
    for b, p in enumerate(PROMPTS):
        alone = generate(llm, [p], cache=DLLMCache(**policy), **KW)
        assert alone.tokens[0] == batch.tokens[b]


@pytest.mark.parametrize("layer0_full", [True, False])
def test_recompute_fraction_matches_the_schedule(llada, layer0_full):
    """K_p = 4, K_r = 2, rho = 0.25, 16 steps, G = 16, L = P + G: count the rows by hand; layer 0
    recomputes all L rows at every step unless layer0_full is off."""
    P = max(len(p) for p in PROMPTS)
    G, steps, n_layers = 16, 16, llada.config.n_layers
    policy = DLLMCache(4, 2, 0.25, layer0_full=layer0_full)
    out = generate(llada, PROMPTS, cache=policy, early_stop=False, **KW)
    k = int(0.25 * G)
    rows = 0
    for n in range(steps):
        p_rows = P if n % 4 == 0 else 0
        r_rows = G if n % 2 == 0 else k
        rows += (P + G if layer0_full else p_rows + r_rows) + (p_rows + r_rows) * (n_layers - 1)
    assert out.stats.position_layers == rows * len(PROMPTS)
    assert out.stats.recompute_fraction == pytest.approx(rows / (steps * (P + G) * n_layers))


def _masked_batch(llm, prompts, G):
    """Left-padded prompts + G masks -> (tokens [B, P+G], layout, P)."""
    cfg = llm.config
    P = max(len(p) for p in prompts)
    x = torch.full((len(prompts), P + G), cfg.pad_token_id)
    attn = torch.zeros(x.shape, dtype=torch.bool)
    for b, p in enumerate(prompts):
        x[b, P - len(p) : P] = torch.tensor(p)
        attn[b, P - len(p) :] = True
    x[:, P:] = cfg.mask_token_id
    return x, llm.model.layout(attn), P


def test_layer0_recomputes_every_row_at_every_step(llada):
    """Between refreshes layer 0 still sees the tokens committed since: its cached attention and FFN
    outputs equal a fresh layer-0 pass over the current tokens after every step (they go stale
    with layer0_full=false, the published rule's ablation)."""
    model, cfg = llada.model, llada.config
    x, layout, P = _masked_batch(llada, PROMPTS[:2], 8)
    B, L = x.shape
    every = torch.arange(L).expand(B, L)

    def layer0(tokens):
        block = model.blocks[0]
        h = model.embed(tokens)
        q, k, v = block.qkv(h, layout.cos, layout.sin)
        a = block.attend(q, k, v, layout.attn_mask(None))
        return a, block.ffn(h + a)

    stale = {}
    for full in (True, False):
        cache = FeatureCache(cfg, B, L, model.dtype, model.device, store_outputs=True)
        policy = DLLMCache(prompt_interval=100, response_interval=100, transfer_ratio=0.25, layer0_full=full)
        xs = x.clone()
        for n in range(4):
            if n:
                xs[:, P + n] = 40 + n  # a token committed at each step
            m = xs == cfg.mask_token_id
            policy.begin_step(StepState(n, n, 0, P, L, P, L, m, torch.zeros_like(m), False))
            stats = ForwardStats()
            model.forward_active(xs, layout, cache, policy, None, every, stats)
            a, f = layer0(xs)
            if full:
                torch.testing.assert_close(cache.attn[0], a)
                torch.testing.assert_close(cache.ffn[0], f)
                assert stats.position_layers >= B * L  # layer 0: every row, counted
            stale[full] = not torch.allclose(cache.attn[0], a)
    assert stale == {True: False, False: True}


class _View:
    def __init__(self, h, cache, values):
        self.h, self.cache, self._values = h, cache, values

    def values(self, rows):
        return gather_rows(self._values, rows, dim=2)


def test_selection_picks_the_least_similar_rows(llada):
    """Constructed V: the rows whose V turned most are chosen, and the fresh V is stored for all rows."""
    cfg = llada.config
    B, P, G = 2, 3, 8
    L = P + G
    cache = FeatureCache(cfg, B, L, torch.float32, torch.device("cpu"), store_outputs=True)
    old = torch.randn(B, cfg.n_kv_heads, L, cfg.head_dim)
    cache.v[0].copy_(old)
    fresh = old.clone()
    # rotate V of rows (answer offsets) 5, 1 in row 0 and 2, 7 in row 1 by growing amounts
    turns = {0: {5: 3.0, 1: 1.0, 6: 0.1}, 1: {2: 2.0, 7: 5.0, 0: 0.05}}
    for b, rows in turns.items():
        for off, amount in rows.items():
            fresh[b, :, P + off] += amount * torch.randn(cfg.n_kv_heads, cfg.head_dim)
    policy = DLLMCache(
        prompt_interval=100, response_interval=100, transfer_ratio=0.25, layer0_full=False
    )  # k=2
    state = StepState(
        3, 3, 0, P, L, P, L, torch.zeros(B, L, dtype=torch.bool), torch.zeros(B, L, dtype=torch.bool), False
    )
    policy.begin_step(state)
    chosen = policy.select(0, _View(torch.zeros(B, L, cfg.d_model), cache, fresh))
    assert chosen.tolist() == [[P + 1, P + 5], [P + 2, P + 7]]
    torch.testing.assert_close(cache.v[0][:, :, P:], fresh[:, :, P:])
    torch.testing.assert_close(cache.v[0][:, :, :P], old[:, :, :P])  # prompt V untouched


def test_rho_zero_is_pure_interval_caching(llada):
    """With nothing selected, every row's output is embed(x) + the cached sub-block outputs of each layer."""
    model, cfg = llada.model, llada.config
    x, layout, P = _masked_batch(llada, PROMPTS[:2], 8)
    B, L = x.shape
    cache = FeatureCache(cfg, B, L, model.dtype, model.device, store_outputs=True)
    policy = DLLMCache(prompt_interval=10, response_interval=10, transfer_ratio=0.0, layer0_full=False)
    every = torch.arange(L).expand(B, L)

    def step(n, x):
        m = x == cfg.mask_token_id
        policy.begin_step(StepState(n, n, 0, P, L, P, L, m, torch.zeros_like(m), False))
        stats = ForwardStats()
        return model.forward_active(x, layout, cache, policy, None, every, stats), stats

    step(0, x)  # refresh: fills the cache
    x1 = x.clone()
    x1[:, P + 1] = 42
    x1[:, P + 4] = 17
    logits, stats = step(1, x1)
    assert stats.position_layers == 0
    h = model.embed(x1) + sum(cache.attn[i] + cache.ffn[i] for i in range(cfg.n_layers))
    torch.testing.assert_close(logits, model.lm_head(model.final_norm(h)))


def test_dream_answer_side_includes_the_row_before_the_answer(dream):
    """For Dream, the row that predicts the first answer token (P-1) is refreshed with the answer."""
    policy = DLLMCache(prompt_interval=100, response_interval=2, transfer_ratio=0.25)
    B, P, L = 1, 5, 13
    m = torch.zeros(B, L, dtype=torch.bool)
    policy.begin_step(StepState(2, 2, 0, P, L, P, L, m, m, True))
    rows = policy.select(1, _View(torch.zeros(B, L, 8), None, None))
    assert rows.tolist() == [list(range(P - 1, L))]
    assert policy.select(0, _View(torch.zeros(B, L, 8), None, None)) is None  # layer 0: every row


def test_invalid_arguments_are_named():
    with pytest.raises(GenerationError, match="prompt_interval must be >= 1, got 0"):
        DLLMCache(prompt_interval=0)
    with pytest.raises(GenerationError, match="response_interval must be >= 1"):
        make_policy("dllm-cache", response_interval=-2)
    with pytest.raises(GenerationError, match=r"transfer_ratio must be in \[0, 1\], got 1.5"):
        make_policy("dllm-cache", transfer_ratio=1.5)
    with pytest.raises(
        GenerationError, match="has no argument 'rho' .valid: prompt_interval, response_interval"
    ):
        make_policy("dllm-cache", rho=0.1)
    with pytest.raises(GenerationError, match="unknown dllm-cache preset 'fast' .choose default"):
        make_policy("dllm-cache", preset="fast")
    with pytest.raises(GenerationError, match="invalid argument value"):
        make_policy("dllm_cache", prompt_interval="often")
    with pytest.raises(GenerationError, match="layer0_full must be true or false, got 'no'"):
        make_policy("dllm-cache", layer0_full="no")


def test_presets():
    p = make_policy("dllm-cache", preset="dream-gsm8k")
    assert (p.prompt_interval, p.response_interval, p.transfer_ratio) == (25, 2, 0.25)
    p = make_policy("dllm-cache", preset="dream-gsm8k", response_interval=3)
    assert p.response_interval == 3
