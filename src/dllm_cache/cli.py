"""The `dllm-cache` command line (typer + rich)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

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
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
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
        typer.Option(
            help="cache policy: none, dllm-cache, prefix, dual, dkv, d2cache, freecache, elastic-cache"
        ),
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
    agreement_top_k: Annotated[
        int | None, typer.Option(help="topk_relative: the draft must be among the AR top-k (5)")
    ] = None,
    agreement_ratio: Annotated[
        float | None, typer.Option(help="topk_relative: ... with probability >= ratio x the AR top-1 (0.95)")
    ] = None,
    preset: Annotated[
        str | None, typer.Option(help="a named method, e.g. fast-dllm-dual-parallel or dual-surprise")
    ] = None,
    seed: int = 0,
    no_chat: Annotated[
        bool, typer.Option("--no-chat", help="send the prompt raw, without chat template")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="print one JSON object {text, tokens, stats}")
    ] = False,
    no_graphs: Annotated[
        bool, typer.Option("--no-graphs", help="run every denoising forward eagerly (no CUDA graphs)")
    ] = False,
    compile: Annotated[
        bool,
        typer.Option(
            "--compile", help="torch.compile RMSNorm, RoPE and SwiGLU (fused kernels; first use compiles)"
        ),
    ] = False,
    trace: Annotated[
        Path | None,
        typer.Option(
            help="write DIR/trace.html, trace.png and trace.json: every step's commits and recomputes"
        ),
    ] = None,
    live: Annotated[
        bool, typer.Option("--live", help="redraw the answer canvas in the terminal after every step")
    ] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Generate an answer to PROMPT."""
    with user_errors():
        from dllm_cache.methods import Method, parse_method
        from dllm_cache.models.loading import load
        from dllm_cache.trace import generate as run_generate
        from dllm_cache.trace.figure import require_matplotlib
        from dllm_cache.trace.live import live_canvas

        if trace is not None:
            require_matplotlib()

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
            "agreement_top_k": agreement_top_k,
            "agreement_ratio": agreement_ratio,
        }
        overrides = {**method.overrides, **{k: v for k, v in explicit.items() if v is not None}}
        policy = method.policy()
        llm = load(model, dtype=dtype, device=resolve_device(device))
        # --live replaces the progress bar with the canvas itself.
        view = live_canvas(llm, err_console) if live else nullcontext(None)
        with (
            step_progress(not live and not as_json and sys.stderr.isatty(), steps or gen_length) as progress,
            view as on_step,
        ):
            result = run_generate(
                llm,
                prompt,
                cache=policy,
                progress=progress,
                on_step=on_step,
                trace=trace,
                gen_length=gen_length,
                steps=steps,
                temperature=temperature,
                remasking=remasking,
                alg=alg,
                cfg_scale=cfg_scale,
                seed=seed,
                chat=not no_chat,
                graphs=not no_graphs,
                compile=compile,
                **overrides,
            )
    if trace is not None:
        from dllm_cache.trace import TRACE_FILES

        err_console.print(f"[dim]wrote {', '.join(str(trace / f) for f in TRACE_FILES)}[/]", highlight=False)
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


trace_app = typer.Typer(help="Step-by-step denoising traces (written by `generate --trace DIR`).")
app.add_typer(trace_app, name="trace")


@trace_app.command("compare")
def trace_compare(
    a: Annotated[Path, typer.Argument(help="a trace directory (or its trace.json)")],
    b: Annotated[Path, typer.Argument(help="the trace to put beside it")],
    out: Annotated[Path, typer.Option("--out", "-o", help="the page to write")] = Path("trace-compare.html"),
) -> None:
    """One page with two methods' traces side by side: where do their tokens part?"""
    with user_errors():
        from dllm_cache.trace import write_compare

        path = write_compare(a, b, out)
    console.print(f"wrote {path}")


@trace_app.command("screenshot")
def trace_screenshot(
    page: Annotated[Path, typer.Argument(help="a trace page (trace.html or a compare page)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="the PNG to write")] = Path("trace-page.png"),
    step: Annotated[int | None, typer.Option(help="slider position (default: the last step)")] = None,
    width: int = 1400,
    height: int = 900,
) -> None:
    """A PNG of a trace page as headless Chromium draws it (needs chromium, chromedriver, selenium)."""
    with user_errors():
        from dllm_cache.trace.browser import screenshot

        screenshot(page, out, step, width, height)
    console.print(f"wrote {out}")


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
        from dllm_cache.demo.random_checkpoint import write_random_checkpoint

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
        Path | None, typer.Option(help="warm start from a checkpoint of the same shape (keeps its tokenizer)")
    ] = None,
    train_problems: Annotated[int, typer.Option(help="distinct training problems generated")] = 60000,
    pseudo_names: Annotated[
        float, typer.Option(help="fraction of word problems with made-up names (0-1)")
    ] = 0.5,
    pairs: Annotated[
        float, typer.Option(help="fraction of training problems that are pair problems (tiny-gsm-pairs)")
    ] = 0.0,
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
            train_problems=train_problems,
            pseudo_name_fraction=pseudo_names,
            pair_fraction=pairs,
        )
        dev = resolve_device(device)
        summary = train(
            cfg, out or Path(f"tiny-{arch}"), device=dev, log=lambda m: err_console.print(m, highlight=False)
        )
    console.print_json(json.dumps({k: v for k, v in summary.items() if k != "config"}))


