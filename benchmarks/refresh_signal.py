"""How far the prompt's features move during decoding, per layer and step, and when the surprise
signal fires: a tiny-gsm-pairs problem against a tiny-gsm problem (tiny-llada, uncached decoding).

At every step and layer: the prompt rows' V drift, 1 - cosine(V now, V at the previous step),
averaged over the prompt rows (what a prompt cache serves stale), and the confidence of the tokens
committed at the previous step (the surprise signal: a commit at <= `--surprise` refreshes the cached
rows at the next step; cache/surprise.py). Writes a PNG (default docs/refresh_signal.png) and prints
a table: mean drift at the steps the signal marks against the others.

    python benchmarks/refresh_signal.py [--pairs-index 0] [--gsm-index 0] [--surprise 0.5] [--out PATH]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from dllm_cache.cache import DLLMCache
from dllm_cache.engine import generate
from dllm_cache.eval.tasks import load_task
from dllm_cache.models.active import column_range, gather_rows
from dllm_cache.models.loading import load


class DriftProbe(DLLMCache):
    """dLLM-Cache refreshing everything at every step (the uncached output exactly), measuring on the
    way the prompt rows' V drift against the previous step at every layer."""

    def __init__(self) -> None:
        super().__init__(prompt_interval=1, response_interval=1)
        self.drift: list[list[float]] = []  # [step][layer]

    def select(self, layer, view):
        state = self._state
        start = state.prompt_end
        if state.step > 0:
            prompt = column_range(view.h.shape[0], 0, start, view.h.device)
            fresh = view.values(prompt).transpose(1, 2).flatten(2).float()
            old = gather_rows(view.cache.v[layer], prompt, dim=2).transpose(1, 2).flatten(2).float()
            if layer == 0:
                self.drift.append([])
            self.drift[-1].append(float((1 - F.cosine_similarity(fresh, old, dim=-1)).mean()))
        return super().select(layer, view)


def trace(llm, prompt: str, gen_length: int, block_length: int) -> tuple[list[list[float]], list[float], str]:
    """Per step (from the second): drift per layer, and the lowest confidence committed just before."""
    probe = DriftProbe()
    result = generate(
        llm, [prompt], cache=probe, gen_length=gen_length, block_length=block_length, record_steps=True
    )
    lowest = [min(r.confidence[0], default=1.0) for r in result.step_records]
    return probe.drift, lowest[: len(probe.drift)], result.text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-llada")
    ap.add_argument("--pairs-index", type=int, default=0)
    ap.add_argument("--gsm-index", type=int, default=0)
    ap.add_argument("--surprise", type=float, default=0.5)
    ap.add_argument("--gen-length", type=int, default=128)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--out", default="docs/refresh_signal.png")
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    torch.manual_seed(0)
    llm = load(args.model)
    cases = []
    for task, index in (("tiny-gsm-pairs", args.pairs_index), ("tiny-gsm", args.gsm_index)):
        problem = load_task(task, index + 1)[index]
        drift, lowest, text = trace(llm, problem.prompt, args.gen_length, args.block_length)
        cases.append((task, problem, drift, lowest, text))

    fig, axes = plt.subplots(2, 2, figsize=(12, 6), sharex="col", gridspec_kw={"height_ratios": [3, 1]})
    vmax = max(max(max(row) for row in c[2]) for c in cases)
    print(
        "| task | problem | answer | steps | steps marked | mean drift, marked steps | mean drift, other steps |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for col, (task, problem, drift, lowest, text) in enumerate(cases):
        d = torch.tensor(drift).T  # [layers, steps]; column j = step j + 1
        marked = [j for j, c in enumerate(lowest) if c <= args.surprise]
        ax = axes[0, col]
        im = ax.imshow(d, aspect="auto", cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"{task}: {problem.prompt[:60]}...\nanswer: {text.strip()[:40]!r}", fontsize=8)
        ax.set_ylabel("layer")
        ax.set_yticks(range(d.shape[0]))
        for j in marked:
            ax.axvline(j, color="cyan", lw=0.8, ls="--")
        bar = axes[1, col]
        bar.plot(range(len(lowest)), lowest, marker="o", ms=3)
        bar.axhline(args.surprise, color="cyan", ls="--", lw=0.8)
        bar.set_ylim(0, 1.05)
        bar.set_xlabel("step")
        bar.set_ylabel("confidence of\nprevious commit")
        per_step = d.mean(0)
        other = [j for j in range(len(lowest)) if j not in marked]
        m_mark = float(per_step[marked].mean()) if marked else float("nan")
        m_other = float(per_step[other].mean()) if other else float("nan")
        print(
            f"| {task} | {problem.id} | {text.strip()[:30]!r} | {len(lowest)} | {len(marked)} | "
            f"{m_mark:.2e} | {m_other:.2e} |"
        )
    fig.colorbar(
        im, ax=axes.ravel().tolist(), label="prompt V drift\n1 - cos(V_n, V_n-1)\n(mean over prompt rows)"
    )
    fig.suptitle(
        f"{args.model}: prompt feature drift per layer and step; dashed: steps after a commit with "
        f"confidence <= {args.surprise} (surprise refresh)",
        fontsize=9,
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
