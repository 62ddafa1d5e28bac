"""dLLM-Cache: long-interval prompt caching + V-similarity partial response updates.

Per step n (counted from the start of the generation):
- layer 0 recomputes every row (prompt and answer) at every step; the schedule below applies to the
  layers after it. Layer 0's input is the token embeddings, so without this the rows committed
  since the last refresh keep layer-0 attention outputs that never saw the new tokens. This is the
  rule of the dLLM-Cache implementation published with d2Cache (its src/cache/dllm_cache.py forces
  both refresh flags on at layer 0); the hooks of the dLLM-Cache release (maomaocun/dLLM-cache,
  the version we read) apply the schedule to layer 0 too, which `layer0_full=false` reproduces;
- prompt refresh when n % prompt_interval == 0: the prompt rows are recomputed;
- response refresh when n % response_interval == 0: every answer row is recomputed;
- otherwise, per layer, V is projected for every answer row from the layer's current input, compared
  (cosine) with the cached V, and the k = floor(transfer_ratio * A) least similar of the A answer-side
  rows are recomputed.
Rows not recomputed add the layer's cached attention and FFN outputs to their current residual stream.

`surprise=TAU` (cache/surprise.py) adds prompt refreshes between the scheduled ones: at the step after
a row commits a token with confidence <= TAU, that row's prompt rows are recomputed at every layer.

Row choice, where we differ from the published code on purpose: it takes `topk(smallest)` of the raw
fp32 cosine similarities. We treat 1 - similarity below UNCHANGED_TOL (1e-5) as no change and break
ties toward the leftmost row. Rounding noise in the similarity of unchanged rows depends on the
batch (padding changes the shapes of the matrix products), so picking among those rows by their
noise would make a row's output depend on what else is in its batch; ours does not. On rows whose
V really moved (above the tolerance, no exact ties) the two choices agree.

For Dream the answer span is shifted one row left: row i-1 produces the logits for position i, so the
last prompt row belongs to the answer side (it predicts the first answer token).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dllm_cache.cache.base import StepState, column_range
from dllm_cache.cache.surprise import SurpriseSignal, attach_surprise
from dllm_cache.errors import GenerationError
from dllm_cache.models.active import LayerView, gather_rows

# Named settings (prompt_interval, response_interval, transfer_ratio). Sources: the official release's
# demo and evaluation scripts (gen 256, steps 256), and our measurements on the demo models.
PRESETS: dict[str, tuple[int, int, float]] = {
    "default": (100, 7, 0.25),  # official demo, LLaDA-8B-Instruct
    "llada-instruct": (100, 7, 0.25),
    "llada-base-gsm8k": (100, 6, 0.25),
    "llada-base-humaneval": (50, 5, 0.25),
    "dream-gsm8k": (25, 2, 0.25),
    "dream-humaneval": (25, 2, 0.25),
    "exact": (1, 1, 0.25),  # refresh everything every step: equals the uncached baseline
}


# 1 - cosine similarity below this is rounding noise (fp32), not a change of the row's features.
UNCHANGED_TOL = 1e-5


class DLLMCache:
    name = "dllm-cache"
    per_layer = True
    uses_cache = True

    def __init__(
        self,
        prompt_interval: int | None = None,
        response_interval: int | None = None,
        transfer_ratio: float | None = None,
        preset: str = "default",
        layer0_full: bool = True,
        surprise: float | None = None,
    ) -> None:
        if preset not in PRESETS:
            raise GenerationError(f"unknown dllm-cache preset {preset!r} (choose {', '.join(PRESETS)})")
        kp, kr, rho = PRESETS[preset]
        try:
            self.prompt_interval = kp if prompt_interval is None else int(prompt_interval)
            self.response_interval = kr if response_interval is None else int(response_interval)
            self.transfer_ratio = rho if transfer_ratio is None else float(transfer_ratio)
        except (TypeError, ValueError) as e:
            raise GenerationError(f"dllm-cache: invalid argument value ({e})") from None
        self.preset = preset
        if not isinstance(layer0_full, bool):
            raise GenerationError(f"dllm-cache: layer0_full must be true or false, got {layer0_full!r}")
        self.layer0_full = layer0_full
        if self.prompt_interval < 1:
            raise GenerationError(f"dllm-cache: prompt_interval must be >= 1, got {self.prompt_interval}")
        if self.response_interval < 1:
            raise GenerationError(f"dllm-cache: response_interval must be >= 1, got {self.response_interval}")
        if not 0.0 <= self.transfer_ratio <= 1.0:
            raise GenerationError(f"dllm-cache: transfer_ratio must be in [0, 1], got {self.transfer_ratio}")
        self._state: StepState | None = None
        self._signal: SurpriseSignal | None = attach_surprise(self, "dllm-cache", surprise)

    def describe(self) -> dict:
        out = {
            "name": self.name,
            "prompt_interval": self.prompt_interval,
            "response_interval": self.response_interval,
            "transfer_ratio": self.transfer_ratio,
            "layer0_full": self.layer0_full,
        }
        return out if self.surprise is None else {**out, "surprise": self.surprise}

    def begin_step(self, state: StepState) -> Tensor | None:
        self._state = state
        if self._signal is not None:
            self._signal.begin_step(state)
        return None  # per-layer selection

    def _surprise_due(self) -> bool:
        assert self._state is not None
        return self._signal is not None and self._signal.due(self._state)

    def graph_key(self) -> tuple[bool, bool, bool]:
        """Besides shapes, what changes the coming forward's work: which refreshes are due."""
        assert self._state is not None, "begin_step must be called first"
        n = self._state.step
        return n % self.prompt_interval == 0, n % self.response_interval == 0, self._surprise_due()

    def select(self, layer: int, view: LayerView) -> Tensor | None:
        state = self._state
        assert state is not None, "begin_step must be called first"
        if layer == 0 and self.layer0_full:
            return None  # every row: layer 0 sees the newly committed tokens at every step
        n = state.step
        refresh_prompt = n % self.prompt_interval == 0
        refresh_response = n % self.response_interval == 0
        if refresh_prompt and refresh_response:
            return None
        B, device = view.h.shape[0], view.h.device
        start = state.prompt_end - 1 if state.shift else state.prompt_end  # first answer-side row
        if refresh_response:
            answer = column_range(B, start, state.seq_len, device)
        else:
            answer = self._least_similar(layer, view, start)
        if refresh_prompt:
            return torch.cat([column_range(B, 0, start, device), answer], dim=1)
        if self._surprise_due() and self._signal is not None:
            # Surprised rows recompute their prompt rows; the others fill those slots with the scratch
            # slot (index L, never read), so their results do not depend on the batch. Sorted, as
            # rows_from_mask gives them: real rows first, padding last.
            prompt = torch.where(
                self._signal.rows()[:, None], column_range(B, 0, start, device), state.seq_len
            )
            return torch.cat([prompt, answer], dim=1).sort(dim=1).values
        return answer

    def _least_similar(self, layer: int, view: LayerView, start: int) -> Tensor:
        """Answer rows whose fresh V is least similar to the cached V; stores the fresh V of all of them."""
        state = self._state
        assert state is not None
        B, device = view.h.shape[0], view.h.device
        answer = column_range(B, start, state.seq_len, device)
        fresh = view.values(answer)  # [B, Hkv, A, hd]
        cached_v = view.cache.v[layer]
        old = gather_rows(cached_v, answer, dim=2)
        sim = F.cosine_similarity(_flat_heads(fresh).float(), _flat_heads(old).float(), dim=-1)  # [B, A]
        # Rows whose V moved by less than numerical noise count as unchanged, and ties go to the
        # leftmost rows: otherwise rounding noise (which differs with the batch's padding) would pick
        # among the many unchanged rows and a row's output would depend on its batch.
        change = (1 - sim).masked_fill(1 - sim < UNCHANGED_TOL, 0.0)
        k = int(self.transfer_ratio * answer.shape[1])
        order = change.argsort(dim=1, descending=True, stable=True)
        chosen = order[:, :k].sort(dim=1).values + start
        cached_v[:, :, start:] = fresh
        return chosen

    def end_step(self, state: StepState) -> None:
        if self._signal is not None:
            self._signal.end_step(state)


def _flat_heads(v: Tensor) -> Tensor:
    """[B, H, A, hd] -> [B, A, H*hd]: one V vector per row."""
    B, H, A, hd = v.shape
    return v.transpose(1, 2).reshape(B, A, H * hd)
