"""Static-shape steps (what a CUDA graph replays) give the eager reference's tokens, for every policy."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS

from dllm_cache.cache import make_policy
from dllm_cache.engine import generate
from dllm_cache.errors import GenerationError
from dllm_cache.models.active import bucket, pad_rows, rows_from_mask, source_rows
from dllm_cache.models.step_graphs import step_mode

KW = dict(gen_length=16, steps=16, block_length=8)
# Every policy at its default (approximate) settings, at settings that exercise its branches, and
# with the decoders it needs.
POLICIES = {
    "none": (dict(), "reference"),
    "dllm-cache": (dict(prompt_interval=3, response_interval=2), "reference"),
    "prefix": (dict(), "reference"),
    "dual": (dict(), "threshold"),
    "dkv": (dict(refresh_interval=3), "reference"),
    "dkv-greedy": (dict(variant="greedy", refresh_interval=5), "threshold"),
    "freecache": (dict(window=12), "reference"),
    "d2cache": (dict(current_k=4, rollout_p=0.5), "certainty"),
    "elastic-cache": (dict(gamma=0.95, window=4), "threshold"),
    "dual-surprise": (dict(surprise=0.6), "threshold"),
    "dllm-cache-surprise": (dict(prompt_interval=5, surprise=0.6), "reference"),
}


def _policy(name: str):
    args, _ = POLICIES[name]
    return make_policy(name.removesuffix("-greedy").removesuffix("-surprise"), **args)


@pytest.mark.parametrize("fixture", ["llada", "dream"])
@pytest.mark.parametrize("name", list(POLICIES))
def test_static_shapes_give_the_eager_tokens(fixture, name, request):
    llm = request.getfixturevalue(fixture)
    kw = dict(KW, decoder=POLICIES[name][1], threshold=0.3)
    eager = generate(llm, PROMPTS, cache=_policy(name), graphs=False, **kw)
    static = generate(llm, PROMPTS, cache=_policy(name), graphs="static", **kw)
    assert torch.equal(eager.sequences, static.sequences)
    assert static.stats.nfe == eager.stats.nfe
    # padding to a bucket computes rows again, never fewer
    assert static.stats.position_layers >= eager.stats.position_layers


def test_static_steps_use_few_shapes(llada, monkeypatch):
    """dKV's active set changes size at every step; padded to buckets it takes a handful of shapes."""
    model = llada.model
    forward_active = model.forward_active
    seen: dict[str, set] = {"eager": set(), "static": set()}
    mode = ["eager"]

    def recording(x, layout, cache, policy, rows, logit_rows, stats):
        seen[mode[0]].add(None if rows is None else rows.shape[1])
        return forward_active(x, layout, cache, policy, rows, logit_rows, stats)

    monkeypatch.setattr(model, "forward_active", recording)
    kw = dict(gen_length=32, steps=32, block_length=32)
    generate(llada, PROMPTS, cache=make_policy("dkv", refresh_interval=100), graphs=False, **kw)
    mode[0] = "static"
    generate(llada, PROMPTS, cache=make_policy("dkv", refresh_interval=100), graphs="static", **kw)
    sizes = {k for k in seen["static"] if k is not None}
    assert len(sizes) < len({k for k in seen["eager"] if k is not None})
    L = max(len(p) for p in PROMPTS) + 32
    assert all(k == bucket(k, L) for k in sizes)


def test_buckets_and_padding():
    assert [bucket(k, 1000) for k in (1, 8, 9, 13, 17, 33, 49, 65, 100)] == [
        8,
        8,
        12,
        16,
        24,
        48,
        64,
        96,
        128,
    ]
    assert bucket(300, 280) == 280  # never beyond the sequence
    rows = torch.tensor([[3, 5], [1, 1]])
    assert pad_rows(rows, 4, 9).tolist() == [[3, 5, 9, 9], [1, 1, 9, 9]]  # 9: the scratch slot
    assert source_rows(pad_rows(rows, 4, 9), 9).tolist() == [[3, 5, 3, 3], [1, 1, 1, 1]]
    active = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    assert rows_from_mask(active).tolist() == [[1, 2], [2, 4], [4, 4]]
    assert source_rows(rows_from_mask(active), 4).tolist() == [[1, 2], [2, 2], [3, 3]]


