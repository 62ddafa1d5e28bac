"""Tiny random checkpoints written in the real release formats (same names and config fields)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dllm_cache.models.loading import DLLM, load_model, save_checkpoint
from dllm_cache.models.random_init import random_model, tiny_config

# The real releases' config, weight-index and tokenizer files (fixtures/real/SOURCES.md).
REAL = Path(__file__).resolve().parent / "fixtures" / "real"

torch.set_num_threads(2)


def write_tiny(tmp: Path, arch: str, sharded: bool = False, **sizes) -> Path:
    # std 0.5 makes random logits peaked enough that greedy choices are not near-ties.
    model = random_model(tiny_config(arch, **sizes), seed=1, std=0.5)
    return save_checkpoint(
        model, tmp / f"{arch}{'-sharded' if sharded else ''}", shard_bytes=40_000 if sharded else None
    )


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ckpts")


@pytest.fixture(scope="session")
def llada_dir(ckpt_dir) -> Path:
    return write_tiny(ckpt_dir, "llada")


@pytest.fixture(scope="session")
def dream_dir(ckpt_dir) -> Path:
    return write_tiny(ckpt_dir, "dream")


@pytest.fixture(scope="session")
def llada_sharded_dir(ckpt_dir) -> Path:
    return write_tiny(ckpt_dir, "llada", sharded=True)


def as_llm(path: Path) -> DLLM:
    return DLLM(load_model(path), None, path)


@pytest.fixture(scope="session")
def llada(llada_dir) -> DLLM:
    return as_llm(llada_dir)


@pytest.fixture(scope="session")
def dream(dream_dir) -> DLLM:
    return as_llm(dream_dir)


PROMPTS = [[5, 17, 33, 60, 9, 12, 40], [7, 8], [100, 101, 102, 103]]
