"""Bad input: one clear error naming the problem (library) and exit code 2 without traceback (CLI)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import PROMPTS
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from dllm_cache.cli import app
from dllm_cache.engine import generate
from dllm_cache.errors import GenerationError, ModelLoadError
from dllm_cache.models.loading import load_model


@pytest.fixture
def broken(llada_dir, tmp_path):
    """A fresh copy of the tiny LLaDA checkpoint to damage."""
    dst = tmp_path / "ckpt"
    shutil.copytree(llada_dir, dst)
    return dst


def _edit_tensors(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def test_missing_directory():
    with pytest.raises(ModelLoadError, match="model directory not found: /no/such/dir"):
        load_model("/no/such/dir")


def test_missing_config(broken):
    (broken / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(broken)


def test_missing_weights(broken):
    (broken / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no model.safetensors"):
        load_model(broken)


def test_missing_tensor(broken):
    _edit_tensors(broken, lambda t: t.pop("model.transformer.blocks.1.up_proj.weight"))
    with pytest.raises(
        ModelLoadError, match=r"missing tensor model\.transformer\.blocks\.1\.up_proj\.weight"
    ):
        load_model(broken)


def test_unexpected_tensor(broken):
    _edit_tensors(broken, lambda t: t.update({"model.transformer.blocks.9.extra.weight": torch.zeros(2)}))
    with pytest.raises(
        ModelLoadError, match=r"unexpected tensor model\.transformer\.blocks\.9\.extra\.weight"
    ):
        load_model(broken)


def test_wrong_shape(broken):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["mlp_hidden_size"] = 96
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ModelLoadError,
        match=r"blocks\.0\.ff_proj\.weight has shape \[128, 64\], config\.json implies \[96, 64\]",
    ):
        load_model(broken)


def test_unknown_model_type(broken):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="unknown model_type 'gpt2'"):
        load_model(broken)


def test_missing_shard(llada_sharded_dir, tmp_path):
    dst = tmp_path / "sharded"
    shutil.copytree(llada_sharded_dir, dst)
    next(dst.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(ModelLoadError, match="shard model-00002-of-.* is missing"):
        load_model(dst)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (
            dict(gen_length=600),
            r"prompt \(7 tokens\) \+ gen_length \(600\) exceeds the model's maximum sequence length 512",
        ),
        (dict(gen_length=20, block_length=8), "gen_length 20 is not divisible by block_length 8"),
        (dict(gen_length=32, block_length=8, steps=6), "steps 6 is not divisible by the number of blocks 4"),
        (dict(gen_length=0), "gen_length must be positive"),
        (dict(temperature=-1.0), "temperature must be >= 0"),
        (dict(remasking="lowest"), "unknown remasking 'lowest'"),
    ],
)
def test_invalid_generation_parameters(llada, kwargs, message):
    with pytest.raises(GenerationError, match=message):
        generate(llada, PROMPTS, **kwargs)


def test_empty_prompt(llada):
    with pytest.raises(GenerationError, match="empty prompt"):
        generate(llada, [PROMPTS[0], []], gen_length=8)
    with pytest.raises(GenerationError, match="no tokenizer"):
        generate(llada, "text needs a tokenizer", gen_length=8)


def test_unknown_cache_policy(llada):
    with pytest.raises(GenerationError, match="unknown cache policy 'magic'"):
        generate(llada, PROMPTS, gen_length=8, cache="magic")


runner = CliRunner()


@pytest.mark.parametrize(
    "args,message",
    [
        (["generate", "hi", "--model", "/no/such/dir"], "model directory not found: /no/such/dir"),
        (["info", "--model", "/no/such/dir"], "model directory not found"),
        (["generate", "hi", "--cache", "magic"], "unknown cache policy 'magic'"),
        # a misspelt preset names both lists, so the user sees the preset they meant
        (["generate", "hi", "--preset", "dual-surprize"], "no preset of that name (presets: baseline,"),
        (["generate", "hi", "--cache-arg", "novalue"], "--cache-arg expects key=value"),
    ],
)
def test_cli_errors_are_one_line(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    out = result.output
    assert message in out and "Traceback" not in out
    assert len(out.strip().splitlines()) == 1


def test_cli_info_on_weights_only_checkpoint(llada_dir):
    result = runner.invoke(app, ["info", "--model", str(llada_dir), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["architecture"] == "llada" and info["layers"] == 2 and info["special_tokens"]["mask"][0] == 2
