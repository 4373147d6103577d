"""`AttributionGraph`: the result of `ll.attribution_graph`, with pruning, scores, tidy tables and export.

Node order, as circuit-tracer's Graph: [selected features, errors (layer-major, then pos), tokens, logits];
adjacency[target, source] is the direct effect of source on target.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ..errors import ArgumentError
from .influence import PruneResult, compute_influence, graph_scores, normalize_matrix, prune
from .intervene import InterventionResult, intervene


@dataclass
class AttributionGraph:
    """An attribution graph of one prompt.

    Attributes:
        tokens: the prompt's token ids [pos]; str_tokens their texts.
        n_layers: the model's layers.
        active_features: [n_active, 3] (layer, pos, feature) of every active feature.
        activation_values: [n_active].
        selected_features: indices into active_features of the feature nodes [n_features].
        adjacency: [n_nodes, n_nodes], target rows by source columns.
        logit_tokens: the token ids of the logit nodes [n_logits]; logit_probabilities their probabilities.
        node_constants: [n_nodes]: what a feature's pre-activation or a logit (demeaned) holds beyond its
            incoming edges: biases read through the replacement model (0 for errors and tokens).
        node_values: [n_features + n_logits]: the feature pre-activations and demeaned logits of the clean run;
            for feature and logit rows, adjacency.sum(1) + node_constants equals them.
        d_vocab: the model's vocabulary size.
        prompt: the prompt's text; logit_strings the logit tokens' texts.
    """

    tokens: torch.Tensor
    str_tokens: list[str]
    n_layers: int
    active_features: torch.Tensor
    activation_values: torch.Tensor
    selected_features: torch.Tensor
    adjacency: torch.Tensor
    logit_tokens: torch.Tensor
    logit_probabilities: torch.Tensor
    node_constants: torch.Tensor
    node_values: torch.Tensor
    d_vocab: int
    prompt: str = ""
    logit_strings: list[str] = field(default_factory=list)
    model_config: dict = field(default_factory=dict)  # circuit-tracer's UnifiedConfig fields, for export

    def __post_init__(self) -> None:
        n_nodes = self.n_features + (self.n_layers + 1) * self.n_pos + self.n_logits
        if tuple(self.adjacency.shape) != (n_nodes, n_nodes):
            raise ArgumentError(f"adjacency must be [{n_nodes}, {n_nodes}], got {tuple(self.adjacency.shape)}")

    # ------------------------------------------------------------------------------------------- sizes
    @property
    def n_pos(self) -> int:
        return len(self.tokens)

    @property
    def n_features(self) -> int:
        return len(self.selected_features)

    @property
    def n_logits(self) -> int:
        return len(self.logit_tokens)

    @property
    def n_errors(self) -> int:
        return self.n_layers * self.n_pos

    @property
    def n_nodes(self) -> int:
        return self.adjacency.shape[0]

    # --------------------------------------------------------------------------------- pruning, scores
    def prune(self, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PruneResult:
        """(node_mask, edge_mask, cumulative_scores) by influence on the logits (circuit-tracer's prune_graph)."""
        return prune(
            self.adjacency,
            self.logit_probabilities,
            n_features=self.n_features,
            n_tokens=self.n_pos,
            node_threshold=node_threshold,
            edge_threshold=edge_threshold,
        )

    def scores(self) -> tuple[float, float]:
        """(replacement score, completeness score), circuit-tracer's compute_graph_scores."""
        return graph_scores(
            self.adjacency,
            self.logit_probabilities,
            n_features=self.n_features,
            n_errors=self.n_errors,
            n_tokens=self.n_pos,
        )

    def top_features(self, n: int = 5, *, logit: int | None = 0) -> list[tuple[int, int, int]]:
        """The (layer, pos, feature) of the `n` feature nodes with the most influence on logit node `logit`
        (0: the most probable token), or on all logit nodes weighted by probability if None."""
        if not isinstance(n, int) or n < 1:
            raise ArgumentError(f"n must be a positive integer, got {n!r}")
        weights = self.adjacency.new_zeros(self.n_nodes)
        first_logit = self.n_nodes - self.n_logits
        if logit is None:
            weights[first_logit:] = self.logit_probabilities.to(weights)
        elif isinstance(logit, int) and -self.n_logits <= logit < self.n_logits:
            weights[first_logit + logit % self.n_logits] = 1.0
        else:
            raise ArgumentError(f"logit must be a logit node index in [0, {self.n_logits}) or None, got {logit!r}")
        influence = compute_influence(normalize_matrix(self.adjacency), weights)[: self.n_features]
        order = torch.argsort(influence, descending=True)[:n]
        return [tuple(row) for row in self.active_features[self.selected_features[order]].tolist()]

    # ---------------------------------------------------------------------------------- interventions
    def intervene(
        self, model, transcoders, interventions, *, scale: bool = False, min_change: float = 1e-4
    ) -> InterventionResult:
        """Sets feature nodes to new activations, all at once, and compares the graph's predicted change of each
        logit node with the model's (graphs/intervene.py).

        Args:
            model: the model the graph was built on.
            transcoders: the transcoders it was built with.
            interventions: (layer, pos, feature, value) tuples, each naming a feature node of this graph.
            scale: each value multiplies the feature's activation on the prompt instead of replacing it.
            min_change: the |change| (in logits) below which a gap is NaN.
        """
        return intervene(self, model, transcoders, interventions, scale=scale, min_change=min_change)

    # ------------------------------------------------------------------------------------------ tables
    def node_kinds(self) -> list[tuple[str, int, int, int]]:
        """(kind, layer, pos, feature or token id) of every node, in node order. Kinds: "feature", "error",
        "embedding", "logit"; embeddings sit at layer -1 and logits at layer n_layers."""
        out = []
        for layer, pos, feature in self.active_features[self.selected_features].tolist():
            out.append(("feature", layer, pos, feature))
        out += [("error", layer, pos, -1) for layer in range(self.n_layers) for pos in range(self.n_pos)]
        out += [("embedding", -1, pos, int(token)) for pos, token in enumerate(self.tokens.tolist())]
        out += [("logit", self.n_layers, self.n_pos - 1, int(token)) for token in self.logit_tokens.tolist()]
        return out

    def nodes_frame(self, prune_result: PruneResult | None = None):
        """One row per node: node, kind, layer, pos, feature (or token id), activation, influence (cumulative
        share, as circuit-tracer's), kept (by `prune_result`, or by the default thresholds)."""
        import pandas as pd

        pruned = prune_result or self.prune()
        kinds = self.node_kinds()
        activations = [float(v) for v in self.activation_values[self.selected_features].tolist()]
        activations += [float("nan")] * (self.n_nodes - self.n_features)
        return pd.DataFrame(
            {
                "node": range(self.n_nodes),
                "kind": [k[0] for k in kinds],
                "layer": [k[1] for k in kinds],
                "pos": [k[2] for k in kinds],
                "feature": [k[3] for k in kinds],
                "activation": activations,
                "influence": pruned.cumulative_scores.tolist(),
                "kept": pruned.node_mask.tolist(),
            }
        )

    def edges_frame(self, prune_result: PruneResult | None = None, *, pruned: bool = True):
        """One row per nonzero edge: source, target (node indices), weight; only the kept edges unless
        `pruned=False`."""
        import pandas as pd

        mask = self.adjacency != 0
        if pruned:
            mask &= (prune_result or self.prune()).edge_mask
        targets, sources = mask.nonzero(as_tuple=True)
        return pd.DataFrame(
            {"source": sources.numpy(), "target": targets.numpy(), "weight": self.adjacency[targets, sources].numpy()}
        )

    # ------------------------------------------------------------------------------------------ export
    def to_json(self, path: str | os.PathLike, *, slug: str = "graph", scan: str | None = None, **thresholds) -> dict:
        """Writes circuit-tracer's frontend graph JSON (metadata, qParams, nodes, links) of the pruned graph;
        returns it as a dict. `thresholds`: node_threshold, edge_threshold."""
        from .export import write_json

        return write_json(self, path, slug=slug, scan=scan, **thresholds)

    def to_pt(self, path: str | os.PathLike, *, scan: str | None = None) -> None:
        """Writes a `.pt` that circuit-tracer's `Graph.from_pt` loads (it needs circuit-tracer to read)."""
        from .export import write_pt

        write_pt(self, path, scan=scan)

    def __repr__(self) -> str:
        return (
            f"AttributionGraph({self.n_pos} tokens, {self.n_features} of {len(self.active_features)} active "
            f"features, {self.n_errors} errors, {self.n_logits} logits)"
        )
