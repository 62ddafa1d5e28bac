"""Small byte-level BPE tokenizers for the demo models, with the special tokens of a real family.

The demo models must go through the same code paths as LLaDA-8B and Dream-7B (chat template,
mask / EOS / EOT ids), so each tokenizer carries its family's special tokens and chat template.
Special tokens take the first ids, in a fixed order, so their ids are stable across retraining:

* LLaDA: 0 ``<|endoftext|>`` (eos, pad), 1 ``<|startoftext|>`` (bos), 2 ``<|mdm_mask|>`` (mask),
  3 ``<|start_header_id|>``, 4 ``<|end_header_id|>``, 5 ``<|eot_id|>``;
* Dream: 0 ``<|endoftext|>`` (eos, pad, bos), 1 ``<|im_start|>``, 2 ``<|im_end|>``,
  3 ``<|beginoftext|>``, 4 ``<|mask|>`` (mask).

Numbers: tiny GSM is arithmetic, and a tiny model learns it far better when every number is one
token. GPT-2's byte-level pre-tokenizer keeps a digit run together (with its leading space), but
the BPE trainer only merges what is frequent in the corpus. So after training on the text we append
merges (lowest priority) that make every integer 0..``max_single_token_number`` one token when
written without a space ("17"), and 0..99 also with a leading space (" 17", the form inside
sentences); what is left of the vocabulary goes to larger space-prefixed numbers, smallest first. Appending merges after the
trained ones leaves every existing encoding unchanged, and each appended merge is derived from how
the tokenizer built so far splits its target, so the merge list stays consistent.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

Family = Literal["llada", "dream"]

# Copied verbatim from LLaDA-8B-Instruct's tokenizer_config.json. Note that it always ends with
# the assistant header (it ignores add_generation_prompt), exactly like the real model.
LLADA_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
)

# Dream-v0-Instruct-7B's template (Qwen2.5 style) without the tool-calling branches.
DREAM_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) '
    'or (message.role == "assistant") %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)


@dataclass(frozen=True)
class FamilyTokens:
    """The special tokens of a model family (the strings; ids come from the tokenizer)."""

    special_tokens: tuple[str, ...]  # in id order: they become ids 0, 1, 2, ...
    bos: str
    eos: str
    pad: str
    mask: str
    eot: str  # end of a chat turn
    chat_template: str
    # Plain text the chat template adds around messages, so BPE learns tokens for it.
    scaffold: tuple[str, ...]


FAMILIES: dict[str, FamilyTokens] = {
    "llada": FamilyTokens(
        special_tokens=(
            "<|endoftext|>",
            "<|startoftext|>",
            "<|mdm_mask|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ),
        bos="<|startoftext|>",
        eos="<|endoftext|>",
        pad="<|endoftext|>",
        mask="<|mdm_mask|>",
        eot="<|eot_id|>",
        chat_template=LLADA_CHAT_TEMPLATE,
        scaffold=("user", "assistant", "system"),
    ),
    "dream": FamilyTokens(
        special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|beginoftext|>", "<|mask|>"),
        # Dream's model config uses <|endoftext|> as BOS (bos_token_id == eos_token_id).
        bos="<|endoftext|>",
        eos="<|endoftext|>",
        pad="<|endoftext|>",
        mask="<|mask|>",
        eot="<|im_end|>",
        chat_template=DREAM_CHAT_TEMPLATE,
        scaffold=("user", "assistant", "system", "You are a helpful assistant."),
    ),
}

_SPACE = "Ġ"  # how ByteLevel writes a space byte
_SMALL_NUMBERS = 100  # 0..99 are single tokens with and without a leading space


def _family(family: str) -> FamilyTokens:
    try:
        return FAMILIES[family]
    except KeyError:
        raise ValueError(f"unknown tokenizer family {family!r}; expected one of {sorted(FAMILIES)}") from None


def _bpe_split(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges (lower rank first) to one pre-token, as the `tokenizers` BPE model does."""
    parts = list(word)
    while len(parts) > 1:
        best = min(range(len(parts) - 1), key=lambda i: (ranks.get((parts[i], parts[i + 1]), 1 << 62), i))
        pair = (parts[best], parts[best + 1])
        if pair not in ranks:
            break
        parts[best : best + 2] = [pair[0] + pair[1]]
    return parts


def _append_single_token_words(
    vocab: dict[str, int], merges: list[tuple[str, str]], targets: Iterable[str], max_vocab: int
) -> None:
    """Append merges so each target (a byte-level pre-token) becomes one token, while room lasts.

    Targets are handled one at a time against all merges so far, so a later merge never changes
    how an earlier target (or any text the trained merges already handled) is split.
    """
    ranks = {pair: i for i, pair in enumerate(merges)}
    for target in targets:
        parts = _bpe_split(target, ranks)
        if len(parts) == 1:
            continue
        new_tokens = {parts[0] + "".join(parts[1 : i + 1]) for i in range(1, len(parts))} - vocab.keys()
        if len(vocab) + len(new_tokens) > max_vocab:
            return
        left = parts[0]
        for right in parts[1:]:
            merged = left + right
            if merged not in vocab:
                vocab[merged] = len(vocab)
            ranks[(left, right)] = len(merges)
            merges.append((left, right))
            left = merged


