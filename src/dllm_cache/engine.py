"""The denoising loop: any model x any cache policy x any decoder.

generate(llm, prompts, config, cache=..., decoder=...) -> GenerationResult
"""

from __future__ import annotations

import functools
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from dllm_cache.cache import make_policy
from dllm_cache.decoding import Decoder, DreamDecoder, LLaDADecoder
from dllm_cache.decoding.certainty import CertaintyPriorDecoder
from dllm_cache.decoding.guided import GenerationContext, GuidedDecoder
from dllm_cache.decoding.parallel import EarlyCommit, FactorDecoder, ThresholdDecoder
from dllm_cache.errors import GenerationError
from dllm_cache.models import step_graphs
from dllm_cache.models.active import CachePolicy, FeatureCache, ForwardStats, StepState, column_range
from dllm_cache.models.loading import DLLM, load
from dllm_cache.models.step_graphs import StepForward, step_mode
from dllm_cache.models.tokenizer import encode_prompt

Prompt = str | Sequence[int]


@dataclass
class GenerationConfig:
    gen_length: int = 128
    steps: int | None = None  # None: gen_length (one token per step)
    block_length: int | None = None  # None: 32 for LLaDA (or gen_length if smaller), gen_length for Dream
    temperature: float = 0.0
    remasking: str = "low_confidence"  # LLaDA decoder: low_confidence | random
    alg: str = "entropy"  # Dream decoder: origin | maskgit_plus | topk_margin | entropy
    alg_temp: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    eps: float = 1e-3
    cfg_scale: float = 0.0
    seed: int = 0
    early_stop: bool = True
    decoder: str = "reference"  # reference (the family's sampler) | threshold | factor | certainty | guided
    threshold: float = 0.9  # threshold decoder: commit every position above this confidence
    factor: float = 1.0  # factor decoder
    certainty_sigma: float = 10.0  # certainty decoder: width of the certainty-density Gaussian
    guide_model: str | None = None  # guided decoder: the AR verifier (a name or a Qwen2-format dir)
    agreement: str = "deterministic"  # guided decoder: deterministic | topk_relative
    agreement_top_k: int = 5  # topk_relative: the draft must be among the AR top-k ...
    agreement_ratio: float = 0.95  # ... with probability >= this x the AR top-1 (published defaults)
    early_commit_margin: float | None = None  # Prophet: commit all when every top1-top2 gap >= this
    chat: bool = True  # wrap text prompts in the tokenizer's chat template
    record_steps: bool = False
    # The denoising forward: True/"auto" replays it as CUDA graphs on CUDA (static shapes, captured
    # once per shape) and runs it eagerly elsewhere; False/"off" always eagerly (the reference, what
    # --no-graphs gives); "static" the static shapes and buffers without capture (models/step_graphs.py).
    graphs: bool | str = True
    # torch.compile the per-layer pointwise parts (RMSNorm, RoPE, SwiGLU) into fused kernels; off by
    # default (a compile per shape family on first use; eager stays the reference).
    compile: bool = False


@dataclass
class GenerationStats:
    nfe: int  # forward passes (a classifier-free-guidance step counts two)
    steps: int
    wall_time_s: float
    generated_tokens: int  # non-pad, non-EOS answer tokens
    tokens_per_s: float
    position_layers: int  # rows x layers actually recomputed
    position_layers_total: int  # rows x layers uncached forwards would have computed
    recompute_fraction: float  # of what uncached forwards would have computed
    flops: float  # estimated from the shapes computed
    peak_memory_bytes: int
    cache_bytes: int
    guide_nfe: int = 0  # guided decoding: forward passes of the AR verifier (not in nfe)
    guide_flops: float = 0.0
    # Per prompt: the forward passes until that answer was complete, i.e. what it would cost alone
    # (batch size 1); `nfe` is the batch's, set by its slowest row.
    row_nfe: list[int] = field(default_factory=list)
    guide_row_nfe: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StepRecord:
    step: int
    block: int
    positions: list[list[int]]  # per row: answer offsets committed at this step
    tokens: list[list[int]]
    confidence: list[list[float]]


