"""Attribution graphs with a cross-layer transcoder read from circuit-tracer's files (the exactness of CLT graphs
is in test_graph_exact.py): a CLT from `ll.load_dictionary` gives a graph whose rows sum to its nodes' values,
its exports name the features by the layer they read, and CLTs the graph cannot read are refused by name."""

import pytest
import torch
from support.dictionaries import write_clt
from support.models import tiny_config, tiny_model

import llama_lens as ll
from llama_lens.errors import ArgumentError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model(tiny_config(n_layers=2), seed=0).to(torch.float64)


def test_a_loaded_clt_gives_a_graph_whose_rows_sum_to_the_node_values(model, tmp_path):
    clt = ll.load_dictionary(write_clt(tmp_path / "clt", jumprelu=False))
    tokens = torch.randint(3, 128, (6,), generator=torch.Generator().manual_seed(0))
    graph = ll.attribution_graph(model, tokens, clt, batch_size=16)
    assert clt.dtype == torch.float32  # the graph casts what it reads; the CLT is left as it was
    assert graph.n_features > 10 and set(graph.active_features[:, 0].tolist()) == {0, 1}
    rows = torch.cat([torch.arange(graph.n_features), torch.arange(graph.n_nodes - graph.n_logits, graph.n_nodes)])
    total = graph.adjacency[rows].sum(1) + graph.node_constants[rows]
    scale = graph.adjacency[rows].abs().sum(1) + graph.node_constants[rows].abs()
    assert ((total - graph.node_values).abs() <= 1e-10 * scale).all()

    # The feature nodes' values are the CLT's pre-activations in the clean run.
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("mlp.hook_in"))
    for node, (layer, pos, feature) in enumerate(graph.active_features[graph.selected_features].tolist()):
        pre = clt.encode_pre(cache[f"blocks.{layer}.mlp.hook_in"][0, pos], layer)[feature]
        assert graph.node_values[node] == pytest.approx(float(pre), rel=1e-5, abs=1e-5)  # the CLT's float32

    data = graph.to_json(tmp_path / "graph.json", slug="clt", scan="random-clt")
    features = [node for node in data["nodes"] if node["feature_type"] == "cross layer transcoder"]
    assert features and all(node["layer"] in ("0", "1") for node in features)
    assert data["metadata"]["scan"] == "random-clt"


def test_a_clt_in_a_list_is_taken_as_the_clt(model, tmp_path):
    clt = ll.load_dictionary(write_clt(tmp_path / "clt"))
    tokens = torch.randint(3, 128, (5,), generator=torch.Generator().manual_seed(1))
    alone = ll.attribution_graph(model, tokens, clt, max_feature_nodes=8)
    listed = ll.attribution_graph(model, tokens, [clt], max_feature_nodes=8)
    assert torch.equal(alone.adjacency, listed.adjacency)


def test_clts_the_graph_cannot_read_are_refused_by_name(model, tmp_path):
    tokens = torch.randint(3, 128, (5,))
    resid_mid = ll.load_dictionary(write_clt(tmp_path / "resid_mid", input_hook="hook_resid_mid"))
    with pytest.raises(ArgumentError, match=r"resid_mid: the CLT reads blocks\.0\.hook_resid_mid.*mlp\.hook_in"):
        ll.attribution_graph(model, tokens, resid_mid)
    three = ll.load_dictionary(write_clt(tmp_path / "three", n_layers=3))
    with pytest.raises(ArgumentError, match="the CLT spans 3 layers and the model has 2"):
        ll.attribution_graph(model, tokens, three)
