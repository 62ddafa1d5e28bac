"""`dllm-cache train-demo`: train the small demo models on tiny GSM (docs: demo-models.md).

- llada / dream: LLaDA's masked-diffusion SFT objective. Per example t ~ U(eps, 1); each answer token
  (EOS padding included, so the model learns to stop) is masked with probability t; cross-entropy on
  the masked tokens weighted 1/t, normalised by the answer length. Dream reads the prediction for
  position i from row i-1 (shifted logits).
- ar: next-token loss on the answer (the small autoregressive guide).
The answer region is padded to a length drawn per batch from `answer_lengths`, so the model sees the
positions of a 128-token generation without paying for 128 tokens on every example.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from dllm_cache.demo.tasks import TOKENIZER_MIX, generate_pair_problems, generate_problems, training_corpus
from dllm_cache.demo.tokenizer import save_tokenizer, special_token_ids, train_tokenizer
from dllm_cache.errors import DllmCacheError
from dllm_cache.models.loading import load_model, resolve_model_dir, save_checkpoint
from dllm_cache.models.random_init import init_weights
from dllm_cache.models.tokenizer import encode_prompt, load_tokenizer
from dllm_cache.models.transformer import ModelConfig, Transformer

ARCHES = ("llada", "dream", "ar")


@dataclass
class TrainConfig:
    arch: str = "llada"
    n_layers: int = 4
    d_model: int = 256
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: n_heads for LLaDA, n_heads // 2 for the Qwen2-style models
    d_ff: int = 704
    vocab_size: int = 2048  # BPE size before the special tokens
    train_problems: int = 60000
    steps: int = 2500
    batch_size: int = 128  # rows of a batch with the shortest answer length (see `batch_rows`)
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.01
    # Answers are at most 17 tokens; most batches pad them to 20 (cheap), one in six to 128 so
    # the model also learns to stop and to ignore a long masked tail (generation length 128).
    answer_lengths: tuple[int, ...] = (20, 20, 20, 20, 20, 128)
    pseudo_name_fraction: float = 0.5  # word problems with made-up names (see demo/tasks.py)
    pair_fraction: float = 0.0  # share of the training problems that are pair problems
    amp: str = "bf16"  # autocast dtype for the forward ("none": fp32); bf16 is ~1.8x faster on CPU
    eps: float = 1e-3
    seed: int = 0
    init_from: str | None = None  # continue from a checkpoint of the same shape (warm start)
    max_minutes: float | None = None  # training-loop time budget: the cosine schedule ends with it
    log_every: int = 10
    extra: dict = field(default_factory=dict)


TOKENIZER_PROBLEMS = 60000  # the tokenizer's training text, independent of `train_problems`


def family_of(arch: str) -> str:
    return "llada" if arch == "llada" else "dream"


def build_tokenizer(cfg: TrainConfig):
    """The BPE tokenizer and the training problems. A warm start keeps the starting checkpoint's
    tokenizer (its embeddings are indexed by that vocabulary); otherwise a new one is trained on a
    fixed mix, `TOKENIZER_MIX`."""
    if cfg.init_from:
        tok = load_tokenizer(resolve_model_dir(cfg.init_from))
        if tok is None:
            raise DllmCacheError(f"--init-from {cfg.init_from}: no tokenizer files to keep")
    else:
        corpus = generate_problems(TOKENIZER_PROBLEMS, "train", cfg.seed, **TOKENIZER_MIX)
        tok = train_tokenizer(training_corpus(corpus), family_of(cfg.arch), vocab_size=cfg.vocab_size)
    n_pairs = round(cfg.train_problems * cfg.pair_fraction)
    problems = generate_problems(
        cfg.train_problems - n_pairs, "train", cfg.seed, pseudo_name_fraction=cfg.pseudo_name_fraction
    )
    problems += generate_pair_problems(
        n_pairs, "train", cfg.seed, pseudo_name_fraction=cfg.pseudo_name_fraction
    )
    return tok, problems


def batch_rows(cfg: TrainConfig, answer_len: int, prompt_len: int = 32) -> int:
    """Rows of a batch: `batch_size` at the shortest answer length, fewer for longer answers so
    every batch costs about the same number of tokens."""
    shortest = min(cfg.answer_lengths)
    return max(1, round(cfg.batch_size * (prompt_len + shortest) / (prompt_len + answer_len)))


def model_config(cfg: TrainConfig, tok) -> ModelConfig:
    ids = special_token_ids(tok, family_of(cfg.arch))
    arch = {"llada": "llada", "dream": "dream", "ar": "qwen2"}[cfg.arch]
    return ModelConfig(
        arch=arch,
        vocab_size=-(-len(tok) // 64) * 64,
        d_model=cfg.d_model,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_kv_heads or (cfg.n_heads if arch == "llada" else max(1, cfg.n_heads // 2)),
        d_ff=cfg.d_ff,
        rope_theta=10000.0,
        norm_eps=1e-5 if arch == "llada" else 1e-6,
        qkv_bias=arch != "llada",
        max_seq_len=1024,
        mask_token_id=ids["mask"] if arch != "qwen2" else None,
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
        bos_token_id=ids["bos"],
        causal=arch == "qwen2",
        shift_logits=arch == "dream",
    )


class Examples:
    """Tokenised (prompt, answer + end-of-turn) pairs and batches of them, left-padded."""

    def __init__(self, tok, problems, family: str, max_answer: int) -> None:
        ids = special_token_ids(tok, family)
        self.eos, self.pad, self.mask, self.eot = ids["eos"], ids["pad"], ids["mask"], ids["eot"]
        self.items: list[tuple[list[int], list[int]]] = []
        for p in problems:
            prompt = encode_prompt(tok, p.question)
            answer = tok(p.answer, add_special_tokens=False)["input_ids"] + [self.eot]
            if len(answer) <= max_answer:
                self.items.append((prompt, answer))
        if not self.items:
            raise DllmCacheError("no training example fits the answer length")

    def batch(self, rng: random.Random, size: int, answer_len: int, pad_answer: bool = True):
        chosen = [self.items[rng.randrange(len(self.items))] for _ in range(size)]
        P = max(len(p) for p, _ in chosen)
        A = answer_len if pad_answer else max(len(a) for _, a in chosen)
        x = torch.full((size, P + A), self.pad, dtype=torch.long)
        attn = torch.zeros((size, P + A), dtype=torch.bool)
        answer_mask = torch.zeros((size, P + A), dtype=torch.bool)  # positions that carry loss
        for b, (p, a) in enumerate(chosen):
            x[b, P - len(p) : P] = torch.tensor(p)
            x[b, P : P + len(a)] = torch.tensor(a)
            x[b, P + len(a) :] = self.eos
            attn[b, P - len(p) : P + (A if pad_answer else len(a))] = True
            answer_mask[b, P : P + (A if pad_answer else len(a))] = True
        return x, attn, answer_mask, P


def diffusion_loss(model: Transformer, x, attn, answer_mask, mask_id: int, eps: float, gen: torch.Generator):
    B, L = x.shape
    t = (1 - eps) * torch.rand(B, 1, generator=gen) + eps
    masked = (torch.rand(B, L, generator=gen) < t) & answer_mask
    noisy = torch.where(masked, torch.full_like(x, mask_id), x)
    logits = model(noisy, attn)
    if model.config.shift_logits:
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
    ce = F.cross_entropy(logits[masked], x[masked], reduction="none")
    weights = (1.0 / t.expand(B, L))[masked]
    answer_len = answer_mask.sum(1, keepdim=True).expand(B, L)[masked].float()
    return (ce * weights / answer_len).sum() / B


def ar_loss(model: Transformer, x, attn, answer_mask):
    logits = model(x, attn)[:, :-1]
    target = x[:, 1:]
    keep = answer_mask[:, 1:]
    return F.cross_entropy(logits[keep], target[keep])


def train(
    cfg: TrainConfig, out_dir: str | Path, device: str = "cpu", log: Callable[[str], None] = print
) -> dict:
    """Train one demo model and write it as an HF checkpoint directory; returns the training summary."""
    if cfg.arch not in ARCHES:
        raise DllmCacheError(f"unknown arch {cfg.arch!r} (choose {', '.join(ARCHES)})")
    if cfg.amp not in ("bf16", "none"):
        raise DllmCacheError(f"unknown amp {cfg.amp!r} (choose bf16, none)")
    if not 0.0 <= cfg.pseudo_name_fraction <= 1.0:
        raise DllmCacheError(f"--pseudo-names must lie in [0, 1], got {cfg.pseudo_name_fraction}")
    if not 0.0 <= cfg.pair_fraction < 1.0:
        raise DllmCacheError(f"--pairs must lie in [0, 1), got {cfg.pair_fraction}")
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.time()
    tok, problems = build_tokenizer(cfg)
    mcfg = model_config(cfg, tok)
    examples = Examples(tok, problems, family_of(cfg.arch), max(cfg.answer_lengths))
    model = init_weights(Transformer(mcfg), seed=cfg.seed).to(device)
    if cfg.init_from:
        start = load_model(cfg.init_from, dtype=torch.float32)
        if start.config != mcfg:
            raise DllmCacheError(f"--init-from {cfg.init_from}: its config differs from this run's model")
        model.load_state_dict(start.state_dict())
        model.requires_grad_(True)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    history = []
    n_params = sum(p.numel() for p in model.parameters())
    log(
        f"{cfg.arch}: {n_params / 1e6:.2f}M parameters, vocab {mcfg.vocab_size}, {len(examples.items)} examples"
    )
    step = 0
    budget_s = cfg.max_minutes * 60 if cfg.max_minutes is not None else None
    t_train = time.time()
    for step in range(1, cfg.steps + 1):
        # Cosine decay over the run; with a time budget the run ends (annealed) when either runs out.
        progress = step / cfg.steps
        if budget_s is not None:
            progress = max(progress, (time.time() - t_train) / budget_s)
        lr = cfg.lr * min(1.0, step / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        for group in opt.param_groups:
            group["lr"] = lr
        answer_len = rng.choice(cfg.answer_lengths)
        rows = cfg.batch_size if cfg.arch == "ar" else batch_rows(cfg, answer_len)
        x, attn, answer_mask, _ = examples.batch(rng, rows, answer_len, pad_answer=cfg.arch != "ar")
        x, attn, answer_mask = x.to(device), attn.to(device), answer_mask.to(device)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16"):
            if cfg.arch == "ar":
                loss = ar_loss(model, x, attn, answer_mask)
            else:
                loss = diffusion_loss(model, x, attn, answer_mask, mcfg.mask_token_id, cfg.eps, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        history.append(loss.item())
        if step % cfg.log_every == 0 or step == cfg.steps:
            recent = sum(history[-cfg.log_every :]) / len(history[-cfg.log_every :])
            log(f"step {step}/{cfg.steps} loss {recent:.4f} lr {lr:.2e} {time.time() - t0:.0f}s")
        if progress >= 1.0 and step < cfg.steps:
            log(f"time budget of {cfg.max_minutes} min reached at step {step}")
            break
    model.eval()
    out = save_checkpoint(model.cpu(), out_dir, dtype=torch.float16)
    save_tokenizer(tok, out)
    summary = {
        "config": asdict(cfg),
        "parameters": n_params,
        "steps_done": step,
        "final_loss": sum(history[-50:]) / max(1, len(history[-50:])),
        "train_seconds": round(time.time() - t0, 1),
        "device": str(device),
    }
    (Path(out) / "training_log.json").write_text(json.dumps({**summary, "loss": history}, indent=1) + "\n")
    return summary
