"""d2Cache (+ certainty-prior decoding), FreeCache and Guided Diffusion."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import PROMPTS

from dllm_cache.cache import D2Cache, FreeCache, make_policy
from dllm_cache.cache.base import FeatureCache, StepState
from dllm_cache.cache.d2cache import inflate, rollout_importance
from dllm_cache.decoding.certainty import certainty_density
from dllm_cache.decoding.guided import GuidedDecoder, VocabularyMap
from dllm_cache.engine import generate
from dllm_cache.errors import GenerationError
from dllm_cache.models.loading import DLLM, load
from dllm_cache.models.tokenizer import encode_prompt, load_tokenizer

KW = dict(gen_length=16, steps=16, block_length=8)
EVERYTHING = dict(current_k=10_000, rollout_p=1.0)


@pytest.mark.parametrize("fixture", ["llada", "dream"])
@pytest.mark.parametrize("decoder", ["certainty", "threshold", "reference"])
def test_d2cache_recomputing_everything_reproduces_the_uncached_tokens(fixture, decoder, request):
    llm = request.getfixturevalue(fixture)
    kw = dict(KW, decoder=decoder, threshold=0.3)
    base = generate(llm, PROMPTS, **kw)
    cached = generate(llm, PROMPTS, cache=D2Cache(**EVERYTHING), **kw)
    assert torch.equal(base.sequences, cached.sequences)
    assert cached.stats.recompute_fraction == 1.0


@pytest.mark.parametrize("fixture", ["llada", "dream"])
@pytest.mark.parametrize("block_boundary", [False, True])
def test_freecache_refreshing_every_step_reproduces_the_uncached_tokens(fixture, block_boundary, request):
    llm = request.getfixturevalue(fixture)
    base = generate(llm, PROMPTS, **KW)
    cached = generate(llm, PROMPTS, cache=FreeCache(block_boundary=block_boundary, refresh_interval=1), **KW)
    assert torch.equal(base.sequences, cached.sequences)


@pytest.mark.parametrize("fixture", ["llada", "dream"])
@pytest.mark.parametrize("spec", [("d2cache", {"current_k": 4}), ("freecache", {"window": 8})])
def test_default_settings_skip_rows_and_each_row_is_batch_independent(fixture, spec, request):
    llm = request.getfixturevalue(fixture)
    name, args = spec
    kw = dict(KW, decoder="certainty")
    batch = generate(llm, PROMPTS, cache=make_policy(name, **args), **kw)
    assert batch.stats.recompute_fraction < 0.8
    for b, p in enumerate(PROMPTS):
        assert generate(llm, [p], cache=make_policy(name, **args), **kw).tokens[0] == batch.tokens[b]


def test_freecache_window_rows(llada):
    """As published: every row at the generation's first step only, then the window from the block
    start (capped at the end) at every step, block starts included; `block_refresh=True` (ours before)
    recomputes every row at each block's first step."""
    P, G, B, layers = max(len(p) for p in PROMPTS), 16, len(PROMPTS), llada.config.n_layers
    full = P + G
    for policy, per_block in [
        (FreeCache(window=12), [[full, 12, 12, 12], [8, 8, 8, 8]]),
        (FreeCache(block_boundary=True), [[full, 8, 8, 8], [8, 8, 8, 8]]),
        (FreeCache(window=12, block_refresh=True), [[full, 12, 12, 12], [full, 8, 8, 8]]),
    ]:
        out = generate(llada, PROMPTS, cache=policy, gen_length=G, steps=8, block_length=8, early_stop=False)
        assert out.stats.position_layers == sum(map(sum, per_block)) * layers * B


