#!/usr/bin/env bash
# The quality/speed bars on the demo models (CPU): every method on the same held-out tiny-GSM problems.
# Usage: bash benchmarks/tiny_gsm.sh [N]   (N problems, default 500); JSON summaries land in runs/.
set -euo pipefail
N=${1:-500}
mkdir -p runs
dllm-cache eval --model tiny-llada --task tiny-gsm --limit "$N" --cache none,dllm-cache --json \
    --output runs/tiny-llada-dllmcache.jsonl > runs/tiny-llada-dllmcache.json
dllm-cache eval --model tiny-dream --task tiny-gsm --limit "$N" --cache none,dllm-cache --json \
    --output runs/tiny-dream-dllmcache.jsonl > runs/tiny-dream-dllmcache.json
dllm-cache eval --model tiny-llada --task tiny-gsm --limit "$N" --json \
    --cache none,fast-dllm-dual,fast-dllm-prefix,dkv-decode,fast-dllm-parallel,fast-dllm-dual-parallel \
    --output runs/tiny-llada-block.jsonl > runs/tiny-llada-block.json
