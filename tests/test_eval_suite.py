"""The evaluation suite: data, answer extraction, code execution, the eval command, resume, torchrun."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dllm_cache.cli import app
from dllm_cache.errors import DllmCacheError
from dllm_cache.eval import runner as runner_mod
from dllm_cache.eval.answers import extract_answer
from dllm_cache.eval.data import BUNDLED_DATA_DIR, DATA_ENV, data_dir, data_file, data_source
from dllm_cache.eval.distributed import Dist
from dllm_cache.eval.execution import extract_code, run_program, truncate_at
from dllm_cache.eval.math_answers import (
    extract_math_answer,
    last_boxed,
    math_equal,
    normalize_math,
    to_fraction,
)
from dllm_cache.eval.runner import percentile
from dllm_cache.eval.suite import RowStore, method_filename
from dllm_cache.eval.tasks import Problem, load_task, score

cli = CliRunner()
HAVE_DATA = all(
    (data_dir() / f).is_file()
    for f in (
        "gsm8k/test.jsonl",
        "gsm8k/train.jsonl",
        "math500/test.jsonl",
        "humaneval/HumanEval.jsonl.gz",
        "mbpp/mbpp.jsonl",
    )
)
needs_data = pytest.mark.skipif(not HAVE_DATA, reason=f"evaluation data not found (set {DATA_ENV})")
TINY = ["--model", "tiny-llada", "--gen-length", "16", "--device", "cpu"]


# ------------------------------------------------------------------ data


def test_data_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)
    assert data_dir() == BUNDLED_DATA_DIR
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert data_dir() == tmp_path
    assert data_dir(tmp_path / "x") == tmp_path / "x"
    with pytest.raises(DllmCacheError, match=r"missing data file .*gsm8k/test\.jsonl .*--data-dir DIR or"):
        data_file("gsm8k/test.jsonl")


def test_missing_data_file_is_one_clear_line(tmp_path):
    result = cli.invoke(app, ["eval", "--task", "gsm8k", "--data-dir", str(tmp_path), *TINY])
    assert result.exit_code == 2
    out = result.output.strip()
    assert len(out.splitlines()) == 1 and "Traceback" not in out
    assert f"missing data file {tmp_path / 'gsm8k' / 'test.jsonl'}" in out
    assert "--data-dir DIR or DLLM_CACHE_DATA=DIR" in out


# ------------------------------------------------------------------ GSM8K


@needs_data
def test_gsm8k_gold_solutions_score_and_perturbed_answers_do_not():
    problems = load_task("gsm8k", 50, chat=True)
    rows = [json.loads(line) for line in data_file("gsm8k/test.jsonl").read_text().splitlines()[:50]]
    assert len(problems) == 50
    for p, row in zip(problems, rows, strict=True):
        solution = row["answer"]
        assert p.gold == extract_answer(solution) == solution.rpartition("#### ")[2].replace(",", "")
        assert score(p, solution).correct, (p.id, solution)
        head, _, gold = solution.rpartition("#### ")
        wrong = f"{head}#### {Fraction(gold.replace(',', '')) + 1}"
        assert not score(p, wrong).correct, (p.id, wrong)
        # A model that ends with a sentence instead of the marker: the last number counts.
        assert score(p, f"{head}The answer is {gold}.").correct


@needs_data
def test_gsm8k_prompts_chat_and_fewshot():
    chat = load_task("gsm8k", 2, chat=True)
    assert chat[0].chat and chat[0].prompt.endswith('"#### <number>".') and chat[0].stop == ()
    base = load_task("gsm8k", 2, chat=False)  # no chat template: 4-shot raw
    assert not base[0].chat and base[0].prompt.count("Question:") == 5 and base[0].prompt.endswith("Answer:")
    assert "<<" not in base[0].prompt  # calculator annotations stripped from the shots
    two = load_task("gsm8k", 2, chat=True, fewshot=2)
    assert not two[0].chat and two[0].prompt.count("Question:") == 3
    # a base model continues with the next question: the output is cut there before extraction
    p = base[0]
    assert score(p, f" She makes 18.\n#### {p.gold}\n\nQuestion: x\nAnswer: #### 7").correct


# ------------------------------------------------------------------ MATH-500


@needs_data
def test_math500_gold_solutions_score_and_perturbed_answers_do_not():
    problems = load_task("math500", 50, chat=True)
    rows = [json.loads(line) for line in data_file("math500/test.jsonl").read_text().splitlines()[:50]]
    for p, row in zip(problems, rows, strict=True):
        solution = row["answer"]
        assert p.gold == last_boxed(solution) and p.gold
        assert score(p, solution).correct, (p.id, p.gold)
        value = to_fraction(normalize_math(p.gold))
        wrong = str(value + 1) if value is not None else p.gold + "+1"
        assert not score(p, f"So the answer is $\\boxed{{{wrong}}}$.").correct, (p.id, p.gold, wrong)


@pytest.mark.parametrize(
    "pred,gold",
    [
        ("\\dfrac{1}{2}", "\\frac12"),
        ("1/2", "\\frac{1}{2}"),
        ("0.5", "\\tfrac{1}{2}"),
        ("\\frac{270}7\\text{ degrees}", "\\frac{270}{7}"),
        ("1\\frac{4}{5}", "9/5"),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}2)"),
        ("x = 5", "5"),
        ("90^\\circ", "90"),
        ("50\\%", "50"),
        ("\\$32,\\!348", "32348"),
        ("58,500", "58500"),
        ("5.0", "5"),
        (".0000672", "0.0000672"),
        ("5.4 \\text{ cents}", "5.4"),
        ("864 \\mbox{ inches}^2", "864"),
        ("15 degrees", "15"),
        ("\\text{(C)}", "C"),
        ("\\text{Evelyn}", "Evelyn"),
        ("-2, 1", "1,-2"),
        ("x \\in [-2,7]", "[-2, 7]"),
        ("(2, \\infty)", "(2,\\infty)"),
        (
            "\\begin{pmatrix} -1/3 \\\\ 2/3 \\end{pmatrix}",
            "\\begin{pmatrix}\\frac{-1}{3}\\\\\\frac23\\end{pmatrix}",
        ),
        ("\\sqrt2 + 1", "\\sqrt{2}+1"),
    ],
)
def test_math_equivalent_forms(pred, gold):
    assert math_equal(pred, gold), (normalize_math(pred), normalize_math(gold))


@pytest.mark.parametrize(
    "pred,gold",
    [
        ("[2,5)", "(2,5)"),
        ("(1,2)", "(2,1)"),
        ("\\frac{14}{3}+1", "\\frac{14}{3}"),
        ("0.33", "\\frac13"),
        (None, "1"),
    ],
)
def test_math_different_answers(pred, gold):
    assert not math_equal(pred, gold)


def test_math_extraction():
    assert (
        last_boxed("a \\boxed{\\frac{1}{2}} then \\boxed{\\left\\{ 1, 2 \\right\\}}.")
        == "\\left\\{ 1, 2 \\right\\}"
    )
    assert last_boxed("$\\boxed 5$.") == "5"
    assert last_boxed("no box") is None
    assert extract_math_answer("Final Answer: The final answer is $3.5$. I hope it is correct.") == "3.5"
    assert extract_math_answer("... \\boxed{\\frac{3}{4") == "\\frac{3}{4"  # truncated: what there is


# ------------------------------------------------------------------ code execution


def test_extract_code():
    text = "Here:\n```\nnot this\n```\n```python\ndef f(x):\n    return x\n```\nDone."
    assert extract_code(text, "f") == "def f(x):\n    return x\n"
    assert extract_code("```py\nprint(1)\n```") == "print(1)\n"
    assert extract_code("```python\ndef g():\n    pass") == "def g():\n    pass"  # unclosed fence
    assert extract_code("    return 1\n") == "    return 1\n"  # no fence: raw
    assert truncate_at("a\ndef b\n#c", ("\n#", "\ndef ")) == "a"


def test_execution_is_contained():
    assert run_program("print('ok')", timeout_s=5).passed
    failed = run_program("assert 1 == 2, 'boom'", timeout_s=5)
    assert not failed.passed and failed.status == "failed: AssertionError: boom"
    net = run_program("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)", timeout_s=5)
    assert not net.passed and "network access is disabled" in net.status
    mem = run_program("x = bytearray(8 * 2**30)", timeout_s=5, memory_mb=512)
    assert not mem.passed and "MemoryError" in mem.status


def test_hanging_program_and_its_children_are_killed():
    start = time.perf_counter()
    r = run_program(
        "import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', 'while True: pass'])\nwhile True: pass",
        timeout_s=2,
    )
    assert not r.passed and r.status == "timed out after 2s"
    assert time.perf_counter() - start < 6


@needs_data
def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail():
    base = load_task("humaneval", 4, chat=False, exec_timeout_s=5)
    chat = load_task("humaneval", 4, chat=True, exec_timeout_s=5)
    for b, c in zip(base, chat, strict=True):
        assert b.prompt == b.meta["prompt"] and "```python" in c.prompt
        assert score(b, b.gold).correct, (b.id, score(b, b.gold).detail)
        whole = f"Sure!\n```python\n{c.meta['prompt']}{c.gold}```\n"
        assert score(c, whole).correct, (c.id, score(c, whole).detail)
        wrong = score(b, "    return None\n")
        assert not wrong.correct and wrong.detail.startswith("failed")
    # a base model's continuation is cut at the next top-level definition
    assert score(base[0], base[0].gold + "\ndef junk(:\n").correct


@needs_data
def test_humaneval_hanging_completion_times_out():
    (p,) = load_task("humaneval", 1, chat=False, exec_timeout_s=2)
    start = time.perf_counter()
    s = score(p, "    while True:\n        pass\n")
    assert not s.correct and s.detail == "timed out after 2s"
    assert time.perf_counter() - start < 6


@needs_data
def test_mbpp_canonical_solutions_pass_and_wrong_ones_fail():
    base = load_task("mbpp", 4, chat=False, exec_timeout_s=5)
    chat = load_task("mbpp", 4, chat=True, exec_timeout_s=5)
    assert base[0].id == "mbpp/11" and base[0].prompt.count("[BEGIN]") == 4  # 3 shots + the question
    assert chat[0].prompt.startswith("You are an expert Python programmer, and here is your task:")
    assert "Your code should pass these tests:\n\nassert remove_Occ" in chat[0].prompt
    for b, c in zip(base, chat, strict=True):
        assert score(b, b.gold + "\n[DONE]\nmore text").correct, (b.id, score(b, b.gold).detail)
        assert score(c, f"```python\n{c.gold}\n```").correct
        assert not score(c, f"```python\ndef {c.meta['entry_point']}(*a):\n    return 0\n```").correct
    (hang,) = load_task("mbpp", 1, chat=True, exec_timeout_s=2)
    s = score(hang, "while True:\n    pass\n")
    assert not s.correct and s.detail == "timed out after 2s"


def test_task_options_are_checked():
    with pytest.raises(DllmCacheError, match="unknown task 'mmlu'"):
        load_task("mmlu")
    with pytest.raises(DllmCacheError, match="math500 has at most 4 few-shot examples"):
        load_task("math500", 1, fewshot=5)
    with pytest.raises(DllmCacheError, match="humaneval has at most 0 few-shot"):
        load_task("humaneval", 1, fewshot=1)
    with pytest.raises(DllmCacheError, match="--limit must be positive"):
        load_task("tiny-gsm", 0)


# ------------------------------------------------------------------ the eval command


def test_percentile_matches_linear_interpolation():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 95) == 5.0 and percentile([], 50) == 0.0
    assert percentile([0.0, 10.0], 95) == pytest.approx(9.5)


@needs_data
def test_eval_writes_rows_and_summaries_then_resumes(tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = ["eval", "--task", "gsm8k", "--limit", "5", "--batch-size", "3", "--cache", "none,dllm-cache"]
    result = cli.invoke(app, [*args, *TINY, "--out-dir", str(out)])
    assert result.exit_code == 0, result.output
    assert "dllm-cache" in result.output and "speed-up" in result.output
    files = {p.name for p in out.iterdir()}
    assert files == {"run.json", "none.jsonl", "dllm-cache.jsonl", "summary.json", "summary.md"}
    for method in ("none", "dllm-cache"):
        rows = [json.loads(line) for line in (out / f"{method}.jsonl").read_text().splitlines()]
        assert [r["id"] for r in rows] == [f"gsm8k/{i}" for i in range(5)]
        for r in rows:
            assert {
                "id",
                "method",
                "prompt",
                "text",
                "prediction",
                "gold",
                "correct",
                "latency_s",
                "nfe",
            } <= set(r)
            assert r["method"] == method and r["nfe"] > 0 and r["latency_s"] > 0
        # latency = the wall time of the batch (3 + 2 problems): shared within a batch
        assert rows[0]["latency_s"] == rows[2]["latency_s"] and rows[0]["batch_size"] == 3
        assert rows[3]["latency_s"] == rows[4]["latency_s"] and rows[4]["batch_size"] == 2
    summary = json.loads((out / "summary.json").read_text())
    none, cached = summary["results"]
    assert summary["task"] == "gsm8k" and summary["n"] == 5 and summary["chat"] is True
    assert none["n"] == cached["n"] == 5 and none["speedup"] == 1.0 and cached["recompute_fraction"] < 1
    assert none["latency_p50_s"] > 0 and none["latency_p95_s"] >= none["latency_p50_s"]
    md = (out / "summary.md").read_text()
    assert (
        "| method | accuracy | tokens/s | latency p50 (s) | latency p95 (s) |" in md
        and "| dllm-cache |" in md
    )

    # Rerun: nothing to generate, the files stay byte for byte.
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls: list[int] = []
    real_generate = runner_mod.generate

    def counting_generate(*a, **k):
        calls.append(1)
        return real_generate(*a, **k)

    monkeypatch.setattr(runner_mod, "generate", counting_generate)
    again = cli.invoke(app, [*args, *TINY, "--out-dir", str(out), "--json"])
    assert again.exit_code == 0, again.output
    assert calls == []
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert json.loads(again.output)["results"] == summary["results"]

    # A longer limit generates only the new problem (one batch per method) and appends it.
    longer = [a if a != "5" else "6" for a in args]
    assert cli.invoke(app, [*longer, *TINY, "--out-dir", str(out)]).exit_code == 0
    assert len(calls) == 2
    rows = (out / "none.jsonl").read_text().splitlines()
    assert len(rows) == 6 and (out / "none.jsonl").read_bytes().startswith(before["none.jsonl"])
    assert json.loads((out / "summary.json").read_text())["n"] == 6

    # Other generation settings into the same folder are refused.
    bad = cli.invoke(app, [*args, *TINY, "--out-dir", str(out), "--steps", "8"])
    assert bad.exit_code == 2 and "holds a run with steps=None, not 8" in bad.output


def test_eval_refuses_to_resume_rows_of_a_changed_checkpoint(tmp_path):
    from dllm_cache.demo.random_checkpoint import write_random_checkpoint

    ckpt, out = tmp_path / "model", tmp_path / "run"
    write_random_checkpoint("llada", ckpt, seed=0)
    args = ["eval", "--model", str(ckpt), "--task", "tiny-gsm", "--limit", "2", "--gen-length", "8"]
    args += ["--device", "cpu", "--out-dir", str(out)]
    first = cli.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert cli.invoke(app, args).exit_code == 0  # same weights: resumes
    write_random_checkpoint("llada", ckpt, seed=1)  # "retrained" into the same directory
    bad = cli.invoke(app, args)
    assert bad.exit_code == 2 and "the checkpoint changed" in bad.output
    assert "Traceback" not in bad.output


@needs_data
@pytest.mark.parametrize("task", ["math500", "humaneval", "mbpp"])
def test_eval_runs_every_task(task, tmp_path):
    out = tmp_path / "rows.jsonl"
    result = cli.invoke(
        app,
        ["eval", "--task", task, "--limit", "2", "--cache", "none", *TINY, "--json", "--output", str(out)],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["n"] == 2 and summary["results"][0]["n"] == 2
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(r["method"] == "none" for r in rows)
    if task != "math500":  # the tiny model writes no working code: the tests ran and failed
        assert all(r["detail"] and r["detail"] != "passed" for r in rows)


def test_stale_shards_are_merged_without_generating(tmp_path):
    """An interrupted torchrun leaves shards; the next run folds them into <method>.jsonl."""
    from dllm_cache.engine import GenerationConfig
    from dllm_cache.eval.suite import EvalSpec, run_eval

    problems = [Problem(f"p/{i}", f"q{i}", str(i)) for i in range(4)]

    def row(i: int) -> dict:
        return {
            "id": f"p/{i}", "method": "none", "prompt": f"q{i}", "text": str(i), "prediction": str(i),
            "gold": str(i), "correct": i % 2 == 0, "detail": None, "latency_s": 1.0 + i, "time_s": 0.5,
            "batch_size": 2, "nfe": 8, "guide_nfe": 0, "gen_tokens": 4, "flops": 1e9,
            "position_layers": 10.0, "position_layers_total": 10.0,
        }  # fmt: skip

    (tmp_path / "none.rank0.jsonl").write_text("".join(json.dumps(row(i)) + "\n" for i in (0, 2)))
    (tmp_path / "none.rank1.jsonl").write_text(json.dumps(row(3)) + "\n" + json.dumps(row(1)) + "\n{torn")
    spec = EvalSpec("m", "/m", "t", ["none"], GenerationConfig(gen_length=8), 2, 0, True)
    outcome = run_eval(None, problems, spec, tmp_path, Dist())  # type: ignore[arg-type]  # no model needed
    assert outcome is not None and outcome.generated == {"none": 0}
    merged = [json.loads(line)["id"] for line in (tmp_path / "none.jsonl").read_text().splitlines()]
    assert merged == ["p/0", "p/1", "p/2", "p/3"] and not list(tmp_path.glob("*.rank*"))
    (r,) = outcome.results
    assert r.n == 4 and r.correct == 2 and r.wall_time_s == 2.0 and r.tokens_per_s == 8.0
    assert r.latency_p50_s == 2.5


def test_method_file_names_and_shard_paths(tmp_path):
    assert method_filename("dllm-cache:response_interval=4") == "dllm-cache_response_interval=4"
    assert method_filename("dual+threshold:threshold=0.8") == "dual_threshold_threshold=0.8"
    store = RowStore(tmp_path, Dist(rank=1, world_size=2, local_rank=1))
    assert store.own_path("none").name == "none.rank1.jsonl"
    assert Dist(rank=1, world_size=3).shard(list(range(8))) == [1, 4, 7]


def test_torchrun_two_ranks_match_one_process(tmp_path):
    """2 gloo ranks on CPU: every problem once in the merged file, identical to a single-process run."""
    common = ["--task", "tiny-gsm", "--limit", "4", "--batch-size", "1", "--cache", "none,dllm-cache", *TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "dllm_cache.eval", *common, "--out-dir", str(tmp_path / "dist"), "--json"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])  # printed once, by rank 0
    assert summary["n"] == 4 and [r["n"] for r in summary["results"]] == [4, 4]
    single = subprocess.run(
        [sys.executable, "-m", "dllm_cache.eval", *common, "--out-dir", str(tmp_path / "one"), "--json"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    assert not list((tmp_path / "dist").glob("*.rank*.jsonl"))
    keys = ("id", "method", "prompt", "text", "prediction", "gold", "correct", "nfe", "gen_tokens")
    for method in ("none", "dllm-cache"):
        dist_rows = [json.loads(x) for x in (tmp_path / "dist" / f"{method}.jsonl").read_text().splitlines()]
        one_rows = [json.loads(x) for x in (tmp_path / "one" / f"{method}.jsonl").read_text().splitlines()]
        assert [r["id"] for r in dist_rows] == [f"tiny-gsm/{i}" for i in range(4)]
        assert [{k: r[k] for k in keys} for r in dist_rows] == [{k: r[k] for k in keys} for r in one_rows]
    one = json.loads(single.stdout)
    assert [(r["correct"], r["nfe_per_problem"]) for r in summary["results"]] == [
        (r["correct"], r["nfe_per_problem"]) for r in one["results"]
    ]


def test_eval_without_data_files_still_runs_tiny_gsm(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "nowhere"))
    result = cli.invoke(
        app, ["eval", "--task", "tiny-gsm", "--limit", "2", "--cache", "none", *TINY, "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["results"][0]["n"] == 2


def test_torchrun_needs_an_out_dir(monkeypatch):
    from dllm_cache.engine import GenerationConfig
    from dllm_cache.eval.suite import EvalSpec, run_eval

    spec = EvalSpec("m", "/m", "t", ["none"], GenerationConfig(), 1, 0, True)
    with pytest.raises(DllmCacheError, match="--out-dir is required under torchrun"):
        run_eval(None, [], spec, None, Dist(0, 2, 0))  # type: ignore[arg-type]


def test_bundled_data_is_the_package_copy_and_matches_its_sources():
    """The evaluation sets ship inside the package (found without any folder beside the checkout),
    unchanged: each file's sha256 starts with the prefix recorded in datasets/SOURCES.md."""
    import hashlib

    import dllm_cache

    assert BUNDLED_DATA_DIR == Path(dllm_cache.__file__).resolve().parent / "eval" / "datasets"
    sources = (BUNDLED_DATA_DIR / "SOURCES.md").read_text()
    listed = dict(re.findall(r"^\| (\S+) \| \d+ \|.*\| ([0-9a-f]{16})… \|$", sources, flags=re.M))
    assert set(listed) == {
        "gsm8k/test.jsonl",
        "gsm8k/train.jsonl",
        "humaneval/HumanEval.jsonl.gz",
        "mbpp/mbpp.jsonl",
        "mbpp/mbpp_test.jsonl",
        "math500/test.jsonl",
    }
    for rel, prefix in listed.items():
        assert hashlib.sha256((BUNDLED_DATA_DIR / rel).read_bytes()).hexdigest().startswith(prefix), rel


