"""Milliseconds per denoising forward at a real model's shape (random weights).

    python benchmarks/forward.py --shape llada-8b --device cuda --batch 1 8      # on a GPU, bf16
    python benchmarks/forward.py --shape tiny --device cpu --batch 1 8          # anywhere

One forward = what one uncached denoising step costs: every row through every layer, the LM head on
the 32 rows of the current block. Also reports the full-vocabulary LM head variant for reference.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dllm_cache.models.loading import read_config
from dllm_cache.models.random_init import random_model, tiny_config
from dllm_cache.models.transformer import ForwardStats, ModelConfig, Transformer

RELEASE_CONFIGS = {"llada-8b": "llada-8b-instruct", "dream-7b": "dream-v0-instruct-7b"}


def shape_config(shape: str) -> ModelConfig:
    if shape == "tiny":
        return tiny_config("llada", vocab_size=2048, d_model=256, n_layers=4, n_heads=4, d_ff=704)
    from pathlib import Path

    # The real releases' config.json files, kept beside this script.
    return read_config(Path(__file__).resolve().parent / "configs" / RELEASE_CONFIGS[shape])


def build(cfg: ModelConfig, device: str, dtype: torch.dtype) -> Transformer:
    return random_model(cfg, seed=0, device=device, dtype=dtype).eval().requires_grad_(False)


def time_forward(model: Transformer, batch: int, prompt: int, gen: int, iters: int, full_head: bool) -> float:
    cfg, device = model.config, model.device
    L = prompt + gen
    x = torch.randint(0, cfg.vocab_size, (batch, L), device=device)
    attn = torch.ones(batch, L, dtype=torch.bool, device=device)
    layout = model.layout(attn)
    rows = torch.arange(
        prompt - 1 if cfg.shift_logits else prompt, L if full_head else prompt + 32, device=device
    )
    rows = rows.expand(batch, -1)

    def once() -> None:
        model.forward_active(x, layout, None, None, None, rows, ForwardStats())

    for _ in range(2):
        once()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        once()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="tiny", choices=["tiny", *RELEASE_CONFIGS])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--gen", type=int, default=256)
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    )
    cfg = shape_config(args.shape)
    model = build(cfg, args.device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    rows = []
    for b in args.batch:
        block_ms = time_forward(model, b, args.prompt, args.gen, args.iters, full_head=False)
        full_ms = time_forward(model, b, args.prompt, args.gen, args.iters, full_head=True)
        rows.append(
            {"batch": b, "ms_block_head": round(block_ms, 2), "ms_full_answer_head": round(full_ms, 2)}
        )
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    out = {
        "shape": args.shape,
        "params": n_params,
        "device": gpu,
        "dtype": str(dtype),
        "seq": args.prompt + args.gen,
        "rows": rows,
    }
    print(json.dumps(out))
    print(
        "| shape | device | dtype | batch | seq | ms/forward (LM head on block) | ms/forward (LM head on answer) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {args.shape} | {gpu} | {dtype} | {r['batch']} | {args.prompt}+{args.gen} | {r['ms_block_head']} | "
            f"{r['ms_full_answer_head']} |"
        )


if __name__ == "__main__":
    main()
