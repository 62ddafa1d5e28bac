"""Guided Diffusion: a small autoregressive model verifies what the dLLM drafts (speculative style).

Each step the dLLM drafts every masked position from the current block's start to the end of the
answer (argmax; the engine hands this decoder the logits of that whole span). The AR model (a causal
Qwen2-format checkpoint sharing the tokenizer) checks the drafts as the published verifier does
(FlashDLM): in chunks of `chunk` (32) positions from the first masked position, across block
boundaries, one AR forward per chunk over the committed answer plus the draft, keeping its own K/V
cache over the committed prefix (causal: committed rows never change). The longest run of drafted
tokens the AR model agrees with is committed, plus the AR model's own token at the first
disagreement, so every step commits at least one token; a fully accepted chunk moves on to the next.
Agreement rules:
- `deterministic`: the AR argmax equals the draft;
- `topk_relative`: the draft is among the AR top-`agreement_top_k` and its probability is at least
  `agreement_ratio` x the AR top-1 (the published evaluator's defaults: top-k 5, ratio 0.95).

The AR K/V cache holds exactly the rows whose tokens are final: after a step, every row before the
first position not accepted (the published verifier also keeps one entry past a fully accepted
chunk that its next forward overwrites; here no row is kept that a plain AR forward would not hold).
A masked position the dLLM's cache did not compute (no draft) counts as a disagreement.

Vocabularies are matched by token string at load (Dream and Qwen2.5 share ids; the demo models share
one BPE). The dLLM's EOS maps to the AR model's end-of-turn marker when it has one (Dream pads answers
with EOS where Qwen ends its turn with <|im_end|>). A dLLM whose ordinary tokens the AR vocabulary
lacks is rejected with a clear error. The AR prompt is the prompt text in the AR model's own chat
template.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from dllm_cache.decoding.base import Commit, computed
from dllm_cache.errors import GenerationError
from dllm_cache.models import step_graphs
from dllm_cache.models.active import FeatureCache, ForwardStats, rows_from_mask
from dllm_cache.models.loading import DLLM
from dllm_cache.models.step_graphs import StepForward, step_mode
from dllm_cache.models.tokenizer import END_OF_TURN_TOKENS, encode_prompt

# (AR probabilities [B, N, V], draft ids in the AR vocabulary [B, N]) -> agree [B, N] bool
Agreement = Callable[[Tensor, Tensor], Tensor]


def agree_deterministic(probs: Tensor, draft: Tensor) -> Tensor:
    return probs.argmax(-1) == draft


def agree_topk_relative(probs: Tensor, draft: Tensor, top_k: int = 5, ratio: float = 0.95) -> Tensor:
    """The draft is among the AR top-k and its probability >= ratio x the AR top-1."""
    top = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    p_draft = probs.gather(-1, draft.clamp(min=0)[..., None]).squeeze(-1)
    return (top.indices == draft[..., None]).any(-1) & (p_draft >= ratio * top.values[..., 0])


AGREEMENTS: dict[str, Agreement] = {
    "deterministic": agree_deterministic,
    "topk_relative": agree_topk_relative,
}


@dataclass
class GenerationContext:
    """What the engine tells a decoder beyond one block's logits: the prompts and live sequence (guided
    decoding), and host facts the reference samplers rank with (ReferenceRows)."""

    llm: DLLM
    prompts: Sequence[str | Sequence[int]]
    chat: bool
    x: Tensor  # [B, P+G] the live sequence (committed tokens, mask ids elsewhere)
    prompt_length: int  # P
    block_start: int = 0  # the current block's first answer offset (updated by the engine)
    extra: dict[str, Any] = field(default_factory=dict)
    prompt_lengths: list[int] = field(default_factory=list)  # each prompt's own (unpadded) length
    # Per row: masked positions in the current block, as of the engine's last host read (before
    # every step: the counts the step starts from). Host numbers, so decoders need not read them.
    block_masked: list[int] = field(default_factory=list)


class VocabularyMap:
    """dLLM id <-> AR id by token string; -1 where a token has no counterpart."""

    def __init__(self, llm: DLLM, guide: DLLM, shared_ids: bool = False) -> None:
        """shared_ids: the two models number their tokens alike (Dream and Qwen2.5; random-weight
        benchmarks, which have no tokenizers): id i maps to id i where both have it."""
        if shared_ids:
            n_src, n_dst = llm.config.vocab_size, guide.config.vocab_size
            ids = torch.arange(max(n_src, n_dst))
            self.to_guide = torch.where(ids[:n_src] < n_dst, ids[:n_src], -1)
            self.to_model = torch.where(ids[:n_dst] < n_src, ids[:n_dst], -1)
            dst: dict[str, int] = {}
        else:
            dst = self._match_by_string(llm, guide)
        # End of answer: the dLLM's EOS is the guide's end-of-turn (or EOS); the guide's end tokens
        # map back to the dLLM's EOS.
        guide_end = next((dst[t] for t in END_OF_TURN_TOKENS if t in dst), guide.config.eos_token_id)
        self.to_guide[llm.config.eos_token_id] = guide_end
        for j in {guide_end, guide.config.eos_token_id}:
            self.to_model[j] = llm.config.eos_token_id
        self.guide_pad = guide.config.pad_token_id if guide.config.pad_token_id is not None else guide_end

    def _match_by_string(self, llm: DLLM, guide: DLLM) -> dict[str, int]:
        """Fill the maps from the two tokenizers; returns the guide's vocabulary."""
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
        return dst

    def guide_ids(self, ids: Tensor) -> Tensor:
        return self.to_guide.to(ids.device)[ids]

    def model_ids(self, ids: Tensor) -> Tensor:
        return self.to_model.to(ids.device)[ids]


