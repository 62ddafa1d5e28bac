#!/usr/bin/env bash
# The quality/speed bars on the demo models (CPU): every method on the same held-out tiny-GSM problems,
# gen 128, block 32, one token per step for the reference decoders. Resumable: each grid writes
# runs/bench-*/<method>.jsonl + summary.md/json, and a rerun skips finished problems.
# Usage: bash benchmarks/tiny_gsm.sh [N] [GRID...]   (N problems, default 500; grids: all, paraphrase, pairs, adaptive, or dllm block more)
# `all` runs every method on a model in one process (one uncached baseline for every ratio).
set -euo pipefail
N=${1:-500}
shift || true
GRIDS=${*:-all}
BLOCK=fast-dllm-dual,fast-dllm-prefix,dkv-decode,fast-dllm-parallel,fast-dllm-dual-parallel
# dLLM-Cache that never refreshes (one full pass per block, then cached features only): too stale.
STALE=dllm-cache:prompt_interval=1000:response_interval=1000:transfer_ratio=0
# Issue 19: Elastic-Cache (paper defaults) and the surprise refresh on dual and dLLM-Cache.
ADAPTIVE=elastic-cache,elastic-cache-surprise,dual-surprise,dual-surprise-parallel,dllm-cache-surprise
COMMON=(--task tiny-gsm --limit "$N" --gen-length 128 --block-length 32 --batch-size 64)
for grid in $GRIDS; do
  case $grid in
    all)  # every method; guided decoding only on tiny-dream (tiny-ar shares its vocabulary)
      dllm-cache eval --model tiny-llada "${COMMON[@]}" --out-dir "runs/bench-$N-llada-all" \
        --cache "none,dllm-cache,$STALE,$BLOCK,d2cache,freecache,freecache-block-refresh,$ADAPTIVE"
      dllm-cache eval --model tiny-dream "${COMMON[@]}" --out-dir "runs/bench-$N-dream-all" \
        --cache "none,dllm-cache,$BLOCK,d2cache,freecache,freecache-block-refresh,guided,freecache-guided,$ADAPTIVE" ;;
    dllm)  # issue #5: dLLM-Cache on both diffusion demo models
      dllm-cache eval --model tiny-llada "${COMMON[@]}" --cache none,dllm-cache --out-dir "runs/bench-$N-llada-dllm"
      dllm-cache eval --model tiny-dream "${COMMON[@]}" --cache none,dllm-cache --out-dir "runs/bench-$N-dream-dllm" ;;
    block)  # issue #8: block caches and parallel decoding, both diffusion demo models
      for model in llada dream; do
        dllm-cache eval --model "tiny-$model" "${COMMON[@]}" --out-dir "runs/bench-$N-$model-block" \
          --cache "none,$BLOCK"
      done ;;
    more)  # issue #9: d2cache, freecache, guided decoding with tiny-ar (which shares tiny-dream's vocabulary)
      dllm-cache eval --model tiny-dream "${COMMON[@]}" --out-dir "runs/bench-$N-dream-more" \
        --cache none,d2cache,freecache,freecache-block-refresh,guided,freecache-guided ;;
    paraphrase)  # the baselines on word problems phrased as no training problem is (tiny-gsm-paraphrase)
      for model in llada dream; do
        dllm-cache eval --model "tiny-$model" "${COMMON[@]/#tiny-gsm/tiny-gsm-paraphrase}" --cache none \
          --out-dir "runs/bench-$N-$model-paraphrase"
      done ;;
    pairs)  # pair problems (several right answers, the second number must agree with the first):
      # where one-pass decoding and a stale cache show (tiny-llada: the demo model trained on them)
      dllm-cache eval --model tiny-llada "${COMMON[@]/#tiny-gsm/tiny-gsm-pairs}" --out-dir "runs/bench-$N-llada-pairs" \
        --cache "none,dllm-cache,$STALE,$BLOCK,d2cache,freecache,freecache-block-refresh,$ADAPTIVE" ;;
    adaptive)  # issue 19 alone: uncached and the adaptive caches (pairs 200 is run with N=200)
      dllm-cache eval --model tiny-llada "${COMMON[@]/#tiny-gsm/tiny-gsm-pairs}" --out-dir "runs/bench-$N-llada-pairs-adaptive" \
        --cache "none,$ADAPTIVE"
      dllm-cache eval --model tiny-llada "${COMMON[@]}" --out-dir "runs/bench-$N-llada-adaptive" --cache "none,$ADAPTIVE"
      dllm-cache eval --model tiny-dream "${COMMON[@]}" --out-dir "runs/bench-$N-dream-adaptive" --cache "none,$ADAPTIVE" ;;
    *) echo "unknown grid $grid (all, paraphrase, pairs, adaptive, dllm, block, more)" >&2; exit 2 ;;
  esac
done
