"""The docs/benchmarks.md table of an eval out-dir (e.g. runs/bench-500-llada-all): every method's
summary row plus how many answers equal the first method's (normally `none`) on the same problem.

    python benchmarks/tiny_gsm_table.py runs/bench-500-llada-all
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dllm_cache.eval.runner import nfe_text
from dllm_cache.eval.suite import method_filename


def rows_of(out_dir: Path, method: str) -> dict[str, dict]:
    path = out_dir / f"{method_filename(method)}.jsonl"
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


def table(out_dir: Path) -> str:
    summary = json.loads((out_dir / "summary.json").read_text())
    results = summary["results"]
    base = rows_of(out_dir, results[0]["method"])
    lines = [
        f"| method | accuracy | same answer as {results[0]['method']} | tokens/s | NFE (batch) | NFE/answer "
        "| position-layers recomputed | GFLOPs/problem | speed-up |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        rows = rows_of(out_dir, r["method"])
        row_nfe = (  # absent from summaries written before per-answer NFE existed
            nfe_text(r["row_nfe_per_problem"], r["guide_row_nfe_per_problem"])
            if "row_nfe_per_problem" in r
            else "-"
        )
        same = sum(rows[i]["prediction"] == base[i]["prediction"] for i in rows if i in base)
        lines.append(
            f"| {r['method']} | {r['accuracy']:.1%} ({r['correct']}/{r['n']}) | "
            f"{'-' if r is results[0] else f'{same}/{len(rows)}'} | {r['tokens_per_s']:.1f} | "
            f"{nfe_text(r['nfe_per_problem'], r['guide_nfe_per_problem'])} | "
            f"{row_nfe} | "
            f"{r['recompute_fraction']:.1%} | {r['flops_per_problem'] / 1e9:.1f} | {r['speedup']:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    print(table(ap.parse_args().out_dir))


if __name__ == "__main__":
    main()
