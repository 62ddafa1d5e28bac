"""The `dllm-cache` command line (typer + rich)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from dllm_cache.errors import DllmCacheError

app = typer.Typer(
    help="Fast, training-free inference for diffusion LLMs (LLaDA, Dream).", no_args_is_help=True
)
console = Console()
err_console = Console(stderr=True)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="checkpoint directory or embedded model name")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto")]
DtypeOpt = Annotated[str, typer.Option(help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")]


@contextmanager
def user_errors() -> Iterator[None]:
    """Bad input -> one line naming the problem and exit code 2, never a traceback."""
    try:
        yield
    except DllmCacheError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DllmCacheError(f"device {device!r} requested but CUDA is not available")
    return device


def parse_cache_args(items: list[str] | None) -> dict[str, Any]:
    """`--cache-arg key=value` pairs; values parsed as JSON where they can be (numbers, booleans)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise DllmCacheError(f"--cache-arg expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


@contextmanager
def step_progress(enabled: bool, total_hint: int) -> Iterator[Callable[[int, int], None] | None]:
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("denoising"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    ) as bar:
        task = bar.add_task("steps", total=total_hint)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="the user message (wrapped in the model's chat template)")],
    model: ModelOpt = "tiny-llada",
    gen_length: Annotated[int, typer.Option(help="answer length in tokens")] = 128,
    steps: Annotated[int | None, typer.Option(help="denoising steps (default: gen-length)")] = None,
    block_length: Annotated[
        int | None, typer.Option(help="semi-AR block (default 32 LLaDA, gen-length Dream)")
    ] = None,
    temperature: float = 0.0,
    remasking: Annotated[str, typer.Option(help="LLaDA: low_confidence | random")] = "low_confidence",
    alg: Annotated[
        str, typer.Option(help="Dream: origin | maskgit_plus | topk_margin | entropy")
    ] = "entropy",
    cfg_scale: Annotated[float, typer.Option(help="classifier-free guidance scale (LLaDA)")] = 0.0,
    cache: Annotated[
        str | None,
        typer.Option(help="cache policy: none, dllm-cache, prefix, dual, dkv, d2cache, freecache"),
    ] = None,
    cache_arg: Annotated[
        list[str] | None, typer.Option(help="policy hyperparameter key=value (repeatable)")
    ] = None,
    decoder: Annotated[
        str | None, typer.Option(help="reference | threshold | factor | certainty | guided")
    ] = None,
    threshold: Annotated[float | None, typer.Option(help="threshold decoder confidence (0.9)")] = None,
    factor: Annotated[float | None, typer.Option(help="factor decoder parameter (1.0)")] = None,
    early_commit_margin: Annotated[
        float | None, typer.Option(help="commit all remaining when every top1-top2 gap >= this")
    ] = None,
    guide_model: Annotated[
        str | None, typer.Option(help="guided decoder: the AR verifier (tiny-ar or a Qwen2 directory)")
    ] = None,
    agreement: Annotated[
        str | None, typer.Option(help="guided decoder: deterministic | topk_relative")
    ] = None,
    preset: Annotated[str | None, typer.Option(help="a named method, e.g. fast-dllm-dual-parallel")] = None,
    seed: int = 0,
    no_chat: Annotated[
        bool, typer.Option("--no-chat", help="send the prompt raw, without chat template")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="print one JSON object {text, tokens, stats}")
    ] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Generate an answer to PROMPT."""
    with user_errors():
        from dllm_cache.engine import generate as run_generate
        from dllm_cache.methods import Method, parse_method
        from dllm_cache.models.loading import load

        method = parse_method(preset) if preset else Method()
        if cache is not None:
            method.cache = cache
        method.cache_args.update(parse_cache_args(cache_arg))
        explicit = {
            "decoder": decoder,
            "threshold": threshold,
            "factor": factor,
            "early_commit_margin": early_commit_margin,
            "block_length": block_length,
            "guide_model": guide_model,
            "agreement": agreement,
        }
        overrides = {**method.overrides, **{k: v for k, v in explicit.items() if v is not None}}
        policy = method.policy()
        llm = load(model, dtype=dtype, device=resolve_device(device))
        with step_progress(not as_json and sys.stderr.isatty(), steps or gen_length) as progress:
            result = run_generate(
                llm,
                prompt,
                cache=policy,
                progress=progress,
                gen_length=gen_length,
                steps=steps,
                temperature=temperature,
                remasking=remasking,
                alg=alg,
                cfg_scale=cfg_scale,
                seed=seed,
                chat=not no_chat,
                **overrides,
            )
    if as_json:
        print(json.dumps({"text": result.text, "tokens": result.tokens[0], "stats": result.stats.to_dict()}))
        return
    console.print(result.text, highlight=False, markup=False)
    s = result.stats
    err_console.print(
        f"[dim]{s.generated_tokens} tokens, {s.nfe} NFE, {s.wall_time_s:.2f} s, {s.tokens_per_s:.1f} tok/s, "
        f"recomputed {s.recompute_fraction:.1%} of position-layers"
        + (f", {s.guide_nfe} guide NFE" if s.guide_nfe else "")
        + "[/]"
    )


@app.command()
def info(model: ModelOpt = "tiny-llada", as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Architecture, parameter count, dtype and special tokens of a checkpoint."""
    with user_errors():
        from dllm_cache.models.loading import load

        llm = load(model)
        cfg = llm.config
        raw = json.loads((llm.path / "config.json").read_text())
        tok = llm.tokenizer

        def name(i: int | None) -> str | None:
            return tok.convert_ids_to_tokens(i) if tok is not None and i is not None else None

        out = {
            "path": str(llm.path),
            "architecture": cfg.arch,
            "parameters": sum(p.numel() for p in llm.model.parameters()),
            "checkpoint_dtype": raw.get("torch_dtype"),
            "layers": cfg.n_layers,
            "d_model": cfg.d_model,
            "heads": cfg.n_heads,
            "kv_heads": cfg.n_kv_heads,
            "ffn": cfg.d_ff,
            "vocab_size": cfg.vocab_size,
            "max_sequence_length": cfg.max_seq_len,
            "shifted_logits": cfg.shift_logits,
            "special_tokens": {
                "mask": [cfg.mask_token_id, name(cfg.mask_token_id)],
                "eos": [cfg.eos_token_id, name(cfg.eos_token_id)],
                "pad": [cfg.pad_token_id, name(cfg.pad_token_id)],
                "bos": [cfg.bos_token_id, name(cfg.bos_token_id)],
                "end_of_answer": [[i, name(i)] for i in llm.end_token_ids],
            },
            "tokenizer": type(tok).__name__ if tok is not None else None,
        }
    if as_json:
        print(json.dumps(out))
        return
    from rich.table import Table

    table = Table(show_header=False)
    for k, v in out.items():
        table.add_row(k, f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v))
    console.print(table)


