"""Tokens/s and peak memory of every cache policy / preset at LLaDA-8B and Dream-7B shapes.

    python benchmarks/gpu.py                                       # the full grid on CUDA, bf16
    python benchmarks/gpu.py --shapes llada-8b --methods none,dual,dllm-cache --gen 256 --batch 1
    python benchmarks/gpu.py --tiny --device cpu                   # small shapes: a smoke test anywhere
    python benchmarks/gpu.py --shapes dream-7b --guided none,dual --server dual --batch 1 8

--guided adds rows of guided decoding (an AR guide at the Qwen2.5-0.5B-Instruct shape verifies
the dLLM's drafts; Dream shapes only, the pair that shares token ids): the AR guide's ms per forward
(the verifier's static 32-row chunk, timed around each call), its floor and efficiency.
--server adds rows that go through the server's scheduler (serve/scheduler.py): `batch` requests
submitted at once, batched into one generation by the scheduler, timed from submit to the last
answer.

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
import asyncio
import dataclasses
import functools
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dllm_cache.cache import make_policy
from dllm_cache.decoding.guided import GuidedDecoder, VocabularyMap
from dllm_cache.engine import GenerationConfig, generate
from dllm_cache.methods import parse_method
from dllm_cache.models.loading import DLLM, read_config
from dllm_cache.models.random_init import random_model, tiny_config
from dllm_cache.models.transformer import ModelConfig

HERE = Path(__file__).resolve().parent
CONFIG_DIRS = {"llada-8b": "llada-8b-instruct", "dream-7b": "dream-v0-instruct-7b"}
# The AR guide of guided decoding, per dLLM shape (Dream and Qwen2.5 number their tokens alike).
GUIDE_DIRS = {"dream-7b": "qwen2.5-0.5b-instruct"}
TINY_GUIDES = {"tiny-dream": lambda: tiny_config("qwen2", vocab_size=2048, d_model=64, n_layers=2, d_ff=128)}
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


@dataclasses.dataclass(frozen=True)
class Workload:
    """What one row of the table generates: the prompts and the generation settings every method
    of the row shares."""

    prompts: list[list[int]]
    gen: int
    steps: int | None
    block: int
    seed: int
    graphs: bool

    def config(self, method: str) -> tuple[Any, GenerationConfig]:
        """The parsed method and the generation config it runs with (its decoder overrides applied)."""
        m = parse_method(method)
        config = GenerationConfig(
            gen_length=self.gen,
            steps=self.steps,
            block_length=self.block,
            chat=False,
            seed=self.seed,
            graphs=self.graphs,
        )
        return m, dataclasses.replace(config, **m.overrides)

    def two_blocks(self) -> Workload:
        """The same settings over two blocks (the same tokens per step): for profiling one step."""
        gen = 2 * self.block
        steps = gen * self.steps // self.gen if self.steps else None
        return dataclasses.replace(self, gen=gen, steps=steps)


LAUNCH_EVENTS = ("LaunchKernel", "GraphLaunch", "cuLaunch")


def launches_in_one_step(llm: DLLM, method: str, work: Workload) -> int:
    """Kernel launches of one denoising step, profiled in the middle of a generation (after every
    graph of the generation's first block is captured). CUDA: runtime launch calls (a graph replay
    is one); CPU: leaf aten operator calls."""
    from torch.profiler import ProfilerActivity, profile

    device = llm.model.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=activities)
    total = work.steps or work.gen
    mark = min(max(total // 2, work.block + 1), total - 1)  # a step of a later block

    def progress(done: int, _total: int) -> None:
        if done == mark:
            prof.start()
        elif done == mark + 1:
            _sync(device)
            prof.stop()

    run_one(llm, method, work, progress=progress)
    events = prof.events()
    if device.type == "cuda":
        return sum(1 for e in events if any(k in e.name for k in LAUNCH_EVENTS))
    return sum(1 for e in events if e.name.startswith("aten::") and not e.cpu_children)


def stats_columns(s: dict[str, Any]) -> dict[str, Any]:
    """The columns every row reports, from a generation's stats (GenerationStats.to_dict(), or
    the server's copy of it)."""
    return {
        "tokens_per_s": s["tokens_per_s"],
        "wall_time_s": s["wall_time_s"],
        "generated_tokens": s["generated_tokens"],
        "nfe": s["nfe"],
        "recompute_fraction": s["recompute_fraction"],
        "tflops": s["flops"] / 1e12,
        "peak_memory_gib": s["peak_memory_bytes"] / 2**30,
        "cache_gib": s["cache_bytes"] / 2**30,
    }


def run_one(llm: DLLM, method: str, work: Workload, progress: Any = None) -> dict[str, Any]:
    m, config = work.config(method)
    out = generate(llm, work.prompts, config, cache=m.policy(), progress=progress)
    return {
        **stats_columns(out.stats.to_dict()),
        "block_length": config.block_length,
        "decoder": config.decoder,
    }


class _Warm(Exception):
    pass


