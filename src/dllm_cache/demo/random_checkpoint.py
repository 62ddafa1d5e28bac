"""`dllm-cache init-random`: a small random checkpoint with a real (demo) tokenizer, in HF format."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from dllm_cache.demo.tasks import generate_problems, training_corpus
from dllm_cache.demo.tokenizer import save_tokenizer, special_token_ids, train_tokenizer
from dllm_cache.errors import DllmCacheError
from dllm_cache.models.loading import save_checkpoint
from dllm_cache.models.random_init import random_model, tiny_config

ARCHES = ("llada", "dream", "qwen2")


def write_random_checkpoint(
    arch: str, out: str | Path, n_layers: int = 2, d_model: int = 64, n_heads: int = 4, seed: int = 0
) -> Path:
    if arch not in ARCHES:
        raise DllmCacheError(f"unknown arch {arch!r} (choose {', '.join(ARCHES)})")
    if d_model % n_heads or (d_model // n_heads) % 2:
        raise DllmCacheError(f"d_model {d_model} must split into {n_heads} heads of even size")
    family = "llada" if arch == "llada" else "dream"
    tok = train_tokenizer(training_corpus(generate_problems(300, "train", seed)), family, vocab_size=1536)
    ids = special_token_ids(tok, family)
    vocab = -(-len(tok) // 64) * 64  # padded like the real checkpoints' embedding tables
    cfg = tiny_config(
        arch, vocab_size=vocab, d_model=d_model, n_layers=n_layers, n_heads=n_heads, d_ff=2 * d_model
    )
    cfg = dataclasses.replace(
        cfg,
        mask_token_id=ids["mask"] if arch != "qwen2" else None,
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
        bos_token_id=ids["bos"],
    )
    path = save_checkpoint(random_model(cfg, seed=seed), out)
    save_tokenizer(tok, path)
    return path
