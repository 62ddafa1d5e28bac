"""dllm-cache bench (grid -> table, JSON, Pareto plot), benchmarks/gpu.py, the lm-eval adapter."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dllm_cache.cli import app
from dllm_cache.engine import GenerationConfig, generate
from dllm_cache.errors import DllmCacheError
from dllm_cache.eval import bench
from dllm_cache.methods import PRESETS, parse_method

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

GRID = """
models = ["tiny-llada"]
tasks = ["tiny-gsm"]
methods = ["none", "dllm-cache", "fast-dllm-dual-parallel"]
limit = 2
gen_length = 32
batch_size = 2
device = "cpu"
"""


@pytest.fixture(autouse=True)
def one_thread():
    """These tests run small shapes, where a second intra-op thread only adds contention on a busy
    machine (measured: 0.3 s vs 17 s for one generate_until call with a training run beside it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- config ---------------------------------------------------------------------------------


def test_default_config_is_shipped_and_valid():
    cfg = bench.load_config(None)
    assert cfg.models == ["tiny-llada", "tiny-dream"] and cfg.tasks == ["tiny-gsm"]
    assert cfg.methods[0] == "none"
    for m in cfg.methods:
        assert m in PRESETS or m == "none"
        parse_method(m)
    bench.validate(cfg)  # the demo models and the task exist


BASE = {"models": ["tiny-llada"], "tasks": ["tiny-gsm"], "methods": ["none"]}


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"tasks": ["tiny-gsm"], "methods": ["none"]}, "missing 'models'"),
        ({**BASE, "models": []}, "'models' must be a non-empty list"),
        ({**BASE, "limt": 3}, "unknown key 'limt'"),
        ({**BASE, "limit": 0}, "positive integer"),
        ({**BASE, "gen_length": "64"}, "positive integer"),
        ({**BASE, "device": 1}, "must be a string"),
        ({**BASE, "fewshot": -1}, "'fewshot' must be an integer >= 0"),
        ({**BASE, "chat": "yes"}, "true or false"),
    ],
)
def test_config_errors_are_named(raw, message):
    with pytest.raises(DllmCacheError, match=message):
        bench.parse_config(raw)


def test_config_file_errors(tmp_path):
    with pytest.raises(DllmCacheError, match="not found"):
        bench.load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("models = [")
    with pytest.raises(DllmCacheError, match="invalid TOML"):
        bench.load_config(bad)
    cfg = bench.parse_config({"models": "tiny-llada", "tasks": ["tiny-gsm"], "methods": ["none"]})
    assert cfg.models == ["tiny-llada"]  # a single string is a one-element list
    for field, value, message in [
        ("methods", ["nonsense"], "unknown cache policy"),
        ("tasks", ["no-such-task"], "unknown task"),
        ("models", ["/no/such/model"], "model directory not found"),
        ("tasks", ["gsm8k"], "gsm8k"),  # its data file is not in the (empty) data folder
        ("fewshot", 5, "at most 0 few-shot"),
    ]:
        raw = {**BASE, "data_dir": str(tmp_path), field: value}
        with pytest.raises(DllmCacheError, match=message):
            bench.validate(bench.parse_config(raw))


# ---- Pareto front and plot ------------------------------------------------------------------


def _row(method, tps, acc, model="m", task="t"):
    return {"model": model, "task": task, "method": method, "tokens_per_s": tps, "accuracy": acc, "n": 10}


def test_pareto_mask():
    rows = [_row("a", 10, 0.5), _row("b", 20, 0.4), _row("c", 5, 0.4), _row("d", 20, 0.4), _row("e", 30, 0.1)]
    # c is dominated by a; b and d tie (neither dominates the other); e is the fastest.
    assert bench.pareto_mask(rows) == [True, True, False, True, True]
    assert bench.pareto_mask([_row("x", 1, 0.0)]) == [True]


def test_plot_writes_png(tmp_path):
    rows = [_row("none", 10, 0.5), _row("dual", 40, 0.45), _row("slow", 5, 0.2)]
    rows += [_row("none", 8, 0.3, model="m2"), _row("dual", 0.0, 0.3, model="m2")]  # 0 tok/s: clipped
    for r, p in zip(rows[:3], bench.pareto_mask(rows[:3]), strict=True):
        r["pareto"] = p
    path = bench.plot_pareto(rows, tmp_path / "p.png", title="t")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_missing_matplotlib_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(DllmCacheError, match=r"dllm-cache\[bench\]"):
        bench.plot_pareto([_row("a", 1, 0.1)], tmp_path / "p.png")


