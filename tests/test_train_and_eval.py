"""train-demo writes a loadable HF checkpoint; eval compares methods on the same problems."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from dllm_cache.cli import app
from dllm_cache.demo.train import TrainConfig, train
from dllm_cache.engine import generate
from dllm_cache.errors import DllmCacheError
from dllm_cache.eval.runner import load_task
from dllm_cache.methods import Method, parse_method
from dllm_cache.models.loading import load

runner = CliRunner()
SMALL = dict(
    n_layers=1, d_model=32, n_heads=2, d_ff=64, train_problems=400, batch_size=8, warmup=2, log_every=1
)


@pytest.mark.parametrize("arch", ["llada", "dream", "ar"])
def test_train_demo_writes_a_real_checkpoint(arch, tmp_path):
    logs: list[str] = []
    summary = train(TrainConfig(arch=arch, steps=4, **SMALL), tmp_path / arch, log=logs.append)
    files = {p.name for p in (tmp_path / arch).iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    } <= files
    cfg = json.loads((tmp_path / arch / "config.json").read_text())
    assert cfg["model_type"] == {"llada": "llada", "dream": "Dream", "ar": "qwen2"}[arch]
    assert cfg["torch_dtype"] == "float16"
    llm = load(tmp_path / arch)
    assert llm.model.dtype == torch.float32  # upcast on CPU
    assert summary["steps_done"] == 4 and any("loss" in line for line in logs)
    if arch != "ar":
        out = generate(llm, "Tom has 3 apples.", gen_length=8, steps=8)
        assert len(out.sequences[0]) == out.prompt_length + 8


def test_training_is_seeded_and_learns(tmp_path):
    cfg = TrainConfig(arch="llada", steps=80, lr=3e-3, answer_lengths=(20,), **{**SMALL, "batch_size": 32})
    train(cfg, tmp_path / "a", log=lambda m: None)
    train(cfg, tmp_path / "b", log=lambda m: None)
    weights = [(tmp_path / d / "model.safetensors").read_bytes() for d in ("a", "b")]
    assert weights[0] == weights[1]
    loss = json.loads((tmp_path / "a" / "training_log.json").read_text())["loss"]
    assert sum(loss[-10:]) < 0.8 * sum(loss[:10])


def test_tiny_gsm_task_is_fixed():
    a, b = load_task("tiny-gsm", 20), load_task("tiny-gsm", 20)
    assert [p.prompt for p in a] == [p.prompt for p in b] and len(a) == 20
    # The paraphrase set: the same generator, its own ids, other wordings of the word problems.
    para = load_task("tiny-gsm-paraphrase", 20)
    assert [p.id for p in para] == [f"tiny-gsm-paraphrase/{i}" for i in range(20)]
    assert len({p.prompt for p in para} - {p.prompt for p in load_task("tiny-gsm", 500)}) >= 15
    with pytest.raises(DllmCacheError, match="unknown task 'mmlu'"):
        load_task("mmlu")


def test_method_specs():
    assert parse_method("dllm-cache:response_interval=4:transfer_ratio=0.5") == Method(
        "dllm-cache", {"response_interval": 4, "transfer_ratio": 0.5}
    )
    assert parse_method("dual+threshold:threshold=0.8") == Method(
        "dual", {}, {"decoder": "threshold", "threshold": 0.8}
    )
    assert parse_method("fast-dllm-dual-parallel").overrides["decoder"] == "threshold"
    with pytest.raises(DllmCacheError, match="unknown decoder 'greedy'"):
        parse_method("dual+greedy")
    with pytest.raises(DllmCacheError, match="has no argument 'k'"):
        parse_method("dllm-cache:k=3")


def test_eval_command_compares_methods(tmp_path):
    ckpt = tmp_path / "rand"
    assert runner.invoke(app, ["init-random", "--arch", "llada", "--out", str(ckpt)]).exit_code == 0
    out = tmp_path / "rows.jsonl"
    args = ["eval", "--model", str(ckpt), "--limit", "4", "--gen-length", "16", "--batch-size", "2"]
    result = runner.invoke(
        app,
        [
            *args,
            "--cache",
            "none,dllm-cache:prompt_interval=1:response_interval=1",
            "--json",
            "--output",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    none, exact = summary["results"]
    assert none["n"] == exact["n"] == 4 and none["method"] == "none"
    assert exact["recompute_fraction"] == pytest.approx(1.0)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 8
    # interval 1 is exact: the same text for every problem
    by_id = {}
    for r in rows:
        by_id.setdefault(r["id"], set()).add(r["text"])
    assert all(len(texts) == 1 for texts in by_id.values())
    bad = runner.invoke(app, [*args, "--cache", "none,fast"])
    assert bad.exit_code == 2 and "unknown cache policy 'fast'" in bad.output


def test_tiny_gsm_pairs_task_scores_any_right_split():
    from dllm_cache.eval.tasks import score

    problems = load_task("tiny-gsm-pairs", 30)
    assert [p.id for p in problems] == [f"tiny-gsm-pairs/{i}" for i in range(30)]
    p = problems[0]
    total = sum(map(int, p.gold.split(", ")))
    assert p.kind == "pair" and p.meta == {"total": total} and f" {total} " in p.prompt
    assert score(p, f"1 + {total - 1} = {total}\n#### 1, {total - 1}").correct
    assert score(p, f"#### {total - 1}, 1").correct
    assert not score(p, f"#### 1, {total}").correct
    assert not score(p, f"#### {total}").correct


def test_train_demo_rejects_bad_fractions(tmp_path):
    with pytest.raises(DllmCacheError, match=r"--pairs must lie in \[0, 1\), got 1.5"):
        train(TrainConfig(pair_fraction=1.5), tmp_path / "out")
    with pytest.raises(DllmCacheError, match=r"--pseudo-names must lie in \[0, 1\], got -0.1"):
        train(TrainConfig(pseudo_name_fraction=-0.1), tmp_path / "out")
