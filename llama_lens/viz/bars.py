"""Bars per layer from a neutral value, `LayerBars`: side-by-side bars for each group on the x axis (the
embedding, then each layer), and beside them, optionally, a diverging heatmap that splits the bars further
(layer × head). It knows no result type: `AttributionResult.plot()` builds its LayerBars and draws it here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .tokens import thinned

if TYPE_CHECKING:
    from matplotlib.figure import Figure

BAR_SPAN = 0.8  # of the space between two groups, what a group's bars fill together


@dataclass
class LayerBars:
    """What a bar figure shows.

    Attributes:
        groups: [n_groups] the x axis labels, left to right.
        series: series name -> {group index: value}, drawn in this order; series that share a group stand
            side by side there, one alone is centred on it.
        colours: series name -> a matplotlib colour.
        title, xlabel, ylabel: of the bar panel (`ylabel` also labels the heatmap's colour bar).
        heads: [n_rows, n_cols] values for a heatmap panel, drawn with a colour scale symmetric about 0, or None.
        head_rows: [n_rows] the heatmap's row labels (drawn bottom up); its columns are numbered.
        heads_title, heads_xlabel, heads_ylabel: of the heatmap panel.
    """

    groups: Sequence[str]
    series: Mapping[str, Mapping[int, float]]
    title: str
    xlabel: str
    ylabel: str
    colours: Mapping[str, str] = field(default_factory=dict)
    heads: torch.Tensor | None = None
    head_rows: Sequence[str] = ()
    heads_title: str = ""
    heads_xlabel: str = ""
    heads_ylabel: str = ""


def draw_bars(bars: LayerBars, *, figsize: tuple[float, float] | None = None) -> Figure:
    """The bars, and the heatmap beside them when `bars.heads` is given.

    Returns:
        The Figure: axes 0 the bars, axes 1 the heatmap (if any), plus its colour bar.
    """
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    has_heads = bars.heads is not None
    n_groups = len(bars.groups)
    if figsize is None:
        figsize = (min(4.0 + 0.3 * n_groups, 20.0) * (2 if has_heads else 1) * 0.75, 4.5)
    fig = Figure(figsize=figsize, layout="constrained")
    axes = fig.subplots(1, 2 if has_heads else 1, squeeze=False)[0]

    ax = axes[0]
    in_group = [[name for name, values in bars.series.items() if group in values] for group in range(n_groups)]
    width = BAR_SPAN / max(1, max(map(len, in_group), default=1))
    for name, values in bars.series.items():
        xs = [group + (in_group[group].index(name) - (len(in_group[group]) - 1) / 2) * width for group in values]
        ax.bar(xs, [float(v) for v in values.values()], width=width, color=bars.colours.get(name), label=name)
    ax.axhline(0, color="black", linewidth=0.6)
    shown = thinned(n_groups, 40)
    ax.set_xticks(shown, [bars.groups[i] for i in shown], fontsize=8)
    ax.set_xlabel(bars.xlabel)
    ax.set_ylabel(bars.ylabel)
    ax.legend(fontsize=8)
    ax.set_title(bars.title, fontsize=10)

    if has_heads:
        heads = bars.heads
        limit = max(float(heads.abs().max()), 1e-6) if heads.numel() else 1.0
        image = axes[1].imshow(heads.numpy(), aspect="auto", origin="lower", cmap="RdBu",
                               norm=Normalize(-limit, limit), interpolation="nearest")  # fmt: skip
        rows = thinned(heads.shape[0], 40)
        axes[1].set_yticks(rows, [bars.head_rows[r] for r in rows], fontsize=8)
        axes[1].set_xticks(range(heads.shape[1]), [str(h) for h in range(heads.shape[1])], fontsize=8)
        axes[1].set_xlabel(bars.heads_xlabel)
        axes[1].set_ylabel(bars.heads_ylabel)
        axes[1].set_title(bars.heads_title, fontsize=10)
        fig.colorbar(image, ax=axes[1], label=bars.ylabel)
    return fig