# ---- the grid end to end ----------------------------------------------------------------------


def test_run_bench_and_outputs(tmp_path):
    cfg = bench.parse_config(__import__("tomllib").loads(GRID))
    result = bench.run_bench(cfg)
    assert [r["method"] for r in result.rows] == cfg.methods
    assert len(result.outputs) == 2 * len(cfg.methods)
    for r in result.rows:
        assert r["model"] == "tiny-llada" and r["task"] == "tiny-gsm" and r["n"] == 2
        assert r["tokens_per_s"] > 0 and 0 <= r["accuracy"] <= 1
    assert any(r["pareto"] for r in result.rows)
    assert result.rows[0]["speedup"] == 1.0
    paths = bench.write_outputs(result, tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert data["config"]["methods"] == cfg.methods and len(data["rows"]) == 3
    assert data["environment"]["device"] == "cpu"
    md = paths["markdown"].read_text()
    assert md.count("| tiny-llada | tiny-gsm |") == 3
    assert paths["plot"].read_bytes()[:8] == PNG_MAGIC
    assert len(paths["outputs"].read_text().splitlines()) == 6


def test_cli_bench(tmp_path):
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID.replace('"dllm-cache", "fast-dllm-dual-parallel"', '"dual"'))
    out = tmp_path / "res"
    r = CliRunner().invoke(
        app, ["bench", "--config", str(grid), "--out-dir", str(out), "--limit", "1", "--json"]
    )
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert [row["method"] for row in data["rows"]] == ["none", "dual"] and data["rows"][0]["n"] == 1
    assert (out / "bench.md").is_file() and (out / "pareto.png").is_file() and (out / "bench.json").is_file()
    grid.write_text(GRID.replace('"dllm-cache"', '"dllm-cache:nope=1"'))
    r = CliRunner().invoke(app, ["bench", "--config", str(grid), "--out-dir", str(out)])
    assert r.exit_code == 2 and "has no argument 'nope'" in r.output and "Traceback" not in r.output


# ---- benchmarks/gpu.py --------------------------------------------------------------------------


def _gpu_module():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # registered, as an import would (dataclasses look it up)
    spec.loader.exec_module(module)
    return module


def test_gpu_benchmark_tiny_cpu(tmp_path, capsys):
    gpu = _gpu_module()
    out = tmp_path / "gpu.json"
    report = gpu.main(
        ["--tiny", "--device", "cpu", "--shapes", "tiny-llada", "tiny-dream", "--gen", "32", "--batch", "2",
         "--prompt", "16", "--methods", "none,dual,fast-dllm-dual-parallel", "--no-warmup", "--out", str(out)]
    )  # fmt: skip
    rows = report["rows"]
    assert [(r["shape"], r["method"]) for r in rows] == [
        (s, m) for s in ("tiny-llada", "tiny-dream") for m in ("none", "dual", "fast-dllm-dual-parallel")
    ]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["peak_memory_gib"] > 0 and r["generated_tokens"] <= 2 * 32
    assert rows[0]["speedup"] == 1.0 and rows[1]["recompute_fraction"] < 1.0
    assert rows[2]["nfe"] == 32  # random weights: the threshold decoder commits one token per step
    for r in rows:  # each row against the floor of its work, at the chip rates measured in the run
        assert r["ms_per_nfe"] == pytest.approx(1e3 * r["wall_time_s"] / r["nfe"])
        assert 0 < r["floor_ms_per_nfe"] and r["efficiency"] == pytest.approx(
            r["floor_ms_per_nfe"] / r["ms_per_nfe"]
        )
        assert r["launches_per_nfe"] > 10  # one profiled step: a kernel per op at least per layer
    assert rows[1]["launches_per_nfe"] != rows[0]["launches_per_nfe"]  # dual's step is not uncached's
    assert report["chip"]["matmul_flops_per_s"] > 0 and report["chip"]["bytes_per_s"] > 0
    assert json.loads(out.read_text())["rows"] == rows
    printed = capsys.readouterr().out
    assert "| tiny-dream | dual | 16 | 32 | 32 | 2 |" in printed and "random weights" in printed


