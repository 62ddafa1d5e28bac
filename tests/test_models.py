"""Checkpoint formats, loading, and the active-rows forward against the full forward."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import PROMPTS, REAL, as_llm

from dllm_cache.cache.base import FeatureCache
from dllm_cache.models import dream, llada
from dllm_cache.models.loading import load_model, read_config
from dllm_cache.models.transformer import ForwardStats, gather_rows


@pytest.mark.parametrize(
    "name,family", [("llada-8b-instruct", llada), ("dream-v0-instruct-7b", dream)], ids=["llada", "dream"]
)
def test_weight_names_match_the_real_release(name, family):
    """Our name map for the real 8B/7B config reproduces every tensor name of the real index, no more."""
    real = REAL / name
    cfg = read_config(real)
    index = json.loads((real / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(family.weight_names(cfg).values()) == set(index)


def test_real_configs_parse():
    cfg = read_config(REAL / "llada-8b-instruct")
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.d_ff, cfg.vocab_size) == (4096, 32, 32, 12288, 126464)
    assert (cfg.mask_token_id, cfg.eos_token_id, cfg.bos_token_id, cfg.max_seq_len) == (
        126336,
        126081,
        126080,
        4096,
    )
    assert not cfg.shift_logits
    cfg = read_config(REAL / "dream-v0-instruct-7b")
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff) == (3584, 28, 28, 4, 18944)
    assert (cfg.mask_token_id, cfg.eos_token_id, cfg.vocab_size) == (151666, 151643, 152064)
    assert cfg.shift_logits and cfg.qkv_bias


def test_sharded_checkpoint_equals_single(llada_dir, llada_sharded_dir):
    index = json.loads((llada_sharded_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    a, b = load_model(llada_dir), load_model(llada_sharded_dir)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert na == nb and torch.equal(pa, pb)


def test_dtype_option(llada_dir):
    model = load_model(llada_dir, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert load_model(llada_dir).dtype == torch.float32  # auto on CPU: fp32


def _batch(model, prompts=PROMPTS, gen=8, mask_id=2):
    P = max(len(p) for p in prompts)
    x = torch.full((len(prompts), P + gen), model.config.pad_token_id)
    attn = torch.zeros_like(x, dtype=torch.bool)
    for b, p in enumerate(prompts):
        x[b, P - len(p) : P] = torch.tensor(p)
        attn[b, P - len(p) :] = True
    x[:, P:] = model.config.mask_token_id
    x[:, P + 2] = 50  # a committed answer token
    return x, attn


class _PerLayer:
    """A per-layer policy with a fixed selection (or all rows)."""

    per_layer = True
    uses_cache = True

    def __init__(self, rows):
        self.rows = rows

    def select(self, layer, view):
        return self.rows


@pytest.mark.parametrize("fixture", ["llada", "dream"])
def test_active_rows_all_rows_is_the_full_forward(fixture, request):
    llm = request.getfixturevalue(fixture)
    model = llm.model
    x, attn = _batch(model)
    B, L = x.shape
    full = model(x, attn)
    layout = model.layout(attn)
    every = torch.arange(L).expand(B, L)
    for cache, policy in [
        (None, None),
        (FeatureCache(model.config, B, L, model.dtype, model.device, False), None),
        (FeatureCache(model.config, B, L, model.dtype, model.device, True), _PerLayer(None)),
    ]:
        out = model.forward_active(x, layout, cache, policy, None, every, ForwardStats())
        torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fixture", ["llada", "dream"])
def test_active_subset_matches_full_forward_rows(fixture, request):
    """With the cache holding this step's features, recomputing a subset gives those rows exactly."""
    model = request.getfixturevalue(fixture).model
    x, attn = _batch(model)
    B, L = x.shape
    full = model(x, attn)
    layout = model.layout(attn)
    subset = torch.tensor([[L - 8, L - 5, L - 1], [3, L - 8, L - 2], [L - 3, L - 2, L - 1]])
    every = torch.arange(L).expand(B, L)
    for per_layer in (False, True):
        cache = FeatureCache(model.config, B, L, model.dtype, model.device, store_outputs=per_layer)
        policy = _PerLayer(None) if per_layer else None
        model.forward_active(x, layout, cache, policy, None, every, ForwardStats())
        stats = ForwardStats()
        if per_layer:
            out = model.forward_active(x, layout, cache, _PerLayer(subset), None, subset, stats)
        else:
            out = model.forward_active(x, layout, cache, None, subset, subset, stats)
        torch.testing.assert_close(out, gather_rows(full, subset), atol=1e-5, rtol=1e-5)
        assert stats.position_layers == model.config.n_layers * subset.numel()


def test_stale_cache_changes_the_output(llada):
    """The cache is really read: stale K/V for the inactive rows give different logits."""
    model = llada.model
    x, attn = _batch(model)
    B, L = x.shape
    layout = model.layout(attn)
    every = torch.arange(L).expand(B, L)
    cache = FeatureCache(model.config, B, L, model.dtype, model.device, store_outputs=False)
    model.forward_active(x, layout, cache, None, None, every, ForwardStats())
    x2 = x.clone()
    x2[:, -8:-4] = 77
    rows = torch.arange(L - 4, L).expand(B, 4)
    stale = model.forward_active(x2, layout, cache, None, rows, rows, ForwardStats())
    fresh = gather_rows(model(x2, attn), rows)
    assert (stale - fresh).abs().max() > 1e-3


def test_padding_does_not_leak(llada):
    """A left-padded row gives the same logits as the prompt alone."""
    model = llada.model
    x, attn = _batch(model)
    alone, attn1 = _batch(model, prompts=[PROMPTS[1]])
    full = model(x, attn)[1, -8:]
    # Logits here are O(10): padding changes only the summation order (fp32 noise ~1e-5).
    torch.testing.assert_close(model(alone, attn1)[0, -8:], full, atol=1e-4, rtol=1e-5)


def test_dream_is_loaded_as_shifted(dream):
    assert dream.config.shift_logits and dream.config.n_kv_heads < dream.config.n_heads


def test_as_llm_roundtrip(llada_dir):
    assert as_llm(llada_dir).model.config.arch == "llada"


def test_real_dream_tokenizer_files_load():
    """Dream ships vocab.json + merges.txt with a custom class name: loaded as Qwen2's byte-level BPE."""
    from dllm_cache.models.tokenizer import encode_prompt, end_token_ids, load_tokenizer

    path = REAL / "dream-v0-instruct-7b"
    tok = load_tokenizer(path)
    cfg = read_config(path)
    assert tok.convert_tokens_to_ids(["<|mask|>", "<|endoftext|>", "<|im_end|>"]) == [151666, 151643, 151645]
    assert end_token_ids(cfg, tok) == [151643, 151645]
    ids = encode_prompt(tok, "Hi there")
    assert tok.decode(ids) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert ids[:1] == [151644]
