"""Does decoding order matter on tiny-GSM's two-step problems? Uncached iterative decoding at
several block lengths against a dLLM-Cache that never refreshes (its logits are those of the
block's first pass, i.e. one-pass decoding) and the default dLLM-Cache.

Usage: python benchmarks/decoding_order.py [--model tiny-llada] [--n 100] [--blocks 32 8 4]
"""

from __future__ import annotations

import argparse

from dllm_cache import load
from dllm_cache.demo.tasks import generate_problems
from dllm_cache.engine import GenerationConfig
from dllm_cache.eval.runner import compare
from dllm_cache.eval.tasks import TINY_GSM_SEED, Problem

ONE_PASS = "dllm-cache:prompt_interval=1000:response_interval=1000:transfer_ratio=0"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-llada")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--blocks", type=int, nargs="+", default=[32, 8, 4])
    args = ap.parse_args()
    # Two-step word problems of the held-out split (another seed than the tiny-gsm eval set).
    drawn = generate_problems(
        args.n, "test", TINY_GSM_SEED + 1, word_problem_fraction=1.0, two_step_fraction=1.0
    )
    problems = [Problem(f"two-step/{i}", p.question, p.final) for i, p in enumerate(drawn)]
    llm = load(args.model)
    print(f"{args.model}: correct of {args.n} two-step problems, gen 32, one token per step")
    print("block | none | one pass (cache never refreshed) | dllm-cache")
    for block in args.blocks:
        results, _ = compare(
            llm,
            problems,
            ["none", ONE_PASS, "dllm-cache"],
            GenerationConfig(gen_length=32, block_length=block),
            50,
        )
        print(f"{block} | " + " | ".join(str(r.correct) for r in results), flush=True)


if __name__ == "__main__":
    main()
