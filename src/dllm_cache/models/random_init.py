"""Small randomly initialised models in each family's format (tests, benchmarks, `init-random`)."""

from __future__ import annotations

import torch

from dllm_cache.models.config import ModelConfig
from dllm_cache.models.transformer import Transformer

# Special-token ids of the tiny models sit at the start of the vocabulary, as in the demo tokenizers.
TINY_IDS = {
    "llada": {"eos": 0, "bos": 1, "mask": 2},
    "dream": {"eos": 0, "bos": 0, "mask": 4},
    "qwen2": {"eos": 0, "bos": 0, "mask": None},
}


def tiny_config(
    arch: str = "llada",
    vocab_size: int = 256,
    d_model: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int | None = None,
    d_ff: int = 128,
    max_seq_len: int = 512,
) -> ModelConfig:
    ids = TINY_IDS[arch]
    return ModelConfig(
        arch=arch,
        vocab_size=vocab_size,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads or (n_heads if arch == "llada" else max(1, n_heads // 2)),
        d_ff=d_ff,
        rope_theta=10000.0,
        norm_eps=1e-5 if arch == "llada" else 1e-6,
        qkv_bias=arch != "llada",
        max_seq_len=max_seq_len,
        mask_token_id=ids["mask"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["eos"],
        bos_token_id=ids["bos"],
        causal=arch == "qwen2",
        shift_logits=arch == "dream",
    )


def init_weights(model: Transformer, seed: int = 0, std: float = 0.02) -> Transformer:
    """Normal(0, std) matrices and biases, unit norms; deterministic per seed (and device).

    The generator lives on the parameters' device: a CPU generator cannot fill CUDA tensors, and
    filling 8B parameters on the GPU is what makes the large-shape benchmarks quick to start."""
    gens: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                if p.device not in gens:
                    gens[p.device] = torch.Generator(device=p.device).manual_seed(seed)
                p.normal_(0.0, std, generator=gens[p.device])
    return model


def random_model(
    cfg: ModelConfig,
    seed: int = 0,
    std: float = 0.02,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> Transformer:
    """The architecture with random weights, allocated and drawn directly on `device` in `dtype`
    (an 8B-shape model never passes through CPU memory in fp32)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    if dtype is not None:
        model = model.to(dtype=dtype)
    model = model.to_empty(device=device)
    if cfg.tie_embeddings:  # to_empty gives each module its own tensor
        model.lm_head.weight = model.embed.weight
    return init_weights(model, seed, std)