@app.command("init-random")
def init_random(
    arch: Annotated[str, typer.Option(help="llada | dream | qwen2")] = "llada",
    out: Annotated[Path, typer.Option(help="output directory")] = Path("tiny-random"),
    layers: int = 2,
    d_model: int = 64,
    heads: int = 4,
    seed: int = 0,
) -> None:
    """Write a small random checkpoint (with a demo tokenizer) in the family's HF format."""
    with user_errors():
        from dllm_cache.models.random_checkpoint import write_random_checkpoint

        path = write_random_checkpoint(arch, out, n_layers=layers, d_model=d_model, n_heads=heads, seed=seed)
    console.print(f"wrote {path}")


def main() -> None:  # pragma: no cover
    app()


@app.command("train-demo")
def train_demo(
    arch: Annotated[str, typer.Option(help="llada | dream | ar")] = "llada",
    out: Annotated[Path | None, typer.Option(help="output directory (default: ./tiny-ARCH)")] = None,
    steps: int = 2500,
    batch_size: int = 128,
    lr: float = 1e-3,
    amp: Annotated[str, typer.Option(help="bf16 (autocast, ~1.8x faster on CPU) | none (fp32)")] = "bf16",
    layers: int = 4,
    d_model: int = 256,
    heads: int = 4,
    d_ff: int = 704,
    seed: int = 0,
    max_minutes: Annotated[float | None, typer.Option(help="stop when the wall clock runs out")] = None,
    init_from: Annotated[
        Path | None, typer.Option(help="warm start from a checkpoint of the same shape")
    ] = None,
    device: DeviceOpt = "auto",
) -> None:
    """Train a demo model (tiny-llada, tiny-dream or tiny-ar) on tiny GSM and write an HF checkpoint."""
    with user_errors():
        from dllm_cache.demo.train import TrainConfig, train

        cfg = TrainConfig(
            arch=arch,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            n_layers=layers,
            d_model=d_model,
            n_heads=heads,
            d_ff=d_ff,
            seed=seed,
            max_minutes=max_minutes,
            init_from=str(init_from) if init_from else None,
            amp=amp,
        )
        dev = resolve_device(device)
        summary = train(
            cfg, out or Path(f"tiny-{arch}"), device=dev, log=lambda m: err_console.print(m, highlight=False)
        )
    console.print_json(json.dumps({k: v for k, v in summary.items() if k != "config"}))