def test_gpu_benchmark_guided_and_server_rows(tmp_path, capsys):
    """--guided: the AR guide's ms per forward against its floor; --server: the same engine call
    through the server's scheduler, the batch's requests in one generation."""
    gpu = _gpu_module()
    report = gpu.main(
        ["--tiny", "--device", "cpu", "--shapes", "tiny-dream", "--gen", "16", "--batch", "2", "--prompt", "8",
         "--block-length", "16", "--methods", "none", "--server", "dual", "--guided", "dual", "--no-warmup",
         "--no-profile", "--out", str(tmp_path / "gpu.json")]
    )  # fmt: skip
    rows = {r["method"]: r for r in report["rows"]}
    assert list(rows) == ["none", "dual (server)", "guided+dual"]
    server = rows["dual (server)"]
    assert server["server_batches"] == 1 and server["nfe"] == 16 and server["recompute_fraction"] < 1.0
    assert server["server_wall_s"] >= server["wall_time_s"] > 0 and server["efficiency"] > 0
    guided = rows["guided+dual"]
    assert guided["guide_nfe"] >= 1 and guided["steps"] == guided["nfe"] and guided["generated_tokens"] > 0
    assert 0 < guided["guide_floor_ms"] and guided["guide_efficiency"] == pytest.approx(
        guided["guide_floor_ms"] / guided["guide_ms_per_forward"]
    )
    assert "The AR guide's forward in guided decoding" in capsys.readouterr().out


def test_gpu_bar_script_dry_run_keeps_its_time(tmp_path):
    """benchmarks/gpu_bar.sh at tiny shapes on CPU with a 20 s budget: the first table is written row
    by row, the tables it has no time for are named, and the script ends within its budget."""
    import os
    import subprocess
    import sys
    import time

    env = dict(os.environ, OUT=str(tmp_path), TINY="1", TOTAL_S="20", PY=sys.executable)
    start = time.perf_counter()
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_bar.sh")], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert time.perf_counter() - start < 20 + 60
    first = json.loads((tmp_path / "llada-p16-g32.json").read_text())
    assert first["chip"]["matmul_flops_per_s"] > 0 and first["rows"]
    assert all("error" in r or r["ms_per_nfe"] > 0 for r in first["rows"])
    tables = (tmp_path / "tables.md").read_text()
    assert "# llada-eager: no time left" in tables and "# gpu_bar.sh:" in tables


def test_gpu_benchmark_budget_writes_what_it_has(tmp_path):
    gpu = _gpu_module()
    out = tmp_path / "gpu.json"
    report = gpu.main(
        ["--tiny", "--device", "cpu", "--shapes", "tiny-llada", "--gen", "32", "--batch", "1", "--prompt", "16",
         "--methods", "none,dual", "--no-warmup", "--no-profile", "--budget-s", "0", "--out", str(out)]
    )  # fmt: skip
    assert [r["error"] for r in report["rows"]] == ["skipped (--budget-s)"] * 2
    assert json.loads(out.read_text())["chip"] == report["chip"]


def test_gpu_benchmark_real_shapes_parse():
    gpu = _gpu_module()
    llada = gpu.shape_config("llada-8b", gpu.HERE / "configs")
    dream = gpu.shape_config("dream-7b", gpu.HERE / "configs")
    assert (llada.n_layers, llada.d_model, llada.vocab_size) == (32, 4096, 126464)
    assert (dream.n_layers, dream.d_model, dream.n_kv_heads, dream.shift_logits) == (28, 3584, 4, True)
    with pytest.raises(SystemExit):
        gpu.parse_args(["--shapes", "gpt-9"])
    with pytest.raises(DllmCacheError):
        gpu.parse_args(["--tiny", "--device", "cpu", "--methods", "none,warp-drive"])


# ---- lm-eval adapter ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm():
    # lm-eval is part of the dev extra: a missing install fails here instead of skipping quietly.
    from dllm_cache.eval.lm_eval_adapter import DllmCacheLM

    return DllmCacheLM(model="tiny-llada", cache="dllm-cache", device="cpu", mc_samples=8, mc_batch_size=4)


def _instance(kind, args, i=0):
    from lm_eval.api.instance import Instance

    return Instance(kind, {}, args, i)