@dataclass
class StepEvent:
    """Handed to `on_step` after every step: the answer canvas as it stands (masks still in place)."""

    step: int
    block: int
    canvas: Tensor  # [B, G] answer tokens, mask id where not yet committed (a live view: copy to keep)
    mask_id: int
    block_done: bool  # every row's current block is fully committed
    # the canvas on the host ([B][G] ids), read with the step's one host read: use it, not
    # canvas.tolist() (a second read per step)
    tokens: list[list[int]] = field(default_factory=list)


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # per prompt: answer ids up to (not including) the first end token
    texts: list[str]
    sequences: Tensor  # [B, P+G] the full left-padded sequences
    prompt_length: int  # P: the answer starts at this column
    stats: GenerationStats
    step_records: list[StepRecord] | None = None

    @property
    def text(self) -> str:
        return self.texts[0]


DECODERS = ("reference", "threshold", "factor", "certainty", "guided")


def default_decoder(llm: DLLM, config: GenerationConfig) -> Decoder:
    """The decoder named by config.decoder ("reference": the model family's own sampler)."""
    decoder: Decoder
    if config.decoder == "threshold":
        family = "dream" if llm.config.shift_logits else "llada"
        decoder = ThresholdDecoder(config.threshold, config.temperature, family)
    elif config.decoder == "factor":
        decoder = FactorDecoder(config.factor, config.temperature)
    elif config.decoder == "certainty":
        decoder = CertaintyPriorDecoder(config.certainty_sigma, config.temperature)
    elif config.decoder == "guided":
        if not config.guide_model:
            raise GenerationError(
                "decoder 'guided' needs a guide model (--guide-model tiny-ar or a Qwen2 directory)"
            )
        guide = load_guide(config.guide_model, llm.model.device, llm.model.dtype)
        decoder = GuidedDecoder(
            guide, config.agreement, config.agreement_top_k, config.agreement_ratio, graphs=config.graphs
        )
    elif config.decoder != "reference":
        raise GenerationError(f"unknown decoder {config.decoder!r} (choose {', '.join(DECODERS)})")
    elif llm.config.shift_logits:
        decoder = DreamDecoder(
            config.alg, config.temperature, config.top_p, config.top_k, config.alg_temp, config.eps
        )
    else:
        decoder = LLaDADecoder(config.remasking, config.temperature)
    if config.early_commit_margin is not None:
        decoder = EarlyCommit(decoder, config.early_commit_margin)
    return decoder


@functools.lru_cache(maxsize=4)
def load_guide(name_or_path: str, device: torch.device, dtype: torch.dtype) -> DLLM:
    """The AR verifier of guided decoding, loaded once per (path, device, dtype)."""
    return load(name_or_path, dtype=dtype, device=device)


def _check_config(llm: DLLM, config: GenerationConfig, prompt_len: int) -> tuple[int, int, int]:
    """-> (steps, block_length, n_blocks), with every error named."""
    cfg = llm.config
    if cfg.mask_token_id is None:
        raise GenerationError(f"{llm.path}: model_type {cfg.arch!r} has no mask token (not a diffusion LM)")
    G = config.gen_length
    if G <= 0:
        raise GenerationError(f"gen_length must be positive, got {G}")
    if prompt_len + G > cfg.max_seq_len:
        raise GenerationError(
            f"prompt ({prompt_len} tokens) + gen_length ({G}) exceeds the model's maximum sequence length "
            f"{cfg.max_seq_len}"
        )
    if config.block_length is not None:
        block = config.block_length
    else:
        block = G if cfg.shift_logits else min(32, G)
    if block <= 0 or G % block:
        raise GenerationError(f"gen_length {G} is not divisible by block_length {block}")
    n_blocks = G // block
    steps = G if config.steps is None else config.steps
    if steps <= 0 or steps % n_blocks:
        raise GenerationError(f"steps {steps} is not divisible by the number of blocks {n_blocks}")
    if config.temperature < 0:
        raise GenerationError(f"temperature must be >= 0, got {config.temperature}")
    if config.cfg_scale < 0:
        raise GenerationError(f"cfg_scale must be >= 0, got {config.cfg_scale}")
    return steps, block, n_blocks