@app.command("eval")
def eval_cmd(
    model: ModelOpt = "tiny-llada",
    task: Annotated[str, typer.Option(help="tiny-gsm")] = "tiny-gsm",
    cache: Annotated[
        str, typer.Option(help="comma-separated methods, e.g. none,dllm-cache:response_interval=4")
    ] = "none,dllm-cache",
    limit: Annotated[int | None, typer.Option(help="number of problems (tiny-gsm: default 500)")] = None,
    batch_size: int = 32,
    gen_length: int = 128,
    steps: int | None = None,
    block_length: int | None = None,
    output: Annotated[Path | None, typer.Option(help="write per-problem outputs as JSONL")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Accuracy and speed of several cache methods on the same problems, in one table."""
    with user_errors():
        from dllm_cache.engine import GenerationConfig
        from dllm_cache.eval.runner import compare, load_task
        from dllm_cache.methods import parse_method
        from dllm_cache.models.loading import load

        methods = [m for m in cache.split(",") if m.strip()]
        for m in methods:
            parse_method(m)
        problems = load_task(task, limit)
        llm = load(model, dtype=dtype, device=resolve_device(device))
        config = GenerationConfig(gen_length=gen_length, steps=steps, block_length=block_length)
        if as_json or not sys.stderr.isatty():
            results, rows = compare(llm, problems, methods, config, batch_size)
        else:
            from rich.progress import Progress

            with Progress(console=err_console, transient=True) as bar:
                t = bar.add_task(f"{task}", total=len(problems) * len(methods))
                results, rows = compare(
                    llm, problems, methods, config, batch_size, lambda n: bar.advance(t, n)
                )
    if output is not None:
        output.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if as_json:
        print(
            json.dumps(
                {"model": model, "task": task, "n": len(problems), "results": [r.to_dict() for r in results]}
            )
        )
        return
    from rich.table import Table

    table = Table(title=f"{task} · {model} · {len(problems)} problems · gen {gen_length}")
    for col in ("method", "accuracy", "tokens/s", "NFE", "recomputed", "GFLOPs/problem", "speed-up"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in results:
        table.add_row(
            r.method,
            f"{r.accuracy:.1%} ({r.correct}/{r.n})",
            f"{r.tokens_per_s:.1f}",
            f"{r.nfe_per_problem:.1f}"
            + (f" (+{r.guide_nfe_per_problem:.1f} AR)" if r.guide_nfe_per_problem else ""),
            f"{r.recompute_fraction:.1%}",
            f"{r.flops_per_problem / 1e9:.2f}",
            f"{r.speedup:.2f}x",
        )
    console.print(table)


@app.command()
def serve(
    model: ModelOpt = "tiny-llada",
    cache: Annotated[str, typer.Option(help="default cache policy (requests may override)")] = "none",
    cache_arg: Annotated[list[str] | None, typer.Option(help="policy hyperparameter key=value")] = None,
    preset: Annotated[str | None, typer.Option(help="default method preset")] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch_size: int = 8,
    max_queue: int = 64,
    api_key: Annotated[
        str | None, typer.Option(envvar="DLLM_CACHE_API_KEY", help="require this bearer key")
    ] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Start an OpenAI-compatible server (completions + chat, streaming) on HOST:PORT."""
    with user_errors():
        try:
            import uvicorn

            from dllm_cache.serve.app import create_app
        except ImportError:
            raise DllmCacheError("the server needs its extra: pip install 'dllm-cache[serve]'") from None
        from dllm_cache.methods import parse_method
        from dllm_cache.models.loading import load

        method = parse_method(preset) if preset else parse_method(cache)
        method.cache_args.update(parse_cache_args(cache_arg))
        method.policy()
        llm = load(model, dtype=dtype, device=resolve_device(device))
        app_ = create_app(
            llm,
            model_name=Path(str(model)).name,
            method=method,
            max_batch_size=max_batch_size,
            max_queue=max_queue,
            api_key=api_key,
        )
    err_console.print(f"serving {model} on http://{host}:{port}/v1 (cache: {method.cache})")
    uvicorn.run(app_, host=host, port=port, log_level="warning")