def test_lm_eval_registration(lm):
    from lm_eval.api.registry import get_model

    from dllm_cache.eval.lm_eval_adapter import DllmCacheLM

    assert get_model("dllm_cache") is DllmCacheLM


def test_generate_until_matches_engine_and_stops(lm):
    from dllm_cache.eval.lm_eval_adapter import truncate_at_stop

    assert truncate_at_stop("ab\n\ncd####", ["####", "\n\n"]) == "ab"
    assert truncate_at_stop("abc", []) == "abc"
    ctx = lm.apply_chat_template([{"role": "user", "content": "What is 12 + 7?"}])
    reqs = [
        _instance("generate_until", (ctx, {"until": ["####"], "max_gen_toks": 20}), 0),
        _instance(
            "generate_until", ("Question: 2 + 3 = ?\nAnswer:", {"until": ["\n"], "max_gen_toks": 10}), 1
        ),
    ]
    texts = lm.generate_until(reqs)
    assert len(texts) == 2 and "####" not in texts[0] and "\n" not in texts[1]
    # Same tokens as the engine with the chat template: max_gen_toks 20 -> gen_length 32 (block 32).
    direct = generate(
        lm.llm, "What is 12 + 7?", GenerationConfig(gen_length=32), cache=parse_method("dllm-cache").policy()
    )
    assert texts[0] == truncate_at_stop(direct.text, ["####"])
    assert lm._lengths(20) == (32, 32, 32) and lm._lengths(40) == (64, 32, 64)


def test_loglikelihood_estimate(lm):
    ctx = lm.apply_chat_template([{"role": "user", "content": "What is 12 + 7?"}])
    reqs = [
        _instance("loglikelihood", (ctx, "19 + 0 = 19\n#### 19"), 0),
        _instance("loglikelihood", (ctx, " zebra quantum"), 1),
    ]
    first = lm.loglikelihood(reqs)
    assert len(first) == 2
    for ll, greedy in first:
        assert math.isfinite(ll) and ll <= 0 and isinstance(greedy, bool)
    assert lm.loglikelihood(reqs) == first  # masks come from the seed: deterministic
    assert lm.loglikelihood(reqs[::-1]) == first[::-1]  # ... and independent of order