def encode_prompts(llm: DLLM, prompts: Prompt | Sequence[Prompt], chat: bool) -> list[list[int]]:
    prompts = _as_list(prompts)
    if not prompts:
        raise GenerationError("no prompts given")
    out = []
    for p in prompts:
        ids = encode_prompt(llm.tokenizer, p, chat) if isinstance(p, str) else [int(t) for t in p]
        if not ids:
            raise GenerationError("empty prompt")
        out.append(ids)
    return out


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


@torch.no_grad()
def generate(
    llm: DLLM,
    prompts: Prompt | Sequence[Prompt],
    config: GenerationConfig | None = None,
    *,
    cache: str | CachePolicy = "none",
    decoder: Decoder | str | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_step: Callable[[StepEvent], None] | None = None,
    **overrides: Any,
) -> GenerationResult:
    """Generate answers for one prompt or a batch (left-padded); `overrides` set GenerationConfig fields.

    progress(done, total) and on_step(StepEvent) are called after every step (streaming, progress bars);
    an exception raised by on_step aborts the generation.
    """
    config = replace(config or GenerationConfig(), **overrides)
    if isinstance(decoder, str):  # a decoder by name: reference | threshold | factor
        config, decoder = replace(config, decoder=decoder), None
    model, cfg = llm.model, llm.config
    device = model.device
    ids = encode_prompts(llm, prompts, config.chat)
    P, G = max(len(p) for p in ids), config.gen_length
    steps, block_len, n_blocks = _check_config(llm, config, P)
    policy = make_policy(cache) if isinstance(cache, str) else cache
    decoder = decoder or default_decoder(llm, config)
    mask_id, B, L = cfg.mask_token_id, len(ids), P + G
    # Combinations that cannot work are rejected before any work.
    if hasattr(policy, "check_decoder"):
        policy.check_decoder(decoder, block_len)
    inner = getattr(decoder, "inner", decoder)  # EarlyCommit wraps a decoder
    if hasattr(inner, "check_model"):
        inner.check_model(llm)

    x = torch.full((B, L), cfg.pad_token_id, dtype=torch.long, device=device)
    attn = torch.zeros((B, L), dtype=torch.bool, device=device)
    for b, p in enumerate(ids):
        x[b, P - len(p) : P] = torch.tensor(p, device=device)
        attn[b, P - len(p) :] = True
    x[:, P:] = mask_id
    use_cfg = config.cfg_scale > 0
    if use_cfg:  # the unconditional rows: the same sequence with the prompt masked
        attn = torch.cat([attn, attn])
    layout = model.layout(attn)
    rows_total = attn.shape[0]
    context = GenerationContext(
        llm, _as_list(prompts), config.chat, x, P, prompt_lengths=[len(p) for p in ids]
    )
    if hasattr(inner, "begin_generation"):
        inner.begin_generation(context)
    try:
        mode = step_mode(config.graphs, device)
    except ValueError as e:
        raise GenerationError(str(e)) from None

    def make_cache() -> FeatureCache | None:
        if not policy.uses_cache:
            return None
        return FeatureCache(cfg, rows_total, L, model.dtype, device, store_outputs=policy.per_layer)

    # static / graphed: the buffers and graphs of an earlier generation with this key, if any
    forward = step_graphs.acquire(model, layout, make_cache, policy, ForwardStats(), mode, P)
    compiled_before = model.compile_pointwise(config.compile)
    try:
        return _denoise(
            llm,
            config,
            policy,
            decoder,
            inner,
            forward,
            context,
            x,
            attn,
            ids,
            P,
            steps,
            block_len,
            n_blocks,
            use_cfg,
            progress,
            on_step,
        )
    finally:
        model.compile_pointwise(compiled_before)
        step_graphs.release(forward)
        if hasattr(inner, "end_generation"):
            inner.end_generation()