def test_graph_modes_are_checked(llada):
    assert step_mode(True, torch.device("cpu")) == "eager"
    assert step_mode("off", torch.device("cuda")) == "eager"
    assert step_mode(True, torch.device("cuda")) == "cuda-graph"
    with pytest.raises(GenerationError, match="needs a CUDA device"):
        generate(llada, PROMPTS, graphs="cuda-graph", **KW)
    with pytest.raises(GenerationError, match="graphs must be"):
        generate(llada, PROMPTS, graphs="fast", **KW)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("name", list(POLICIES))
def test_cuda_graphs_give_the_eager_tokens(llada_dir, name):
    from dllm_cache.models.loading import DLLM, load_model

    llm = DLLM(load_model(llada_dir, device=torch.device("cuda")), None, llada_dir)
    kw = dict(KW, decoder=POLICIES[name][1], threshold=0.3)
    eager = generate(llm, PROMPTS, cache=_policy(name), graphs=False, **kw)
    graphs = generate(llm, PROMPTS, cache=_policy(name), graphs="cuda-graph", **kw)
    assert torch.equal(eager.sequences, graphs.sequences)


@pytest.mark.parametrize("fixture", ["llada", "dream"])
def test_padding_writes_only_the_scratch_slot(fixture, request):
    """A bucket's padding rows give the unpadded forward's logits and features, and write nothing
    but the scratch slot: rows a step did not choose keep their cached values (a batch row with no
    active row at all included)."""
    from dllm_cache.models.active import FeatureCache, ForwardStats

    model = request.getfixturevalue(fixture).model
    B, L = 3, 24
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(3, model.config.vocab_size - 8, (B, L), generator=gen)
    attn = torch.ones(B, L, dtype=torch.bool)
    attn[1, :5] = False
    layout = model.layout(attn)
    chosen = torch.zeros(B, L, dtype=torch.bool)
    chosen[0, [4, 9, 20]] = True
    chosen[1, [21]] = True  # fewer rows than row 0: padded within the batch
    rows = rows_from_mask(chosen)  # row 2 has none: every slot is padding
    assert rows.tolist() == [[4, 9, 20], [21, L, L], [L, L, L]]
    logit_rows = torch.tensor([[4, 9, 20], [21, 21, 21], [0, 1, 2]])

    def run(rows_in):
        cache = FeatureCache(model.config, B, L, model.dtype, model.device, store_outputs=False)
        for t in cache.slots["k"] + cache.slots["v"]:
            t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(1)))
        before = [t.clone() for t in cache.slots["k"] + cache.slots["v"]]
        out = model.forward_active(x, layout, cache, None, rows_in, logit_rows, ForwardStats())
        return out, cache, before

    eager, cache, before = run(rows)
    padded, padded_cache, _ = run(pad_rows(rows, bucket(rows.shape[1], L), L))
    assert padded_cache.slots["k"][0].shape[2] == L + 1
    real = torch.isfinite(eager[..., 0])
    assert real.tolist() == [[True] * 3, [True] * 3, [False] * 3]  # row 2 computed nothing
    # (matmuls of another row count may round differently: tokens are compared in the tests above)
    torch.testing.assert_close(padded[real], eager[real], atol=1e-5, rtol=1e-5)
    for old, new, new_padded in zip(
        before,
        cache.slots["k"] + cache.slots["v"],
        padded_cache.slots["k"] + padded_cache.slots["v"],
        strict=True,
    ):
        torch.testing.assert_close(new[:, :, :L], new_padded[:, :, :L], atol=1e-5, rtol=1e-5)
        untouched = ~chosen
        assert torch.equal(new[:, :, :L].transpose(1, 2)[untouched], old[:, :, :L].transpose(1, 2)[untouched])
        assert not torch.equal(new_padded[:, :, L], old[:, :, L])  # the padding went to the scratch slot