class GuidedDecoder:
    """The Guided Diffusion decoder (see the module docstring)."""

    name = "guided"
    dynamic = True
    whole_answer = True  # the engine passes logits from the block start to the end of the answer

    def __init__(
        self,
        guide: DLLM,
        agreement: str | Agreement = "deterministic",
        top_k: int = 5,
        ratio: float = 0.95,
        chunk: int = 32,
        graphs: bool | str = True,
        vocab: VocabularyMap | None = None,
    ) -> None:
        if not guide.config.causal:
            raise GenerationError(
                f"guide model {guide.path} is not causal (model_type {guide.config.arch!r}): guided decoding "
                "needs an autoregressive LM such as tiny-ar or Qwen2.5-Instruct"
            )
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise GenerationError(f"guided decoder: agreement_top_k must be an integer >= 1, got {top_k!r}")
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0.0 <= ratio <= 1.0:
            raise GenerationError(f"guided decoder: agreement_ratio must be in [0, 1], got {ratio!r}")
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise GenerationError(f"guided decoder: chunk must be an integer >= 1, got {chunk!r}")
        if isinstance(agreement, str):
            if agreement not in AGREEMENTS:
                raise GenerationError(
                    f"unknown agreement rule {agreement!r} (choose {', '.join(AGREEMENTS)})"
                )
            if agreement == "topk_relative":
                agreement = functools.partial(agree_topk_relative, top_k=top_k, ratio=float(ratio))
            else:
                agreement = AGREEMENTS[agreement]
        self.guide, self.agreement, self.chunk = guide, agreement, chunk
        try:  # the AR forward: static shapes, replayed as CUDA graphs on CUDA (as the dLLM's step)
            self.mode = step_mode(graphs, guide.model.device)
        except ValueError as e:
            raise GenerationError(str(e)) from None
        self.stats = ForwardStats()  # the AR model's forwards, counted apart from the dLLM's
        self._row_forwards: Tensor | None = None  # per prompt: AR forwards that verified its drafts
        self.forward: StepForward | None = None
        self.ctx: GenerationContext | None = None
        self.vocab: VocabularyMap | None = vocab  # given: used with any model (shared ids)
        self._vocab_given = vocab is not None
        self._vocab_of: Any = None

    def check_model(self, llm: DLLM) -> None:
        """Up front: the vocabularies must match (a clear error otherwise)."""
        if not self._vocab_given and self._vocab_of is not llm:
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
        self.stats = ForwardStats()
        self.forward = step_graphs.acquire(
            model,
            model.layout(attn),
            lambda: FeatureCache(model.config, B, Pa + G, model.dtype, device, store_outputs=False),
            None,
            self.stats,
            self.mode,
            Pa,
        )
        self.layout, self.cache = self.forward.layout, self.forward.cache
        self.cached_upto = torch.zeros(B, dtype=torch.long, device=device)  # AR rows with final K/V
        self.prefilled = False  # host-known: has an AR forward computed the prompt's rows yet?
        self.Pa, self.ctx = Pa, ctx
        self._row_forwards = torch.zeros(B, dtype=torch.long, device=device)
        self.to_guide = self.vocab.to_guide.to(device)  # moved once, not at every step
        self.to_model = self.vocab.to_model.to(device)

    def end_generation(self) -> None:
        """The AR step buffers (and graphs) go back to the guide model's pool."""
        if self.forward is not None:
            step_graphs.release(self.forward)

    @property
    def row_forwards(self) -> list[int]:
        """Per prompt: AR forwards that verified its drafts (read at the end of a generation)."""
        return [] if self._row_forwards is None else self._row_forwards.tolist()

    def start_block(self, masked: Tensor, steps: int) -> None:
        pass

    def step(self, logits: Tensor, masked: Tensor, step_in_block: int, generator: torch.Generator) -> Commit:
        """logits, masked: the span from the block start on (to the answer's end, see the engine)."""
        ctx, vocab = self.ctx, self.vocab
        if ctx is None or vocab is None:
            raise GenerationError("guided decoder used outside generate() (no generation context)")
        B, N = masked.shape
        device = self.ar_x.device
        P, Pa, off = ctx.prompt_length, self.Pa, ctx.block_start
        probs = logits.to(torch.float64).softmax(-1)
        draft_out = logits.nan_to_num(float("-inf")).argmax(-1)
        conf = probs.gather(-1, draft_out[..., None]).squeeze(-1)
        # Everything below lives on the guide's device (moved once; usually the same device) and
        # is tensor operations: the host is read only to decide whether another chunk is verified.
        ready = (masked & computed(logits)).to(device)
        masked, draft = masked.to(device), draft_out.to(device)
        # The AR sequence mirrors the dLLM's answer: committed tokens, then the draft.
        answer = ctx.x[:, P:].to(device).clone()
        answer[:, off : off + N] = torch.where(masked, draft, answer[:, off : off + N])
        mapped = self.to_guide[answer.clamp(min=0)]
        self.ar_x[:, Pa:] = torch.where(mapped >= 0, mapped, torch.full_like(mapped, vocab.guide_pad))
        draft_guide = self.to_guide[draft]
        has_mask = masked.any(1)
        first = torch.where(has_mask, masked.long().argmax(1), torch.full_like(has_mask, N, dtype=torch.long))
        stop = torch.full((B,), N, dtype=torch.long, device=device)  # first disagreement (N: none)
        ar_top = torch.full((B, N + 1), -1, dtype=torch.long, device=device)  # AR argmax, dLLM ids; N: dump
        base = Pa + off  # the AR row holding span position 0; row base + j - 1 predicts position j
        cols = torch.arange(self.ar_x.shape[1], device=device)
        # Rows an AR forward computes: after the first forward of a generation (the prompt), a
        # chunk's rows are at most `chunk` (what precedes a row's first masked position is cached:
        # the previous step committed up to its first disagreement and cached the rows before it),
        # so the shape is host-known and static; the first one counts its rows (one host read).
        n_rows = min(self.chunk, self.ar_x.shape[1]) if self.prefilled else None
        going = has_mask.clone()  # the engine steps only while some row has masks: chunk 0 runs
        for c in range(-(-N // self.chunk)):
            lo = first + c * self.chunk  # this chunk's span positions: [lo, hi)
            going &= lo < N
            if c > 0 and not bool(going.any()):  # a host read only when a further chunk may run
                break
            hi = torch.clamp(lo + self.chunk, max=N)
            start = base + lo - 1
            if c == 0:  # rows not cached yet (a previous disagreement, the prompt at step 0)
                start = torch.minimum(self.cached_upto, start)
            active = (cols[None, :] >= start[:, None]) & (cols[None, :] < (base + hi - 1)[:, None])
            pos = lo[:, None] + torch.arange(self.chunk, device=device)
            valid = (pos < hi[:, None]) & going[:, None]
            pos = pos.clamp(max=N - 1)
            assert self.forward is not None
            ar_logits = self.forward(
                self.ar_x, rows_from_mask(active & going[:, None], n_rows), base + pos - 1
            )
            self.prefilled, n_rows = True, min(self.chunk, self.ar_x.shape[1])
            self._row_forwards += going
            ar_probs = ar_logits.to(torch.float64).softmax(-1).nan_to_num(0.0)
            # each valid position's AR token (invalid slots write the dump column N)
            ar_top.scatter_(1, torch.where(valid, pos, N), self.to_model[ar_probs.argmax(-1)])
            d = draft_guide.gather(1, pos)
            agree = self.agreement(ar_probs, d) & (d >= 0)
            # committed positions pass; a masked position without a draft (uncomputed) disagrees
            ok = (agree & ready.gather(1, pos)) | ~masked.gather(1, pos)
            fail = valid & ~ok
            failed = fail.any(1)
            stop = torch.where(failed, lo + fail.long().argmax(1), stop)
            going &= ~failed
        idx = torch.arange(N, device=device)
        disagree = stop < N
        at_stop = (idx[None, :] == stop[:, None]) & disagree[:, None]
        ar_token = ar_top.gather(1, stop[:, None])  # [B, 1]
        # the AR token at the first disagreement (the draft if the AR token has no dLLM id)
        tokens = torch.where(at_stop & (ar_token >= 0), ar_token, draft)
        commit = masked & ((idx[None, :] < stop[:, None]) | at_stop)
        # AR rows whose tokens are final now: every row before the first position not accepted
        # (all accepted: the last answer row, whose K/V no forward has computed yet, is not)
        upto = torch.where(disagree, base + stop, torch.full_like(stop, base + N - 1))
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
