"""Dream (Dream-v0-Base/-Instruct-7B, Dream-Coder) and its Qwen2 autoregressive twin.

Dream is a Qwen2-style transformer (grouped-query attention, q/k/v biases) without a causal mask that
keeps the AR convention: the token at position i is predicted by the logits at position i-1
("shifted logits"). A Qwen2/Qwen2.5 checkpoint has the same weight names; with a causal mask and no
shift it is the small autoregressive guide (model_type "qwen2").
"""

from __future__ import annotations

from typing import Any

from dllm_cache.models.config import ModelConfig

MODEL_TYPES = {"Dream": "dream", "dream": "dream", "qwen2": "qwen2"}

REQUIRED_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
)


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    arch = MODEL_TYPES[raw["model_type"]]
    n_heads = raw["num_attention_heads"]
    eos = raw.get("eos_token_id", 151643)
    if isinstance(eos, list):
        eos = eos[0]
    return ModelConfig(
        arch=arch,
        vocab_size=raw["vocab_size"],
        d_model=raw["hidden_size"],
        n_layers=raw["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=raw.get("num_key_value_heads") or n_heads,
        d_ff=raw["intermediate_size"],
        rope_theta=float(raw.get("rope_theta", 1e6)),
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        qkv_bias=True,
        max_seq_len=raw.get("max_position_embeddings", 32768),
        mask_token_id=raw.get("mask_token_id") if arch == "dream" else None,
        eos_token_id=eos,
        pad_token_id=raw.get("pad_token_id", eos) if raw.get("pad_token_id") is not None else eos,
        bos_token_id=raw.get("bos_token_id"),
        causal=arch == "qwen2",
        shift_logits=arch == "dream",
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
    )


def weight_names(cfg: ModelConfig) -> dict[str, str]:
    """Our parameter name -> checkpoint tensor name."""
    names = {"embed.weight": "model.embed_tokens.weight", "final_norm.weight": "model.norm.weight"}
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    ours_to_theirs = {
        "attn_norm.weight": "input_layernorm.weight",
        "q_proj.weight": "self_attn.q_proj.weight",
        "q_proj.bias": "self_attn.q_proj.bias",
        "k_proj.weight": "self_attn.k_proj.weight",
        "k_proj.bias": "self_attn.k_proj.bias",
        "v_proj.weight": "self_attn.v_proj.weight",
        "v_proj.bias": "self_attn.v_proj.bias",
        "o_proj.weight": "self_attn.o_proj.weight",
        "ffn_norm.weight": "post_attention_layernorm.weight",
        "gate_proj.weight": "mlp.gate_proj.weight",
        "up_proj.weight": "mlp.up_proj.weight",
        "down_proj.weight": "mlp.down_proj.weight",
    }
    for i in range(cfg.n_layers):
        for ours, theirs in ours_to_theirs.items():
            names[f"blocks.{i}.{ours}"] = f"model.layers.{i}.{theirs}"
    return names


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """config.json for a checkpoint we write, in the released field layout."""
    is_dream = cfg.arch == "dream"
    out: dict[str, Any] = {
        "architectures": ["DreamModel" if is_dream else "Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": cfg.bos_token_id if cfg.bos_token_id is not None else cfg.eos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "hidden_act": "silu",
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "max_position_embeddings": cfg.max_seq_len,
        "model_type": "Dream" if is_dream else "qwen2",
        "num_attention_heads": cfg.n_heads,
        "num_hidden_layers": cfg.n_layers,
        "num_key_value_heads": cfg.n_kv_heads,
        "pad_token_id": cfg.pad_token_id,
        "rms_norm_eps": cfg.norm_eps,
        "rope_scaling": None,
        "rope_theta": cfg.rope_theta,
        "sliding_window": None,
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_sliding_window": False,
        "vocab_size": cfg.vocab_size,
    }
    if is_dream:
        out["mask_token_id"] = cfg.mask_token_id
    return out
