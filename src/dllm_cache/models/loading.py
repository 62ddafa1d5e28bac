"""Hugging Face checkpoint directory -> model (+ tokenizer), and back.

A directory holds config.json, model.safetensors or a sharded model.safetensors.index.json, and the
tokenizer files. Shards are opened lazily (safetensors `safe_open`) and each tensor goes straight to
the target device and dtype onto a model built on the meta device, so an 8B model loads without a
2x memory peak. Everything a user can get wrong is reported as a `ModelLoadError` naming the problem.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dllm_cache.errors import ModelLoadError
from dllm_cache.models import dream, llada
from dllm_cache.models.config import ModelConfig
from dllm_cache.models.transformer import Transformer

CHECKPOINTS_DIR = Path(__file__).resolve().parent.parent / "checkpoints"
DEFAULT_MODEL = "tiny-llada"

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def _family(model_type: str | None):
    if model_type == llada.MODEL_TYPE:
        return llada
    if model_type in dream.MODEL_TYPES:
        return dream
    known = ", ".join([llada.MODEL_TYPE, *dream.MODEL_TYPES])
    raise ModelLoadError(f"unknown model_type {model_type!r} in config.json (supported: {known})")


def family_of(cfg: ModelConfig):
    """The family module (config fields, weight names) of a parsed config."""
    return llada if cfg.arch == "llada" else dream


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """A directory path, or the name of a checkpoint shipped inside the package (e.g. tiny-llada)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    embedded = CHECKPOINTS_DIR / str(name_or_path)
    if embedded.is_dir():
        return embedded
    shipped = (
        sorted(p.name for p in CHECKPOINTS_DIR.iterdir() if p.is_dir()) if CHECKPOINTS_DIR.is_dir() else []
    )
    hint = f" (embedded models: {', '.join(shipped)})" if shipped else ""
    raise ModelLoadError(f"model directory not found: {name_or_path}{hint}")


def weights_fingerprint(model_dir: str | Path, sample_bytes: int = 1 << 20) -> str:
    """A short hash that changes when a checkpoint's config or weights change (e.g. retraining into
    the same directory): config.json, and each weight file's name, size, first and last MiB. Cheap
    for an 8B checkpoint, unlike hashing every byte."""
    model_dir = resolve_model_dir(model_dir)
    h = hashlib.sha256()
    for path in [model_dir / "config.json", *sorted(model_dir.glob("*.safetensors"))]:
        if not path.is_file():
            continue
        size = path.stat().st_size
        h.update(f"{path.name}:{size}:".encode())
        with path.open("rb") as f:
            h.update(f.read(sample_bytes))
            if size > 2 * sample_bytes:
                f.seek(size - sample_bytes)
                h.update(f.read(sample_bytes))
    return h.hexdigest()[:16]


def read_config(model_dir: Path) -> ModelConfig:
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise ModelLoadError(f"{model_dir}: no config.json")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{cfg_path}: invalid JSON ({e})") from None
    family = _family(raw.get("model_type"))
    missing = [f for f in family.REQUIRED_FIELDS if f not in raw]
    if missing:
        raise ModelLoadError(f"{cfg_path}: missing field(s) {', '.join(missing)}")
    cfg = family.parse_config(raw)
    if cfg.d_model % cfg.n_heads or cfg.n_heads % cfg.n_kv_heads:
        raise ModelLoadError(
            f"{cfg_path}: d_model {cfg.d_model} / n_heads {cfg.n_heads} / n_kv_heads {cfg.n_kv_heads} do not divide"
        )
    _read_generation_ids(model_dir, cfg)
    return cfg


def _read_generation_ids(model_dir: Path, cfg: ModelConfig) -> None:
    # LLaDA keeps its BOS id only in generation_config.json.
    gen_path = model_dir / "generation_config.json"
    if gen_path.is_file() and cfg.bos_token_id is None:
        cfg.bos_token_id = json.loads(gen_path.read_text()).get("bos_token_id")