def test_published_freecache_keeps_each_finished_blocks_last_step_kv(llada, monkeypatch):
    """At the second block's first step the first block's rows are not recomputed: their K, V are
    those of its last-step forward, which saw the position committed at that step still masked."""
    import dllm_cache.engine as engine
    from dllm_cache.cache.base import FeatureCache
    from dllm_cache.models.transformer import ForwardStats

    caches: list[FeatureCache] = []

    class Recorded(FeatureCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            caches.append(self)

    seen: dict = {}

    class Spy(FreeCache):
        def begin_step(self, state):
            rows = super().begin_step(state)
            if state.block == 1 and state.step_in_block == 0:
                seen["k"], seen["rows"] = [k.clone() for k in caches[0].k], rows
            return rows

    monkeypatch.setattr(engine, "FeatureCache", Recorded)
    P, mask = len(PROMPTS[0]), llada.config.mask_token_id
    kw = dict(gen_length=8, steps=8, block_length=4, record_steps=True)
    out = generate(llada, PROMPTS[:1], cache=Spy(block_boundary=True), **kw)
    assert seen["rows"] is not None and int(seen["rows"].min()) == P + 4  # the new block only
    # a full forward of the sequence as it stood at block 0's last step (before its commit)
    x = out.sequences.clone()
    x[0, P + 4 :] = mask
    x[0, P + out.step_records[3].positions[0][0]] = mask
    # ... and the prompt's K, V are those of step 0 (everything masked)
    x0 = out.sequences.clone()
    x0[0, P:] = mask

    def full_forward_k(seq: torch.Tensor) -> list[torch.Tensor]:
        fresh = FeatureCache(llada.config, 1, P + 8, torch.float32, torch.device("cpu"), store_outputs=False)
        layout = llada.model.layout(torch.ones_like(seq, dtype=torch.bool))
        llada.model.forward_active(seq, layout, fresh, None, None, torch.arange(P + 8)[None], ForwardStats())
        return fresh.k

    last_step, step0 = full_forward_k(x), full_forward_k(x0)
    for layer, k in enumerate(seen["k"]):
        assert torch.allclose(k[:, :, P : P + 4], last_step[layer][:, :, P : P + 4], atol=1e-5)
        assert torch.allclose(k[:, :, :P], step0[layer][:, :, :P], atol=1e-5)


def _density_by_hand(decoded: list[int], sigma: float) -> list[float]:
    """The published definition, summed term by term: the span extended by N positions each side
    (left decoded, right as the last position), an untruncated Gaussian, normalised by its sum over
    the distances [-3N, 3N) of the published FFT canvas."""
    n = len(decoded)
    ext = {j: 1.0 for j in range(-n, 0)} | {j: float(d) for j, d in enumerate(decoded)}
    ext |= {j: float(decoded[-1]) for j in range(n, 2 * n)}

    def g(d: int) -> float:
        return math.exp(-(d**2) / (2 * sigma**2))

    z = sum(g(d) for d in range(-3 * n, 3 * n))
    return [sum(v * g(t - j) for j, v in ext.items()) / z for t in range(n)]


def test_certainty_density_is_the_published_untruncated_gaussian():
    for sigma, decoded in [
        (1.0, [0, 0, 0, 0, 0]),
        (1.0, [1, 0, 0, 0, 1]),
        (1.0, [0, 1, 0, 0, 0]),
        (10.0, [1] * 5 + [0] * 27),  # a 32-token block, sigma 10 (the default)
        (10.0, [1, 0] * 16),
    ]:
        got = certainty_density(torch.tensor([decoded], dtype=torch.bool), sigma)[0].tolist()
        assert got == pytest.approx(_density_by_hand(decoded, sigma), abs=1e-12)
    # The old kernel cut at 3 sigma and renormalised was off by up to ~1e-3 on a block of 32.
    block = torch.tensor([[1] * 5 + [0] * 27], dtype=torch.bool)
    w, offsets = 30, torch.arange(-30, 31, dtype=torch.float64)
    kern = torch.exp(-(offsets**2) / 200)
    padded = torch.cat(
        [torch.ones(w, dtype=torch.float64), block[0].double(), torch.zeros(w, dtype=torch.float64)]
    )
    truncated = torch.nn.functional.conv1d(padded[None, None], (kern / kern.sum())[None, None])[0, 0]
    assert (certainty_density(block, 10.0)[0] - truncated).abs().max() > 5e-4
    nothing = certainty_density(torch.zeros(1, 6, dtype=torch.bool), 1.0)[0]
    assert bool((nothing[:-1] >= nothing[1:]).all())  # the left edge counts as decoded, the right not
    assert certainty_density(torch.ones(1, 6, dtype=torch.bool), 1.0)[0].tolist() == pytest.approx([1.0] * 6)


def test_rollout_importance_and_nucleus_on_a_constructed_attention_map():
    # Two layers, every row computed, 4 positions; every query attends mostly to column 2.
    A = torch.tensor([[0.1, 0.1, 0.7, 0.1]] * 4, dtype=torch.float64)[None]
    real = torch.ones(1, 4, dtype=torch.bool)
    imp = rollout_importance([(None, A), (None, A)], real)
    M = 0.5 * A[0] + 0.5 * torch.eye(4, dtype=torch.float64)
    assert torch.allclose(imp[0], (M @ M).sum(0))
    # Only rows 1 and 3 computed at the last layer: the others contribute identity rows, and the
    # importance sums the columns of the whole product (every row, as published; before, only the
    # last layer's active rows 1 and 3 were summed).
    rows = torch.tensor([[1, 3]])
    imp2 = rollout_importance([(None, A), (rows, A[:, [1, 3]])], real)
    M_last = torch.eye(4, dtype=torch.float64)
    M_last[[1, 3]] = M[[1, 3]]
    assert torch.allclose(imp2[0], (M_last @ M).sum(0))
    # Left padding (row and column 0 here) neither gives nor receives importance.
    pad = torch.tensor([[False, True, True, True]])
    A_pad = torch.tensor([[0.0, 0.2, 0.6, 0.2]] * 4, dtype=torch.float64)[None]
    imp3 = rollout_importance([(None, A_pad)], pad)
    M_pad = 0.5 * A_pad[0] + 0.5 * torch.eye(4, dtype=torch.float64)
    assert torch.allclose(imp3[0], M_pad[1:].sum(0)) and imp3[0, 0] == 0

    # One layer: importance (0.5 + 0.5 * column sums) / 4 = [0.175, 0.175, 0.475, 0.175].
    policy = D2Cache(rollout_p=0.4)
    policy.attention = [(None, A)]
    masked = torch.zeros(1, 4, dtype=torch.bool)
    picked = policy._rollout_rows(masked, torch.zeros_like(masked))
    assert picked.tolist() == [[False, False, True, False]]  # column 2 alone holds >= 40%
    masked[0, 2] = True  # a masked row is never a rollout candidate
    assert int(policy._rollout_rows(masked, torch.zeros_like(masked)).sum()) == 2  # 0.175/0.525 each
    masked[0, 2] = False
    policy.rollout_p = 0.9
    assert policy._rollout_rows(masked, torch.zeros_like(masked))[0, 2]
    assert int(policy._rollout_rows(masked, torch.zeros_like(masked)).sum()) == 4


def test_gap_inflation():
    sel = torch.tensor([[1, 0, 0, 1, 0, 0, 0, 0, 1, 0]], dtype=torch.bool)
    assert inflate(sel, 2).long().tolist() == [[1, 1, 1, 1, 0, 0, 0, 0, 1, 0]]
    assert inflate(sel, 4).long().tolist() == [[1, 1, 1, 1, 1, 1, 1, 1, 1, 0]]
    assert torch.equal(inflate(sel, 0), sel)


def test_d2cache_masked_selection_ranks_the_current_block_first_and_shifts_for_dream():
    B, L, P = 1, 16, 4
    masked = torch.zeros(B, L, dtype=torch.bool)
    masked[:, P:] = True
    state = StepState(1, 1, 0, P, P + 4, P, L, masked, torch.zeros_like(masked), False)
    policy = D2Cache(current_k=6)
    policy.confidence = torch.zeros(B, L, dtype=torch.float64)
    policy.confidence[0, 9:12] = 0.9  # confident rows beyond the current block
    policy.confidence[0, 5] = 0.1
    chosen = policy._masked_rows(state, masked)
    # searched up to the first boundary with >= 6 masked rows (P + 8); all four masked rows of the
    # current block come first, then the best two beyond it (before: only one in-block row was
    # guaranteed, and rows 9, 10, 11 outranked rows 6 and 7)
    assert chosen[0].nonzero().flatten().tolist() == [4, 5, 6, 7, 9, 10]
    policy.current_k = 2
    assert policy._masked_rows(state, masked)[0].nonzero().flatten().tolist() == [4, 5]
    state.shift = True
    assert policy._masked_rows(state, masked)[0].nonzero().flatten().tolist() == [3, 4, 5]


def test_d2cache_needs_a_dynamic_decoder_when_it_skips_masked_rows(llada):
    with pytest.raises(GenerationError, match="dynamic decoder"):
        generate(llada, PROMPTS, cache=D2Cache(current_k=4), **KW)


@pytest.mark.parametrize(
    "name,args,msg",
    [
        ("d2cache", {"rollout_p": 2}, "rollout_p"),
        ("d2cache", {"current_k": 0}, "current_k"),
        ("freecache", {"window": 0}, "window"),
        ("freecache", {"block_boundary": "yes"}, "block_boundary"),
        ("freecache", {"block_refresh": 1}, "block_refresh"),
    ],
)
def test_bad_arguments_are_named(name, args, msg):
    with pytest.raises(GenerationError, match=msg):
        make_policy(name, **args)


# --- Guided Diffusion, on the shipped demo checkpoints (they share one tokenizer) ----------------


@pytest.fixture(scope="module")
def dream_and_guide():
    return load("tiny-dream", dtype="float32"), load("tiny-ar", dtype="float32")


QUESTIONS = ["Tom has 3 apples. He buys 5 more. How many apples does he have now?", "What is 7 + 8?"]


def _ar_greedy(guide: DLLM, prompt: str, n: int) -> list[int]:
    ids = encode_prompt(guide.tokenizer, prompt)
    out: list[int] = []
    for _ in range(n):
        nxt = int(guide.model(torch.tensor([ids + out]))[0, -1].argmax())
        out.append(nxt)
        if nxt in guide.end_token_ids:
            break
    return out


def _always(guide: DLLM) -> GuidedDecoder:
    return GuidedDecoder(guide, agreement=lambda probs, draft: torch.ones_like(draft, dtype=torch.bool))


def test_guided_verifies_32_token_chunks_across_block_boundaries(dream_and_guide):
    llm, guide = dream_and_guide
    # A verifier that always agrees: the first step's drafts of the whole answer (four 16-token
    # blocks) are checked in two 32-token chunks and all committed in one dLLM step (before: one
    # step per block, stopping at each block's end).
    always = _always(guide)
    out = generate(llm, QUESTIONS, decoder=always, gen_length=64, block_length=16, early_stop=False)
    assert out.stats.nfe == 1 and out.stats.guide_nfe == 2 and out.stats.guide_row_nfe == [2, 2]
    # ... and what it commits is the dLLM's own one-step draft of the answer
    draft = generate(
        llm, QUESTIONS, gen_length=64, block_length=64, steps=1, decoder="threshold", threshold=1e-12
    )
    assert torch.equal(out.sequences, draft.sequences)


def test_a_fully_accepted_chunk_leaves_the_ar_cache_equal_to_a_fresh_forward(dream_and_guide):
    """After a step every AR row the decoder counts as cached holds what a plain AR forward of the
    committed tokens computes, so the next-token logits from the cache are the plain forward's."""
    from dllm_cache.models.transformer import ForwardStats

    llm, guide = dream_and_guide
    for gen_length, block in [(40, 8), (64, 32)]:  # a partial last chunk; two full chunks
        always = _always(guide)
        generate(llm, QUESTIONS, decoder=always, gen_length=gen_length, block_length=block, early_stop=False)
        n = always.Pa + gen_length
        assert always.cached_upto.tolist() == [n - 1, n - 1]  # the last row has not been computed
        model, x, layout = guide.model, always.ar_x, always.layout
        fresh = FeatureCache(model.config, 2, n, model.dtype, x.device, store_outputs=False)
        plain = model.forward_active(
            x, layout, fresh, None, None, torch.arange(n).expand(2, n), ForwardStats()
        )
        real = layout.key_mask
        for layer in range(model.config.n_layers):
            for cached, full in [
                (always.cache.k[layer], fresh.k[layer]),
                (always.cache.v[layer], fresh.v[layer]),
            ]:
                diff = (cached[:, :, : n - 1] - full[:, :, : n - 1]).abs().amax((1, 3))
                assert float(diff[real[:, : n - 1]].max()) < 1e-5
        # the last row's logits computed from the cache == the plain forward's
        last = torch.full((2, 1), n - 1)
        from_cache = model.forward_active(x, layout, always.cache, None, last, last, ForwardStats())
        assert torch.allclose(from_cache[:, 0], plain[:, n - 1], atol=1e-4)


def test_topk_relative_takes_its_k_and_ratio_with_the_published_defaults(dream_and_guide):
    probs = torch.tensor([[[0.40, 0.30, 0.12, 0.10, 0.05, 0.03]]], dtype=torch.float64)  # [B, N, V]
    agree = GuidedDecoder(dream_and_guide[1], agreement="topk_relative").agreement
    # defaults top-5, ratio 0.95: only a draft within 95% of the top-1 passes (before: top-2, 0.5)
    assert agree(probs, torch.tensor([[0]])).item() and not agree(probs, torch.tensor([[1]])).item()
    loose = GuidedDecoder(dream_and_guide[1], agreement="topk_relative", top_k=5, ratio=0.25).agreement
    assert [loose(probs, torch.tensor([[t]])).item() for t in range(6)] == [
        True,
        True,
        True,
        True,
        False,
        False,
    ]
    top2 = GuidedDecoder(dream_and_guide[1], agreement="topk_relative", top_k=2, ratio=0.25).agreement
    assert [top2(probs, torch.tensor([[t]])).item() for t in range(4)] == [True, True, False, False]
    with pytest.raises(GenerationError, match="agreement_top_k"):
        GuidedDecoder(dream_and_guide[1], agreement="topk_relative", top_k=0)
    with pytest.raises(GenerationError, match="agreement_ratio"):
        GuidedDecoder(dream_and_guide[1], agreement="topk_relative", ratio=1.5)
    llm, guide = dream_and_guide
    kw = dict(
        gen_length=32, block_length=32, decoder="guided", guide_model="tiny-ar", agreement="topk_relative"
    )
    assert (
        generate(llm, QUESTIONS[:1], agreement_top_k=1, agreement_ratio=0.0, **kw).tokens
        == generate(
            llm, QUESTIONS[:1], decoder="guided", guide_model="tiny-ar", gen_length=32, block_length=32
        ).tokens
    )  # top-1 at any ratio is the deterministic rule


def test_guided_with_a_verifier_that_never_agrees_is_ar_greedy_decoding(dream_and_guide):
    llm, guide = dream_and_guide
    never = GuidedDecoder(guide, agreement=lambda probs, draft: torch.zeros_like(draft, dtype=torch.bool))
    out = generate(llm, QUESTIONS, decoder=never, gen_length=32, block_length=32, record_steps=True)
    for b, q in enumerate(QUESTIONS):
        expected = _ar_greedy(guide, q, 32)
        committed = [rec.positions[b] for rec in out.step_records if rec.positions[b]]
        # one AR token per step until the answer ends (then early stop fills the rest)
        assert all(len(c) == 1 for c in committed[: len(expected) - 1])
        ends = [i for i, t in enumerate(expected) if t in guide.end_token_ids]
        assert out.tokens[b] == (expected[: ends[0]] if ends else expected)
        # one dLLM and one AR pass per step until this row's answer was complete
        assert out.stats.row_nfe[b] == len(committed) == out.stats.guide_row_nfe[b]
    assert out.stats.guide_nfe == out.stats.nfe == max(out.stats.row_nfe)  # one block


def test_guided_decoding_by_name_and_with_a_cache(dream_and_guide):
    llm, guide = dream_and_guide
    base = generate(llm, QUESTIONS, gen_length=32, block_length=32)
    out = generate(llm, QUESTIONS, decoder="guided", guide_model="tiny-ar", gen_length=32, block_length=32)
    assert out.stats.guide_nfe == out.stats.nfe and out.stats.nfe < base.stats.nfe

    # With a cache: the trained pair agrees on these easy answers in a single (full-refresh) step,
    # so a verifier that never agrees makes it take one step per token. What is committed is then
    # the verifier's, so the cached run must give the same tokens while recomputing less.
    def never_agreeing() -> GuidedDecoder:
        return GuidedDecoder(guide, agreement=lambda probs, draft: torch.zeros_like(draft, dtype=torch.bool))

    kw = dict(gen_length=32, block_length=32)
    both = generate(llm, QUESTIONS, decoder=never_agreeing(), cache="freecache", **kw)
    alone = generate(llm, QUESTIONS, decoder=never_agreeing(), **kw)
    assert both.tokens == alone.tokens and all(t for t in both.tokens)
    assert both.stats.nfe > 1 and both.stats.recompute_fraction < 1.0


def test_guided_rejects_incompatible_models(dream_and_guide, llada):
    llm, guide = dream_and_guide
    with pytest.raises(GenerationError, match="not causal"):
        GuidedDecoder(llm)
    with pytest.raises(GenerationError, match="needs tokenizers"):
        generate(llada, PROMPTS, decoder=GuidedDecoder(guide), **KW)
    from conftest import REAL

    other = load_tokenizer(REAL / "dream-v0-instruct-7b")
    with pytest.raises(GenerationError, match="does not share the vocabulary"):
        VocabularyMap(llm, DLLM(guide.model, other, guide.path))
    with pytest.raises(GenerationError, match="needs a guide model"):
        generate(llm, QUESTIONS, decoder="guided", gen_length=32)
    with pytest.raises(GenerationError, match="agreement"):
        GuidedDecoder(guide, agreement="sometimes")


def test_cache_policies_do_not_import_the_decoders():
    """Any cache composes with any decoder: cache/ never imports decoding/; the scoring both use
    lives below them (scoring.py)."""
    import ast
    from pathlib import Path

    import dllm_cache

    root = Path(dllm_cache.__file__).parent
    for path in (root / "cache").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n.startswith("dllm_cache.decoding") for n in names), (path.name, names)