@app.command("eval")
def eval_cmd(
    model: ModelOpt = "tiny-llada",
    task: Annotated[
        str,
        typer.Option(
            help="tiny-gsm | tiny-gsm-paraphrase | tiny-gsm-pairs | gsm8k | math500 | humaneval | mbpp"
        ),
    ] = "tiny-gsm",
    cache: Annotated[
        str, typer.Option(help="comma-separated methods, e.g. none,dllm-cache:response_interval=4")
    ] = "none,dllm-cache",
    limit: Annotated[
        int | None, typer.Option(help="the first N problems (default: all; tiny-gsm: 500)")
    ] = None,
    batch_size: int = 32,
    gen_length: int = 128,
    steps: int | None = None,
    block_length: int | None = None,
    fewshot: Annotated[
        int | None,
        typer.Option(help="N-shot raw prompts (default: 0 with a chat template, else the task's usual)"),
    ] = None,
    no_chat: Annotated[
        bool, typer.Option("--no-chat", help="never use the chat template (base-model prompts)")
    ] = False,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help="evaluation data folder (default: $DLLM_CACHE_DATA, else the copy bundled with the package)"
        ),
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option(help="save <method>.jsonl rows + summary.md/json here; a rerun resumes"),
    ] = None,
    exec_timeout: Annotated[float, typer.Option(help="code tasks: seconds per test program")] = 10.0,
    output: Annotated[
        Path | None, typer.Option(help="also write every method's per-problem rows to one JSONL")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Accuracy and speed of several cache methods on the same problems, in one table.

    Under `torchrun --nproc-per-node N -m dllm_cache.eval ...` the problems are sharded across ranks
    (rank r takes r, r+N, ...) and rank 0 merges the shards and prints the summary.
    """
    from dllm_cache.eval.distributed import init_distributed, shutdown

    dist = None
    try:
        with user_errors():
            from dllm_cache.engine import GenerationConfig
            from dllm_cache.eval.suite import EvalSpec, run_eval
            from dllm_cache.eval.tasks import check_task_data, load_task, resolve_prompting
            from dllm_cache.methods import parse_method
            from dllm_cache.models.loading import load

            methods = [m.strip() for m in cache.split(",") if m.strip()]
            for m in methods:
                parse_method(m)
            data = str(data_dir) if data_dir is not None else None
            check_task_data(task, data)  # a missing file is named before the model loads
            dist, dev = init_distributed(resolve_device(device))
            llm = load(model, dtype=dtype, device=dev)
            chat_model = bool(getattr(llm.tokenizer, "chat_template", None)) and not no_chat
            shots, chat = resolve_prompting(task, fewshot, chat_model)
            problems = load_task(
                task, limit, data_dir=data, fewshot=fewshot, chat=chat_model, exec_timeout_s=exec_timeout
            )
            config = GenerationConfig(gen_length=gen_length, steps=steps, block_length=block_length)
            spec = EvalSpec(model, str(llm.path), task, methods, config, batch_size, shots, chat)
            with eval_progress(dist.is_main and not as_json and sys.stderr.isatty(), task) as hooks:
                outcome = run_eval(llm, problems, spec, out_dir, dist, hooks)
    finally:
        if dist is not None:
            shutdown(dist)
    if outcome is None:  # not rank 0
        return
    if output is not None:
        output.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in outcome.rows))
    if as_json:
        print(json.dumps(outcome.summary))
        return
    from rich import box
    from rich.table import Table

    from dllm_cache.eval.data import data_source
    from dllm_cache.eval.suite import SHORT_COLUMNS, summary_cells, summary_title
    from dllm_cache.eval.tasks import task_info

    table = Table(
        title=summary_title(spec, len(problems)), box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 0, 0, 1)
    )
    for col in SHORT_COLUMNS:
        if col == "method":
            table.add_column(col, overflow="fold", min_width=10)
        else:
            table.add_column(col, justify="right")
    for r in outcome.results:
        table.add_row(*summary_cells(r, short=True))
    console.print(table)
    if task_info(task).files:
        err_console.print(f"[dim]data: {data_source(data_dir)}[/]", highlight=False)
    if out_dir is not None:
        resumed = sum(r.n for r in outcome.results) - sum(outcome.generated.values())
        err_console.print(
            f"[dim]rows and summary.md/json in {out_dir}"
            + (f" ({resumed} rows reused from an earlier run)" if resumed else "")
            + "[/]",
            highlight=False,
        )


@contextmanager
def eval_progress(enabled: bool, task: str) -> Iterator[Any]:
    """Hooks driving a progress bar with ETA over the problems left to generate (None when disabled)."""
    from dllm_cache.eval.suite import Hooks

    if not enabled:
        yield Hooks()
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    ) as bar:
        t = bar.add_task(task, total=None)
        yield Hooks(
            on_total=lambda n: bar.update(t, total=n),
            on_method=lambda m: bar.update(t, description=f"{task} · {m}"),
            on_batch=lambda n: bar.advance(t, n),
        )


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
        str | None,
        typer.Option(
            envvar="DLLM_CACHE_API_KEY",
            show_envvar=True,
            help="require this bearer key (prefer the environment variable or --api-key-file: "
            "a command line is visible to every user of the machine)",
        ),
    ] = None,
    api_key_file: Annotated[
        Path | None, typer.Option(help="read the bearer key from this file (first line)")
    ] = None,
    guide_model: Annotated[
        list[str] | None,
        typer.Option(
            help="a guide model requests may name besides the checkpoints shipped with the package "
            "(NAME=DIR, or DIR, named by its last part)"
        ),
    ] = None,
    max_body_bytes: Annotated[
        int | None, typer.Option(help="refuse larger request bodies (413); default: from the model's context")
    ] = None,
    keep_alive: Annotated[int, typer.Option(help="close connections idle this many seconds")] = 5,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Start an OpenAI-compatible server (completions + chat, streaming) on HOST:PORT."""
    with user_errors():
        try:
            import uvicorn

            from dllm_cache.serve.app import create_app, embedded_guide_models
            from dllm_cache.serve.server import server_config
        except ImportError:
            raise DllmCacheError("the server needs its extra: pip install 'dllm-cache[serve]'") from None
        from dllm_cache.methods import parse_method
        from dllm_cache.models.loading import load, resolve_model_dir

        if api_key and api_key_file:
            raise DllmCacheError("give the API key once: --api-key (or DLLM_CACHE_API_KEY) or --api-key-file")
        if api_key_file:
            if not api_key_file.is_file():
                raise DllmCacheError(f"--api-key-file {api_key_file}: no such file")
            lines = api_key_file.read_text().strip().splitlines()
            api_key = lines[0].strip() if lines else ""
            if not api_key:
                raise DllmCacheError(f"--api-key-file {api_key_file} is empty")
        if (max_body_bytes is not None and max_body_bytes <= 0) or keep_alive <= 0:
            raise DllmCacheError("--max-body-bytes and --keep-alive must be positive")
        guides = embedded_guide_models()
        for g in guide_model or []:
            name, sep, where = g.partition("=")
            if not sep:
                name, where = Path(g).name, g
            guides[name] = str(resolve_model_dir(where))
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
            max_body_bytes=max_body_bytes,
            guide_models=guides,
        )
    err_console.print(f"serving {model} on http://{host}:{port}/v1 (cache: {method.cache})")
    uvicorn.Server(server_config(app_, host, port, keep_alive_s=keep_alive)).run()


