#!/usr/bin/env bash
# Issue 18's bar in one script for a lent GPU (about 10 minutes): the CUDA-graph path's tokens against
# eager, then ms per NFE against the floor at the LLaDA-8B / Dream-7B shapes, graphs on and off.
# Every command writes its JSON under $OUT as rows come, and each grid stops at its --budget-s.
#   OUT=/tmp/out bash benchmarks/gpu_bar.sh            # on the GPU
#   OUT=/tmp/out TINY=1 bash benchmarks/gpu_bar.sh     # the same commands at tiny shapes on CPU (a dry run)
set -uo pipefail
OUT=${OUT:-runs/gpu-bar}
mkdir -p "$OUT"
PY=${PY:-python}
if [ -n "${TINY:-}" ]; then
  SHAPES=(tiny-llada); DREAM=(tiny-dream); SIZE=(--tiny --device cpu); PROMPTS=(32 64); GENS=(32 64)
  BUDGET=60
else
  SHAPES=(llada-8b); DREAM=(dream-7b); SIZE=(); PROMPTS=(256 1024); GENS=(256 512)
  BUDGET=110
  timeout 120 $PY -m pytest -q -x tests/test_step_graphs.py -k cuda 2>&1 | tail -3 | tee "$OUT/cuda-graph-tokens.txt"
fi
METHODS=none,dllm-cache,prefix,dual,dkv,d2cache,freecache,fast-dllm-dual-parallel
bench() { timeout $((BUDGET + 60)) $PY benchmarks/gpu.py "${SIZE[@]}" --budget-s "$BUDGET" "$@" | tee -a "$OUT/tables.md"; }
# the bar: batch 1 and 8, gen 256 at prompt 256 first (what the speed-up bars are about)
bench --shapes "${SHAPES[@]}" --prompt "${PROMPTS[0]}" --gen "${GENS[0]}" --batch 1 8 --methods "$METHODS" \
  --out "$OUT/llada-p${PROMPTS[0]}-g${GENS[0]}.json"
# the same with graphs off: what the graphs are worth
bench --shapes "${SHAPES[@]}" --prompt "${PROMPTS[0]}" --gen "${GENS[0]}" --batch 1 --methods none,dllm-cache,dual \
  --no-graphs --no-profile --out "$OUT/llada-p${PROMPTS[0]}-g${GENS[0]}-eager.json"
# a few-shot-length prompt, a longer answer, and 4 tokens per step (parallel decoding's step count)
bench --shapes "${SHAPES[@]}" --prompt "${PROMPTS[1]}" --gen "${GENS[1]}" --batch 1 --methods none,dllm-cache,dual,prefix \
  --no-profile --out "$OUT/llada-p${PROMPTS[1]}-g${GENS[1]}.json"
bench --shapes "${SHAPES[@]}" --prompt "${PROMPTS[0]}" --gen "${GENS[0]}" --batch 1 --tokens-per-step 4 \
  --methods none,dllm-cache,dual --no-profile --out "$OUT/llada-p${PROMPTS[0]}-g${GENS[0]}-4tps.json"
bench --shapes "${DREAM[@]}" --prompt "${PROMPTS[0]}" --gen "${GENS[0]}" --batch 1 --methods none,dllm-cache,dual \
  --no-profile --out "$OUT/dream-p${PROMPTS[0]}-g${GENS[0]}.json"
