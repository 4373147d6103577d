"""Graph results: the feature budget, pruning and scores, the tidy tables, the exports circuit-tracer reads, and
the errors bad input gets."""

import json
import pickle
import types
from collections import namedtuple

import pytest
import torch
from random_transcoders import random_transcoders
from support.models import tiny_config, tiny_model

import llama_lens as ll

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_config(n_layers=3)
    model = tiny_model(cfg, seed=2)
    transcoders = random_transcoders(cfg.d_model, 3, skip=True, seed=2, dtype=torch.float32)
    tokens = torch.randint(3, cfg.d_vocab, (6,), generator=torch.Generator().manual_seed(2))
    return model, transcoders, tokens


@pytest.fixture(scope="module")
def full(setup):
    return ll.attribution_graph(setup[0], setup[2], setup[1], batch_size=32)


def test_budget_keeps_the_most_influential_features_with_the_same_rows(setup, full):
    model, transcoders, tokens = setup
    budget = ll.attribution_graph(model, tokens, transcoders, max_feature_nodes=25, batch_size=8, update_interval=1)
    assert budget.n_features == 25 and len(budget.active_features) == full.n_features
    selected = budget.selected_features
    assert bool((selected.diff() > 0).all())  # in node order
    # A selected feature's row is its row in the full graph, restricted to the columns the budget kept.
    columns = torch.cat([selected, torch.arange(full.n_features, full.n_nodes)])
    torch.testing.assert_close(budget.adjacency[:25], full.adjacency[selected][:, columns], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(budget.adjacency[-budget.n_logits :], full.adjacency[-full.n_logits :][:, columns])
    # The first features visited are those the logit rows alone rank highest.
    from llama_lens.graphs.influence import normalize_matrix

    logit_rows = normalize_matrix(full.adjacency[-full.n_logits :])
    direct = (full.logit_probabilities @ logit_rows)[: full.n_features]
    assert int(direct.argmax()) in selected.tolist()


def test_pruning_keeps_tokens_and_logits_and_scores_lie_in_0_1(full):
    node_mask, edge_mask, cumulative = full.prune(0.8, 0.95)
    n_kept_always = full.n_pos + full.n_logits
    assert bool(node_mask[-n_kept_always:].all())
    assert 0 < int(node_mask[: full.n_features].sum()) < full.n_features
    # Kept edges join kept nodes only; every kept feature has an edge in and out.
    targets, sources = edge_mask.nonzero(as_tuple=True)
    assert bool(node_mask[targets].all() and node_mask[sources].all())
    kept_features = node_mask[: full.n_features].nonzero().flatten()
    assert bool(edge_mask[kept_features].any(1).all()) and bool(edge_mask[:, kept_features].any(0).all())
    assert float(cumulative.max()) == pytest.approx(1.0)
    replacement, completeness = full.scores()
    assert 0 < replacement < 1 and 0 < completeness < 1
    assert full.prune(1.0, 1.0).node_mask.sum() >= node_mask.sum()
    with pytest.raises(ll.LlamaLensError, match="node_threshold"):
        full.prune(node_threshold=1.5)


def test_tables_list_every_node_and_kept_edge(full):
    nodes = full.nodes_frame()
    assert len(nodes) == full.n_nodes
    assert nodes["kind"].value_counts().to_dict() == {
        "feature": full.n_features,
        "error": full.n_layers * full.n_pos,
        "embedding": full.n_pos,
        "logit": full.n_logits,
    }
    edges = full.edges_frame()
    assert len(edges) == int(((full.adjacency != 0) & full.prune().edge_mask).sum())
    row = edges.iloc[0]
    assert full.adjacency[int(row.target), int(row.source)] == pytest.approx(row.weight)
    assert len(full.edges_frame(pruned=False)) == int((full.adjacency != 0).sum())


def test_json_export_has_circuit_tracers_node_ids_and_links(full, tmp_path):
    data = full.to_json(tmp_path / "graph.json", slug="tiny", scan="random")
    assert json.loads((tmp_path / "graph.json").read_text()) == data
    assert set(data) == {"metadata", "qParams", "nodes", "links"}
    ids = {node["node_id"]: node for node in data["nodes"]}
    layer, pos, feature = full.active_features[full.selected_features[0]].tolist()
    logit = ids[f"{full.n_layers + 1}_{int(full.logit_tokens[0])}_{full.n_pos - 1}"]
    assert logit["is_target_logit"] and logit["feature_type"] == "logit"
    assert f"E_{int(full.tokens[0])}_0" in ids
    for link in data["links"]:
        assert link["source"] in ids and link["target"] in ids
    assert {n["feature_type"] for n in data["nodes"]} >= {"embedding", "logit"}
    assert data["metadata"]["slug"] == "tiny" and data["metadata"]["prompt_tokens"] == full.str_tokens
    del layer, pos, feature


def test_pt_export_holds_what_graph_from_pt_takes(full, tmp_path):
    full.to_pt(tmp_path / "graph.pt", scan="random")
    # Stand-ins for circuit-tracer's classes, found where the file asks for them.
    LogitTarget = namedtuple("LogitTarget", "token_str vocab_idx")  # noqa: PYI024
    UnifiedConfig = types.SimpleNamespace(from_dict=lambda d: ("cfg", d))
    modules = {
        "circuit_tracer.attribution.targets": types.SimpleNamespace(LogitTarget=LogitTarget),
        "circuit_tracer.utils.tl_nnsight_mapping": types.SimpleNamespace(UnifiedConfig=UnifiedConfig),
    }

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) == ("importlib", "import_module"):
                return modules.__getitem__
            return super().find_class(module, name)

    fake_pickle = types.SimpleNamespace(Unpickler=Unpickler, load=pickle.load, __name__="pickle")
    data = torch.load(tmp_path / "graph.pt", pickle_module=fake_pickle, weights_only=False)
    assert set(data) == {
        "input_string", "adjacency_matrix", "cfg", "active_features", "logit_targets", "logit_probabilities",
        "vocab_size", "input_tokens", "selected_features", "activation_values", "scan",
    }  # fmt: skip
    assert data["cfg"][1]["n_layers"] == full.n_layers and data["cfg"][1]["original_architecture"] == "LlamaForCausalLM"
    assert [t.vocab_idx for t in data["logit_targets"]] == full.logit_tokens.tolist()
    torch.testing.assert_close(data["adjacency_matrix"], full.adjacency)


def test_bad_input_is_refused_by_name(setup):
    model, transcoders, tokens = setup
    with pytest.raises(ll.LlamaLensError, match=r"none for layers \[2\]"):
        ll.attribution_graph(model, tokens, transcoders[:2])
    sae = random_transcoders(64, 3, seed=3, dtype=torch.float32)
    sae[1].hook_out = "blocks.1.hook_resid_post"
    with pytest.raises(ll.LlamaLensError, match="blocks.1.hook_resid_post"):
        ll.attribution_graph(model, tokens, sae)
    with pytest.raises(ll.LlamaLensError, match="Dictionary"):
        ll.attribution_graph(model, tokens, ["layer_0.safetensors"] * 3)
    with pytest.raises(ll.LlamaLensError, match="one prompt"):
        ll.attribution_graph(model, torch.stack([tokens, tokens]), transcoders)
    with pytest.raises(ll.LlamaLensError, match="batch_size"):
        ll.attribution_graph(model, tokens, transcoders, batch_size=0)
    partial = tiny_model(tiny_config(n_layers=3), seed=2, layers=[0, 1])
    with pytest.raises(ll.LlamaLensError, match="every layer"):
        ll.attribution_graph(partial, tokens, transcoders)