@app.command()
def bench(
    config: Annotated[
        Path | None, typer.Option(help="grid as TOML (default: the shipped bench_default.toml)")
    ] = None,
    out_dir: Annotated[Path, typer.Option(help="where bench.md, bench.json and pareto.png go")] = Path(
        "bench-results"
    ),
    limit: Annotated[int | None, typer.Option(help="override the config's problems per task")] = None,
    device: Annotated[str | None, typer.Option(help="override the config's device")] = None,
    plot: Annotated[bool, typer.Option(help="write the Pareto plot (needs matplotlib)")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="print the rows as JSON")] = False,
) -> None:
    """Every method x model x task of a grid: one table (markdown + JSON) and one Pareto plot."""
    with user_errors():
        import dataclasses

        from dllm_cache.eval.bench import (
            load_config,
            markdown_table,
            require_matplotlib,
            run_bench,
            validate,
            write_outputs,
        )

        cfg = load_config(config)
        if limit is not None:
            if limit <= 0:
                raise DllmCacheError(f"--limit must be positive, got {limit}")
            cfg = dataclasses.replace(cfg, limit=limit)
        if device is not None:
            cfg = dataclasses.replace(cfg, device=device)
        if plot:
            require_matplotlib()  # fail now, not after the whole grid has run
        validate(cfg)
        log = None if as_json else (lambda m: err_console.print(m, highlight=False))
        if as_json or not sys.stderr.isatty():
            result = run_bench(cfg, log=log)
        else:
            from rich.progress import Progress

            from dllm_cache.eval.bench import count_problems

            with Progress(console=err_console, transient=True) as bar:
                t = bar.add_task("bench", total=count_problems(cfg))
                result = run_bench(cfg, log=log, on_batch=lambda n: bar.advance(t, n))
        paths = write_outputs(result, out_dir, plot=plot)
    if as_json:
        print(
            json.dumps(
                {"config": cfg.to_dict(), "rows": result.rows, "files": {k: str(v) for k, v in paths.items()}}
            )
        )
        return
    console.print(markdown_table(result), highlight=False, markup=False, soft_wrap=True)
    for kind, path in paths.items():
        err_console.print(f"[dim]{kind}: {path}[/]", highlight=False)
