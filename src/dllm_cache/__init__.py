"""dllm-cache: fast, training-free inference for diffusion LLMs (LLaDA, Dream).

from dllm_cache import load, generate
llm = load("tiny-llada")
print(generate(llm, "Tom has 3 apples and buys 4 more. How many apples does he have?").text)
"""

from dllm_cache.engine import GenerationConfig, GenerationResult
from dllm_cache.errors import DllmCacheError, GenerationError, ModelLoadError
from dllm_cache.models.loading import DLLM, load

# engine.generate, plus `trace="DIR"` to write the step-by-step trace files (docs/trace.md)
from dllm_cache.trace import generate

__version__ = "0.1.0"

__all__ = [
    "DLLM",
    "DllmCacheError",
    "GenerationConfig",
    "GenerationError",
    "GenerationResult",
    "ModelLoadError",
    "generate",
    "load",
]
