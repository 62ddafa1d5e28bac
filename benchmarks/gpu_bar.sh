#!/usr/bin/env bash
# Issue 18's bar in one prepared script for a lent GPU: at most TOTAL_S seconds (default 540, which
# leaves a 10-minute device call room for start-up), tables in the order the bar needs them, each
# gpu.py run writing its JSON row by row under $OUT and stopping at its share of the time left
# (--budget-s: the rows it could not reach say "skipped (--budget-s)").
#   OUT=/tmp/out bash benchmarks/gpu_bar.sh                  # on the GPU (H200: LLaDA-8B / Dream-7B shapes)
#   OUT=/tmp/out TINY=1 bash benchmarks/gpu_bar.sh           # the same tables at tiny shapes on CPU (a dry run)
# Tables:
#   cuda-graph-tokens.txt  the CUDA capture gives eager's tokens (tests/test_step_graphs.py -k cuda)
#   llada-p256-g256        every method at batch 1 and 8, launches per NFE, the server's batched path
#   dream-p256-g256        the same at the Dream shape, plus guided decoding (AR guide ms/forward, floor)
#   llada-4tps             4 tokens per step (steps = gen / 4), batch 1 and 8
#   p1024-g512             the long cell of the grid, both shapes, batch 1 and 8
#   rest                   the other grid cells (prompt 256 gen 512, prompt 1024 gen 256)
#   llada-eager            graphs off (--no-graphs): what the graphs are worth
# tables.md gathers every table as it is printed.
set -uo pipefail
OUT=${OUT:-runs/gpu-bar}
mkdir -p "$OUT"
PY=${PY:-python}
START=$(date +%s)
if [ -n "${TINY:-}" ]; then
  LLADA=tiny-llada; DREAM=tiny-dream; SIZE=(--tiny --device cpu --no-profile)
  P1=16; P2=32; G1=32; G2=64; BATCH=(1 2); TOTAL_S=${TOTAL_S:-120}
  METHODS=none,dllm-cache,dual
else
  LLADA=llada-8b; DREAM=dream-7b; SIZE=()
  P1=256; P2=1024; G1=256; G2=512; BATCH=(1 8); TOTAL_S=${TOTAL_S:-540}
  METHODS=none,dllm-cache,prefix,dual,dkv,d2cache,freecache,fast-dllm-dual-parallel
  timeout 90 $PY -m pytest -q -x tests/test_step_graphs.py -k cuda 2>&1 | tail -3 | tee "$OUT/cuda-graph-tokens.txt"
fi

left() { echo $((TOTAL_S - ($(date +%s) - START))); }

# bench NAME SHARE ARGS...: gpu.py with --budget-s = min(SHARE, time left - 15 s), killed 60 s after it
bench() {
  local name=$1 share=$2
  shift 2
  local budget
  budget=$(left)
  budget=$((budget - 15 < share ? budget - 15 : share))
  if [ "$budget" -le 0 ]; then
    echo "# $name: no time left" | tee -a "$OUT/tables.md"
    return
  fi
  echo "## $name (--budget-s $budget)" >>"$OUT/tables.md"
  timeout $((budget + 60)) $PY benchmarks/gpu.py "${SIZE[@]}" --budget-s "$budget" --out "$OUT/$name.json" "$@" |
    tee -a "$OUT/tables.md"
}

bench llada-p$P1-g$G1 150 --shapes $LLADA --prompt $P1 --gen $G1 --batch "${BATCH[@]}" --methods "$METHODS" \
  --server dual
bench dream-p$P1-g$G1 120 --shapes $DREAM --prompt $P1 --gen $G1 --batch "${BATCH[@]}" --methods "$METHODS" \
  --guided none,dual --no-profile
bench llada-4tps 50 --shapes $LLADA --prompt $P1 --gen $G1 --batch "${BATCH[@]}" --tokens-per-step 4 \
  --methods none,dllm-cache,dual,fast-dllm-dual-parallel --no-profile
bench p$P2-g$G2 90 --shapes $LLADA $DREAM --prompt $P2 --gen $G2 --batch "${BATCH[@]}" \
  --methods none,dllm-cache,dual,prefix --no-profile
bench rest 60 --shapes $LLADA $DREAM --prompt $P1 $P2 --gen $G2 $G1 --batch "${BATCH[@]}" \
  --methods none,dllm-cache,dual --no-profile
bench llada-eager 40 --shapes $LLADA --prompt $P1 --gen $G1 --batch 1 --methods none,dllm-cache,dual \
  --no-graphs --no-profile
echo "# gpu_bar.sh: $(($(date +%s) - START)) s of $TOTAL_S" | tee -a "$OUT/tables.md"