def test_loglikelihood_single_token_is_exact(lm):
    """With the "l" estimator a one-token continuation is always masked with weight 1: the estimate
    is log p(token | context) from one forward, whatever the number of samples."""
    ids = lm._with_bos(
        lm.tok_encode(lm.apply_chat_template([{"role": "user", "content": "What is 12 + 7?"}]))
    )
    x = torch.tensor([[*ids, lm.llm.config.mask_token_id]])
    logp = lm.llm.model(x)[0, -1].log_softmax(-1)
    best = int(logp.argmax())
    other = int(logp.argsort()[len(logp) // 2])
    ll_best, greedy_best = lm.score(ids, [best])
    ll_other, greedy_other = lm.score(ids, [other])
    assert ll_best == pytest.approx(float(logp[best]), abs=1e-4) and greedy_best
    assert ll_other == pytest.approx(float(logp[other]), abs=1e-4) and not greedy_other


def test_loglikelihood_t_estimator_and_samples(lm):
    from dllm_cache.eval.lm_eval_adapter import DllmCacheLM

    ids = lm._with_bos(lm.tok_encode("Question: what is 2 + 3?\nAnswer:"))
    cont = lm.tok_encode(" 5, because two plus three is five.")
    estimates = {}
    for estimator in ("l", "t"):
        for samples in (4, 32):
            other = DllmCacheLM.__new__(DllmCacheLM)
            other.__dict__.update(lm.__dict__)
            other.mc_estimator, other.mc_samples = estimator, samples
            estimates[estimator, samples] = other.score(ids, cont)[0]
    assert all(math.isfinite(v) and v <= 0 for v in estimates.values())
    # Both estimate the same bound: with 32 samples they agree within a loose factor.
    assert estimates["t", 32] / estimates["l", 32] == pytest.approx(1.0, rel=0.6)


def test_lm_eval_errors(lm):
    from dllm_cache.eval.lm_eval_adapter import DllmCacheLM

    with pytest.raises(NotImplementedError, match="loglikelihood_rolling"):
        lm.loglikelihood_rolling([_instance("loglikelihood_rolling", ("some text",))])
    with pytest.raises(DllmCacheError, match="unknown model argument 'bogus'"):
        DllmCacheLM(model="tiny-llada", bogus=1)
    with pytest.raises(DllmCacheError, match="mc_estimator"):
        DllmCacheLM(model="tiny-llada", mc_estimator="z")
    with pytest.raises(DllmCacheError, match="unknown cache policy"):
        DllmCacheLM(model="tiny-llada", cache="warp")


def test_lm_eval_simple_evaluate_local_task(lm, tmp_path, monkeypatch):
    """lm-eval end to end: a local JSON task (no hub), generation and multiple choice."""
    import lm_eval

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    data = tmp_path / "data.jsonl"
    data.write_text(
        json.dumps({"question": "What is 12 + 7?", "answer": "19"})
        + "\n"
        + json.dumps({"question": "What is 3 + 4?", "answer": "7"})
        + "\n"
    )
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (tmp_path / "gen.yaml").write_text(
        "task: dllm_tiny_gen\n" + common + 'output_type: generate_until\ndoc_to_text: "{{question}}"\n'
        'doc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 16\n'
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (tmp_path / "mc.yaml").write_text(
        "task: dllm_tiny_mc\n"
        + common
        + 'output_type: multiple_choice\ndoc_to_text: "{{question}} Answer:"\n'
        'doc_to_choice: ["7", "19"]\ndoc_to_target: "{{0 if answer == \'7\' else 1}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model="dllm_cache",
        model_args="model=tiny-llada,cache=fast-dllm-dual-parallel,mc_samples=2,device=cpu",
        tasks=["dllm_tiny_gen", "dllm_tiny_mc"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        apply_chat_template=True,
        log_samples=False,
    )
    assert set(out["results"]) == {"dllm_tiny_gen", "dllm_tiny_mc"}
    assert 0.0 <= out["results"]["dllm_tiny_mc"]["acc,none"] <= 1.0


def test_lm_eval_scores_a_local_task_as_our_eval_does(tmp_path, monkeypatch):
    """lm-eval's own evaluator on the demo model, over a task YAML of bundled tiny-GSM problems
    (no hub): its exact-match score and every response equal `dllm-cache eval`'s on the same
    problems with the same settings."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    import dllm_cache.eval.lm_eval_adapter  # noqa: F401  (registers the `dllm_cache` model)
    from dllm_cache.engine import GenerationConfig
    from dllm_cache.eval.runner import compare
    from dllm_cache.eval.tasks import load_task
    from dllm_cache.models.loading import load

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    problems = load_task("tiny-gsm", 6)
    data = tmp_path / "tiny_gsm.jsonl"
    data.write_text("".join(json.dumps({"question": p.prompt, "gold": p.gold}) + "\n" for p in problems))
    (tmp_path / "tiny_gsm.yaml").write_text(
        "task: dllm_tiny_gsm\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        'output_type: generate_until\ndoc_to_text: "{{question}}"\ndoc_to_target: "{{gold}}"\n'
        'generation_kwargs:\n  until: ["<|never|>"]\n  max_gen_toks: 32\n'
        "filter_list:\n  - name: answer\n    filter:\n"
        '      - function: regex\n        regex_pattern: "#### (\\\\-?[0-9]+)"\n'
        "      - function: take_first\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    out = lm_eval.simple_evaluate(
        model="dllm_cache",
        model_args="model=tiny-llada,cache=dllm-cache,gen_length=32,block_length=32,device=cpu",
        tasks=["dllm_tiny_gsm"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        apply_chat_template=True,
        log_samples=True,
    )
    llm = load("tiny-llada", device="cpu")
    config = GenerationConfig(gen_length=32, steps=32, block_length=32)
    (ours,), rows = compare(llm, problems, ["dllm-cache"], config, batch_size=6)
    samples = sorted(out["samples"]["dllm_tiny_gsm"], key=lambda s: s["doc_id"])
    assert [s["resps"][0][0] for s in samples] == [r["text"] for r in rows]
    assert ours.correct >= 4  # the demo model solves most of them: the comparison is not 0 == 0
    assert out["results"]["dllm_tiny_gsm"]["exact_match,answer"] == pytest.approx(
        ours.correct / len(problems)
    )
