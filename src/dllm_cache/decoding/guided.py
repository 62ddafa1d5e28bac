"""Guided Diffusion: a small autoregressive model verifies what the dLLM drafts (speculative style).

Each step the dLLM drafts every masked position of the current block (argmax). The AR model (a
causal Qwen2-format checkpoint sharing the tokenizer) reads the committed answer plus the draft in one
forward pass, keeping its own K/V cache over the committed prefix (causal: committed rows never
change). From the first masked position on, the longest run of drafted tokens the AR model agrees
with is committed, plus the AR model's own token at the first disagreement, so every step commits at
least one token. Agreement rules:
- `deterministic`: the AR argmax equals the draft;
- `topk_relative`: the draft is among the AR top-2 and its probability >= 0.5 x the AR top-1.

Vocabularies are matched by token string at load (Dream and Qwen2.5 share ids; the demo models share
one BPE). The dLLM's EOS maps to the AR model's end-of-turn marker when it has one (Dream pads answers
with EOS where Qwen ends its turn with <|im_end|>). A dLLM whose ordinary tokens the AR vocabulary
lacks is rejected with a clear error. The AR prompt is the prompt text in the AR model's own chat
template.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from dllm_cache.decoding.base import Commit, computed
from dllm_cache.errors import GenerationError
from dllm_cache.models.active import FeatureCache, ForwardStats, rows_from_mask
from dllm_cache.models.loading import DLLM
from dllm_cache.models.tokenizer import END_OF_TURN_TOKENS, encode_prompt

# (AR probabilities [B, N, V], draft ids in the AR vocabulary [B, N]) -> agree [B, N] bool
Agreement = Callable[[Tensor, Tensor], Tensor]


def agree_deterministic(probs: Tensor, draft: Tensor) -> Tensor:
    return probs.argmax(-1) == draft


def agree_topk_relative(probs: Tensor, draft: Tensor) -> Tensor:
    top2 = probs.topk(2, dim=-1)
    p_draft = probs.gather(-1, draft.clamp(min=0)[..., None]).squeeze(-1)
    return (top2.indices == draft[..., None]).any(-1) & (p_draft >= 0.5 * top2.values[..., 0])


AGREEMENTS: dict[str, Agreement] = {
    "deterministic": agree_deterministic,
    "topk_relative": agree_topk_relative,
}


@dataclass
class GenerationContext:
    """What the engine tells a decoder that needs more than one block's logits (guided decoding)."""

    llm: DLLM
    prompts: Sequence[str | Sequence[int]]
    chat: bool
    x: Tensor  # [B, P+G] the live sequence (committed tokens, mask ids elsewhere)
    prompt_length: int  # P
    block_start: int = 0  # the current block's first answer offset (updated by the engine)
    extra: dict[str, Any] = field(default_factory=dict)


class VocabularyMap:
    """dLLM id <-> AR id by token string; -1 where a token has no counterpart."""

    def __init__(self, llm: DLLM, guide: DLLM) -> None:
        if llm.tokenizer is None or guide.tokenizer is None:
            raise GenerationError("guided decoding needs tokenizers for both the model and the guide model")
        src, dst = llm.tokenizer.get_vocab(), guide.tokenizer.get_vocab()
        special = set(llm.tokenizer.all_special_tokens) | set(
            getattr(llm.tokenizer, "added_tokens_encoder", {})
        )
        missing = [t for t in src if t not in dst and t not in special]
        if missing:
            raise GenerationError(
                f"guide model {guide.path} does not share the vocabulary of {llm.path}: {len(missing)} of "
                f"{len(src)} tokens have no counterpart (e.g. {', '.join(map(repr, missing[:5]))})"
            )
        n_src = max(llm.config.vocab_size, max(src.values()) + 1)
        n_dst = max(guide.config.vocab_size, max(dst.values()) + 1)
        self.to_guide = torch.full((n_src,), -1, dtype=torch.long)
        self.to_model = torch.full((n_dst,), -1, dtype=torch.long)
        for tok, i in src.items():
            if tok in dst:
                self.to_guide[i] = dst[tok]
        for tok, j in dst.items():
            if tok in src:
                self.to_model[j] = src[tok]
        # End of answer: the dLLM's EOS is the guide's end-of-turn (or EOS); the guide's end tokens
        # map back to the dLLM's EOS.
        guide_end = next((dst[t] for t in END_OF_TURN_TOKENS if t in dst), guide.config.eos_token_id)
        self.to_guide[llm.config.eos_token_id] = guide_end
        for j in {guide_end, guide.config.eos_token_id}:
            self.to_model[j] = llm.config.eos_token_id
        self.guide_pad = guide.config.pad_token_id if guide.config.pad_token_id is not None else guide_end

    def guide_ids(self, ids: Tensor) -> Tensor:
        return self.to_guide.to(ids.device)[ids]

    def model_ids(self, ids: Tensor) -> Tensor:
        return self.to_model.to(ids.device)[ids]


