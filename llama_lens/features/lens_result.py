"""What the feature lens returns: the top features per site and position, their read-outs and attributions, as
tensors; a tidy table, a heatmap, and the explorer.

Shapes: S sites (forward order), P positions read, k = top_k, n_u a site's distinct reported features.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ArgumentError
from ..lens.inputs import InputsView, LensInputs
from ..validate import check_choice
from ..viz.heatmap import Grid, draw_grid
from .lens_sites import FeatureSite

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

PLOT_METRICS = ("activation", "dla", "l0")


@dataclass
class SiteReadout:
    """The vocabulary read-out of one site's reported features.

    Attributes:
        features: [n_u] the feature ids, ascending.
        top_ids: [n_u, n_readout] token ids, best first (no columns for a site that writes nothing to the
            residual stream).
        top_logits: [n_u, n_readout] their logits per unit of activation along the feature's direction.
        top_strs: the tokens' texts, [n_u][n_readout].
    """

    features: torch.Tensor
    top_ids: torch.Tensor
    top_logits: torch.Tensor
    top_strs: list[list[str]] = field(default_factory=list)

    def of(self, feature: int) -> list[str]:
        """The read-out tokens of `feature` (empty where the site has none)."""
        index = int(torch.searchsorted(self.features, torch.tensor(feature)))
        if index >= len(self.features) or int(self.features[index]) != feature:
            raise ArgumentError(f"feature {feature} is not among this site's reported features")
        return self.top_strs[index] if self.top_strs else []


@dataclass(repr=False)
class FeatureLensResult(InputsView):
    """The feature lens of one prompt (`ll.feature_lens`).

    Attributes:
        inputs: the prompt, positions and target (`LensInputs`); `tokens`, `str_tokens`, `positions`,
            `target_ids` and `target_strs` read as the result's own.
        sites: [S] each dictionary's site (label, hook, hook_in, layer, path, d_sae), in forward order.
        feature_ids: [S, P, k] the top active features by activation, -1 past the last active one.
        activations: [S, P, k] their activations (NaN where no feature is).
        dla: [S, P, k] their direct logit attribution to the target, or None without a target (NaN where no
            feature is, or where the site writes nothing to the residual stream).
        n_active: [S, P] how many features are active (the L0).
        readouts: [S] each site's read-out of the features it reports (`SiteReadout`).
        scale: [P] the final norm's scale at each position, which the DLA divides by.
    """

    inputs: LensInputs
    sites: list[FeatureSite]
    feature_ids: torch.Tensor
    activations: torch.Tensor
    dla: torch.Tensor | None
    n_active: torch.Tensor
    readouts: list[SiteReadout]
    scale: torch.Tensor

    def __repr__(self) -> str:
        target = f", target={self.target_strs[0][0]!r}" if self.target_strs else ""
        return (
            f"FeatureLensResult(sites={[s.label for s in self.sites]}, positions={len(self.positions)}, "
            f"top_k={self.top_k}{target})"
        )

    @property
    def top_k(self) -> int:
        return self.feature_ids.shape[-1]

    @property
    def labels(self) -> list[str]:
        """The sites' row labels."""
        return [site.label for site in self.sites]

    def site_index(self, site: int | str) -> int:
        """The index of a site given by index or label (or hook, when one dictionary writes it)."""
        if isinstance(site, str):
            for index, s in enumerate(self.sites):
                if site in (s.label, s.hook):
                    return index
            raise ArgumentError(f"no site {site!r}; this result holds {self.labels}")
        if not -len(self.sites) <= site < len(self.sites):
            raise ArgumentError(f"site {site} is out of range: this result holds {len(self.sites)} sites")
        return site % len(self.sites)

    def readout(self, site: int | str, feature: int) -> list[str]:
        """The read-out tokens of one reported feature at a site."""
        return self.readouts[self.site_index(site)].of(feature)

    def to_frame(self) -> pd.DataFrame:
        """A tidy pandas DataFrame, one row per site × position × rank with a feature.

        Columns: layer, hook, site (the row label), hook_in, position, token, rank (0 = most active), feature,
        activation, n_active (the L0 there), top_tokens (the feature's read-out, a list), and with a target:
        target, dla.
        """
        import pandas as pd

        s, p, r = (self.feature_ids >= 0).nonzero(as_tuple=True)
        features = self.feature_ids[s, p, r].tolist()
        s_list, p_list = s.tolist(), p.tolist()
        positions = [self.positions[i] for i in p_list]
        columns: dict[str, Any] = {
            "layer": [self.sites[i].layer for i in s_list],
            "hook": [self.sites[i].hook for i in s_list],
            "site": pd.Categorical([self.sites[i].label for i in s_list], categories=self.labels, ordered=True),
            "hook_in": [self.sites[i].hook_in for i in s_list],
            "position": positions,
            "token": [self.str_tokens[0][q] for q in positions],
            "rank": r.tolist(),
            "feature": features,
            "activation": self.activations[s, p, r].tolist(),
            "n_active": self.n_active[s, p].tolist(),
            "top_tokens": [self.readouts[i].of(f) for i, f in zip(s_list, features)],
        }
        if self.dla is not None:
            columns["target"] = self.target_strs[0][0]
            columns["dla"] = self.dla[s, p, r].tolist()
        return pd.DataFrame(columns)

    def plot(self, metric: str = "activation", *, annotate: bool = True, figsize=None) -> Figure:
        """A site × position heatmap (sites up, in forward order), each cell labelled with its top feature.

        Args:
            metric: what colours the cells: "activation" (the top feature's), "dla" (the sum of the reported
                features' DLA, needs a target) or "l0" (how many features are active).
            annotate: write the top feature's id in each cell (where cells are large enough).
            figsize: (width, height) in inches.

        Returns:
            The Figure (`axes[0].images[0]` holds the [S, P] values).
        """
        check_choice("metric", metric, PLOT_METRICS, "feature lens colouring")
        if metric == "activation":
            values = self.activations[:, :, 0].nan_to_num(0.0)
            low, high, cmap, what = 0.0, float(values.max().clamp(min=1e-9)), "Blues", "top feature's activation"
        elif metric == "l0":
            values = self.n_active.float()
            low, high, cmap, what = 0.0, float(values.max().clamp(min=1.0)), "Greens", "active features (L0)"
        else:
            if self.dla is None:
                raise ArgumentError('metric="dla" needs a target: ll.feature_lens(..., target=" Paris")')
            values = self.dla.nan_to_num(0.0).sum(-1)
            high = float(values.abs().max().clamp(min=1e-9))
            low, cmap = -high, "RdBu_r"
            what = f"DLA of the top {self.top_k} features to {self.target_strs[0][0]!r}"
        cell_text = [[f"{int(f)}" if f >= 0 else "" for f in row] for row in self.feature_ids[:, :, 0].tolist()]
        grid = Grid(
            values=values,
            row_labels=self.labels,
            col_labels=[self.str_tokens[0][p] for p in self.positions],
            col_numbers=self.positions,
            cell_text=cell_text,
            colorbar_label=what,
            vmin=low,
            vmax=high,
            cmap=cmap,
            title_prefix="feature lens: ",
            xlabel="position",
            ylabel="site",
        )
        return draw_grid(grid, annotate=annotate, figsize=figsize)
