"""What `feature_attribution` returns: one row per node (an active feature, or a dictionary's error term, at
one position of one site of one prompt), with its attribution and, for the nodes ablated, the effect measured."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..errors import ArgumentError, UsageError

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

ERROR = -1  # the feature id of a dictionary's error term


@dataclass
class FeatureAttribution:
    """Nodes of a batch of prompts' spliced runs, each a (prompt, site, position, feature) with feature -1 for
    the error term.

    Attributes:
        sites: the hook points the dictionaries replace (their hook_out; a CLT's output hook of each layer, where
            that layer's features are found); `site_index` points into it.
        site_index, positions, features: [n_nodes] long; positions count within the node's prompt (padding
            left out).
        activations: [n_nodes] the feature's activation; for an error node, the error's norm.
        attributions: [n_nodes] gradient x activation: d(metric)/d(node) . node, the first-order estimate of
            metric(clean) - metric(node ablated). Over a site and position, the features', the error's and the
            decoder bias' attributions add up to d(metric)/d(activation) . activation.
        effects: [n_nodes] metric(clean) - metric(node ablated), measured by `ablate_features` (the same sign as
            the attribution); NaN for the nodes not ablated.
        metrics: [n_prompts] float64, each prompt's metric in the clean run.
        n_layers: the model's, for the final norm's layer in `to_frame`.
        prompts: [n_nodes] long, the prompt each node belongs to (index into the batch).
        prompt_tokens: each prompt's tokens (without padding), labelling positions.
    """

    sites: list[str]
    site_index: torch.Tensor
    positions: torch.Tensor
    features: torch.Tensor
    activations: torch.Tensor
    attributions: torch.Tensor
    effects: torch.Tensor
    metrics: torch.Tensor
    n_layers: int
    prompts: torch.Tensor | None = None
    prompt_tokens: list[list[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.positions)
        if self.prompts is None:
            self.prompts = torch.zeros(n, dtype=torch.long)
        for name in ("site_index", "features", "activations", "attributions", "effects", "prompts"):
            if len(getattr(self, name)) != n:
                raise ArgumentError(f"FeatureAttribution.{name} has {len(getattr(self, name))} nodes, expected {n}")

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def n_prompts(self) -> int:
        return len(self.metrics)

    @property
    def metric(self) -> float:
        """The clean run's metric, for one prompt (a batch: see `metrics`)."""
        if self.n_prompts != 1:
            raise UsageError(f"this attribution holds {self.n_prompts} prompts: read .metrics, one per prompt")
        return float(self.metrics[0])

    @property
    def tokens(self) -> list[str]:
        """The prompt's tokens, for one prompt (a batch: see `prompt_tokens`)."""
        if self.n_prompts != 1:
            raise UsageError(f"this attribution holds {self.n_prompts} prompts: read .prompt_tokens")
        return self.prompt_tokens[0] if self.prompt_tokens else []

    @property
    def ablated(self) -> torch.Tensor:
        """[n_nodes] bool: the nodes whose effect was measured."""
        return ~self.effects.isnan()

    def to_frame(self) -> pd.DataFrame:
        """One row per node, by prompt, then largest |attribution| first: prompt, site, layer (-1 for hook_embed,
        n_layers for the final norm), position, token, feature (-1 for the error term), kind ("feature" or
        "error"), activation, attribution, effect (NaN where not ablated)."""
        import pandas as pd

        order = self.attributions.abs().argsort(descending=True, stable=True)
        order = order[self.prompts[order].argsort(stable=True)]  # by prompt, each by |attribution|
        sites = [self.sites[i] for i in self.site_index[order].tolist()]
        prompts = self.prompts[order].tolist()
        positions = self.positions[order].tolist()
        features = self.features[order]
        tokens = [
            self.prompt_tokens[b][p] if b < len(self.prompt_tokens) and 0 <= p < len(self.prompt_tokens[b]) else ""
            for b, p in zip(prompts, positions)
        ]
        return pd.DataFrame(
            {
                "prompt": prompts,
                "site": sites,
                "layer": [site_layer(site, self.n_layers) for site in sites],
                "position": positions,
                "token": tokens,
                "feature": features.tolist(),
                "kind": ["error" if f == ERROR else "feature" for f in features.tolist()],
                "activation": self.activations[order].double().numpy(),
                "attribution": self.attributions[order].double().numpy(),
                "effect": self.effects[order].double().numpy(),
            }
        )

    def plot(self, *, figsize: tuple[float, float] = (4.5, 4.0)) -> Figure:
        """The ablated nodes' attribution (x) against their measured effect (y), with the diagonal where the two
        agree. Returns the matplotlib Figure."""
        from matplotlib.figure import Figure

        if not bool(self.ablated.any()):
            raise ArgumentError("no node was ablated: run feature_attribution with top_n > 0 to plot effects")
        x, y = self.attributions[self.ablated].double(), self.effects[self.ablated].double()
        is_error = self.features[self.ablated] == ERROR
        fig = Figure(figsize=figsize, layout="constrained")
        ax = fig.subplots()
        ax.scatter(x[~is_error].numpy(), y[~is_error].numpy(), s=14, label="feature")
        if bool(is_error.any()):
            ax.scatter(x[is_error].numpy(), y[is_error].numpy(), s=14, marker="x", label="error term")
        low, high = float(torch.cat([x, y]).min()), float(torch.cat([x, y]).max())
        ax.plot([low, high], [low, high], color="grey", linewidth=0.8, linestyle="--")
        ax.set_xlabel("attribution (gradient x activation)")
        ax.set_ylabel("effect of ablating (clean - ablated)")
        ax.set_title(f"{int(self.ablated.sum())} ablated nodes")
        ax.legend(loc="best")
        return fig


def site_layer(site: str, n_layers: int) -> int:
    """The layer of a hook point: i for blocks.{i}.*, -1 for hook_embed, n_layers for the final norm."""
    if site.startswith("blocks."):
        return int(site.split(".")[1])
    return -1 if site == "hook_embed" else n_layers