def warm_up(llm: DLLM, method: str, work: Workload) -> None:
    """The timed run's first block and one more step, untimed: kernels, allocator, and on CUDA the
    graphs of those step shapes (kept with the model for the timed run, which has the same key)."""
    per_block = (work.steps or work.gen) // (work.gen // work.block)

    def stop(done: int, _total: int) -> None:
        if done > per_block:
            raise _Warm

    try:
        run_one(llm, method, work, progress=stop)
    except _Warm:
        pass


def run_profiled(llm: DLLM, method: str, work: Workload, profile: bool, warm: bool = True) -> dict[str, Any]:
    """`run_one` after its warm-up, plus the kernel launches of one step of a short two-block generation."""
    if warm:
        warm_up(llm, method, work)
    out = run_one(llm, method, work)
    if profile:
        out["launches_per_nfe"] = launches_in_one_step(llm, method, work.two_blocks())
    return out


def forward_flops(cfg: ModelConfig, batch: int, rows: int, seq_len: int) -> float:
    """A forward of `rows` query rows over `seq_len` keys, counted as the engine counts it."""
    per_layer = 2 * cfg.linear_params_per_layer() * batch * rows + 4 * batch * rows * seq_len * cfg.d_model
    return cfg.n_layers * per_layer + 2 * cfg.d_model * cfg.vocab_size * batch * rows


class TimedGuidedDecoder(GuidedDecoder):
    """Guided decoding with every AR forward timed (synchronised before and after: the timing run
    is separate from the tokens/s run)."""

    def begin_generation(self, ctx: Any) -> None:
        super().begin_generation(ctx)
        self.untimed, self.ar_seconds = self.forward, []
        device = self.guide.model.device

        def timed(x: torch.Tensor, rows: Any, logit_rows: torch.Tensor) -> torch.Tensor:
            _sync(device)
            t = time.perf_counter()
            out = self.untimed(x, rows, logit_rows)
            _sync(device)
            self.ar_seconds.append(time.perf_counter() - t)
            return out

        self.forward = timed  # type: ignore[assignment]

    def end_generation(self) -> None:
        self.forward = self.untimed
        super().end_generation()


def run_guided(
    llm: DLLM, guide: DLLM, policy: str, work: Workload, rates: dict[str, float]
) -> dict[str, Any]:
    """One guided generation with each AR forward timed (its median, the prompt's first forward left
    out, against the guide's floor), then one timed whole (tokens/s, ms per dLLM NFE)."""
    vocab = VocabularyMap(llm, guide, shared_ids=True)
    prompts, graphs = work.prompts, work.graphs
    # guided decoding sets its own steps (as many as it takes)
    config = GenerationConfig(
        gen_length=work.gen, block_length=work.block, chat=False, seed=work.seed, graphs=graphs
    )
    # the forward-timed run first: it also warms up (and on CUDA captures) what the timed run replays
    timed = TimedGuidedDecoder(guide, graphs=graphs, vocab=vocab)
    generate(llm, prompts, config, cache=make_policy(policy), decoder=timed)
    out = generate(
        llm,
        prompts,
        config,
        cache=make_policy(policy),
        decoder=GuidedDecoder(guide, graphs=graphs, vocab=vocab),
    )
    s = out.stats
    row = {
        **stats_columns(s.to_dict()),
        "guide_nfe": s.guide_nfe,
        "decoder": "guided",
    }
    steady = sorted(timed.ar_seconds[1:] or timed.ar_seconds)
    ms = 1e3 * steady[len(steady) // 2]
    gcfg = guide.model.config
    L = max(len(p) for p in prompts) + work.gen
    read_ms = 1e3 * weight_bytes_per_forward(guide.model) / rates["bytes_per_s"]
    compute_ms = 1e3 * forward_flops(gcfg, len(prompts), timed.chunk, L) / rates["matmul_flops_per_s"]
    row["guide_ms_per_forward"] = ms
    row["guide_floor_ms"] = max(read_ms, compute_ms)
    row["guide_efficiency"] = row["guide_floor_ms"] / ms
    return row


def run_server(llm: DLLM, method: str, work: Workload) -> dict[str, Any]:
    """`len(prompts)` requests submitted at once to the server's scheduler (one batch), timed from
    submit to the last answer; the engine's own timing of the batch gives ms per NFE."""
    from dllm_cache.serve.scheduler import Job, Scheduler

    m, config = work.config(method)
    prompts = work.prompts

    async def serve() -> tuple[list[Any], float, int]:
        loop = asyncio.get_running_loop()
        scheduler = Scheduler(llm, max_batch_size=len(prompts), max_queue=len(prompts), batch_wait_s=0.05)
        try:
            jobs = [Job(p, config, m, loop, loop.create_future()) for p in prompts]
            start = time.perf_counter()
            for job in jobs:
                scheduler.submit(job)
            results = await asyncio.gather(*(job.future for job in jobs))
            return results, time.perf_counter() - start, scheduler.metrics.batches
        finally:
            scheduler.close()

    results, wall, batches = asyncio.run(serve())
    s = results[0].stats  # the batch's generation (every request of it reports the same)
    return {
        **stats_columns(s),  # wall_time_s: the generation's (ms/NFE); end to end: server_wall_s
        "tokens_per_s": s["generated_tokens"] / wall,
        "server_wall_s": wall,
        "server_batches": batches,
        "block_length": config.block_length,
        "decoder": config.decoder,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="small shapes, short prompts: a smoke test")
    ap.add_argument("--shapes", nargs="+", default=None, help=f"{', '.join([*CONFIG_DIRS, *TINY_SHAPES])}")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated presets / method specs")
    ap.add_argument("--gen", type=int, nargs="+", default=None, help="answer lengths (default 256 512)")
    ap.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default 1 8)")
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
    ap.add_argument(
        "--no-warmup",
        action="store_true",
        help="skip the untimed warm-up (first block) before each timed run",
    )
    ap.add_argument("--budget-s", type=float, default=None, help="skip the remaining runs after this long")
    ap.add_argument(
        "--guided",
        default="",
        help="cache policies to run with guided decoding (Dream shapes), e.g. none,dual",
    )
    ap.add_argument(
        "--server", default="", help="methods to also run through the server's scheduler (batched requests)"
    )
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
    args.batch = args.batch or ([1, 2] if args.tiny else [1, 8])
    args.prompt = args.prompt or [32 if args.tiny else 256]
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: CUDA is not available (use --tiny --device cpu for a smoke test)")
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.guided = [m.strip() for m in args.guided.split(",") if m.strip()]
    args.server = [m.strip() for m in args.server.split(",") if m.strip()]
    for m in args.methods + args.server:
        parse_method(m)  # a bad spec fails now, not after an 8B model is built
    for m in args.guided:
        make_policy(m)
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


