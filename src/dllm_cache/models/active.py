"""The active-rows contract: what the transformer's cached forward and the cache policies share.

The model (models/transformer.py) reads it to run a denoising forward; the policies (cache/) and the
engine write it. It sits below both so neither imports the other:

- `FeatureCache`: per layer K, V (and for per-layer policies the attention/FFN outputs) of every row;
- `StepState`: what a policy is told at the start of each denoising step;
- `CachePolicy`: the protocol (whole-network rows from `begin_step`, per-layer rows from `select`);
- `LayerView`: what a per-layer policy may look at before choosing a layer's rows;
- `ForwardStats`: what was computed, counted from the shapes (device counts are added without a
  host read and read once at the end);
- row-index helpers (`gather_rows`, `scatter_rows`, `column_range`, `rows_from_mask`, `shifted_left`),
  the scratch slot padding rows write into (`pad_rows`, `source_rows`) and the static-shape buckets
  (`bucket`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from dllm_cache.models.config import ModelConfig


class FeatureCache:
    """Per layer, for every position of the batch: K, V (after RoPE) and, for per-layer policies,
    the attention and FFN sub-block outputs (what each adds to the residual stream).

    Each tensor has one extra row past the sequence, the scratch slot (index `seq_len`): padding
    rows (`rows_from_mask`, a step's static-shape bucket) write there and nothing reads it. `k`, `v`,
    `attn`, `ffn` are views of the real rows (what attention and the policies read); `write` takes
    row indices that may name the scratch slot.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        batch: int,
        seq_len: int,
        dtype: torch.dtype,
        device: torch.device,
        store_outputs: bool,
    ) -> None:
        self.seq_len = seq_len
        kv_shape = (batch, cfg.n_kv_heads, seq_len + 1, cfg.head_dim)
        out_shape = (batch, seq_len + 1, cfg.d_model)
        n_out = cfg.n_layers if store_outputs else 0
        self.slots = {
            "k": [torch.zeros(kv_shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)],
            "v": [torch.zeros(kv_shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)],
            "attn": [torch.zeros(out_shape, dtype=dtype, device=device) for _ in range(n_out)],
            "ffn": [torch.zeros(out_shape, dtype=dtype, device=device) for _ in range(n_out)],
        }
        self.k = [t[:, :, :seq_len] for t in self.slots["k"]]
        self.v = [t[:, :, :seq_len] for t in self.slots["v"]]
        self.attn = [t[:, :seq_len] for t in self.slots["attn"]]
        self.ffn = [t[:, :seq_len] for t in self.slots["ffn"]]

    def write(self, name: str, layer: int, rows: Tensor | None, src: Tensor) -> None:
        """Rows `rows` ([B, k], None = all real rows; index seq_len = the scratch slot) of `name`
        (k, v, attn, ffn) at `layer` = src."""
        dim = 2 if name in ("k", "v") else 1
        if rows is None:
            getattr(self, name)[layer].copy_(src)
        else:
            scatter_rows(self.slots[name][layer], rows, src, dim=dim)

    def zero_(self) -> None:
        for tensors in self.slots.values():
            for t in tensors:
                t.zero_()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in self.slots.values() for t in ts)


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
    # Host-known upper bound on the rows a data-dependent policy (dkv, d2cache) may choose this step,
    # from the engine's one host read of the previous step (see `CachePolicy.row_bound`); None: the
    # policy counts for itself (a host read of its own).
    # (A policy whose `row_bound` returns several numbers gets them back as a tuple.)
    row_budget: int | tuple[int, ...] | None = None