@pytest.mark.parametrize("name", ["dllm-cache", "dkv", "d2cache"])
def test_buffers_are_reused_across_generations(llada, name):
    """A second generate() with the same policy settings and shapes takes the first one's buffers
    (and, on CUDA, its graphs): new prompts in old buffers still give the eager tokens."""
    from dllm_cache.models import step_graphs

    llada.model.__dict__.pop("_step_forwards", None)
    kw = dict(KW, decoder=POLICIES[name][1], threshold=0.3)
    others = [[9, 8, 7, 6, 5, 4, 3], [11, 12, 13], [200, 201]]  # the same padded length
    for prompts in (PROMPTS, others):
        static = generate(llada, prompts, cache=_policy(name), graphs="static", **kw)
        eager = generate(llada, prompts, cache=_policy(name), graphs=False, **kw)
        assert torch.equal(static.sequences, eager.sequences)
    (forward,) = step_graphs._pool(llada.model).values()
    assert forward.generations == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graphs_are_captured_once_across_generations(llada_dir):
    from dllm_cache.models import step_graphs
    from dllm_cache.models.loading import DLLM, load_model

    llm = DLLM(load_model(llada_dir, device=torch.device("cuda")), None, llada_dir)
    generate(llm, PROMPTS, cache=_policy("dkv"), graphs="cuda-graph", **KW)
    (forward,) = step_graphs._pool(llm.model).values()
    captured = len(forward.graphs)
    again = generate(llm, PROMPTS, cache=_policy("dkv"), graphs="cuda-graph", **KW)
    assert len(forward.graphs) == captured and forward.generations == 2
    eager = generate(llm, PROMPTS, cache=_policy("dkv"), graphs=False, **KW)
    assert torch.equal(again.sequences, eager.sequences)


def _can_compile() -> bool:
    import shutil

    return shutil.which("cc") is not None or shutil.which("gcc") is not None


@pytest.mark.skipif(not _can_compile(), reason="torch.compile's CPU backend needs a C compiler (none found)")
def test_compiled_pointwise_gives_the_eager_tokens(llada):
    """--compile (RMSNorm, RoPE, SwiGLU fused by torch.compile) gives eager's tokens; the model is
    back to eager afterwards. (Compiling the three parts takes ~30-50 s on 2 CPU cores.)"""
    from torch._dynamo.utils import counters

    from dllm_cache.models.transformer import EAGER

    kw = dict(KW, decoder="threshold", threshold=0.3)
    eager = generate(llada, PROMPTS, cache=_policy("dual"), graphs=False, **kw)
    counters.clear()
    compiled = generate(llada, PROMPTS, cache=_policy("dual"), graphs="static", compile=True, **kw)
    assert torch.equal(eager.sequences, compiled.sequences)
    assert counters["stats"]["calls_captured"] > 0  # the compiled kernels really ran
    assert llada.model.final_norm.ops is EAGER and llada.model.blocks[0].ops is EAGER


def test_guided_static_ar_forward_gives_the_eager_tokens():
    """Guided decoding's AR verifier on the static path (bucketed rows, static buffers: what a CUDA
    graph replays) commits what the eager verifier commits."""
    from dllm_cache.decoding.guided import GuidedDecoder
    from dllm_cache.models.loading import load

    dream, guide = load("tiny-dream", dtype="float32"), load("tiny-ar", dtype="float32")
    questions = ["What is 7 + 8?", "Tom has 3 apples. He buys 5 more. How many apples does he have now?"]
    kw = dict(gen_length=24, block_length=24, cache=_policy("dual"), graphs=False)
    eager = generate(dream, questions, decoder=GuidedDecoder(guide, graphs=False, chunk=8), **kw)
    static = generate(dream, questions, decoder=GuidedDecoder(guide, graphs="static", chunk=8), **kw)
    assert torch.equal(eager.sequences, static.sequences)
    assert static.stats.guide_nfe == eager.stats.guide_nfe > 1
