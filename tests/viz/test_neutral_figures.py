"""viz draws neutral values (a grid, lines, bars) that know no result type; lens results build them."""

import ast
from pathlib import Path

import pytest
import torch

import llama_lens as ll
from llama_lens.viz.bars import LayerBars, draw_bars
from llama_lens.viz.heatmap import Grid, draw_grid
from llama_lens.viz.lines import Trajectory, draw_trajectory

VIZ = Path(ll.__file__).parent / "viz"


def test_viz_imports_nothing_from_lens():
    for path in VIZ.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith(("lens", "llama_lens.lens")), path.name


def test_a_grid_is_drawn_with_its_labels_cells_and_scale():
    values = torch.tensor([[0.1, 0.9, 0.5], [0.3, 0.2, 0.7]])  # [n_rows, n_cols]
    grid = Grid(
        values=values, row_labels=["embed", "0_post"], col_labels=[" a", "b\n", "c"], colorbar_label="probability",
        top_labels=["b\n", "c", ""], cell_text=[["x", " y", "z"], ["u", "v", "w"]], xlabel="input token",
    )  # fmt: skip
    fig = draw_grid(grid, figsize=(6, 3))
    ax = fig.axes[0]
    assert torch.equal(torch.tensor(ax.images[0].get_array()), values)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["·a", "b↵", "c"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["embed", "0_post"]
    assert [t.get_text() for t in ax.texts] == ["x", "·y", "z", "u", "v", "w"]
    assert ax.get_title() == "probability" and fig.axes[-1].get_ylabel() == "probability"
    assert not draw_grid(grid, annotate=False, figsize=(6, 3)).axes[0].texts

    ranks = Grid(values=values + 1, row_labels=["a", "b"], col_labels=list("xyz"), colorbar_label="rank", scale="log",
                 vmin=1.0, vmax=10.0)  # fmt: skip
    assert type(draw_grid(ranks).axes[0].images[0].norm).__name__ == "LogNorm"
    with pytest.raises(ValueError, match="colour scale"):
        Grid(values=values, row_labels=[], col_labels=[], colorbar_label="", scale="cubic")


def test_lines_and_bars_draw_what_they_are_given():
    trajectory = Trajectory(x_labels=["embed", "0_post", "1_post"], line_labels=[" Paris"],
                            probs=torch.tensor([[0.1, 0.4, 0.8]]), ranks=None, title="t")  # fmt: skip
    fig = draw_trajectory(trajectory)
    assert len(fig.axes) == 1 and list(fig.axes[0].lines[0].get_ydata()) == pytest.approx([0.1, 0.4, 0.8])
    assert fig.axes[0].get_legend().get_texts()[0].get_text() == "·Paris"

    series = {"attn": {1: 1.0, 2: -2.0}, "mlp": {1: 0.5}, "embed": {0: 3.0}}
    bars = LayerBars(groups=["embed", "0", "1"], series=series, title="t", xlabel="layer", ylabel="logit",
                     heads=torch.ones(2, 4), head_rows=["0", "1"])  # fmt: skip
    fig = draw_bars(bars)
    assert [p.get_height() for p in fig.axes[0].patches] == [1.0, -2.0, 0.5, 3.0]
    # attention and MLP side by side in layer 0's group; the lone bars centred on theirs
    centres = [p.get_x() + p.get_width() / 2 for p in fig.axes[0].patches]
    assert centres == pytest.approx([0.8, 2.0, 1.2, 0.0])
    assert fig.axes[1].images[0].get_array().shape == (2, 4)