def _weight_files(model_dir: Path) -> dict[str, Path]:
    """Checkpoint tensor name -> the shard that holds it."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        shards = {f: model_dir / f for f in set(weight_map.values())}
        for f, p in shards.items():
            if not p.is_file():
                raise ModelLoadError(
                    f"{model_dir}: shard {f} listed in model.safetensors.index.json is missing"
                )
        return {name: shards[f] for name, f in weight_map.items()}
    single = model_dir / "model.safetensors"
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    raise ModelLoadError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")


def load_model(
    model_dir: str | Path, dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu"
) -> Transformer:
    model_dir = resolve_model_dir(model_dir)
    cfg = read_config(model_dir)
    device = torch.device(device)
    dtype = resolve_dtype(dtype, device)
    family = family_of(cfg)
    names = family.weight_names(cfg)
    files = _weight_files(model_dir)
    theirs = set(names.values())
    missing = sorted(theirs - files.keys())
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelLoadError(f"{model_dir}: missing tensor {missing[0]}{more}")
    unexpected = sorted(files.keys() - theirs)
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ModelLoadError(f"{model_dir}: unexpected tensor {unexpected[0]}{more}")

    with torch.device("meta"):
        model = Transformer(cfg)
    expected_shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    by_file: dict[Path, list[str]] = {}
    for ours, theirs_name in names.items():
        by_file.setdefault(files[theirs_name], []).append(ours)
    state: dict[str, torch.Tensor] = {}
    for path, ours_names in by_file.items():
        with safe_open(path, framework="pt", device=str(device) if device.type != "cpu" else "cpu") as f:
            for ours in ours_names:
                theirs_name = names[ours]
                shape = tuple(f.get_slice(theirs_name).get_shape())
                if shape != expected_shapes[ours]:
                    raise ModelLoadError(
                        f"{model_dir}: tensor {theirs_name} has shape {list(shape)}, "
                        f"config.json implies {list(expected_shapes[ours])}"
                    )
                state[ours] = f.get_tensor(theirs_name).to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    model.requires_grad_(False)
    return model.eval()


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        # bf16 weights on GPU; on CPU upcast to fp32 (docs: models.md, "Numerics").
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r} (choose auto, {', '.join(DTYPES)})")
    return DTYPES[dtype]


def save_checkpoint(
    model: Transformer,
    out_dir: str | Path,
    dtype: torch.dtype | None = None,
    shard_bytes: int | None = None,
    generation_config: dict[str, Any] | None = None,
) -> Path:
    """Write config.json + model.safetensors (or shards + index) in the family's release format."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    family = family_of(cfg)
    raw = family.hf_config(cfg)
    dtype = dtype or model.dtype
    raw["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    params = dict(model.named_parameters())
    tensors = {
        theirs: params[ours].detach().to("cpu", dtype).contiguous()
        for ours, theirs in family.weight_names(cfg).items()
    }
    if shard_bytes is None:
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    else:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name in sorted(tensors):
            t = tensors[name]
            if shards[-1] and size + t.numel() * t.element_size() > shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = t
            size += t.numel() * t.element_size()
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, out / fname, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, fname))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    gen = {
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
    }
    gen.update(generation_config or {})
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return out


@dataclass
class DLLM:
    """A loaded model with its tokenizer: what `generate` and the CLI work with."""

    model: Transformer
    tokenizer: Any  # a transformers PreTrainedTokenizerFast, or None for a weights-only directory
    path: Path
    end_token_ids: list[int] = field(default_factory=list)

    @property
    def config(self) -> ModelConfig:
        return self.model.config


def load(
    name_or_path: str | Path = DEFAULT_MODEL,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
) -> DLLM:
    """Load a checkpoint directory (or an embedded model by name) with its tokenizer."""
    from dllm_cache.models.tokenizer import end_token_ids, load_tokenizer

    model_dir = resolve_model_dir(name_or_path)
    model = load_model(model_dir, dtype=dtype, device=device)
    tokenizer = load_tokenizer(model_dir)
    return DLLM(model, tokenizer, model_dir, end_token_ids(model.config, tokenizer))
