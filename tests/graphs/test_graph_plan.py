"""`ll.plan(..., graph={...})`: what an attribution graph adds to a pass's memory, counted from its shapes."""

import pytest
from support.dictionaries import write_circuit_tracer, write_sparsify
from support.models import tiny_config

import llama_lens as ll

CFG = tiny_config(n_layers=3)  # d_model 64, 4 heads, vocab 128


@pytest.fixture(scope="module")
def transcoders(tmp_path_factory):
    return ll.load_dictionary(write_circuit_tracer(tmp_path_factory.mktemp("set"), 3, d_model=64, d_sae=32))


def planned(transcoders, tokens=64, **graph):
    job = dict(transcoders=transcoders, active_features=600, max_feature_nodes=100, batch_size=16) | graph
    return ll.plan(CFG, stream=True, tokens=tokens, dtype="float32", cache=None, unembed="memory", graph=job)


def test_the_graph_adds_its_rows_unless_they_are_offloaded(transcoders):
    offloaded, held = planned(transcoders, offload=True), planned(transcoders, offload=False)
    assert 0 < offloaded.graph_bytes < held.graph_bytes
    assert held.peak_bytes - held.graph_bytes == offloaded.peak_bytes - offloaded.graph_bytes  # the plain pass
    # In memory: the rows [max_feature_nodes + logits, active + (layers + 1) * tokens + logits] in float32, with a
    # batch's pass or the ranking's two copies of them in turn; offloaded, a batch's pass or the ranking's square.
    rows = (100 + 10) * (600 + 4 * 64 + 10) * 4
    batch = 16 * (600 + 4 * 64 + 5 * 64 * 64) * 4  # its row block and five gradients [16, 64, 64]
    in_memory, on_disk = rows + max(batch, 2 * rows), max(batch, (100 + 10) ** 2 * 4)
    assert held.graph_bytes - offloaded.graph_bytes == in_memory - on_disk
    assert "attribution graph" in repr(held) and "attribution graph" in held.to_frame().index
    assert "attribution graph" not in repr(ll.plan(CFG, tokens=64, cache=None))


def test_a_longer_prompt_or_more_features_need_more(transcoders):
    assert planned(transcoders, active_features=6000).peak_bytes > planned(transcoders).peak_bytes
    assert planned(transcoders, tokens=256).peak_bytes > planned(transcoders).peak_bytes


def test_the_default_active_count_is_k_per_token_for_topk(tmp_path):
    topk = [ll.load_dictionary(write_sparsify(tmp_path / f"layers.{i}.mlp", k=4, transcode=True)) for i in range(3)]
    assert planned(topk, active_features=None).peak_bytes == planned(topk, active_features=4 * 63 * 3).peak_bytes


@pytest.mark.parametrize(
    ("graph", "kwargs", "message"),
    [
        (dict(max_features=3), {}, "graph= takes ll.attribution_graph's keywords"),
        (dict(transcoders=[]), dict(batch=2), "batch=1"),
    ],
)
def test_bad_graph_plans_are_refused(graph, kwargs, message):
    with pytest.raises(ll.errors.ArgumentError, match=message):
        ll.plan(CFG, stream=True, tokens=8, cache=None, graph=graph, **kwargs)
