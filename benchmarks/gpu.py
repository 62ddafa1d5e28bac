"""Tokens/s and peak memory of every cache policy / preset at LLaDA-8B and Dream-7B shapes.

    python benchmarks/gpu.py                                       # the full grid on CUDA, bf16
    python benchmarks/gpu.py --shapes llada-8b --methods none,dual,dllm-cache --gen 256 --batch 1
    python benchmarks/gpu.py --tiny --device cpu                   # small shapes: a smoke test anywhere

Weights are random (normal, std 0.02, unit norms), drawn directly on the device in the benchmark
dtype: no checkpoint files. The shapes come from the real config.json files (benchmarks/configs/,
copies of the released LLaDA-8B-Instruct and Dream-v0-Instruct-7B configs) parsed by the project's
own config reader. Prompts are 256 random token ids (no tokenizer). Every (shape, gen, batch,
method) is one generate() call timed by the engine (wall clock between CUDA syncs); peak memory is
torch.cuda.max_memory_allocated during that call (on CPU: the process's peak RSS so far).

Random weights give near-uniform logits: threshold decoders (fast-dllm-dual-parallel) then commit
one token per step, and rows practically never stop early, so every run generates the full answer. The numbers
measure the cost of each cache policy at these shapes, not the speed-up parallel decoding would
give on a trained model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dllm_cache.engine import GenerationConfig, generate
from dllm_cache.methods import parse_method
from dllm_cache.models.loading import DLLM, read_config
from dllm_cache.models.random_init import random_model, tiny_config
from dllm_cache.models.transformer import ModelConfig

HERE = Path(__file__).resolve().parent
CONFIG_DIRS = {"llada-8b": "llada-8b-instruct", "dream-7b": "dream-v0-instruct-7b"}
TINY_SHAPES = {
    "tiny-llada": lambda: tiny_config("llada", vocab_size=2048, d_model=128, n_layers=2, n_heads=4, d_ff=256),
    "tiny-dream": lambda: tiny_config("dream", vocab_size=2048, d_model=128, n_layers=2, n_heads=4, d_ff=256),
}
# Every cache policy plus the presets that add a decoder: names of dllm_cache.methods.PRESETS or specs.
METHODS = ["none", "dllm-cache", "prefix", "dual", "dkv", "d2cache", "freecache", "fast-dllm-dual-parallel"]
NOTES = [
    "random weights (std 0.02): near-uniform logits, so threshold decoders "
    "(fast-dllm-dual-parallel) commit one token per step (NFE = gen) and rows practically never "
    "stop early (generated_tokens in the JSON); parallel decoding's gain on a trained model is not "
    "measured here, only each cache policy's cost",
    "tokens/s = answer tokens / wall time of one generate() call (CUDA-synchronised); "
    "peak memory = torch.cuda.max_memory_allocated during the call (CPU: process peak RSS)",
    "speed-up: tokens/s against `none` at the same shape, gen and batch",
]


def shape_config(shape: str, config_dir: Path) -> ModelConfig:
    if shape in TINY_SHAPES:
        return TINY_SHAPES[shape]()
    path = config_dir / CONFIG_DIRS[shape]
    if not (path / "config.json").is_file():
        raise SystemExit(f"{path}/config.json not found (pass --config-dir)")
    return read_config(path)


def random_prompts(cfg: ModelConfig, batch: int, length: int, seed: int) -> list[list[int]]:
    """Token ids drawn uniformly from the vocabulary, special tokens excluded."""
    gen = torch.Generator().manual_seed(seed)
    special = {cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id, cfg.bos_token_id} - {None}
    ids = torch.randint(0, cfg.vocab_size, (batch, length), generator=gen)
    for s in special:
        ids[ids == s] = (s + 1) % cfg.vocab_size if (s + 1) % cfg.vocab_size not in special else 3
    return ids.tolist()


def run_one(
    llm: DLLM, method: str, prompts: list[list[int]], gen: int, steps: int | None, block: int, seed: int
) -> dict[str, Any]:
    m = parse_method(method)
    config = GenerationConfig(gen_length=gen, steps=steps, block_length=block, chat=False, seed=seed)
    config = dataclasses.replace(config, **m.overrides)
    out = generate(llm, prompts, config, cache=m.policy())
    s = out.stats
    return {
        "tokens_per_s": s.tokens_per_s,
        "wall_time_s": s.wall_time_s,
        "generated_tokens": s.generated_tokens,
        "nfe": s.nfe,
        "recompute_fraction": s.recompute_fraction,
        "tflops": s.flops / 1e12,
        "peak_memory_gib": s.peak_memory_bytes / 2**30,
        "cache_gib": s.cache_bytes / 2**30,
        "block_length": config.block_length,
        "decoder": config.decoder,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="small shapes, short prompts: a smoke test")
    ap.add_argument("--shapes", nargs="+", default=None, help=f"{', '.join([*CONFIG_DIRS, *TINY_SHAPES])}")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated presets / method specs")
    ap.add_argument("--gen", type=int, nargs="+", default=None, help="answer lengths (default 256 512)")
    ap.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default 1 16)")
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 256; --tiny 32)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: gen, 1 token/step)")
    ap.add_argument("--block-length", type=int, default=32, help="block for every method (presets agree)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument(
        "--config-dir", type=Path, default=HERE / "configs", help="dirs with the real config.json"
    )
    ap.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up generation per method")
    ap.add_argument("--budget-s", type=float, default=None, help="skip the remaining runs after this long")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--out", type=Path, default=Path("gpu-bench.json"), help="JSON results (rewritten per run)"
    )
    args = ap.parse_args(argv)
    args.shapes = args.shapes or (list(TINY_SHAPES) if args.tiny else list(CONFIG_DIRS))
    unknown = [s for s in args.shapes if s not in CONFIG_DIRS and s not in TINY_SHAPES]
    if unknown:
        ap.error(f"unknown shape {unknown[0]!r} (choose {', '.join([*CONFIG_DIRS, *TINY_SHAPES])})")
    args.gen = args.gen or ([32] if args.tiny else [256, 512])
    args.batch = args.batch or ([1, 2] if args.tiny else [1, 16])
    args.prompt = args.prompt or (32 if args.tiny else 256)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: CUDA is not available (use --tiny --device cpu for a smoke test)")
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in args.methods:
        parse_method(m)  # a bad spec fails now, not after an 8B model is built
    return args


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| shape | method | gen | batch | tokens/s | speed-up | wall s | NFE | recomputed | peak GiB | cache GiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        head = f"| {r['shape']} | {r['method']} | {r['gen']} | {r['batch']} |"
        if "error" in r:
            lines.append(f"{head} {r['error']} | | | | | | |")
            continue
        speedup = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        lines.append(
            f"{head} {r['tokens_per_s']:.1f} | {speedup} | {r['wall_time_s']:.2f} | "
            f"{r['nfe']} | {r['recompute_fraction']:.1%} | {r['peak_memory_gib']:.2f} | {r['cache_gib']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if device.type == "cpu":
        torch.manual_seed(args.seed)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "prompt": args.prompt,
        "steps": args.steps or "gen",
        "block_length": args.block_length,
        "command": " ".join(["python benchmarks/gpu.py", *(sys.argv[1:] if argv is None else argv)]),
        "notes": NOTES,
        "shapes": {},
        "rows": [],
    }
    rows: list[dict[str, Any]] = report["rows"]
    start = time.perf_counter()

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")

    for shape in args.shapes:
        cfg = shape_config(shape, args.config_dir)
        model = random_model(cfg, args.seed, device=device, dtype=dtype).eval().requires_grad_(False)
        llm = DLLM(model, None, Path(f"random:{shape}"), [cfg.eos_token_id])
        n_params = sum(p.numel() for p in model.parameters())
        report["shapes"][shape] = {"params": n_params, "layers": cfg.n_layers, "d_model": cfg.d_model}
        print(f"# {shape}: {n_params / 1e6:,.1f}M parameters, {dtype}, {report['device']}", file=sys.stderr)
        if not args.no_warmup:  # kernels, allocator and cuBLAS heuristics: not part of any timing
            warm = random_prompts(cfg, 1, args.prompt, args.seed)
            for method in args.methods:
                run_one(llm, method, warm, args.block_length, None, args.block_length, args.seed)
        for gen in args.gen:
            for batch in args.batch:
                prompts = random_prompts(cfg, batch, args.prompt, args.seed)
                group: list[dict[str, Any]] = []
                for method in args.methods:
                    row: dict[str, Any] = {"shape": shape, "method": method, "gen": gen, "batch": batch}
                    if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
                        row["error"] = "skipped (--budget-s)"
                    else:
                        try:
                            row.update(
                                run_one(llm, method, prompts, gen, args.steps, args.block_length, args.seed)
                            )
                        except torch.cuda.OutOfMemoryError:
                            row["error"] = "out of memory"
                            torch.cuda.empty_cache()
                    rows.append(row)
                    group.append(row)
                    save()
                    print(markdown([row]).splitlines()[-1], file=sys.stderr, flush=True)
                base = next(
                    (r["tokens_per_s"] for r in group if r["method"] == "none" and "error" not in r), None
                )
                for r in group:
                    if base and "error" not in r:
                        r["speedup"] = r["tokens_per_s"] / base
                save()
        del model, llm
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report["total_s"] = time.perf_counter() - start
    save()
    print(f"`{report['command']}` on {report['device']}, {report['dtype']}, prompt {args.prompt} tokens\n")
    print(markdown(rows))
    print("\nNotes:\n" + "\n".join(f"- {n}" for n in NOTES))
    print(f"\nJSON: {args.out}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
