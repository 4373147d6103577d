"""Lines across read-outs from a neutral value, `Trajectory`: one line per tracked token, a probability panel
and a rank panel (log scale, best at the top). It knows no result type: `LensResult.plot_trajectory()` builds
its Trajectory and draws it here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .tokens import thinned, visible_token

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass
class Trajectory:
    """What a trajectory figure shows: values across read-outs (the x axis), one line per token.

    Attributes:
        x_labels: [n_x] the read-outs' labels.
        line_labels: [n_lines] the token each line follows (made visible and clipped when drawn).
        probs: [n_lines, n_x] probabilities for a probability panel, or None for none.
        ranks: [n_lines, n_x] rank + 1 for a rank panel (NaN draws nothing), or None for none.
        title: the figure's title.
        xlabel: the x axis label.
        legend_title: what the legend says above the line labels.
    """

    x_labels: Sequence[str]
    line_labels: Sequence[str]
    probs: torch.Tensor | None
    ranks: torch.Tensor | None
    title: str
    xlabel: str = "read-out (layer)"
    legend_title: str = "target"


def draw_trajectory(trajectory: Trajectory, *, figsize: tuple[float, float] | None = None) -> Figure:
    """One panel for each of the trajectory's probabilities and ranks (in that order), sharing the x axis.

    Returns:
        The Figure, one axes per panel.
    """
    from matplotlib.figure import Figure

    panels = [(name, values) for name, values in (("prob", trajectory.probs), ("rank", trajectory.ranks))]
    panels = [(name, values) for name, values in panels if values is not None]
    n = len(trajectory.x_labels)
    if figsize is None:
        figsize = (min(3.0 + 0.22 * n, 20.0), 2.6 * len(panels) + 0.8)
    fig = Figure(figsize=figsize, layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    x = list(range(n))
    for ax, (panel, values) in zip(axes, panels):
        for line, text in enumerate(trajectory.line_labels):
            ax.plot(x, values[line].tolist(), marker="o", markersize=3, label=visible_token(text, 16))
        if panel == "prob":
            ax.set_ylim(-0.02, 1.02)
            ax.set_ylabel("probability")
        else:
            ax.set_yscale("log")
            ax.invert_yaxis()  # better ranks higher up, like the probability panel
            ax.set_ylabel("rank + 1 (log)")
        ax.grid(True, alpha=0.3)
    axes[0].legend(title=trajectory.legend_title, fontsize=8, title_fontsize=8)
    shown = thinned(n, 40)
    axes[-1].set_xticks(shown, [trajectory.x_labels[i] for i in shown], rotation=90, fontsize=8)
    axes[-1].set_xlabel(trajectory.xlabel)
    axes[0].set_title(trajectory.title, fontsize=10)
    return fig