def train_tokenizer(
    texts: Iterable[str],
    family: Family,
    vocab_size: int = 2048,
    *,
    max_single_token_number: int = 999,
    model_max_length: int = 4096,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` with ``family``'s special tokens and chat template.

    Every integer 0..``max_single_token_number`` written without a leading space is one token,
    and so is every " 0" .. " 99" with one; vocabulary left over makes the larger space-prefixed
    numbers single tokens too, smallest first. Deterministic for a given input.
    """
    spec = _family(family)
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("train_tokenizer needs at least one non-empty text")
    n_special = len(spec.special_tokens)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # Order of the appended number tokens: the small numbers tiny GSM writes, in both forms, come
    # before the plain 3-digit ones; space-prefixed 3-digit numbers get whatever room is left.
    # Shorter numbers come first, so each target splits into at most two known tokens and costs at
    # most one new token: the reserve below is a worst case.
    small = range(min(max_single_token_number, _SMALL_NUMBERS - 1) + 1)
    large = range(_SMALL_NUMBERS, max_single_token_number + 1)
    guaranteed = [str(i) for i in small] + [_SPACE + str(i) for i in small] + [str(i) for i in large]
    best_effort = [_SPACE + str(i) for i in large]
    number_reserve = sum(len(t) > 1 for t in guaranteed)
    trained_size = vocab_size - number_reserve
    if trained_size < n_special + len(alphabet) + 64:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: {n_special} special + {len(alphabet)} byte tokens "
            f"+ up to {number_reserve} number tokens leave fewer than 64 tokens for text"
        )

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=trained_size,
        special_tokens=list(spec.special_tokens),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    # The chat scaffold appears in every prompt; weight it like the texts so it gets whole tokens.
    scaffold = [s for s in spec.scaffold for _ in range(max(1, len(texts) // 4))]
    tok.train_from_iterator(texts + scaffold, trainer=trainer, length=len(texts) + len(scaffold))

    model = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    _append_single_token_words(vocab, merges, guaranteed + best_effort, vocab_size)

    final = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    final.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    final.decoder = decoders.ByteLevel()
    final.post_processor = processors.ByteLevel(trim_offsets=False)
    # Already in the vocab at ids 0..n-1; registering them makes them unsplittable and special.
    final.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec.special_tokens])
    for i, t in enumerate(spec.special_tokens):
        if final.token_to_id(t) != i:
            raise RuntimeError(f"special token {t!r} got id {final.token_to_id(t)}, expected {i}")
    for target in guaranteed:
        text = " " + target[1:] if target.startswith(_SPACE) else target
        if len(final.encode(text).ids) != 1:
            raise RuntimeError(f"number {text!r} is not a single token")

    named = {spec.bos, spec.eos, spec.pad, spec.mask}
    hf = PreTrainedTokenizerFast(
        tokenizer_object=final,
        bos_token=spec.bos,
        eos_token=spec.eos,
        pad_token=spec.pad,
        mask_token=spec.mask,
        additional_special_tokens=[t for t in spec.special_tokens if t not in named],
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )
    hf.chat_template = spec.chat_template
    return hf


def _extra_special_tokens(tok: PreTrainedTokenizerFast) -> list[str]:
    # transformers 5 renamed additional_special_tokens to extra_special_tokens.
    extra = getattr(tok, "extra_special_tokens", None)
    if extra is None:
        extra = getattr(tok, "additional_special_tokens", [])
    if isinstance(extra, dict):
        extra = list(extra.values())
    return [str(t) for t in extra]


def save_tokenizer(tok: PreTrainedTokenizerFast, out_dir: str | Path) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` in the hub layout of the real models.

    The config is written by hand rather than by ``save_pretrained`` so that it has the classic
    layout (``tokenizer_class: PreTrainedTokenizerFast``, chat template inside the config) that
    both transformers 4 and 5 load, like the LLaDA / Dream checkpoints users download.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.backend_tokenizer.save(str(out / "tokenizer.json"))
    added = {
        str(i): {
            "content": t.content,
            "lstrip": t.lstrip,
            "normalized": t.normalized,
            "rstrip": t.rstrip,
            "single_word": t.single_word,
            "special": t.special,
        }
        for i, t in sorted(tok.added_tokens_decoder.items())
    }
    config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": _extra_special_tokens(tok),
        "bos_token": tok.bos_token,
        "chat_template": tok.chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": tok.eos_token,
        "mask_token": tok.mask_token,
        "model_max_length": tok.model_max_length,
        "pad_token": tok.pad_token,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def special_token_ids(tok: PreTrainedTokenizerFast, family: Family) -> dict[str, int]:
    """Ids of the family's mask, eos, pad, bos and eot (end-of-turn) tokens in ``tok``.

    Works on the real LLaDA / Dream tokenizers too, since it looks the tokens up by their text.
    """
    spec = _family(family)
    out: dict[str, int] = {}
    for key in ("mask", "eos", "pad", "bos", "eot"):
        text = getattr(spec, key)
        idx = tok.convert_tokens_to_ids(text)
        if idx is None or idx == tok.unk_token_id or tok.convert_ids_to_tokens(idx) != text:
            raise KeyError(f"{family} tokenizer has no {key} token {text!r}")
        out[key] = int(idx)
    return out
