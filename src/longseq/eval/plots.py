"""Plots as PNG files, drawn with matplotlib's Agg canvas (no display, no global pyplot state) and written
atomically."""

from __future__ import annotations

import math
from pathlib import Path

from longseq.eval.io import write_atomic


def tokens_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else f"{n:,}"


def passkey_heatmap(grid: list[list[float]], lengths: tuple[int, ...], depths: tuple[float, ...], path: str | Path,
                    title: str = "passkey retrieval", task: str = "passkey") -> Path:
    """grid[depth][length] accuracy in 0..1 (NaN: not measured) -> a needle-in-a-haystack heatmap PNG (any retrieval
    task: `task` names the depth axis)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LinearSegmentedColormap
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2.0 + 0.9 * len(lengths), 1.4 + 0.45 * len(depths)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cmap = LinearSegmentedColormap.from_list("retrieval", ["#d7263d", "#f4d35e", "#2e8b57"])  # fail -> pass
    cmap = cmap.with_extremes(bad="#dddddd")  # NaN: not measured
    image = ax.imshow(grid, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(lengths)), [tokens_label(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(f"{task} depth")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, "n/a" if math.isnan(value) else f"{value:.0%}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="accuracy")
    ax.set_title(title, fontsize=10)
    return write_atomic(path, lambda p: fig.savefig(p, format="png", dpi=120))
