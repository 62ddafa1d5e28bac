"""An lm-evaluation-harness model backed by dllm-cache: `--model dllm_cache`.

    pip install 'dllm-cache[lm-eval]'
    python -m dllm_cache.eval.lm_eval_adapter --model dllm_cache \\
        --model_args model=/path/to/LLaDA-8B-Instruct,cache=dllm-cache,gen_length=256 \\
        --tasks gsm8k --apply_chat_template --device cuda

lm-eval finds a model class only once the module that registers it is imported, and lm-eval has
no plugin entry point for models: running this module (or the `dllm-cache-lm-eval` script, which is
the same) imports the registration and then hands the command line to lm-eval's own CLI. From
Python, `import dllm_cache.eval.lm_eval_adapter` before `lm_eval.simple_evaluate(model="dllm_cache")`.

Model arguments (`--model_args key=value,...`):
  model            checkpoint directory or embedded name (default tiny-llada)
  cache / method   a preset or method spec (dllm_cache.methods), e.g. dllm-cache,
                   fast-dllm-dual-parallel or dual+threshold:threshold=0.8 (default none)
  gen_length       answer length; default: the task's max_gen_toks rounded up to the block length
  block_length     semi-autoregressive block (default: the family's, or the method's preset)
  steps            denoising steps (default gen_length / tokens_per_step)
  tokens_per_step  with `steps` unset (default 1)
  batch_size       prompts per generate() call (lm-eval's --batch_size; "auto" means 16)
  device, dtype    as for dllm-cache generate (lm-eval's --device is passed here)
  mc_samples       Monte-Carlo samples per loglikelihood request (default 64)
  mc_batch_size    samples per forward (default 32)
  mc_estimator     "l" (default): mask exactly l ~ U{1..n} of the n continuation tokens, weight n/l
                   (the lower-variance form the LLaDA paper evaluates with; exact for one token);
                   "t": t ~ U(0,1), mask each token with probability t, weight 1/t (the training
                   objective's form; same expectation, far noisier on short continuations)
  seed             seeds sampling and the Monte-Carlo masks (default 0)
  add_bos          prepend the BOS token to every context (default: yes for LLaDA, no for Dream)
  any other GenerationConfig field (temperature, threshold, cfg_scale, ...)
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Sequence
from typing import Any

import torch

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "the lm-eval adapter needs lm-evaluation-harness: pip install 'dllm-cache[lm-eval]'"
    ) from e

from dllm_cache.engine import GenerationConfig, generate
from dllm_cache.errors import DllmCacheError
from dllm_cache.methods import parse_method
from dllm_cache.models.loading import load
from dllm_cache.models.transformer import ForwardStats

MC_ESTIMATORS = ("t", "l")


@register_model("dllm_cache")
class DllmCacheLM(LM):
    """generate_until through dllm_cache.engine.generate (any cache policy and decoder);
    loglikelihood by the masked-diffusion Monte-Carlo estimate (LLaDA, Eq. for conditional
    likelihood: an upper bound on -log p estimated by masking the continuation)."""

    def __init__(
        self,
        model: str = "tiny-llada",
        cache: str | None = None,
        method: str | None = None,
        gen_length: int | None = None,
        block_length: int | None = None,
        steps: int | None = None,
        tokens_per_step: int = 1,
        batch_size: int | str | None = 16,
        max_batch_size: int | None = None,
        device: str | None = None,
        dtype: str = "auto",
        mc_samples: int = 64,
        mc_batch_size: int = 32,
        mc_estimator: str = "l",
        seed: int = 0,
        add_bos: bool | None = None,
        **generation_args: Any,
    ) -> None:
        super().__init__()
        if cache is not None and method is not None and cache != method:
            raise DllmCacheError("give either cache= or method= (the same thing), not both")
        self.method_spec = method or cache or "none"
        self.method = parse_method(self.method_spec)
        fields = {f.name for f in dataclasses.fields(GenerationConfig)}
        unknown = sorted(set(generation_args) - fields)
        if unknown:
            raise DllmCacheError(f"dllm_cache: unknown model argument {unknown[0]!r}")
        if "chat" in generation_args:
            raise DllmCacheError(
                "dllm_cache: contexts are used as lm-eval gives them; for the chat template pass "
                "lm-eval's --apply_chat_template"
            )
        # The method's settings (block length, decoder...) first; explicit model_args win.
        self.base_config = dataclasses.replace(
            GenerationConfig(seed=seed), **{**self.method.overrides, **generation_args}
        )
        if block_length is not None:
            self.base_config = dataclasses.replace(self.base_config, block_length=int(block_length))
        self.gen_length = int(gen_length) if gen_length is not None else None
        self.steps = int(steps) if steps is not None else None
        if tokens_per_step < 1:
            raise DllmCacheError(f"tokens_per_step must be >= 1, got {tokens_per_step}")
        self.tokens_per_step = int(tokens_per_step)
        if batch_size in (None, "auto") or (isinstance(batch_size, str) and batch_size.startswith("auto")):
            batch_size = 16
        self.batch_size = max(1, int(batch_size))
        if max_batch_size:
            self.batch_size = min(self.batch_size, int(max_batch_size))
        if mc_estimator not in MC_ESTIMATORS:
            raise DllmCacheError(
                f"mc_estimator must be one of {', '.join(MC_ESTIMATORS)}, got {mc_estimator!r}"
            )
        if mc_samples < 1 or mc_batch_size < 1:
            raise DllmCacheError("mc_samples and mc_batch_size must be >= 1")
        self.mc_samples, self.mc_batch_size, self.mc_estimator = (
            int(mc_samples),
            int(mc_batch_size),
            mc_estimator,
        )
        self.seed = int(seed)
        if device in (None, "auto"):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif str(device).startswith("cuda") and not torch.cuda.is_available():
            raise DllmCacheError(f"device {device!r} requested but CUDA is not available")
        self.llm = load(model, dtype=dtype, device=device)
        self._device = self.llm.model.device
        if self.llm.tokenizer is None:
            raise DllmCacheError(f"{self.llm.path}: lm-eval needs a tokenizer (the directory has none)")
        cfg = self.llm.config
        self.add_bos = (not cfg.shift_logits) if add_bos is None else bool(add_bos)

    # ---- tokenisation -------------------------------------------------------------------------

    def tok_encode(self, text: str) -> list[int]:
        return self.llm.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _with_bos(self, ids: list[int]) -> list[int]:
        bos = self.llm.config.bos_token_id
        if self.add_bos and bos is not None and (not ids or ids[0] != bos):
            return [bos, *ids]
        return ids

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's convention: trailing spaces of the context move to the continuation; the
        continuation's tokens are those of context+continuation after the context's."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        if whole[: len(ctx)] != ctx:  # a token straddles the boundary: encode separately
            return self._with_bos(ctx), self.tok_encode(continuation)
        return self._with_bos(ctx), whole[len(ctx) :]

    @property
    def tokenizer_name(self) -> str:
        return str(self.llm.path).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if chat_template is False or chat_template is None:
            return None
        return getattr(self.llm.tokenizer, "chat_template", None)

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        tok = self.llm.tokenizer
        if not getattr(tok, "chat_template", None):
            raise DllmCacheError(f"{self.llm.path}: the tokenizer has no chat template")
        if add_generation_prompt:
            return tok.apply_chat_template(chat_history, tokenize=False, add_generation_prompt=True)
        # lm-eval prefills the assistant turn: continue its last message (transformers >= 4.45)
        return tok.apply_chat_template(chat_history, tokenize=False, continue_final_message=True)

    # ---- generation ---------------------------------------------------------------------------

    def _lengths(self, max_gen_toks: int) -> tuple[int, int | None, int]:
        """-> (gen_length, block_length, steps) for one generate() call."""
        cfg = self.base_config
        block = cfg.block_length
        if self.gen_length is not None:
            gen = self.gen_length
        else:
            unit = block or (1 if self.llm.config.shift_logits else 32)
            gen = max(unit, math.ceil(max_gen_toks / unit) * unit)
        if block is None and not self.llm.config.shift_logits:
            block = min(32, gen)  # LLaDA's default, made explicit to count blocks below
        if self.steps is not None:
            return gen, block, self.steps
        n_blocks = gen // block if block else 1
        steps = max(1, gen // self.tokens_per_step)
        steps = max(n_blocks, steps - steps % n_blocks)  # a multiple of the number of blocks
        return gen, block, steps

    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, if the task asks) generation; the text is cut at the first stop string."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[tuple[Any, ...], list[int]] = {}
        parsed: list[tuple[list[int], list[str], dict[str, Any]]] = []
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            kwargs = dict(gen_kwargs or {})
            until = kwargs.pop("until", None) or []
            if isinstance(until, str):
                until = [until]
            max_gen_toks = int(kwargs.pop("max_gen_toks", 256))
            temperature = self.base_config.temperature
            if "do_sample" in kwargs:  # the task decides: greedy, or sampling at its temperature
                do_sample = bool(kwargs["do_sample"])
                temperature = float(kwargs.get("temperature") or 0.0) if do_sample else 0.0
            gen, block, steps = self._lengths(max_gen_toks)
            ids = self._with_bos(self.tok_encode(context))
            room = self.llm.config.max_seq_len - gen
            if room <= 0:
                raise DllmCacheError(
                    f"gen_length {gen} leaves no room for a prompt (max sequence length "
                    f"{self.llm.config.max_seq_len})"
                )
            ids = ids[-room:]  # keep the end of an over-long context, as lm-eval's HF model does
            parsed.append((ids, list(until), {"temperature": temperature}))
            groups.setdefault((gen, block, steps, temperature), []).append(i)
        for (gen, block, steps, temperature), idx in groups.items():
            config = dataclasses.replace(
                self.base_config,
                gen_length=gen,
                block_length=block,
                steps=steps,
                temperature=temperature,
                chat=False,
            )
            idx = sorted(idx, key=lambda i: -len(parsed[i][0]))  # similar lengths: less padding
            for start in range(0, len(idx), self.batch_size):
                batch = idx[start : start + self.batch_size]
                result = generate(self.llm, [parsed[i][0] for i in batch], config, cache=self.method.policy())
                for i, text in zip(batch, result.texts, strict=True):
                    text = truncate_at_stop(text, parsed[i][1])
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return [t if t is not None else "" for t in out]

    # ---- likelihood ---------------------------------------------------------------------------

    @torch.no_grad()
    def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """Monte-Carlo estimate of log p(continuation | context) (a lower bound, see score())."""
        results = []
        for req in requests:
            context, continuation = req.args
            if not context:
                ctx_ids = self._with_bos([])
                if not ctx_ids:
                    ctx_ids = [self.llm.config.eos_token_id]
                cont_ids = self.tok_encode(continuation)
            else:
                ctx_ids, cont_ids = self._encode_pair(context, continuation)
            ll, greedy = self.score(ctx_ids, cont_ids)
            results.append((ll, greedy))
            self.cache_hook.add_partial("loglikelihood", req.args, (ll, greedy))
        return results

    @torch.no_grad()
    def score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """(estimated log-likelihood, is_greedy) of `continuation` after `context` (token ids).

        For a masked diffusion model log p(c | x) >= -E_t[(1/t) sum_{i masked} CE_i] (LLaDA,
        conditional likelihood evaluation). Each Monte-Carlo sample masks part of the continuation
        and adds the cross-entropy of the masked tokens, weighted: mc_estimator "t" masks every token
        with probability t ~ U(eps, 1) and weights 1/t; "l" masks exactly l ~ U{1..n} tokens and
        weights n/l (the paper's lower-variance equivalent). The negated average over samples is
        returned. The masks come from a generator seeded with `seed`, so the estimate of a request
        does not depend on its batch or order.

        is_greedy: every continuation token is the argmax when the whole continuation is masked
        (a single-pass check; the iterative sampler could still choose otherwise).
        """
        if not continuation:
            return 0.0, True
        llm = self.llm
        cfg, device = llm.config, llm.model.device
        mask_id = cfg.mask_token_id
        if mask_id is None:
            raise DllmCacheError(f"{llm.path}: not a masked diffusion model (no mask token)")
        ids = context + continuation
        if len(ids) > cfg.max_seq_len:
            ids = ids[-cfg.max_seq_len :]
        L, n = len(ids), len(continuation)
        if L <= n:
            raise DllmCacheError(
                f"continuation of {n} tokens does not fit the model's {cfg.max_seq_len}-token window"
            )
        seq = torch.tensor(ids, device=device)
        target = seq[L - n :]
        shift = 1 if cfg.shift_logits else 0
        cont_rows = torch.arange(L - n, L, device=device)  # continuation positions
        logit_rows = cont_rows - shift
        gen = torch.Generator().manual_seed(self.seed)
        total = 0.0
        done = 0
        while done < self.mc_samples:
            b = min(self.mc_batch_size, self.mc_samples - done)
            masked, weight = self._draw_masks(b, n, gen)
            x = seq.expand(b, L).clone()
            x[:, L - n :] = torch.where(masked.to(device), mask_id, target)
            nll = self._masked_nll(x, logit_rows, target, masked.to(device))
            total += float((nll * weight.to(device, nll.dtype)).sum())
            done += b
        ll = -total / self.mc_samples
        # is_greedy: everything masked, one pass.
        x = seq.clone()[None]
        x[0, L - n :] = mask_id
        logits = self._logits(x, logit_rows)
        greedy = bool((logits[0].argmax(-1) == target).all())
        return ll, greedy

    def _draw_masks(self, b: int, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (masked [b, n] bool, weight [b]) for one batch of Monte-Carlo samples."""
        if self.mc_estimator == "t":
            eps = 1e-3
            t = eps + (1 - eps) * torch.rand(b, generator=gen)
            masked = torch.rand(b, n, generator=gen) < t[:, None]
            return masked, 1.0 / t
        # "l": exactly l ~ U{1..n} random tokens masked, weight n / l
        l_count = torch.randint(1, n + 1, (b,), generator=gen)
        order = torch.rand(b, n, generator=gen).argsort(dim=1)
        masked = order < l_count[:, None]
        return masked, n / l_count.double()

    def _logits(self, x: torch.Tensor, logit_rows: torch.Tensor) -> torch.Tensor:
        model = self.llm.model
        attn = torch.ones_like(x, dtype=torch.bool)
        rows = logit_rows.expand(x.shape[0], -1)
        return model.forward_active(x, model.layout(attn), None, None, None, rows, ForwardStats())

    def _masked_nll(
        self, x: torch.Tensor, logit_rows: torch.Tensor, target: torch.Tensor, masked: torch.Tensor
    ) -> torch.Tensor:
        """Per sample: sum of the cross-entropy of the masked continuation tokens, [b] (fp64)."""
        logits = self._logits(x, logit_rows)  # [b, n, V] fp32
        ce = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), target.repeat(x.shape[0]), reduction="none"
        ).view(x.shape[0], -1)
        return (ce.double() * masked).sum(1)

    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError(
            "dllm_cache: loglikelihood_rolling (perplexity tasks such as wikitext) is not supported: a "
            "masked diffusion model has no left-to-right factorisation to roll over; use generation or "
            "multiple-choice tasks"
        )


def truncate_at_stop(text: str, until: Sequence[str]) -> str:
    """Cut `text` at the earliest occurrence of any stop string."""
    cut = len(text)
    for s in until:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's own command line, with the `dllm_cache` model registered."""
    import lm_eval.models  # noqa: F401  (lm-eval's models stay available next to ours)
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
