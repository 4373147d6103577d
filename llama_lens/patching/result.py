"""The result of activation and attribution patching: scores per site, as a tidy frame or heatmaps."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..errors import ArgumentError

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure


@dataclass
class PatchingResult:
    """Scores per site. `scores[site]` is [n_layers, pos] or [n_layers, pos, heads] / [n_layers, heads]; `axes[site]`
    names its dimensions; `tokens` labels the positions (the first clean prompt's tokens)."""

    scores: dict[str, torch.Tensor]
    axes: dict[str, tuple[str, ...]]
    layers: list[int]
    tokens: list[str] = field(default_factory=list)
    method: str = "activation"

    def __post_init__(self) -> None:
        for site, score in self.scores.items():
            if score.dim() != len(self.axes[site]) or score.shape[0] != len(self.layers):
                raise ArgumentError(f"scores of {site!r} are {tuple(score.shape)}, expected axes {self.axes[site]}")

    def to_frame(self) -> pd.DataFrame:
        """One row per patched site: method, site, layer, position, token, head (-1 where not per head), score."""
        import pandas as pd

        rows = []
        for site, score in self.scores.items():
            axes = self.axes[site]
            for index in torch.cartesian_prod(*[torch.arange(n) for n in score.shape]).view(-1, score.dim()).tolist():
                named = dict(zip(axes, index))
                pos = named.get("pos", -1)
                rows.append(
                    {
                        "method": self.method,
                        "site": site,
                        "layer": self.layers[named["layer"]],
                        "position": pos,
                        "token": self.tokens[pos] if 0 <= pos < len(self.tokens) else "",
                        "head": named.get("head", -1),
                        "score": float(score[tuple(index)]),
                    }
                )
        return pd.DataFrame(rows)

    def plot(self, sites: Sequence[str] | None = None, *, figsize: tuple[float, float] | None = None) -> Figure:
        """A heatmap per site (layers down; positions or heads across; per-position heads as one panel per
        head axis flattened to position x head). Returns the matplotlib Figure."""
        from matplotlib.figure import Figure

        sites = list(self.scores) if sites is None else list(sites)
        for site in sites:
            if site not in self.scores:
                raise ArgumentError(f"no scores for site {site!r}; this result holds {list(self.scores)}")
        fig = Figure(figsize=figsize or (4.5 * len(sites), 0.25 * len(self.layers) + 2.5), layout="constrained")
        axes = fig.subplots(1, len(sites), squeeze=False)[0]
        for ax, site in zip(axes, sites):
            score = self.scores[site].float()
            names = self.axes[site]
            if score.dim() == 3:  # [layer, pos, head] -> [layer, pos * head]
                score = score.flatten(1)
                xlabel = "position x head"
            else:
                xlabel = names[1]
            limit = float(score.abs().max()) or 1.0
            image = ax.imshow(score.numpy(), cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
            ax.set_title(f"{self.method} patching: {site}")
            ax.set_ylabel("layer")
            ax.set_xlabel(xlabel)
            ax.set_yticks(range(len(self.layers)), [str(i) for i in self.layers])
            if names[1] == "pos" and score.shape[1] == len(self.tokens):
                ax.set_xticks(range(len(self.tokens)), [f"{t!r}"[1:-1] for t in self.tokens], rotation=90)
            fig.colorbar(image, ax=ax)
        return fig
