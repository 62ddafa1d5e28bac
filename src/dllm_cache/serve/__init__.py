"""OpenAI-compatible server (optional extra: pip install 'dllm-cache[serve]')."""
