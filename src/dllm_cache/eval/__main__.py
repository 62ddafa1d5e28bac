"""`python -m dllm_cache.eval ...` = `dllm-cache eval ...`; the entry point for torchrun:

torchrun --nproc-per-node 8 -m dllm_cache.eval --model DIR --task gsm8k --cache none,dllm-cache --out-dir runs/x
"""

from __future__ import annotations

import sys

from dllm_cache.cli import app


def main() -> None:
    app(args=["eval", *sys.argv[1:]], prog_name="python -m dllm_cache.eval")


if __name__ == "__main__":
    main()
