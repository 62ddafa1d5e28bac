"""Static-shape steps (what a CUDA graph replays) give the eager reference's tokens, for every policy."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS

from dllm_cache.cache import make_policy
from dllm_cache.engine import generate
from dllm_cache.errors import GenerationError
from dllm_cache.models.active import bucket
from dllm_cache.models.step_graphs import pad_rows, step_mode

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
}


def _policy(name: str):
    args, _ = POLICIES[name]
    return make_policy(name.removesuffix("-greedy"), **args)


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
    assert pad_rows(rows, 4).tolist() == [[3, 5, 3, 3], [1, 1, 1, 1]]


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
