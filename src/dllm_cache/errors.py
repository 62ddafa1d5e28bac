"""Errors a user can act on. The CLI prints them as one line and exits non-zero."""


class DllmCacheError(ValueError):
    """Base class: bad input, named clearly (never a stack trace from deep inside)."""


class ModelLoadError(DllmCacheError):
    """A checkpoint directory that cannot be loaded: missing files, tensors, wrong shapes."""


class GenerationError(DllmCacheError):
    """Invalid generation parameters or prompts (too long, empty, indivisible lengths)."""