def _denoise(
    llm: DLLM,
    config: GenerationConfig,
    policy: CachePolicy,
    decoder: Decoder,
    inner: Any,
    forward: StepForward,
    context: GenerationContext,
    x: Tensor,
    attn: Tensor,
    ids: list[list[int]],
    P: int,
    steps: int,
    block_len: int,
    n_blocks: int,
    use_cfg: bool,
    progress: Callable[[int, int], None] | None,
    on_step: Callable[[StepEvent], None] | None,
) -> GenerationResult:
    """The denoising loop of `generate` (every block, every step) and the result."""
    model, cfg = llm.model, llm.config
    device = model.device
    mask_id, B, L = cfg.mask_token_id, len(ids), x.shape[1]
    G = L - P
    rows_total = attn.shape[0]
    feature_cache, fstats = forward.cache, forward.stats
    end_ids = torch.tensor(llm.end_token_ids or [cfg.eos_token_id], device=device)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    shift = 1 if cfg.shift_logits else 0
    # record_steps: each step's commits stay on the device until the generation ends (no read)
    records: list[tuple[int, int, Tensor, Tensor, Tensor]] | None = [] if config.record_steps else None
    just_committed = torch.zeros((rows_total, L), dtype=torch.bool, device=device)
    steps_per_block = steps // n_blocks
    observe_confidence = getattr(policy, "observe_confidence", None)
    row_bound = getattr(policy, "row_bound", None)
    hidden_logits = getattr(policy, "hidden_logits", None)
    dynamic = getattr(decoder, "dynamic", False)
    n = 0
    row_steps = torch.zeros(B, dtype=torch.long, device=device)  # steps each row still needed
    x_in = _model_input(x, attn, P, mask_id, use_cfg)
    # What the host knows between steps, from one read per step: each row's masked count in each
    # block (all masked at the start), so which blocks are still open, and the row budget of a
    # data-dependent policy.
    masked_counts, row_budget = [[block_len] * n_blocks for _ in range(B)], None
    blocks_open = [True] * n_blocks
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for blk in range(n_blocks):
        bs, be = P + blk * block_len, P + (blk + 1) * block_len
        if not blocks_open[blk]:
            continue  # every row finished early
        context.block_start = bs - P
        context.block_masked = [row[blk] for row in masked_counts]
        decoder.start_block(x[:, bs:be] == mask_id, steps_per_block)
        # The decoder sees the block, or (guided decoding) everything from the block start on.
        span_end = L if getattr(decoder, "whole_answer", False) else be
        logit_rows = column_range(B, bs - shift, span_end - shift, device)
        if use_cfg:
            logit_rows = torch.cat([logit_rows, logit_rows])
        # Parallel (threshold) decoders finish a block in as many steps as they need, at least one
        # token per step; the reference samplers spend exactly steps_per_block.
        for s in range(block_len if dynamic else steps_per_block):
            # The step: tensor operations only, no host read until the end (tests/test_sync_free.py).
            masked_block = x[:, bs:be] == mask_id
            row_steps += masked_block.any(1)
            masked_span = x[:, bs:span_end] == mask_id
            state = StepState(
                n, s, blk, bs, be, P, L, x_in == mask_id, just_committed, bool(shift), row_budget
            )
            rows = policy.begin_step(state)
            logits = forward(x_in, rows, logit_rows)
            if use_cfg:
                cond, uncond = logits[:B], logits[B:]
                logits = uncond + (config.cfg_scale + 1) * (cond - uncond)
            if hidden_logits is not None:  # masked rows the policy leaves out of its window
                hidden = hidden_logits(logit_rows + shift)[: logits.shape[0]]
                logits = logits.masked_fill(hidden[..., None], float("nan"))
            skipped = logits[..., 0].isnan()
            if observe_confidence is not None:
                conf = logits.softmax(-1).amax(-1)
                observe_confidence(logit_rows + shift, torch.cat([conf, conf]) if use_cfg else conf)
            # Rows a policy skipped: committed ones get harmless logits; masked ones may only be
            # skipped for a dynamic decoder, which commits among the computed masked rows (NaN logits
            # on the others, see decoding/base.py) and needs at least one per unfinished row.
            if dynamic:
                ready = (masked_span & ~skipped).any(1) | ~masked_span.any(1)
                misses = ~ready.all()
            else:
                misses = (skipped & masked_span).any()
            logits = torch.where((skipped & ~masked_span)[..., None], 0.0, logits)
            commit = decoder.step(logits, masked_span, s, generator)
            span_x = x[:, bs:span_end]
            span_x.copy_(torch.where(commit.positions, commit.tokens, span_x))
            committed = torch.zeros((B, L), dtype=torch.bool, device=device)
            committed[:, bs:span_end] = commit.positions
            if config.early_stop:
                committed |= _finish_rows(x, P, mask_id, end_ids, cfg.eos_token_id)
            just_committed = torch.cat([committed, committed]) if use_cfg else committed
            state.just_committed = just_committed
            policy.end_step(state)
            x_in = _model_input(x, attn, P, mask_id, use_cfg)
            # The step's one host read: masked counts per row and block, the decoder check and the
            # next row budget.
            facts = [(x[:, P:] == mask_id).view(B, n_blocks, block_len).sum(2).flatten(), misses[None]]
            if row_bound is not None:
                bound = row_bound(x_in == mask_id, just_committed).reshape(-1)
                facts.append(bound)
            if on_step is not None:  # streaming: the answer canvas comes back with the same read
                facts.append(x[:, P:].flatten())
            host = torch.cat([f.long() for f in facts]).tolist()
            n_counts = B * n_blocks
            if host[n_counts]:
                raise RuntimeError(f"cache policy {policy.name!r} skipped a row the decoder needs")
            masked_counts = [host[b * n_blocks : (b + 1) * n_blocks] for b in range(B)]
            blocks_open = [any(row[j] for row in masked_counts) for j in range(n_blocks)]
            context.block_masked = [row[blk] for row in masked_counts]
            if row_bound is not None:  # one number, or a tuple when the policy gives several
                extra = host[n_counts + 1 : n_counts + 1 + bound.shape[0]]
                row_budget = extra[0] if len(extra) == 1 else tuple(extra)
            if records is not None:
                records.append(_record(n, blk, committed, x, commit, bs))
            n += 1
            if progress is not None:
                progress(n, steps)
            if on_step is not None:
                tokens = host[len(host) - B * G :]
                canvas_host = [tokens[b * G : (b + 1) * G] for b in range(B)]
                on_step(StepEvent(n, blk, x[:, P:], mask_id, not blocks_open[blk], canvas_host))
            if not blocks_open[blk]:
                break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    guide_stats = getattr(inner, "stats", None)
    guide_row_nfe = getattr(inner, "row_forwards", None)
    return _result(
        llm,
        x,
        P,
        n,
        row_steps.tolist(),
        use_cfg,
        wall,
        fstats,
        feature_cache,
        records,
        end_ids,
        guide_stats,
        guide_row_nfe,
    )


