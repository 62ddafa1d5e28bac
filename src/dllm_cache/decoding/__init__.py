"""Decoding strategies: which masked positions to commit at each step, and to what."""

from dllm_cache.decoding.base import Commit, Decoder
from dllm_cache.decoding.dream import DreamDecoder
from dllm_cache.decoding.llada import LLaDADecoder

__all__ = ["Commit", "Decoder", "DreamDecoder", "LLaDADecoder"]
