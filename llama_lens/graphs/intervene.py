"""Interventions on an attribution graph: set or scale feature nodes, and compare the change of each logit node
that the graph predicts with the change the model makes.

The graph's prediction is linear. A feature node's column, divided by its activation, is its direct effect per
unit of activation; an active feature's activation moves one for one with its pre-activation (the slope of
ReLU, JumpReLU and TopK where the feature is on); so a change of activations delta [n_features] at the
intervened nodes becomes

    feature changes  D = delta + W_ff D      (intervened nodes keep their set change: their rows of W_ff are 0)
    logit changes      = W_lf D              (the direct part: W_lf delta)

with W the per-unit adjacency. Features come in node order (layer, pos, feature) and edges only go up the
layers, so W_ff is strictly lower triangular and D is one triangular solve. The model's changes come from
graphs/replacement_runs.py; the gap is |predicted - actual| / |actual|.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import ArgumentError, ArgumentTypeError
from .replacement_runs import FROZEN_MODES, MODES, ReplacementRuns
from .transcoders import as_transcoder_set

Intervention = tuple[int, int, int, float]  # (layer, pos, feature, value), as circuit-tracer writes them


@dataclass
class InterventionResult:
    """The predicted and measured change of each logit node of a graph under one intervention.

    Every change is of the graph's logit node: the token's logit minus the mean logit, at the last position.

    Attributes:
        interventions: (layer, pos, feature, new activation) of each intervened feature.
        clean_activations: their activations on the prompt.
        logit_tokens: the logit nodes' token ids [n_logits]; logit_strings their texts.
        predicted: the graph's prediction, direct and indirect effects [n_logits].
        direct: the direct effects alone (edges from the intervened features to the logits) [n_logits].
        linear: the model with patterns, norm scales and errors frozen and the graph's features moving
            linearly: equal to `predicted` up to rounding, a check of the graph itself.
        frozen: patterns, scales and errors frozen, every feature through its activation function.
        frozen_attention: patterns and errors frozen; norm scales move.
        actual: only the errors frozen; attention and norms move. The gap is measured against this by default.
        model: the model's own MLPs with the intervened features' change of write added, nothing frozen
            (circuit-tracer's feature_intervention with freeze_attention=False).
        model_frozen_attention: as `model` with the attention patterns frozen (circuit-tracer's default,
            freeze_attention=True).
        model_constrained: patterns, norm scales and every MLP output frozen, the intervened features' write
            added: their direct effects (circuit-tracer's constrained_layers=range(n_layers)); equal to `direct`
            up to rounding.
        min_change: below this |change| (in logits) a gap is not defined (NaN): the ratio would be noise.
    """

    interventions: list[Intervention]
    clean_activations: list[float]
    logit_tokens: torch.Tensor
    predicted: torch.Tensor
    direct: torch.Tensor
    linear: torch.Tensor
    frozen: torch.Tensor
    frozen_attention: torch.Tensor
    actual: torch.Tensor
    model: torch.Tensor
    model_frozen_attention: torch.Tensor
    model_constrained: torch.Tensor
    logit_strings: list[str] = field(default_factory=list)
    min_change: float = 1e-4

    def gap(self, against: str = "actual") -> torch.Tensor:
        """|predicted - x| / |x| per logit node [n_logits], x the change measured in run `against` (one of
        "linear", "frozen", "frozen_attention", "actual", "model", "model_frozen_attention",
        "model_constrained"); NaN where |x| < min_change."""
        if against not in MODES:
            raise ArgumentError(f"against must be one of {MODES}, got {against!r}")
        measured = getattr(self, against)
        gap = (self.predicted - measured).abs() / measured.abs()
        return torch.where(measured.abs() < self.min_change, torch.full_like(gap, math.nan), gap)

    def to_frame(self):
        """One row per logit node: token, logit (its text), predicted, direct, the seven runs (MODES: linear,
        frozen, frozen_attention, actual, model, model_frozen_attention, model_constrained), gap (against actual),
        frozen_gap."""
        import pandas as pd

        strings = self.logit_strings or [str(int(t)) for t in self.logit_tokens.tolist()]
        columns = {"token": self.logit_tokens.tolist(), "logit": strings}
        for name in ("predicted", "direct", *MODES):
            columns[name] = getattr(self, name).tolist()
        columns["gap"] = self.gap("actual").tolist()
        columns["frozen_gap"] = self.gap("frozen").tolist()
        return pd.DataFrame(columns)

    def __repr__(self) -> str:
        first = self.logit_strings[0] if self.logit_strings else str(int(self.logit_tokens[0]))
        return (
            f"InterventionResult({len(self.interventions)} features set; logit {first!r}: predicted "
            f"{float(self.predicted[0]):+.4g}, actual {float(self.actual[0]):+.4g}, gap {float(self.gap()[0]):.3g})"
        )


def intervene(
    graph,
    model,
    transcoders,
    interventions,
    *,
    scale: bool = False,
    min_change: float = 1e-4,
) -> InterventionResult:
    """Sets feature nodes of `graph` to new activations, all at once, and compares the graph's predicted change
    of each logit node with the model's (see InterventionResult for the runs).

    Args:
        graph: an AttributionGraph.
        model: the HookedLlama the graph was built on.
        transcoders: the transcoders it was built with.
        interventions: (layer, pos, feature, value) tuples, each naming a feature node of the graph.
        scale: each value multiplies the feature's activation on the prompt instead of replacing it.
        min_change: the |change| below which a gap is NaN.

    Returns:
        An InterventionResult.
    """
    if not isinstance(min_change, (int, float)) or not min_change >= 0:
        raise ArgumentError(f"min_change must be a non-negative number, got {min_change!r}")
    if model.cfg.n_layers != graph.n_layers or len(model.layer_indices) != model.cfg.n_layers:
        raise ArgumentError(
            f"the graph is of a model with {graph.n_layers} layers; intervene with that model, loaded whole "
            f"(got {len(model.layer_indices)} of {model.cfg.n_layers} layers)"
        )
    nodes, clean, values = _parse(graph, interventions, scale)
    dtype = torch.float64 if model.dtype == torch.float64 else torch.float32
    transcoders = as_transcoder_set(transcoders, graph.n_layers, dtype=dtype)
    runs = ReplacementRuns(model, graph.tokens, transcoders, graph.logit_tokens, dtype)
    _check_same_features(graph, runs)

    delta = torch.tensor(values, dtype=graph.adjacency.dtype) - torch.tensor(clean, dtype=graph.adjacency.dtype)
    predicted, direct = predict(graph, torch.tensor(nodes), delta)
    device = runs.tokens.device
    feature_nodes = graph.active_features[graph.selected_features]
    sets = _by_layer(feature_nodes[nodes], torch.tensor(values, dtype=dtype), device)
    linear_nodes = {layer: (p, f) for layer, (p, f, _) in _by_layer(feature_nodes, None, device).items()}
    # Each run is measured against a run without the intervention, frozen or not as it is, so that nothing but
    # the intervention shows up as a change. Without one, the linear and frozen runs are the same run, and so
    # are the others (a frozen pattern is the one this run computes, on the same written-out path).
    baselines = {frozen: runs.run("frozen" if frozen else "actual", {}) for frozen in (True, False)}
    measured = {mode: runs.run(mode, sets, linear_nodes) - baselines[mode in FROZEN_MODES] for mode in MODES}
    return InterventionResult(
        interventions=[(*map(int, feature_nodes[node].tolist()), value) for node, value in zip(nodes, values)],
        clean_activations=clean,
        logit_tokens=graph.logit_tokens,
        predicted=predicted,
        direct=direct,
        logit_strings=list(graph.logit_strings),
        min_change=float(min_change),
        **{mode: measured[mode].to(predicted.dtype) for mode in MODES},
    )


def predict(graph, nodes: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(total, direct) predicted change of each logit node [n_logits] when the feature nodes `nodes` [k] change
    their activations by `delta` [k] (see the module docstring)."""
    n_features = graph.n_features
    adjacency = graph.adjacency
    activations = graph.activation_values[graph.selected_features].to(adjacency.dtype)
    per_unit = adjacency[:, :n_features] / activations  # [n_nodes, n_features]
    feature_to_feature = per_unit[:n_features].clone()
    feature_to_feature[nodes] = 0  # an intervened feature's value is set; nothing below moves it
    start = torch.zeros(n_features, dtype=adjacency.dtype)
    start[nodes] = delta.to(adjacency.dtype)
    identity = torch.eye(n_features, dtype=adjacency.dtype)
    changes = torch.linalg.solve_triangular(identity - feature_to_feature, start[:, None], upper=False)[:, 0]
    to_logits = per_unit[graph.n_nodes - graph.n_logits :]
    return to_logits @ changes, to_logits @ start


def _parse(graph, interventions, scale: bool) -> tuple[list[int], list[float], list[float]]:
    """(node index, clean activation, new activation) of each intervention, refusing what the graph lacks."""
    if isinstance(interventions, tuple) and len(interventions) == 4 and not isinstance(interventions[0], tuple):
        interventions = [interventions]  # one (layer, pos, feature, value)
    if not isinstance(interventions, (list, tuple)) or not interventions:
        raise ArgumentError(
            f"interventions must be a non-empty list of (layer, pos, feature, value) tuples, got {interventions!r}"
        )
    feature_nodes = graph.active_features[graph.selected_features].tolist()
    node_of = {tuple(key): node for node, key in enumerate(feature_nodes)}
    active = {tuple(key) for key in graph.active_features.tolist()}
    nodes, clean, values = [], [], []
    for item in interventions:
        if not isinstance(item, (list, tuple)) or len(item) != 4:
            raise ArgumentError(f"each intervention is (layer, pos, feature, value), got {item!r}")
        *key, value = item
        key = tuple(_index(part, item) for part in key)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ArgumentError(f"the value of intervention {item!r} must be a finite number")
        if key not in node_of:
            raise ArgumentError(_not_a_node(graph, key, key in active))
        node = node_of[key]
        if node in nodes:
            raise ArgumentError(f"feature {_name(key)} is intervened on twice")
        activation = float(graph.activation_values[graph.selected_features[node]])
        nodes.append(node)
        clean.append(activation)
        values.append(activation * value if scale else float(value))
    return nodes, clean, values


def _index(part, item) -> int:
    if isinstance(part, torch.Tensor):
        part = part.item() if part.numel() == 1 and not part.is_floating_point() else None
    if isinstance(part, (bool, float)) or not hasattr(part, "__index__"):
        raise ArgumentTypeError(f"layer, pos and feature must be integers, got {item!r}")
    return int(part)


def _name(key: tuple[int, int, int]) -> str:
    return f"(layer {key[0]}, pos {key[1]}, feature {key[2]})"


def _not_a_node(graph, key: tuple[int, int, int], active: bool) -> str:
    layer, pos, _ = key
    if not 0 <= layer < graph.n_layers:
        why = f"layer {layer} is out of range: the model has {graph.n_layers} layers"
    elif not 0 <= pos < graph.n_pos:
        why = f"pos {pos} is out of range: the prompt has {graph.n_pos} tokens"
    elif active:
        why = "it is active but not among the graph's selected features (raise max_feature_nodes)"
    else:
        why = "it is not active on the graph's prompt"
    return f"feature {_name(key)} is not a node of this graph: {why}"


def _by_layer(keys: torch.Tensor, values: torch.Tensor | None, device) -> dict:
    """{layer: (positions, features, values)} of (layer, pos, feature) rows `keys` [k, 3]."""
    out = {}
    for layer in keys[:, 0].unique().tolist():
        mask = keys[:, 0] == layer
        out[layer] = (
            keys[mask, 1].to(device),
            keys[mask, 2].to(device),
            None if values is None else values[mask].to(device),
        )
    return out


def _check_same_features(graph, runs: ReplacementRuns) -> None:
    """The transcoders must give the graph's activations on its prompt: other transcoders (or another model)
    would make every comparison meaningless."""
    activations = torch.empty(len(graph.active_features), dtype=runs.dtype)
    for layer in graph.active_features[:, 0].unique().tolist():
        mask = graph.active_features[:, 0] == layer
        _, positions, features = graph.active_features[mask].T
        activations[mask] = runs.acts[layer][positions.to(runs.tokens.device), features.to(runs.tokens.device)].cpu()
    expected = graph.activation_values.to(activations)
    tolerance = 1e-4 * float(expected.abs().max()) if len(expected) else 0.0
    if len(expected) and not torch.allclose(activations.cpu(), expected.cpu(), rtol=1e-4, atol=tolerance):
        raise ArgumentError(
            "these transcoders and this model do not give the graph's feature activations on its prompt; "
            "intervene with the model and transcoders the graph was built with"
        )
