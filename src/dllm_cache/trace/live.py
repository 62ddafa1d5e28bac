"""`dllm-cache generate --live`: the answer canvas redrawn in the terminal after every step."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.text import Text

from dllm_cache.engine import StepEvent
from dllm_cache.models.loading import DLLM

MASK_GLYPH = "\u2588"  # a full block, drawn dim


def render_canvas(
    canvas: list[int],
    previous: list[int] | None,
    mask_id: int,
    end_ids: set[int],
    piece: Callable[[int], str],
    step: int | None = None,
) -> Text:
    """One row's canvas: masks as dim blocks, tokens committed since `previous` in bold green.
    Stops after the first end token that has nothing masked before it (the answer is complete)."""
    out = Text()
    if step is not None:
        out.append(f"step {step}\n", style="dim")
    masked_before = False
    for p, t in enumerate(canvas):
        if t == mask_id:
            out.append(MASK_GLYPH, style="dim")
            masked_before = True
            continue
        new = previous is not None and previous[p] != t
        if t in end_ids:
            if not masked_before:
                break
            out.append("\u23ce", style="bold green" if new else "dim")
            continue
        out.append(piece(t), style="bold green" if new else "")
    return out


@contextmanager
def live_canvas(llm: DLLM, console: Console, row: int = 0) -> Iterator[Callable[[StepEvent], None]]:
    """An `on_step` callback that redraws prompt `row`'s canvas in a rich Live view."""
    from rich.live import Live

    tok = llm.tokenizer
    end_ids = set(llm.end_token_ids or [llm.config.eos_token_id])
    pieces: dict[int, str] = {}

    def piece(t: int) -> str:
        if t not in pieces:
            pieces[t] = tok.decode([t]) if tok is not None else f"<{t}>"
        return pieces[t]

    previous: list[int] | None = None
    with Live(Text(), console=console, refresh_per_second=20, transient=False) as live:

        def on_step(event: StepEvent) -> None:
            nonlocal previous
            canvas = event.tokens[row]  # read with the step's one host read
            if previous is None:
                previous = [event.mask_id] * len(canvas)
            live.update(render_canvas(canvas, previous, event.mask_id, end_ids, piece, event.step))
            previous = canvas

        yield on_step
