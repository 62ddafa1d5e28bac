"""trace.png: the static figure (matplotlib), for papers and issues."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dllm_cache.errors import DllmCacheError
from dllm_cache.trace.record import recomputed_fraction

MAX_ROWS_DRAWN = 4  # a batch's first prompts get a commit panel each; the heatmap averages them all
WIDTH_IN, PANEL_IN, DPI = 12.0, 3.0, 100  # 1200 px wide, 300 px per panel


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise DllmCacheError(
            "trace.png is drawn with matplotlib, which is not installed: pip install 'dllm-cache[trace]'"
        ) from None


def figure_size(trace: dict[str, Any]) -> tuple[int, int]:
    """(width, height) in pixels of the figure `write_figure` draws."""
    panels = min(len(trace["rows"]), MAX_ROWS_DRAWN) + 1
    return int(WIDTH_IN * DPI), int(PANEL_IN * panels * DPI)


def write_figure(trace: dict[str, Any], path: Path) -> None:
    """Per prompt, steps x answer positions coloured by the step that committed each position; then
    the layers x steps fraction of rows recomputed. NFE and recompute fraction in the title."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt
    import numpy as np

    n_steps, G = len(trace["steps"]), trace["gen_length"]
    drawn = trace["rows"][:MAX_ROWS_DRAWN]
    width, height = figure_size(trace)
    fig, axes = plt.subplots(len(drawn) + 1, 1, figsize=(width / DPI, height / DPI), dpi=DPI, squeeze=False)
    for b, ax in enumerate(axes[: len(drawn), 0]):
        # cell (s, p): the step (1-based) that committed p if it was committed by step s, else blank
        at = np.full(G, np.inf)
        for i, step in enumerate(trace["steps"]):
            at[step["positions"][b]] = i + 1
        grid = np.where(at[None, :] <= np.arange(1, n_steps + 1)[:, None], at[None, :], np.nan)
        im = ax.imshow(
            grid,
            aspect="auto",
            cmap="viridis",
            vmin=1,
            vmax=max(n_steps, 2),
            origin="upper",
            interpolation="nearest",
            extent=(-0.5, G - 0.5, n_steps + 0.5, 0.5),
        )
        ax.set_ylabel("step")
        ax.set_xlabel("answer position")
        label = trace["rows"][b]["prompt"]
        ax.set_title(f"prompt {b}: {label[:90]}" + ("..." if len(label) > 90 else ""), fontsize=9, loc="left")
        fig.colorbar(im, ax=ax, label="commit step", pad=0.01)
    ax = axes[-1, 0]
    heat = np.array(recomputed_fraction(trace)).reshape(trace["n_layers"], n_steps)
    im = ax.imshow(
        heat,
        aspect="auto",
        cmap="Oranges",
        vmin=0,
        vmax=1,
        interpolation="nearest",
        extent=(0.5, n_steps + 0.5, trace["n_layers"] - 0.5, -0.5),
    )
    ax.set_xlabel("step")
    ax.set_ylabel("layer")
    ax.set_title("fraction of rows recomputed", fontsize=9, loc="left")
    fig.colorbar(im, ax=ax, label="recomputed", pad=0.01)
    s = trace["stats"]
    fig.suptitle(
        f"{trace['model']} - {trace['method']}: NFE {s['nfe']}, "
        f"recomputed {s['recompute_fraction']:.1%} of position-layers"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)  # no bbox_inches="tight": the size stays what figure_size says
    plt.close(fig)