class GuidedDecoder:
    """The Guided Diffusion decoder (see the module docstring)."""

    name = "guided"
    dynamic = True

    def __init__(self, guide: DLLM, agreement: str | Agreement = "deterministic") -> None:
        if not guide.config.causal:
            raise GenerationError(
                f"guide model {guide.path} is not causal (model_type {guide.config.arch!r}): guided decoding "
                "needs an autoregressive LM such as tiny-ar or Qwen2.5-Instruct"
            )
        if isinstance(agreement, str):
            if agreement not in AGREEMENTS:
                raise GenerationError(
                    f"unknown agreement rule {agreement!r} (choose {', '.join(AGREEMENTS)})"
                )
            agreement = AGREEMENTS[agreement]
        self.guide, self.agreement = guide, agreement
        self.stats = ForwardStats()  # the AR model's forwards, counted apart from the dLLM's
        self.ctx: GenerationContext | None = None
        self.vocab: VocabularyMap | None = None
        self._vocab_of: Any = None

    def check_model(self, llm: DLLM) -> None:
        """Up front: the vocabularies must match (a clear error otherwise)."""
        if self._vocab_of is not llm:
            self.vocab, self._vocab_of = VocabularyMap(llm, self.guide), llm

    def begin_generation(self, ctx: GenerationContext) -> None:
        self.check_model(ctx.llm)
        assert self.vocab is not None
        model = self.guide.model
        device = model.device
        ids = []
        for p in ctx.prompts:
            if isinstance(p, str):
                ids.append(encode_prompt(self.guide.tokenizer, p, ctx.chat))
            else:
                mapped = self.vocab.guide_ids(torch.tensor([int(t) for t in p]))
                if (mapped < 0).any():
                    raise GenerationError(
                        "guided decoding: the prompt's token ids include tokens the guide model lacks; pass text"
                    )
                ids.append(mapped.tolist())
        B, G = ctx.x.shape[0], ctx.x.shape[1] - ctx.prompt_length
        Pa = max(len(p) for p in ids)
        if Pa + G > model.config.max_seq_len:
            raise GenerationError(
                f"guide model: prompt + gen_length exceeds its maximum length {model.config.max_seq_len}"
            )
        self.ar_x = torch.full((B, Pa + G), self.vocab.guide_pad, dtype=torch.long, device=device)
        attn = torch.zeros((B, Pa + G), dtype=torch.bool, device=device)
        for b, p in enumerate(ids):
            self.ar_x[b, Pa - len(p) : Pa] = torch.tensor(p, device=device)
            attn[b, Pa - len(p) :] = True
        self.layout = model.layout(attn)
        self.cache = FeatureCache(model.config, B, Pa + G, model.dtype, device, store_outputs=False)
        self.cached_upto = torch.zeros(B, dtype=torch.long, device=device)  # AR rows with final K/V
        self.Pa, self.ctx = Pa, ctx
        self.stats = ForwardStats()

    def start_block(self, masked: Tensor, steps: int) -> None:
        pass

    def step(self, logits: Tensor, masked: Tensor, step_in_block: int, generator: torch.Generator) -> Commit:
        ctx, vocab = self.ctx, self.vocab
        if ctx is None or vocab is None:
            raise GenerationError("guided decoder used outside generate() (no generation context)")
        B, N = masked.shape
        device = self.ar_x.device
        P, Pa, off = ctx.prompt_length, self.Pa, ctx.block_start
        probs = logits.to(torch.float64).softmax(-1)
        draft_out = logits.nan_to_num(float("-inf")).argmax(-1)
        conf = probs.gather(-1, draft_out[..., None]).squeeze(-1)
        # Everything below lives on the guide's device (moved once; usually the same device).
        ready = (masked & computed(logits)).to(device)
        masked, draft = masked.to(device), draft_out.to(device)
        # The AR sequence mirrors the dLLM's answer: committed tokens, then the draft.
        answer = ctx.x[:, P:].to(device).clone()
        block = answer[:, off : off + N]
        block[masked] = draft[masked]
        mapped = vocab.guide_ids(answer.clamp(min=0))
        self.ar_x[:, Pa:] = torch.where(mapped >= 0, mapped, torch.full_like(mapped, vocab.guide_pad))
        # One AR forward over the rows not yet cached, up to the end of the block.
        has_mask = masked.any(1)
        first = torch.where(has_mask, masked.long().argmax(1), torch.zeros_like(has_mask, dtype=torch.long))
        start = torch.minimum(self.cached_upto, Pa + off + first - 1)
        cols = torch.arange(Pa + off + N, device=device)
        active = (cols[None, :] >= start[:, None]) & (cols[None, :] < Pa + off + N - 1).expand(B, -1)
        active = torch.cat(
            [active, torch.zeros((B, self.ar_x.shape[1] - active.shape[1]), dtype=torch.bool, device=device)],
            1,
        )
        rows = rows_from_mask(active)
        # row Pa+off+j-1 predicts answer position off+j
        logit_rows = (Pa + off - 1 + torch.arange(N, device=device)).expand(B, N)
        ar_logits = self.guide.model.forward_active(
            self.ar_x, self.layout, self.cache, None, rows, logit_rows, self.stats
        )
        ar_probs = ar_logits.to(torch.float64).softmax(-1)
        ar_top = vocab.model_ids(ar_probs.nan_to_num(0.0).argmax(-1))
        draft_guide = vocab.guide_ids(draft)
        agree = self.agreement(ar_probs.nan_to_num(0.0), draft_guide) & (draft_guide >= 0)
        # committed positions pass; a masked position without a draft (uncomputed) disagrees
        ok = (agree & ready) | ~masked
        ok_run = ok.long().cumprod(1).bool()  # positions before the first disagreement
        commit = masked & ok_run
        stop = (~ok_run).long().argmax(1)  # first disagreement (0 when everything agreed)
        disagree = (~ok_run).any(1)
        tokens = draft.clone()
        rows_b = torch.arange(B, device=device)[disagree]
        ar_token = ar_top[rows_b, stop[disagree]]
        # the AR token at the first disagreement (the draft if the AR token has no dLLM id)
        tokens[rows_b, stop[disagree]] = torch.where(ar_token >= 0, ar_token, tokens[rows_b, stop[disagree]])
        commit[rows_b, stop[disagree]] = masked[rows_b, stop[disagree]]
        # AR rows whose tokens are final now: everything before the first disagreement
        upto = torch.where(disagree, Pa + off + stop, torch.full_like(stop, Pa + off + N))
        self.cached_upto = torch.where(has_mask, upto, self.cached_upto)
        return Commit(commit.to(draft_out.device), tokens.to(draft_out.device), conf)


__all__ = [
    "AGREEMENTS",
    "GenerationContext",
    "GuidedDecoder",
    "VocabularyMap",
    "agree_deterministic",
    "agree_topk_relative",
]