def _as_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str) or (
        isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)
    ):
        return [prompts]  # type: ignore[list-item]
    return list(prompts)  # type: ignore[arg-type]


def _model_input(x: Tensor, attn: Tensor, P: int, mask_id: int, use_cfg: bool) -> Tensor:
    """What the model sees: x, and with classifier-free guidance also the unconditional rows (the
    same sequence with the prompt masked)."""
    if not use_cfg:
        return x
    B = x.shape[0]
    x_uncond = x.clone()
    x_uncond[:, :P].masked_fill_(attn[:B, :P], mask_id)
    return torch.cat([x, x_uncond])


def _finish_rows(x: Tensor, P: int, mask_id: int, end_ids: Tensor, eos_id: int) -> Tensor:
    """Early stop: a row whose answer has an end token with everything before it committed is done;
    its remaining masks become EOS. Returns the positions so filled."""
    ans = x[:, P:]
    masked = ans == mask_id
    done = (torch.isin(ans, end_ids) & (masked.long().cumsum(1) == 0)).any(1)
    fill = masked & done[:, None]
    ans.masked_fill_(fill, eos_id)
    out = torch.zeros_like(x, dtype=torch.bool)
    out[:, P:] = fill
    return out


def _record(
    n: int, blk: int, committed: Tensor, x: Tensor, commit: Any, bs: int
) -> tuple[int, int, Tensor, Tensor, Tensor]:
    """One step's commits as device tensors (what `_step_records` turns into StepRecords)."""
    conf_full = torch.full(x.shape, float("nan"), dtype=torch.float64, device=x.device)
    conf_full[:, bs : bs + commit.confidence.shape[1]] = commit.confidence.to(torch.float64)
    return n, blk, committed.clone(), x.clone(), conf_full


