"""Tokenizer and chat template from a checkpoint directory (transformers' fast tokenizers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dllm_cache.errors import GenerationError, ModelLoadError
from dllm_cache.models.config import ModelConfig

# End-of-turn markers of the two chat formats: an answer is complete at either one or at EOS.
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|im_end|>")


def load_tokenizer(model_dir: str | Path) -> Any | None:
    """tokenizer.json (LLaDA, the demo models) or Qwen2's vocab.json + merges.txt (Dream).

    Returns None for a weights-only directory: such a model still generates from token ids.
    """
    import transformers

    model_dir = Path(model_dir)
    try:
        if (model_dir / "tokenizer.json").is_file():
            return transformers.PreTrainedTokenizerFast.from_pretrained(str(model_dir))
        if (model_dir / "vocab.json").is_file() and (model_dir / "merges.txt").is_file():
            # Dream's tokenizer_config names a custom class; its files are Qwen2's byte-level BPE.
            return transformers.Qwen2TokenizerFast.from_pretrained(str(model_dir))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{model_dir}: cannot load tokenizer ({e})") from None
    return None


def end_token_ids(cfg: ModelConfig, tokenizer: Any | None) -> list[int]:
    ids = [cfg.eos_token_id]
    if tokenizer is not None:
        vocab = tokenizer.get_vocab()
        ids += [vocab[t] for t in END_OF_TURN_TOKENS if t in vocab]
    return sorted(set(ids))


def encode_prompt(tokenizer: Any | None, prompt: str, chat: bool = True) -> list[int]:
    """Prompt text -> ids; with `chat` the tokenizer's chat template wraps it as a user turn."""
    if tokenizer is None:
        raise GenerationError("this model directory has no tokenizer: pass prompts as token ids")
    if not prompt.strip():
        raise GenerationError("empty prompt")
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
    else:
        text = prompt
    return tokenizer(text, add_special_tokens=False)["input_ids"]
