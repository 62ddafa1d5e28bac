"""LLaDA (LLaDA-8B-Base/-Instruct, LLaDA-1.5): a Llama-style transformer without a causal mask.

Logits at position i predict position i itself. Checkpoint names follow the OLMo-derived release:
`model.transformer.{wte, blocks.{i}.*, ln_f, ff_out}`.
"""

from __future__ import annotations

from typing import Any

from dllm_cache.models.config import ModelConfig

MODEL_TYPE = "llada"

# config.json fields the loader requires (the rest have the released defaults).
REQUIRED_FIELDS = ("d_model", "n_layers", "n_heads", "vocab_size")


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    n_heads = raw["n_heads"]
    vocab = raw.get("embedding_size") or raw["vocab_size"]
    eos = raw.get("eos_token_id", 126081)
    return ModelConfig(
        arch="llada",
        vocab_size=vocab,
        d_model=raw["d_model"],
        n_layers=raw["n_layers"],
        n_heads=n_heads,
        n_kv_heads=raw.get("n_kv_heads") or n_heads,
        d_ff=raw.get("mlp_hidden_size") or raw.get("mlp_ratio", 4) * raw["d_model"],
        rope_theta=float(raw.get("rope_theta", 10000.0)),
        norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
        qkv_bias=bool(raw.get("include_qkv_bias", False) or raw.get("include_bias", False)),
        max_seq_len=raw.get("max_sequence_length", 4096),
        mask_token_id=raw.get("mask_token_id", 126336),
        eos_token_id=eos,
        pad_token_id=raw.get("pad_token_id", eos),
        bos_token_id=raw.get("bos_token_id"),
        tie_embeddings=bool(raw.get("weight_tying", False)),
    )


def weight_names(cfg: ModelConfig) -> dict[str, str]:
    """Our parameter name -> checkpoint tensor name."""
    p = "model.transformer."
    names = {"embed.weight": p + "wte.weight", "final_norm.weight": p + "ln_f.weight"}
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = p + "ff_out.weight"
    ours_to_theirs = {
        "attn_norm": "attn_norm",
        "q_proj": "q_proj",
        "k_proj": "k_proj",
        "v_proj": "v_proj",
        "o_proj": "attn_out",
        "ffn_norm": "ff_norm",
        "gate_proj": "ff_proj",  # silu is applied to ff_proj
        "up_proj": "up_proj",
        "down_proj": "ff_out",
    }
    for i in range(cfg.n_layers):
        for ours, theirs in ours_to_theirs.items():
            names[f"blocks.{i}.{ours}.weight"] = f"{p}blocks.{i}.{theirs}.weight"
        if cfg.qkv_bias:
            for proj in ("q_proj", "k_proj", "v_proj"):
                names[f"blocks.{i}.{proj}.bias"] = f"{p}blocks.{i}.{proj}.bias"
    return names


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """config.json for a checkpoint we write (tests, demo models), in the released field layout."""
    return {
        "activation_type": "silu",
        "alibi": False,
        "architectures": ["LLaDAModelLM"],
        "attention_layer_norm": False,
        "block_type": "llama",
        "d_model": cfg.d_model,
        "embedding_size": cfg.vocab_size,
        "eos_token_id": cfg.eos_token_id,
        "flash_attention": False,
        "include_bias": False,
        "include_qkv_bias": cfg.qkv_bias,
        "layer_norm_type": "rms",
        "mask_token_id": cfg.mask_token_id,
        "max_sequence_length": cfg.max_seq_len,
        "mlp_hidden_size": cfg.d_ff,
        "model_type": MODEL_TYPE,
        "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.n_kv_heads,
        "n_layers": cfg.n_layers,
        "pad_token_id": cfg.pad_token_id,
        "rms_norm_eps": cfg.norm_eps,
        "rope": True,
        "rope_full_precision": True,
        "rope_theta": cfg.rope_theta,
        "vocab_size": cfg.vocab_size,
        "weight_tying": cfg.tie_embeddings,
    }
