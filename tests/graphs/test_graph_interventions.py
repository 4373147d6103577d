"""Interventions on attribution graphs, on the tiny random Llama in float64 with random transcoders:

- the graph's linear prediction equals the model run with patterns, norm scales and errors frozen and the graph's
  features moving linearly (the "linear" run goes through the hooked model, not the adjacency);
- a small scaling (1 ± 1e-7) run through the transcoders' real activation functions ("frozen") matches it to
  1e-8: no feature switches, and the graph is the exact derivative;
- hostile interventions are refused by name.
"""

import math

import pytest
import torch
from random_transcoders import random_transcoders
from support.models import tiny_config, tiny_model

import llama_lens as ll
from llama_lens.errors import ArgumentError, ArgumentTypeError
from llama_lens.graphs.replacement_runs import MODES

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_LAYERS = 4


def _setup(activation="relu", skip=False, seed=0, **graph_options):
    cfg = tiny_config(n_layers=N_LAYERS)
    model = tiny_model(cfg, seed=seed).to(torch.float64)
    transcoders = random_transcoders(cfg.d_model, N_LAYERS, activation=activation, skip=skip, seed=seed)
    tokens = torch.randint(3, cfg.d_vocab, (7,), generator=torch.Generator().manual_seed(seed))
    graph = ll.attribution_graph(model, tokens, transcoders, batch_size=16, **graph_options)
    return model, transcoders, graph


def _relative(x, reference):
    return float((x - reference).abs().max() / reference.abs().max())


@pytest.mark.parametrize(("activation", "skip"), [("relu", False), ("jumprelu", True), ("topk", True)])
def test_the_linear_run_is_the_graphs_prediction(activation, skip):
    model, transcoders, graph = _setup(activation, skip)
    first, _, third = graph.top_features(3)
    result = graph.intervene(model, transcoders, [(*first, 1.5), (*third, 0.0)], scale=True, min_change=0)
    assert result.predicted.abs().max() > 1e-2
    # Indirect effects (through downstream features) are part of the prediction, and they are not small here.
    assert _relative(result.direct, result.predicted) > 1e-2
    assert _relative(result.linear, result.predicted) < 1e-10
    assert result.interventions[0][:3] == first and result.interventions[1][3] == 0.0
    assert result.interventions[0][3] == pytest.approx(1.5 * result.clean_activations[0], rel=1e-15)


@pytest.mark.parametrize(("activation", "skip"), [("relu", False), ("jumprelu", True), ("topk", True)])
def test_a_small_scaling_through_the_real_activations_matches_the_prediction(activation, skip):
    model, transcoders, graph = _setup(activation, skip)
    first, second, _ = graph.top_features(3)
    result = graph.intervene(model, transcoders, [(*first, 1 + 1e-7), (*second, 1 - 1e-7)], scale=True, min_change=0)
    assert result.predicted.abs().max() > 1e-3
    assert _relative(result.frozen, result.predicted) < 1e-8
    assert (result.gap("frozen") < 1e-6).all()


def test_with_a_feature_budget_the_linear_run_holds_the_features_outside_the_graph():
    model, transcoders, graph = _setup("relu", False, seed=1, max_feature_nodes=40)
    assert graph.n_features == 40 < len(graph.active_features)
    result = graph.intervene(model, transcoders, [(*graph.top_features(1)[0], 3.0)], scale=True, min_change=0)
    assert result.predicted.abs().max() > 1e-3
    assert _relative(result.linear, result.predicted) < 1e-10