def _step_records(records: list[tuple[int, int, Tensor, Tensor, Tensor]], B: int, P: int) -> list[StepRecord]:
    """The recorded steps, read back to the host once at the end of the generation."""
    out = []
    for n, blk, committed, x, conf in records:
        pos, toks, confs = [], [], []
        for b in range(B):
            cols = committed[b].nonzero().flatten()
            pos.append((cols - P).tolist())
            toks.append(x[b, cols].tolist())
            confs.append(conf[b, cols].tolist())
        out.append(StepRecord(n, blk, pos, toks, confs))
    return out


def _result(
    llm: DLLM,
    x: Tensor,
    P: int,
    n_steps: int,
    row_steps: list[int],
    use_cfg: bool,
    wall: float,
    fstats: ForwardStats,
    feature_cache: FeatureCache | None,
    records: list[tuple[int, int, Tensor, Tensor, Tensor]] | None,
    end_ids: Tensor,
    guide_stats: ForwardStats | None = None,
    guide_row_nfe: list[int] | None = None,
) -> GenerationResult:
    answers = x[:, P:].tolist()
    end_set = set(end_ids.tolist())
    tokens = []
    for row in answers:
        cut = next((i for i, t in enumerate(row) if t in end_set), len(row))
        tokens.append(row[:cut])
    tok = llm.tokenizer
    texts = [tok.decode(t, skip_special_tokens=True) if tok is not None else "" for t in tokens]
    generated = int(
        sum(1 for row in answers for t in row if t not in end_set and t != llm.config.pad_token_id)
    )
    total = max(fstats.position_layers_total, 1)
    stats = GenerationStats(
        nfe=n_steps * (2 if use_cfg else 1),
        steps=n_steps,
        wall_time_s=wall,
        generated_tokens=generated,
        tokens_per_s=generated / wall if wall > 0 else 0.0,
        position_layers=fstats.position_layers,
        position_layers_total=fstats.position_layers_total,
        recompute_fraction=fstats.position_layers / total,
        flops=fstats.total_flops(),
        peak_memory_bytes=_peak_memory(x.device),
        cache_bytes=feature_cache.nbytes() if feature_cache is not None else 0,
        guide_nfe=guide_stats.forwards if guide_stats is not None else 0,
        guide_flops=guide_stats.total_flops() if guide_stats is not None else 0.0,
        row_nfe=[k * (2 if use_cfg else 1) for k in row_steps],
        # The verifier's forwards that checked each row's drafts (one per chunk).
        guide_row_nfe=guide_row_nfe if guide_row_nfe is not None else [0] * len(row_steps),
    )
    step_records = _step_records(records, x.shape[0], P) if records is not None else None
    return GenerationResult(tokens, texts, x.cpu(), P, stats, step_records)


__all__ = ["GenerationConfig", "GenerationResult", "GenerationStats", "StepEvent", "StepRecord", "generate"]