def guide_markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| shape | method | prompt | gen | batch | guide NFE | AR ms/forward | floor ms | efficiency |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if "guide_ms_per_forward" in r:
            lines.append(
                f"| {r['shape']} | {r['method']} | {r['prompt']} | {r['gen']} | {r['batch']} | {r['guide_nfe']} | "
                f"{r['guide_ms_per_forward']:.2f} | {r['guide_floor_ms']:.2f} | {r['guide_efficiency']:.0%} |"
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
        guide = None
        if args.guided and (shape in GUIDE_DIRS or shape in TINY_GUIDES):
            gcfg = (
                TINY_GUIDES[shape]()
                if shape in TINY_GUIDES
                else read_config(args.config_dir / GUIDE_DIRS[shape])
            )
            gmodel = (
                random_model(gcfg, args.seed + 1, device=device, dtype=dtype).eval().requires_grad_(False)
            )
            guide = DLLM(gmodel, None, Path(f"random:{shape}-guide"), [gcfg.eos_token_id])
            report["shapes"][shape]["guide_params"] = sum(p.numel() for p in gmodel.parameters())
        for prompt_len in args.prompt:
            for gen in args.gen:
                steps = gen // args.tokens_per_step if args.tokens_per_step else args.steps
                for batch in args.batch:
                    work = Workload(
                        random_prompts(cfg, batch, prompt_len, args.seed),
                        gen,
                        steps,
                        args.block_length,
                        args.seed,
                        graphs,
                    )
                    group: list[dict[str, Any]] = []
                    # (label, how to run it): the engine per method, then the server's batched path,
                    # then guided decoding
                    runs: list[tuple[str, Any]] = []
                    profile, warm = not args.no_profile, not args.no_warmup
                    runs += [
                        (m, functools.partial(run_profiled, llm, m, work, profile, warm))
                        for m in args.methods
                    ]
                    runs += [
                        (f"{m} (server)", functools.partial(run_server, llm, m, work)) for m in args.server
                    ]
                    runs += [
                        (f"guided+{p}", functools.partial(run_guided, llm, guide, p, work, rates))
                        for p in (args.guided if guide is not None else [])
                    ]
                    for label, fn in runs:
                        row: dict[str, Any] = {
                            "shape": shape,
                            "method": label,
                            "prompt": prompt_len,
                            "gen": gen,
                            "steps": steps or gen,
                            "batch": batch,
                        }
                        if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
                            row["error"] = "skipped (--budget-s)"
                        else:
                            try:
                                row.update(fn())
                                add_floor(row, rates, weight_bytes)
                            except torch.cuda.OutOfMemoryError:
                                row["error"] = "out of memory"
                                torch.cuda.empty_cache()
                        if label.startswith("guided"):
                            row["steps"] = row.get("nfe", "-")  # dynamic: as many steps as it takes
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
        del model, llm, guide
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report["total_s"] = time.perf_counter() - start
    save()
    print(f"`{report['command']}` on {report['device']}, {report['dtype']}, graphs {graphs}\n")
    print(markdown(rows))
    if any("guide_ms_per_forward" in r for r in rows):
        print("\nThe AR guide's forward in guided decoding:\n")
        print(guide_markdown(rows))
    print("\nNotes:\n" + "\n".join(f"- {n}" for n in NOTES))
    print(f"\nJSON: {args.out}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
