"""A denoising step reads nothing back to the host but once (open blocks, decoder check, row budget).

On a GPU every host read stalls the launch queue; on CPU we count the calls that would: the tensor
methods that return host values (item, tolist, bool(t), int(t), ...) and boolean-mask indexing
(which needs the count of True entries on the host). A step is what lies between two `progress`
calls (the first from the first policy call on).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import PROMPTS

from dllm_cache.cache import make_policy
from dllm_cache.engine import generate

HOST_READS = (
    "item",
    "tolist",
    "cpu",
    "numpy",
    "nonzero",
    "unique",
    "__bool__",
    "__int__",
    "__float__",
    "__index__",
)


@contextlib.contextmanager
def counting_host_reads(monkeypatch: pytest.MonkeyPatch, log: list[str]):
    """Record, while `log` is open (log[0] == "on"), every call that reads a tensor on the host."""

    def wrap(name, original):
        def counted(self, *args, **kwargs):
            if log and log[0] == "on":
                log.append(name)
            return original(self, *args, **kwargs)

        return counted

    def bool_index(index) -> bool:
        items = index if isinstance(index, tuple) else (index,)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)

    getitem, setitem = torch.Tensor.__getitem__, torch.Tensor.__setitem__

    def counted_getitem(self, index):
        if log and log[0] == "on" and bool_index(index):
            log.append("bool-index")
        return getitem(self, index)

    def counted_setitem(self, index, value):
        if log and log[0] == "on" and bool_index(index):
            log.append("bool-index")
        return setitem(self, index, value)

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, wrap(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch.Tensor, "__getitem__", counted_getitem)
    monkeypatch.setattr(torch.Tensor, "__setitem__", counted_setitem)
    yield


def host_reads_per_step(monkeypatch, llm, cache: str, **kw) -> list[list[str]]:
    policy = make_policy(cache) if isinstance(cache, str) else cache
    log: list[str] = []
    steps: list[list[str]] = []
    begin = policy.begin_step

    def begin_step(state):
        log[:] = log or ["on"]  # the loop has started: count from here
        return begin(state)

    def progress(done, total):
        steps.append(log[1:])
        log[:] = ["on"]

    policy.begin_step = begin_step
    with counting_host_reads(monkeypatch, log):
        generate(llm, PROMPTS, cache=policy, progress=progress, **kw)
    log.clear()
    return steps


KW = dict(gen_length=16, steps=16, block_length=8)
CASES = {
    # cache spec: the decoders it runs with (every cache with the family's reference decoder and
    # the parallel ones; d2cache needs a dynamic decoder)
    "none": ["reference", "threshold", "factor", "certainty"],
    "dllm-cache": ["reference", "threshold"],
    "prefix": ["reference", "threshold"],
    "dual": ["reference", "factor"],
    "dkv": ["reference", "threshold"],
    "freecache": ["reference"],
    "d2cache": ["certainty", "threshold"],
    "elastic-cache": ["threshold"],
    "dual-surprise": ["reference", "threshold"],
    "dllm-cache-surprise": ["reference"],
}


@pytest.mark.parametrize("fixture", ["llada", "dream"])
@pytest.mark.parametrize(("cache", "decoder"), [(c, d) for c, ds in CASES.items() for d in ds])
def test_a_step_reads_the_host_once(fixture, cache, decoder, monkeypatch, request):
    llm = request.getfixturevalue(fixture)
    policies = {
        "dllm-cache": lambda: make_policy("dllm-cache", prompt_interval=3, response_interval=2),
        "dkv": lambda: make_policy("dkv", refresh_interval=3),
        "d2cache": lambda: make_policy("d2cache", current_k=4),
        "elastic-cache": lambda: make_policy("elastic-cache", gamma=0.95, window=4, surprise=0.6),
        "dual-surprise": lambda: make_policy("dual", surprise=0.6),
        "dllm-cache-surprise": lambda: make_policy("dllm-cache", prompt_interval=5, surprise=0.6),
    }
    policy = policies.get(cache, lambda: make_policy(cache))()
    kw = dict(KW, decoder=decoder, threshold=0.3)
    steps = host_reads_per_step(monkeypatch, llm, policy, **kw)
    assert steps, "no step ran"
    assert all(reads == ["tolist"] for reads in steps), steps


@pytest.mark.parametrize("variant", ["greedy", "prefill"])
def test_dkv_variants_and_early_commit_read_once(variant, llada, monkeypatch):
    policy = make_policy("dkv", variant=variant, refresh_interval=4)
    steps = host_reads_per_step(monkeypatch, llada, policy, early_commit_margin=0.5, **KW)
    assert all(reads == ["tolist"] for reads in steps), steps


def test_dream_origin_and_cfg_read_once(dream, monkeypatch):
    steps = host_reads_per_step(
        monkeypatch, dream, "dual", alg="origin", temperature=0.5, cfg_scale=1.0, **KW
    )
    assert all(reads == ["tolist"] for reads in steps), steps


def test_reference_ranking_and_dream_alg_temp_read_once(dream, monkeypatch):
    """The reference samplers rank with host-known k and layout (ReferenceRows), sampled positions
    (alg_temp) included: batches of mixed prompt lengths, several blocks, early stop on."""
    for alg in ("entropy", "topk_margin"):
        steps = host_reads_per_step(monkeypatch, dream, "none", alg=alg, alg_temp=0.5, temperature=0.5, **KW)
        assert all(reads == ["tolist"] for reads in steps), steps


def test_the_counter_sees_a_host_read(llada, monkeypatch):
    """The counter itself: a policy that reads the host in its step is caught."""
    policy = make_policy("dual")
    begin = policy.begin_step

    def reading_begin_step(state):
        int(state.masked.sum())
        return begin(state)

    policy.begin_step = reading_begin_step
    steps = host_reads_per_step(monkeypatch, llada, policy, **KW)
    assert all(reads == ["__int__", "tolist"] for reads in steps), steps


def test_guided_decoding_reads_once_per_step_and_chunk(monkeypatch):
    """Guided decoding: the AR verifier's forward has a static row count after the prompt's (one
    count read at the first step), and the host is read again only to decide whether a further
    32-token chunk is verified (never when the span fits one chunk)."""
    from dllm_cache.decoding.guided import GuidedDecoder
    from dllm_cache.models.loading import load

    dream, guide = load("tiny-dream", dtype="float32"), load("tiny-ar", dtype="float32")

    def never_agreeing() -> GuidedDecoder:  # one token per step: many steps
        return GuidedDecoder(guide, agreement=lambda probs, draft: torch.zeros_like(draft, dtype=torch.bool))

    kw = dict(gen_length=8, block_length=8, early_stop=False)
    steps = host_reads_per_step(monkeypatch, dream, "none", decoder=never_agreeing(), **kw)
    assert len(steps) == 8
    assert steps[0] == ["__int__", "tolist"]  # the prompt's rows, counted once
    assert all(reads == ["tolist"] for reads in steps[1:]), steps
    # a span longer than a chunk (34 positions): one more read per step (is a second chunk needed?)
    kw = dict(gen_length=34, block_length=34, early_stop=False)
    steps = host_reads_per_step(monkeypatch, dream, "none", decoder=never_agreeing(), **kw)
    assert all(reads == ["__bool__", "tolist"] for reads in steps[1:]), steps


def test_dream_alg_temp_reads_once(dream, monkeypatch):
    """Sampling which positions to commit (alg_temp) draws for every row at once, on the device."""
    steps = host_reads_per_step(monkeypatch, dream, "dual", alg="entropy", alg_temp=0.5, **KW)
    assert all(reads == ["tolist"] for reads in steps), steps


def test_streaming_and_step_records_read_once(llada, monkeypatch):
    """on_step gets the canvas on the host from the step's one read (what the server streams), and
    record_steps keeps its records on the device until the generation ends."""
    canvases: list[list[list[int]]] = []
    log: list[str] = []
    steps: list[list[str]] = []
    policy = make_policy("dual")
    begin = policy.begin_step

    def begin_step(state):
        log[:] = log or ["on"]
        return begin(state)

    def on_step(event):
        steps.append(log[1:])
        log[:] = ["on"]
        canvases.append(event.tokens)

    policy.begin_step = begin_step
    with counting_host_reads(monkeypatch, log):
        out = generate(llada, PROMPTS, cache=policy, on_step=on_step, record_steps=True, **KW)
    log.clear()
    assert all(reads == ["tolist"] for reads in steps), steps
    assert canvases[-1] == out.sequences[:, -16:].tolist()
    assert len(out.step_records) == len(canvases) and out.step_records[0].positions
