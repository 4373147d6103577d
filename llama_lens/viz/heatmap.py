"""A read-out × position heatmap from a neutral value, `Grid`: values, row and column labels, the text of each
cell, the colour scale and what the colour bar says (as tuned-lens' TrajectoryStatistic). It knows no result
type: `LensResult.plot()` builds its Grid and draws it here.

    grid = Grid(values, row_labels=["embed", "0_post"], col_labels=["<s>", "·Paris"], colorbar_label="probability")
    fig = draw_grid(grid)

Figures are built with `matplotlib.figure.Figure`, never pyplot, so none pile up in pyplot's registry and
nothing is drawn behind the caller's back; matplotlib is imported inside the functions. Token text is shown
with its whitespace made visible ("·" for a space, "↵" for a newline, "⇥" for a tab) and clipped with "…".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..validate import check_choice
from .tokens import thinned, visible_token

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

SCALES = ("linear", "log")


@dataclass
class Grid:
    """What a heatmap shows: rows (read-outs, drawn bottom up) × columns (positions).

    Attributes:
        values: [n_rows, n_cols] what colours each cell (NaN draws nothing).
        row_labels: [n_rows] shown as they are.
        col_labels: [n_cols] token text under each column (made visible and clipped when drawn).
        col_numbers: [n_cols] the position of each column, written before its label when labels are thinned.
        top_labels: [n_cols] token text above each column, or None for no top axis.
        cell_text: [n_rows][n_cols] token text written in each cell, or None.
        scale: "linear" or "log" colours.
        vmin, vmax: the colour scale's ends.
        colorbar_label: what the colour bar says (and the title, after `title_prefix`).
        cmap: a matplotlib colour map name.
        title_prefix: written before `colorbar_label` in the title.
        xlabel, ylabel, top_xlabel: the axis labels.
    """

    values: torch.Tensor
    row_labels: Sequence[str]
    col_labels: Sequence[str]
    colorbar_label: str
    col_numbers: Sequence[int] | None = None
    top_labels: Sequence[str] | None = None
    cell_text: Sequence[Sequence[str]] | None = None
    scale: str = "linear"
    vmin: float = 0.0
    vmax: float = 1.0
    cmap: str = "Blues"
    title_prefix: str = ""
    xlabel: str = ""
    ylabel: str = ""
    top_xlabel: str = ""

    def __post_init__(self) -> None:
        check_choice("scale", self.scale, SCALES, "colour scale")


def draw_grid(
    grid: Grid,
    *,
    annotate: bool = True,
    max_chars: int = 7,
    figsize: tuple[float, float] | None = None,
    max_figsize: tuple[float, float] = (40.0, 30.0),
) -> Figure:
    """The heatmap of `grid`, with the cell text written in each cell.

    Args:
        grid: what to draw.
        annotate: write the cell text in each cell (where the cells are large enough to read it).
        max_chars: clip cell text to this many characters (axis labels to 3 more).
        figsize: (width, height) in inches; by default it grows with the number of columns and rows up to
            `max_figsize`, and font sizes follow the cell size either way.

    Returns:
        The Figure; its first axes holds the image (`axes[0].images[0]`, data [n_rows, n_cols]).
    """
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.figure import Figure

    values = grid.values
    n_rows, n_cols = values.shape
    norm = (LogNorm if grid.scale == "log" else Normalize)(grid.vmin, grid.vmax)
    shown_cols = thinned(n_cols)
    input_labels = [visible_token(grid.col_labels[c], max_chars + 3) for c in shown_cols]
    if len(shown_cols) < n_cols and grid.col_numbers is not None:
        # Thinned: the position too, so the unlabelled columns can be counted.
        input_labels = [f"{grid.col_numbers[c]} {label}" for c, label in zip(shown_cols, input_labels)]
    top_labels = (
        [] if grid.top_labels is None else [visible_token(grid.top_labels[c], max_chars + 3) for c in shown_cols]
    )
    if figsize is None:
        # The cells, plus the rotated token labels below and above them (about 0.6 em per character at the
        # largest tick font, 9 pt), the title and the two axis labels: with a few rows only, a height from the
        # rows alone left the cells no room.
        labels_height = 0.6 * 9 / 72 * (max(map(len, input_labels), default=0) + max(map(len, top_labels), default=0))
        width, height = 2.5 + 0.62 * n_cols, 1.2 + labels_height + max(0.27 * n_rows, 1.0)
        figsize = (min(width, max_figsize[0]), min(height, max_figsize[1]))
    fig = Figure(figsize=figsize, layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(values.numpy(), aspect="auto", origin="lower", cmap=grid.cmap, norm=norm,
                      interpolation="nearest")  # fmt: skip
    # A colour bar 4% of the width, as long as the cells are high: matplotlib's default length (20 times its
    # width) is a stub beside a narrow, tall heatmap.
    fig.colorbar(image, ax=ax, label=grid.colorbar_label, fraction=0.04, pad=0.01,
                 aspect=max(20.0, 40.0 * figsize[1] / figsize[0]))  # fmt: skip

    # Font size from the cell size: about 80% of the plot area is cells.
    cell_w_pt = 0.8 * figsize[0] * 72 / n_cols
    cell_h_pt = 0.8 * figsize[1] * 72 / n_rows
    cell_font = min(9.0, 0.6 * cell_h_pt, cell_w_pt / (0.62 * max_chars))
    tick_font = max(5.0, min(9.0, cell_w_pt / 1.2, cell_h_pt * 0.8))
    if annotate and grid.cell_text is not None and cell_font >= 3.5:
        _annotate_cells(ax, grid, norm, image.cmap, cell_font, max_chars)

    ax.set_xticks(shown_cols, input_labels, rotation=90, fontsize=tick_font)
    shown_rows = thinned(n_rows)
    ax.set_yticks(shown_rows, [grid.row_labels[r] for r in shown_rows], fontsize=tick_font)
    ax.set_xlabel(grid.xlabel)
    ax.set_ylabel(grid.ylabel)
    if grid.top_labels is not None:
        top = ax.secondary_xaxis("top")
        top.set_xticks(shown_cols, top_labels, rotation=90, fontsize=tick_font)
        top.set_xlabel(grid.top_xlabel, fontsize=tick_font + 1)
    ax.set_title(grid.title_prefix + grid.colorbar_label, fontsize=10)
    return fig


def _annotate_cells(ax: Axes, grid: Grid, norm, cmap, fontsize: float, max_chars: int) -> None:
    colours = cmap(norm(grid.values.numpy()))  # [n_rows, n_cols, 4]
    for r, row in enumerate(grid.cell_text):
        for c, text in enumerate(row):
            red, green, blue, _ = colours[r, c]
            # Light text on dark cells (perceived luminance, ITU-R BT.601 weights).
            dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
            ax.text(c, r, visible_token(text, max_chars), ha="center", va="center", fontsize=fontsize,
                    color="white" if dark else "black", clip_on=True)  # fmt: skip
