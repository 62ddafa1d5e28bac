"""The transformer shared by every family (LLaDA, Dream, Qwen2 guide) and the active-rows forward.

The architecture files (llada.py, dream.py) only say how a family's config.json and weight names map
onto this module; the math lives here once.

Active-rows forward (docs/architecture.md): at every layer a set of rows A ([B, k] indices, or None for
all rows) is recomputed; the other rows reuse the K, V (and, for per-layer policies, the attention and
FFN outputs) held in a `FeatureCache`. Queries of A attend to the *full* cached K, V.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dllm_cache.models.active import (
    CachePolicy,
    FeatureCache,
    ForwardStats,
    LayerView,
    gather_rows,
    source_rows,
)
from dllm_cache.models.config import ModelConfig

__all__ = ["Block", "ForwardStats", "ModelConfig", "RMSNorm", "SequenceLayout", "Transformer", "gather_rows"]


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # Normalise in fp32 (both reference implementations do), scale in the model dtype.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # RoPE in fp32 (LLaDA's rope_full_precision); cos/sin [B, k, hd] broadcast over heads.
    xf = x.float()
    out = xf * cos[:, None] + rotate_half(xf) * sin[:, None]
    return out.to(x.dtype)


@dataclass(frozen=True)
class Pointwise:
    """The per-layer pointwise parts between the matmuls: eager, or each fused into one kernel by
    torch.compile (`Transformer.compile_pointwise`). The residual adds stay eager: one kernel each
    already, and fusing them into the next RMSNorm would make a block hand the sum and the norm
    around together."""

    rms_norm: Callable[[Tensor, Tensor, float], Tensor] = rms_norm
    rope: Callable[[Tensor, Tensor, Tensor], Tensor] = apply_rope
    swiglu: Callable[[Tensor, Tensor], Tensor] = swiglu


EAGER = Pointwise()


@functools.cache
def compiled_pointwise() -> Pointwise:
    """torch.compile of each pointwise part (dynamic shapes: one compile serves every row count)."""
    return Pointwise(*(torch.compile(f, dynamic=True) for f in (rms_norm, apply_rope, swiglu)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.ops = EAGER

    def forward(self, x: Tensor) -> Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, kv = cfg.d_model, cfg.n_kv_heads * cfg.head_dim
        self.attn_norm = RMSNorm(d, cfg.norm_eps)
        self.q_proj = nn.Linear(d, d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d, kv, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, kv, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.ffn_norm = RMSNorm(d, cfg.norm_eps)
        self.gate_proj = nn.Linear(d, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(d, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, d, bias=False)
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.ops = EAGER

    def values(self, h: Tensor) -> Tensor:
        """V of rows h [B, k, d] -> [B, Hkv, k, hd] (what dLLM-Cache compares across steps)."""
        B, k, _ = h.shape
        v = self.v_proj(self.attn_norm(h))
        return v.view(B, k, self.n_kv_heads, self.head_dim).transpose(1, 2)

    def qkv(self, h: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k (after RoPE), v for rows h [B, k, d]; cos/sin [B, k, hd] are those rows' angles."""
        B, k, _ = h.shape
        n = self.attn_norm(h)
        q = self.q_proj(n).view(B, k, self.n_heads, self.head_dim).transpose(1, 2)
        kk = self.k_proj(n).view(B, k, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(n).view(B, k, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return self.ops.rope(q, cos, sin), self.ops.rope(kk, cos, sin), v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        """Queries [B, H, k, hd] over keys/values [B, Hkv, L, hd]; mask broadcastable to [B, H, k, L]."""
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=self.n_heads != self.n_kv_heads
        )
        B, _, k_rows, _ = q.shape
        return self.o_proj(o.transpose(1, 2).reshape(B, k_rows, -1))

    def attention_probs(self, q: Tensor, k: Tensor, mask: Tensor) -> Tensor:
        """Head-averaged attention probabilities [B, k_rows, L] of queries q over keys k (explicit:
        SDPA does not return them). Only for policies that look at attention (d2cache)."""
        if self.n_heads != self.n_kv_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        scores = (q.float() @ k.float().transpose(-1, -2)) * self.head_dim**-0.5
        return scores.masked_fill(~mask, float("-inf")).softmax(-1).mean(1)

    def ffn(self, h: Tensor) -> Tensor:
        m = self.ffn_norm(h)
        return self.down_proj(self.ops.swiglu(self.gate_proj(m), self.up_proj(m)))


@dataclass
class SequenceLayout:
    """What stays fixed for one batch of sequences during a generation: positions, masks, RoPE angles."""

    key_mask: Tensor  # [B, L] bool, False on left padding
    cos: Tensor  # [B, L, hd] fp32
    sin: Tensor
    causal: bool

    @property
    def seq_len(self) -> int:
        return self.key_mask.shape[1]

    def attn_mask(self, rows: Tensor | None) -> Tensor:
        """Boolean mask [B, 1, k, L] (True = attend) for query rows (None = all rows)."""
        B, L = self.key_mask.shape
        mask = self.key_mask[:, None, None, :]
        if not self.causal:
            return mask
        q_idx = torch.arange(L, device=mask.device).expand(B, L) if rows is None else rows
        k_idx = torch.arange(L, device=mask.device)
        return mask & (k_idx[None, None, None, :] <= q_idx[:, None, :, None])


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def compile_pointwise(self, compiled: bool) -> bool:
        """Run RMSNorm, RoPE and SwiGLU eagerly or torch.compiled (GenerationConfig.compile);
        returns the previous setting."""
        before = self.final_norm.ops is not EAGER
        ops = compiled_pointwise() if compiled else EAGER
        for module in self.modules():
            if isinstance(module, RMSNorm | Block):
                module.ops = ops
        return before

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def layout(self, attention_mask: Tensor) -> SequenceLayout:
        """Positions count from the first real token (left padding); pads get a dummy position 0."""
        key_mask = attention_mask.bool()
        positions = (key_mask.long().cumsum(-1) - 1).clamp(min=0)
        hd = self.config.head_dim
        inv_freq = 1.0 / (
            self.config.rope_theta
            ** (torch.arange(0, hd, 2, device=positions.device, dtype=torch.float32) / hd)
        )
        angles = positions.float()[..., None] * inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        return SequenceLayout(key_mask, angles.cos(), angles.sin(), self.config.causal)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Ordinary full forward (training, tests): logits [B, L, V] for every row."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        layout = self.layout(attention_mask)
        h = self.embed(input_ids)
        mask = layout.attn_mask(None)
        for block in self.blocks:
            q, k, v = block.qkv(h, layout.cos, layout.sin)
            h = h + block.attend(q, k, v, mask)
            h = h + block.ffn(h)
        return self.lm_head(self.final_norm(h)).float()

    def forward_active(
        self,
        input_ids: Tensor,
        layout: SequenceLayout,
        cache: FeatureCache | None,
        policy: CachePolicy | None,
        rows: Tensor | None,
        logit_rows: Tensor,
        stats: ForwardStats,
    ) -> Tensor:
        """One denoising forward with caching; returns fp32 logits [B, r, V] for `logit_rows` [B, r].

        rows: the active rows for the whole network ([B, k], None = all). With a per-layer policy the
        residual stream of every row is carried and `policy.select` picks each layer's rows.
        """
        B, L = input_ids.shape
        cfg = self.config
        per_layer = policy is not None and policy.per_layer
        if per_layer:
            rows = None  # the full residual stream is carried; selection happens per layer
        # rows may name the scratch slot (index L, padding): `src` is what each slot computes from,
        # `rows` where it is written (the cache's scratch slot, never read).
        src = None if rows is None else source_rows(rows, L)
        h = self.embed(gather_rows(input_ids, src))
        n_rows = L if rows is None else rows.shape[1]
        # Probabilities of the active queries, layer by layer, for the policies that look at them
        # (d2cache's attention rollout, Elastic-Cache's most-attended rows).
        observe = getattr(policy, "observe_attention", None)
        cos, sin = gather_rows(layout.cos, src), gather_rows(layout.sin, src)
        stats.forwards += 1
        for i, block in enumerate(self.blocks):
            active = rows
            if per_layer:
                assert cache is not None and policy is not None
                active = policy.select(i, LayerView(block, i, h, cache, stats))
            k_active = n_rows if active is None else active.shape[1]
            self._count(stats, B, k_active, L)
            if cache is None:  # no caching at all: the plain forward
                q, k, v = block.qkv(h, cos, sin)
                h = h + block.attend(q, k, v, layout.attn_mask(src))
                h = h + block.ffn(h)
                continue
            if not per_layer:
                # One set for the whole network: h holds only the active rows; inactive rows are
                # skipped entirely and only their cached K, V are read.
                q, k, v = block.qkv(h, cos, sin)
                cache.write("k", i, rows, k)
                cache.write("v", i, rows, v)
                mask = layout.attn_mask(src)
                if observe is not None:  # a padding slot shows up as a repeat of a real row
                    observe(i, src, block.attention_probs(q, cache.k[i], mask))
                h = h + block.attend(q, cache.k[i], cache.v[i], mask)
                h = h + block.ffn(h)
                continue
            # Per-layer selection: recompute the active rows, every row adds this layer's cached
            # contributions to its *current* input so changes in earlier layers flow through.
            if active is not None and active.shape[1] == 0:  # nothing to recompute at this layer
                h = h + cache.attn[i] + cache.ffn[i]
                continue
            active_src = None if active is None else source_rows(active, L)
            hA = gather_rows(h, active_src)
            q, k, v = block.qkv(hA, gather_rows(cos, active_src), gather_rows(sin, active_src))
            cache.write("k", i, active, k)
            cache.write("v", i, active, v)
            mask = layout.attn_mask(active_src)
            if observe is not None:
                observe(i, active, block.attention_probs(q, cache.k[i], mask))
            cache.write("attn", i, active, block.attend(q, cache.k[i], cache.v[i], mask))
            h = h + cache.attn[i]
            cache.write("ffn", i, active, block.ffn(gather_rows(h, active_src)))
            h = h + cache.ffn[i]
        if rows is not None:
            # logit_rows are sequence positions; map them to their place among the active rows
            # (column L: the scratch slot's, never asked for).
            where = torch.full((B, L + 1), -1, dtype=torch.long, device=h.device)
            where.scatter_(1, rows, torch.arange(rows.shape[1], device=h.device).expand(B, -1))
            logit_rows = where.gather(1, logit_rows)
        # Rows the policy skipped have no features: their logits are NaN (the decoder may only
        # need the masked ones; the engine checks that those were computed).
        skipped = logit_rows < 0
        lm_flops = 2 * cfg.d_model * cfg.vocab_size
        if rows is None:
            stats.flops += lm_flops * logit_rows.numel()
        else:  # how many were computed is data-dependent: counted on the device, read at the end
            stats.add_device_flops(lm_flops * (~skipped).sum(dtype=torch.float64))
        out = self.final_norm(gather_rows(h, logit_rows.clamp(min=0)))
        logits = self.lm_head(out).float()
        return logits.masked_fill(skipped[..., None], float("nan"))

    def _count(self, stats: ForwardStats, B: int, k: int, L: int) -> None:
        cfg = self.config
        stats.position_layers += B * k
        stats.position_layers_total += B * L
        stats.flops += 2 * cfg.linear_params_per_layer() * B * k + 4 * B * k * L * cfg.d_model
