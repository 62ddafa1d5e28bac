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


def chip_rates(device: torch.device, dtype: torch.dtype, small: bool) -> dict[str, float]:
    """The chip's matmul rate (FLOP/s, square n x n x n in the benchmark dtype) and memory bandwidth
    (bytes/s read + written by a large copy), measured now: the floors of every row use these."""

    def timed(fn: Any, reps: int) -> float:
        """The best of `reps` timings (a shared machine only ever slows a run down)."""
        fn()
        best = float("inf")
        for _ in range(reps):
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            best = min(best, time.perf_counter() - t)
        return best

    n = 1024 if small else 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    matmul_s = timed(lambda: a @ b, 10 if small else 20)
    numel = (16 if small else 512) * 2**20 // torch.finfo(dtype).bits * 8
    src, dst = torch.empty(numel, device=device, dtype=dtype), torch.empty(numel, device=device, dtype=dtype)
    copy_s = timed(lambda: dst.copy_(src), 10 if small else 20)
    return {"matmul_flops_per_s": 2 * n**3 / matmul_s, "bytes_per_s": 2 * src.nbytes / copy_s}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def weight_bytes_per_forward(model: torch.nn.Module) -> int:
    """Bytes of weights a forward reads: every matrix once; of the embedding only the rows looked up
    (nothing, at this scale), unless it is tied to the LM head."""
    embed = model.embed.weight
    tied = model.lm_head.weight is embed
    return sum(p.numel() * p.element_size() for p in model.parameters() if tied or p is not embed)


LAUNCH_EVENTS = ("LaunchKernel", "GraphLaunch", "cuLaunch")


