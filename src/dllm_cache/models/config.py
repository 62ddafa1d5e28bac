"""Family-independent model hyperparameters (the bottom of the house: everything else reads these)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelConfig:
    """Family-independent hyperparameters (parsed from each family's config.json)."""

    arch: str  # "llada" | "dream" | "qwen2"
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    rope_theta: float
    norm_eps: float
    qkv_bias: bool
    max_seq_len: int
    mask_token_id: int | None
    eos_token_id: int
    pad_token_id: int
    bos_token_id: int | None = None
    causal: bool = False  # the AR guide; dLLMs attend bidirectionally
    shift_logits: bool = False  # Dream: logits at i-1 predict token i
    tie_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def linear_params_per_layer(self) -> int:
        d, kv = self.d_model, self.n_kv_heads * self.head_dim
        return d * d * 2 + d * kv * 2 + 3 * d * self.d_ff