class CachePolicy(Protocol):
    """A small object with explicit hyperparameters and per-generation state.

    per_layer: the active set may differ by layer (the full residual stream is carried and attention
    and FFN outputs are cached); otherwise one set of rows is active in the whole network and the
    inactive rows are skipped entirely.

    Optional: `row_bound(masked, just_committed) -> Tensor` (a device scalar, called after `end_step`
    with the next step's masks): an upper bound on the rows the next `begin_step` will choose. The
    engine reads it with the step's other host facts and hands it back as `StepState.row_budget`, so
    the selection itself needs no host read (a 1-D tensor of several such facts comes back as a tuple).
    `graph_key() -> tuple` (per-layer policies): what, besides shapes, changes the work of the coming
    forward (e.g. which refreshes are due). `observe_attention(layer, rows, probs)`: the head-averaged
    attention probabilities of each layer's active queries. `observe_confidence(positions,
    confidence)`: the top probability at each predicted position, after the forward.
    `hidden_logits(positions) -> Tensor` ([B, r] bool): predicted positions the decoder may not commit
    this step (outside a policy's prediction window; a dynamic decoder is then required).
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


@dataclass
class ForwardStats:
    """Counted from the shapes actually computed (docs/architecture.md, "Stats")."""

    forwards: int = 0
    position_layers: int = 0  # sum over layers of rows recomputed (x batch)
    position_layers_total: int = 0  # what full forwards would have computed
    flops: float = 0.0  # host-known part
    device_flops: Tensor | None = None  # data-dependent part, summed on the device (no host read)

    def add_device_flops(self, flops: Tensor) -> None:
        if self.device_flops is None:
            self.device_flops = torch.zeros((), dtype=torch.float64, device=flops.device)
        self.device_flops.add_(flops)

    def total_flops(self) -> float:
        """All FLOPs counted; reads the device part (once, at the end of a generation)."""
        return self.flops + (float(self.device_flops) if self.device_flops is not None else 0.0)


class LayerView:
    """What a per-layer policy may look at before choosing the layer's active rows."""

    def __init__(self, block: nn.Module, layer: int, h: Tensor, cache: FeatureCache, stats: ForwardStats):
        self.block, self.layer, self.h, self.cache, self.stats = block, layer, h, cache, stats

    def values(self, rows: Tensor) -> Tensor:
        """Fresh V [B, Hkv, k, hd] for `rows` from this layer's current input (norm + v_proj only)."""
        self.stats.flops += 2 * self.block.v_proj.weight.numel() * rows.numel()
        return self.block.values(gather_rows(self.h, rows))


def gather_rows(t: Tensor, rows: Tensor | None, dim: int = 1) -> Tensor:
    """t[b, rows[b]] along `dim` (1 for [B, L, ...], 2 for [B, H, L, hd])."""
    if rows is None:
        return t
    shape = [1] * t.dim()
    shape[0], shape[dim] = rows.shape
    idx = rows.view(shape).expand(*t.shape[:dim], rows.shape[1], *t.shape[dim + 1 :])
    return t.gather(dim, idx)


def scatter_rows(dst: Tensor, rows: Tensor | None, src: Tensor, dim: int = 1) -> None:
    """dst[b, rows[b]] = src in place (the whole tensor when rows is None)."""
    if rows is None:
        dst.copy_(src)
        return
    shape = [1] * dst.dim()
    shape[0], shape[dim] = rows.shape
    idx = rows.view(shape).expand(*dst.shape[:dim], rows.shape[1], *dst.shape[dim + 1 :])
    dst.scatter_(dim, idx, src)


def column_range(batch: int, start: int, end: int, device: torch.device) -> Tensor:
    """Rows [start, end) for every batch row, as a [B, end-start] index tensor."""
    return torch.arange(start, end, device=device).expand(batch, -1)


def rows_from_mask(active: Tensor, k: int | None = None) -> Tensor:
    """[B, L] bool -> [B, k] sorted row indices; k = the largest count in the batch (a host read)
    unless given (it must be at least that count; `StepState.row_budget`).

    Rows with fewer active positions are padded with L, the scratch slot (`FeatureCache`): a padding
    slot computes a copy of its batch row's first active row (`source_rows`) and writes into the
    scratch slot, which nothing reads, so a row's result never depends on what else is in the batch
    and no real row is written that was not chosen.
    """
    B, L = active.shape
    counts = active.sum(1)
    if k is None:
        k = int(counts.max())
    k = min(max(k, 1), L)
    idx = torch.arange(L, device=active.device).expand(B, L)
    # active positions first (in order), then the rest; take the first k
    order = torch.where(active, idx, idx + L).sort(dim=1).values[:, :k]
    return torch.where(order < L, order, L)


def pad_rows(rows: Tensor, k: int, seq_len: int) -> Tensor:
    """[B, r] -> [B, k] (k >= r): the extra slots name the scratch slot (index seq_len)."""
    extra = k - rows.shape[1]
    return rows if extra <= 0 else torch.cat([rows, rows.new_full((rows.shape[0], extra), seq_len)], dim=1)


def source_rows(rows: Tensor, seq_len: int) -> Tensor:
    """The row each slot computes from: itself, or for a scratch slot (index seq_len) its batch
    row's first real row (rows are sorted, so the first; any real row if it has none): real inputs,
    finite results, written where nothing reads them."""
    first = rows[:, :1].clamp(max=seq_len - 1)
    return torch.where(rows < seq_len, rows, first)


def shifted_left(mask: Tensor) -> Tensor:
    """mask[i + 1] at i: the rows whose logits predict the masked positions (Dream)."""
    out = torch.zeros_like(mask)
    out[:, :-1] = mask[:, 1:]
    return out


def bucket(k: int, limit: int) -> int:
    """k rounded up to the next static-shape bucket (8, 12, 16, 24, 32, 48, ...: powers of two and
    1.5x them, at most a third of padding), capped at `limit` (the sequence length)."""
    size = 8
    while size < k:
        size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
    return min(size, limit)