def test_a_last_layer_feature_acts_directly_and_the_spliced_model_is_the_model():
    model, transcoders, graph = _setup("relu", False)
    last = [key for key in graph.top_features(graph.n_features, logit=None) if key[0] == N_LAYERS - 1][0]
    result = graph.intervene(model, transcoders, [(*last, 0.0)], min_change=0)
    # Nothing downstream but the final norm: the direct effect is all of it, and with no MLP above, the model's
    # own MLPs and the transcoders with frozen errors agree.
    torch.testing.assert_close(result.predicted, result.direct, rtol=0, atol=1e-12)
    torch.testing.assert_close(result.actual, result.model, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(result.frozen, result.predicted, rtol=1e-9, atol=1e-12)
    assert result.actual.abs().max() > 1e-4
    # No attention above it: freezing the patterns changes nothing, while ln_final's scale moving does.
    torch.testing.assert_close(result.frozen_attention, result.actual, rtol=1e-9, atol=1e-12)
    assert (result.actual - result.frozen).abs().max() > 1e-3 * result.actual.abs().max()


@pytest.mark.parametrize(("activation", "skip"), [("relu", False), ("jumprelu", True)])
def test_the_constrained_model_run_is_the_direct_effect(activation, skip):
    # circuit-tracer's constrained_layers=range(n_layers): patterns, norm scales and MLP outputs frozen, so only
    # the intervened features' own writes (and a skip connection's linear pass) reach the logits.
    model, transcoders, graph = _setup(activation, skip)
    first, _, third = graph.top_features(3)
    result = graph.intervene(model, transcoders, [(*first, 0.0), (*third, 2.0)], scale=True, min_change=0)
    assert result.direct.abs().max() > 1e-3
    assert _relative(result.model_constrained, result.direct) < 1e-10
    # The unconstrained model runs let the features' effects travel through the MLPs above: not the direct effect.
    assert _relative(result.model_frozen_attention, result.direct) > 1e-3


def test_freezing_the_patterns_of_the_model_run_changes_it_only_through_attention():
    model, transcoders, graph = _setup("relu", False)
    last = [key for key in graph.top_features(graph.n_features, logit=None) if key[0] == N_LAYERS - 1][0]
    result = graph.intervene(model, transcoders, [(*last, 0.0)], min_change=0)
    # No attention above the last layer: freezing the patterns changes nothing.
    torch.testing.assert_close(result.model_frozen_attention, result.model, rtol=1e-9, atol=1e-12)
    first = graph.top_features(1)[0]
    assert first[0] < N_LAYERS - 1
    result = graph.intervene(model, transcoders, [(*first, 0.0)], min_change=0)
    assert (result.model_frozen_attention - result.model).abs().max() > 1e-6 * result.model.abs().max()


def test_setting_a_feature_to_its_own_value_changes_nothing():
    model, transcoders, graph = _setup("jumprelu", False)
    result = graph.intervene(model, transcoders, [(*graph.top_features(1)[0], 1.0)], scale=True)
    assert (result.predicted == 0).all() and (result.direct == 0).all()
    for name in MODES:
        assert getattr(result, name).abs().max() < 1e-8, name
    # Changes under min_change have no gap: the ratio would be rounding noise.
    assert torch.isnan(result.gap()).all()


def test_gap_and_frame():
    model, transcoders, graph = _setup("relu", False)
    result = graph.intervene(model, transcoders, [(*graph.top_features(1)[0], 0.0)], min_change=1e-3)
    actual = result.actual
    expected = (result.predicted - actual).abs() / actual.abs()
    defined = actual.abs() >= 1e-3
    assert defined.any()
    torch.testing.assert_close(result.gap()[defined], expected[defined])
    assert torch.isnan(result.gap()[~defined]).all()
    frame = result.to_frame()
    assert list(frame.columns) == [
        "token", "logit", "predicted", "direct", "linear", "frozen", "frozen_attention", "actual", "model",
        "model_frozen_attention", "model_constrained", "gap", "frozen_gap",
    ]  # fmt: skip
    assert len(frame) == graph.n_logits and frame["token"].tolist() == graph.logit_tokens.tolist()
    assert "gap" in repr(result)
    with pytest.raises(ArgumentError, match="against"):
        result.gap("exact")


def test_top_features_rank_by_influence_on_the_chosen_logit():
    _, _, graph = _setup("relu", False)
    every = graph.top_features(graph.n_features)
    assert sorted(every) == sorted(map(tuple, graph.active_features[graph.selected_features].tolist()))
    assert graph.top_features(3) == every[:3]
    assert graph.top_features(2, logit=1) != graph.top_features(2, logit=0) or graph.n_logits == 1
    for bad in (0, -1, 2.5):
        with pytest.raises(ArgumentError, match="n must"):
            graph.top_features(bad)
    with pytest.raises(ArgumentError, match="logit"):
        graph.top_features(3, logit=graph.n_logits)


def test_hostile_interventions_are_refused_by_name():
    model, transcoders, graph = _setup("relu", False, seed=1, max_feature_nodes=40)
    selected = {tuple(k) for k in graph.active_features[graph.selected_features].tolist()}
    outside = next(tuple(k) for k in graph.active_features.tolist() if tuple(k) not in selected)
    layer, pos, feature = next(iter(selected))
    inactive = next(
        (layer, pos, f) for f in range(48) if (layer, pos, f) not in {tuple(k) for k in graph.active_features.tolist()}
    )
    cases = [
        ([(9, pos, feature, 0.0)], "layer 9 is out of range"),
        ([(layer, 50, feature, 0.0)], "pos 50 is out of range"),
        ([(*outside, 0.0)], f"feature \\(layer {outside[0]}, pos {outside[1]}, feature {outside[2]}\\).*selected"),
        ([(*inactive, 0.0)], "not active"),
        ([(layer, pos, feature, 0.0), (layer, pos, feature, 1.0)], "twice"),
        ([(layer, pos, feature, math.nan)], "finite"),
        ([(layer, pos, feature, "big")], "finite"),
        ([(layer, pos, feature)], "\\(layer, pos, feature, value\\)"),
        ([], "non-empty"),
        ("feature", "non-empty"),
    ]
    for interventions, message in cases:
        with pytest.raises(ArgumentError, match=message):
            graph.intervene(model, transcoders, interventions)
    for bad_layer in (float(layer), torch.tensor([layer, layer]), True):
        with pytest.raises(ArgumentTypeError, match="integers"):
            graph.intervene(model, transcoders, [(bad_layer, pos, feature, 0.0)])
    # One-element integer tensors are indices like any other.
    result = graph.intervene(model, transcoders, [(torch.tensor(layer), pos, torch.tensor(feature), 0.0)])
    assert result.interventions[0][:3] == (layer, pos, feature)
    with pytest.raises(ArgumentError, match="min_change"):
        graph.intervene(model, transcoders, [(layer, pos, feature, 0.0)], min_change=-1)
    # Other transcoders (or another model) would make every comparison meaningless.
    others = random_transcoders(model.cfg.d_model, N_LAYERS, seed=5)
    with pytest.raises(ArgumentError, match="built with"):
        graph.intervene(model, others, [(layer, pos, feature, 0.0)])
