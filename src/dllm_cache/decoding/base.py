"""The decoder protocol: given logits for the current block, decide what to commit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from dllm_cache.scoring import top_k_per_row as top_k_per_row  # re-exported for the samplers


@dataclass
class Commit:
    """One step's decision for the current block ([B, block_length] each)."""

    positions: Tensor  # bool: commit these masked positions now
    tokens: Tensor  # long: the token for each committed position (ignored elsewhere)
    confidence: Tensor  # float: the score used to choose (for step records / visualisation)


class Decoder(Protocol):
    name: str
    dynamic: bool  # True: steps per block are as many as needed (>= 1 token each), not a fixed number

    def start_block(self, masked: Tensor, steps: int) -> None:
        """A new block begins: masked [B, block_length] bool, `steps` denoising steps to spend on it."""
        ...

    def step(self, logits: Tensor, masked: Tensor, step_in_block: int, generator: torch.Generator) -> Commit:
        """logits [B, block_length, V] fp32 for the block's positions (already shifted for Dream).

        A dynamic decoder may receive NaN logits on masked positions a cache did not compute this
        step (see `computed`); it must commit at least one computed masked position per row."""
        ...


def computed(logits: Tensor) -> Tensor:
    """[B, N] bool: positions whose logits exist. A cache that computes only some masked rows
    (d2cache) leaves NaN logits on the others; dynamic decoders must not commit those."""
    return ~logits[..., 0].isnan()