def launches_in_one_step(
    llm: DLLM,
    method: str,
    prompts: list[list[int]],
    gen: int,
    steps: int | None,
    block: int,
    seed: int,
    graphs: bool,
) -> int:
    """Kernel launches of one denoising step, profiled in the middle of a generation (after every
    graph of the generation's first block is captured). CUDA: runtime launch calls (a graph replay
    is one); CPU: leaf aten operator calls."""
    from torch.profiler import ProfilerActivity, profile

    device = llm.model.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=activities)
    total = steps or gen
    mark = min(max(total // 2, block + 1), total - 1)  # a step of a later block

    def progress(done: int, _total: int) -> None:
        if done == mark:
            prof.start()
        elif done == mark + 1:
            _sync(device)
            prof.stop()

    run_one(llm, method, prompts, gen, steps, block, seed, graphs, progress=progress)
    events = prof.events()
    if device.type == "cuda":
        return sum(1 for e in events if any(k in e.name for k in LAUNCH_EVENTS))
    return sum(1 for e in events if e.name.startswith("aten::") and not e.cpu_children)


def run_one(
    llm: DLLM,
    method: str,
    prompts: list[list[int]],
    gen: int,
    steps: int | None,
    block: int,
    seed: int,
    graphs: bool = True,
    progress: Any = None,
) -> dict[str, Any]:
    m = parse_method(method)
    config = GenerationConfig(
        gen_length=gen, steps=steps, block_length=block, chat=False, seed=seed, graphs=graphs
    )
    config = dataclasses.replace(config, **m.overrides)
    out = generate(llm, prompts, config, cache=m.policy(), progress=progress)
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
    ap.add_argument(
        "--prompt", type=int, nargs="+", default=None, help="prompt tokens (default 256; --tiny 32)"
    )
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: gen, 1 token/step)")
    ap.add_argument(
        "--tokens-per-step", type=int, default=None, help="steps = gen / this (overrides --steps)"
    )
    ap.add_argument("--no-graphs", action="store_true", help="eager denoising forwards (no CUDA graphs)")
    ap.add_argument("--no-profile", action="store_true", help="skip the profiled step (launches per NFE)")
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
    args.prompt = args.prompt or [32 if args.tiny else 256]
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
        "| shape | method | prompt | gen | steps | batch | tokens/s | speed-up | ms/NFE | floor ms/NFE | "
        "efficiency | launches/NFE | NFE | recomputed | peak GiB | cache GiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        head = f"| {r['shape']} | {r['method']} | {r['prompt']} | {r['gen']} | {r['steps']} | {r['batch']} |"
        if "error" in r:
            lines.append(f"{head} {r['error']} |" + " |" * 9)
            continue
        speedup = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        launches = f"{r['launches_per_nfe']}" if r.get("launches_per_nfe") is not None else "-"
        lines.append(
            f"{head} {r['tokens_per_s']:.1f} | {speedup} | {r['ms_per_nfe']:.2f} | {r['floor_ms_per_nfe']:.2f} | "
            f"{r['efficiency']:.0%} | {launches} | {r['nfe']} | {r['recompute_fraction']:.1%} | "
            f"{r['peak_memory_gib']:.2f} | {r['cache_gib']:.2f} |"
        )
    return "\n".join(lines)


def add_floor(row: dict[str, Any], rates: dict[str, float], weight_bytes: int) -> None:
    """ms per NFE against the floor of that work: reading the weights once per forward, or its
    counted FLOPs at the measured matmul rate, whichever is longer (KV/feature-cache traffic and
    attention's softmax are not in the floor)."""
    nfe = max(row["nfe"], 1)
    row["ms_per_nfe"] = 1e3 * row["wall_time_s"] / nfe
    read_ms = 1e3 * weight_bytes / rates["bytes_per_s"]
    compute_ms = 1e3 * row["tflops"] * 1e12 / nfe / rates["matmul_flops_per_s"]
    row["floor_ms_per_nfe"] = max(read_ms, compute_ms)
    row["floor_bound"] = "weights" if read_ms >= compute_ms else "compute"
    row["efficiency"] = row["floor_ms_per_nfe"] / row["ms_per_nfe"]


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
        "tokens_per_step": args.tokens_per_step,
        "block_length": args.block_length,
        "graphs": not args.no_graphs,
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

    rates = chip_rates(device, dtype, small=args.tiny or device.type == "cpu")
    report["chip"] = rates
    print(
        f"# chip: matmul {rates['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s, "
        f"copy {rates['bytes_per_s'] / 1e9:.1f} GB/s (read + write)",
        file=sys.stderr,
    )
    save()
    graphs = not args.no_graphs
    for shape in args.shapes:
        cfg = shape_config(shape, args.config_dir)
        model = random_model(cfg, args.seed, device=device, dtype=dtype).eval().requires_grad_(False)
        llm = DLLM(model, None, Path(f"random:{shape}"), [cfg.eos_token_id])
        n_params = sum(p.numel() for p in model.parameters())
        weight_bytes = weight_bytes_per_forward(model)
        report["shapes"][shape] = {
            "params": n_params,
            "layers": cfg.n_layers,
            "d_model": cfg.d_model,
            "weight_bytes_per_forward": weight_bytes,
        }
        print(f"# {shape}: {n_params / 1e6:,.1f}M parameters, {dtype}, {report['device']}", file=sys.stderr)
        if not args.no_warmup:  # kernels, allocator and cuBLAS heuristics: not part of any timing
            warm = random_prompts(cfg, 1, args.prompt[0], args.seed)
            for method in args.methods:
                run_one(llm, method, warm, args.block_length, None, args.block_length, args.seed, graphs)
        for prompt_len in args.prompt:
            for gen in args.gen:
                steps = gen // args.tokens_per_step if args.tokens_per_step else args.steps
                for batch in args.batch:
                    prompts = random_prompts(cfg, batch, prompt_len, args.seed)
                    group: list[dict[str, Any]] = []
                    for method in args.methods:
                        row: dict[str, Any] = {
                            "shape": shape,
                            "method": method,
                            "prompt": prompt_len,
                            "gen": gen,
                            "steps": steps or gen,
                            "batch": batch,
                        }
                        if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
                            row["error"] = "skipped (--budget-s)"
                        else:
                            try:
                                row.update(
                                    run_one(
                                        llm, method, prompts, gen, steps, args.block_length, args.seed, graphs
                                    )
                                )
                                add_floor(row, rates, weight_bytes)
                                if not args.no_profile:
                                    # a short generation of two blocks, one step of the second profiled
                                    g2 = 2 * args.block_length
                                    s2 = g2 * (steps or gen) // gen
                                    launches = launches_in_one_step(
                                        llm, method, prompts, g2, s2, args.block_length, args.seed, graphs
                                    )
                                    row["launches_per_nfe"] = launches
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
    print(f"`{report['command']}` on {report['device']}, {report['dtype']}, graphs {graphs}\n")
    print(markdown(rows))
    print("\nNotes:\n" + "\n".join(f"- {n}" for n in NOTES))
    print(f"\nJSON: {args.out}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