def test_data_source_says_which_folder_is_read(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)
    assert data_source().startswith("the copy bundled with dllm-cache")
    assert data_source(tmp_path) == f"{tmp_path} (--data-dir)"
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert data_source() == f"{tmp_path} (${DATA_ENV})"


def test_eval_refuses_to_resume_rows_of_other_problems(tmp_path, monkeypatch):
    """Rows saved for a task whose problems have since changed (same ids, other questions, e.g. a
    new generator) are not mixed into the new run."""
    from dllm_cache.demo.random_checkpoint import write_random_checkpoint
    from dllm_cache.eval import tasks as eval_tasks

    ckpt, out = tmp_path / "model", tmp_path / "run"
    write_random_checkpoint("llada", ckpt, seed=0)
    args = ["eval", "--model", str(ckpt), "--task", "tiny-gsm", "--limit", "2", "--gen-length", "8"]
    args += ["--device", "cpu", "--out-dir", str(out)]
    assert cli.invoke(app, args).exit_code == 0
    monkeypatch.setattr(eval_tasks, "TINY_GSM_SEED", eval_tasks.TINY_GSM_SEED + 1)
    bad = cli.invoke(app, args)
    assert bad.exit_code == 2, bad.output
    assert "holds a row for tiny-gsm/0 with another prompt or gold answer" in bad.output
    assert len((out / "none.jsonl").read_text().splitlines()) == 2  # nothing lost or appended
