"""Feature storage and the cache-policy protocol (docs/architecture.md, "The one mechanism")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from dllm_cache.models.transformer import LayerView, ModelConfig


class FeatureCache:
    """Per layer, for every position of the batch: K, V (after RoPE) and, for per-layer policies,
    the attention and FFN sub-block outputs (what each adds to the residual stream)."""

    def __init__(
        self,
        cfg: ModelConfig,
        batch: int,
        seq_len: int,
        dtype: torch.dtype,
        device: torch.device,
        store_outputs: bool,
    ) -> None:
        kv_shape = (batch, cfg.n_kv_heads, seq_len, cfg.head_dim)
        self.k = [torch.zeros(kv_shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(kv_shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        out_shape = (batch, seq_len, cfg.d_model)
        n_out = cfg.n_layers if store_outputs else 0
        self.attn = [torch.zeros(out_shape, dtype=dtype, device=device) for _ in range(n_out)]
        self.ffn = [torch.zeros(out_shape, dtype=dtype, device=device) for _ in range(n_out)]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v, *self.attn, *self.ffn))


@dataclass
class StepState:
    """What a policy is told at the start of each denoising step.

    Columns are positions of the left-padded sequence: the prompt occupies [0, prompt_end) (pads
    first), the answer [prompt_end, seq_len), the current block [block_start, block_end).
    """

    step: int  # n: forward passes so far in this generation
    step_in_block: int
    block: int
    block_start: int
    block_end: int
    prompt_end: int
    seq_len: int
    masked: Tensor  # [B, L] bool: still masked before this step
    just_committed: Tensor  # [B, L] bool: committed by the previous step
    shift: bool  # Dream: row i-1 predicts position i


class CachePolicy(Protocol):
    """A small object with explicit hyperparameters and per-generation state.

    per_layer: the active set may differ by layer (the full residual stream is carried and attention
    and FFN outputs are cached); otherwise one set of rows is active in the whole network and the
    inactive rows are skipped entirely.
    """

    name: str
    per_layer: bool
    uses_cache: bool

    def begin_step(self, state: StepState) -> Tensor | None:
        """Rows active in the whole network this step ([B, k] sorted indices), None for all rows."""
        ...

    def select(self, layer: int, view: LayerView) -> Tensor | None:
        """Per-layer policies only: the active rows of `layer` (None for all rows)."""
        ...

    def end_step(self, state: StepState) -> None: ...


class NoCache:
    """Every row of every layer is active at every step: the baseline."""

    name = "none"
    per_layer = False
    uses_cache = False

    def begin_step(self, state: StepState) -> Tensor | None:
        return None

    def select(self, layer: int, view: LayerView) -> Tensor | None:
        return None

    def end_step(self, state: StepState) -> None:
        pass

    def describe(self) -> dict:
        return {"name": self.name}


def column_range(batch: int, start: int, end: int, device: torch.device) -> Tensor:
    """Rows [start, end) for every batch row, as a [B, end-start] index tensor."""
    return torch.arange(start, end, device=device).expand(batch, -1)


def rows_from_mask(active: Tensor) -> Tensor:
    """[B, L] bool -> [B, k] sorted row indices, k = the largest count in the batch.

    Rows with fewer active positions repeat their own first active index: recomputing a row twice
    writes the same values, so a row's result never depends on what else is in the batch.
    """
    B, L = active.shape
    counts = active.sum(1)
    k = max(int(counts.max()), 1)
    idx = torch.arange(L, device=active.device).expand(B, L)
    # active positions first (in order), then the rest; take the first k
    order = torch.where(active, idx, idx + L).sort(dim=1).values[:, :k] % L
    first = order[:, :1]
    slot = torch.arange(k, device=active.device).expand(B, k)
    return torch.where(slot < counts[:, None], order, first).sort(dim=1).values


def shifted_left(mask: Tensor) -> Tensor:
    """mask[i + 1] at i: the rows whose logits predict the masked positions (Dream)."""
    out = torch.zeros_like(mask)
    out[:, :-1] = mask[:, 1:]
    return out
