"""Offloaded graphs (`offload=True`): the rows go to disk while they are computed and the adjacency is a memory
map, and the graph, its ranking of features by influence, pruning, scores, tables and exports are those of the
graph held in memory."""

import json
import os

import pytest
import torch
from random_transcoders import random_transcoders
from support.models import tiny_config, tiny_model

import llama_lens as ll
from llama_lens.graphs import offload as offload_module
from llama_lens.graphs.influence import partial_influences, partial_influences_by_chunks
from llama_lens.model import memory as memory_module

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_config(n_layers=3)
    model = tiny_model(cfg, seed=4).to(torch.float64)
    transcoders = random_transcoders(cfg.d_model, 3, skip=True, seed=4)
    tokens = torch.randint(3, cfg.d_vocab, (7,), generator=torch.Generator().manual_seed(4))
    return model, transcoders, tokens


def graphs(setup, tmp_path, **kwargs):
    model, transcoders, tokens = setup
    held = ll.attribution_graph(model, tokens, transcoders, offload=False, **kwargs)
    offloaded = ll.attribution_graph(model, tokens, transcoders, offload=True, offload_dir=tmp_path, **kwargs)
    return held, offloaded


def test_an_offloaded_graph_is_the_graph_held_in_memory(setup, tmp_path, monkeypatch):
    # Chunks of three rows: the influence ranking and the last step read the rows back over several chunks.
    monkeypatch.setattr(offload_module, "CHUNK_BYTES", 3 * 8 * 2000)
    held, offloaded = graphs(setup, tmp_path, max_feature_nodes=30, batch_size=4, update_interval=2)
    assert len(held.active_features) > 40 and held.n_features == 30  # the budget ranks features 4 times
    assert torch.equal(offloaded.selected_features, held.selected_features)
    torch.testing.assert_close(offloaded.adjacency, held.adjacency, rtol=0, atol=1e-12)
    assert torch.equal(offloaded.node_constants, held.node_constants)
    # The adjacency is a map of a file already unlinked: nothing is left in the folder.
    assert os.listdir(tmp_path) == []
    if os.path.exists("/proc/self/maps"):
        with open("/proc/self/maps") as maps:
            assert any(f"{tmp_path}/" in line and "(deleted)" in line for line in maps)
    # The result's methods read it as they read a tensor in memory.
    for a, b in zip(offloaded.prune(0.8, 0.95), held.prune(0.8, 0.95), strict=True):
        assert torch.equal(a, b)
    assert offloaded.scores() == pytest.approx(held.scores(), rel=1e-12)
    assert offloaded.nodes_frame().equals(held.nodes_frame())
    assert offloaded.edges_frame().equals(held.edges_frame())
    exported = offloaded.to_json(tmp_path / "offloaded.json", slug="g")
    assert exported == json.loads(json.dumps(held.to_json(tmp_path / "held.json", slug="g")))


def test_every_feature_without_a_budget_offloaded(setup, tmp_path):
    held, offloaded = graphs(setup, tmp_path, batch_size=16)
    assert offloaded.n_features == len(held.active_features)
    torch.testing.assert_close(offloaded.adjacency, held.adjacency, rtol=0, atol=1e-12)


def test_chunked_influence_is_the_influence_of_the_rows_in_memory():
    generator = torch.Generator().manual_seed(0)
    n_columns, n_logits = 40, 3
    # Rows of 3 logits then 12 features (nodes 0..11); a feature's row reads only features below it (acyclic).
    row_to_node = torch.cat([torch.arange(n_logits) + n_columns, torch.randperm(12, generator=generator)])
    rows = torch.randn(len(row_to_node), n_columns, generator=generator, dtype=torch.float64)
    for row, node in enumerate(row_to_node.tolist()):
        if node < n_columns:
            rows[row, node:12] = 0
    probabilities = torch.tensor([0.5, 0.3, 0.1], dtype=torch.float64)
    edge_matrix = torch.cat([rows, rows.new_zeros(len(rows), n_logits)], dim=1)
    expected = partial_influences(edge_matrix, probabilities, row_to_node)

    def chunks():
        return ((start, rows[start : start + 4]) for start in range(0, len(rows), 4))

    actual = partial_influences_by_chunks(chunks, n_columns, probabilities, row_to_node)
    assert expected[:12].abs().min() > 0
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(offload="yes"), "offload must be True, False or 'auto'"),
        (dict(offload_dir="/no/such/folder"), "offload_dir"),
    ],
)
def test_bad_offload_options_are_refused_before_the_run(setup, kwargs, message):
    model, transcoders, tokens = setup
    with pytest.raises(ll.errors.ArgumentError, match=message):
        ll.attribution_graph(model, tokens, transcoders, **kwargs)


def test_auto_offloads_when_the_rows_would_take_a_quarter_of_the_memory_available(monkeypatch):
    monkeypatch.setattr(memory_module, "available_memory", lambda device: 4000)
    assert offload_module.resolve_offload("auto", 1001) and not offload_module.resolve_offload("auto", 1000)
    monkeypatch.setattr(memory_module, "available_memory", lambda device: None)
    assert not offload_module.resolve_offload("auto", 10**15)
