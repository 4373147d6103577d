"""Parity with circuit-tracer 0.5.0 on the embedded model (SmolLM2-135M-Instruct, float32) with 30 small random
ReLU transcoders, and with a small random ReLU cross-layer transcoder over the 30 layers: the same active
features, selected features and logit targets, the same adjacency rows within 1e-4 of its largest entry, the same
replacement and completeness scores and pruned node set.

circuit-tracer's numbers were recorded by scripts/parity/record_graph.py into data/graph_parity.npz (68 kB) and,
with --clt, data/graph_parity_clt.npz (64 kB); the transcoders are rebuilt here from the same seeded numpy
generator and the recorded encoder biases.
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import llama_lens as ll

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FIXTURES = {
    "per-layer": Path(__file__).parent / "data" / "graph_parity.npz",
    "clt": Path(__file__).parent / "data" / "graph_parity_clt.npz",
}
RECORDER = Path(__file__).parents[2] / "scripts" / "parity" / "record_graph.py"


def _recorder():
    spec = importlib.util.spec_from_file_location("record_graph", RECORDER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", params=list(FIXTURES))
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def recorded(kind):
    return dict(np.load(FIXTURES[kind]))


@pytest.fixture(scope="module")
def graph(demo_path, kind, recorded, tmp_path_factory):
    recorder = _recorder()
    write = recorder.write_clt if kind == "clt" else recorder.write_set
    folder = write(tmp_path_factory.mktemp("transcoders") / kind, recorded["b_enc"])
    model = ll.load(demo_path, dtype=torch.float32, progress=False)
    transcoders = ll.load_dictionary(folder)
    return ll.attribution_graph(
        model,
        torch.as_tensor(recorded["tokens"]),
        transcoders,
        max_feature_nodes=recorder.MAX_FEATURE_NODES,
        batch_size=recorder.BATCH_SIZE,
    )


def test_same_nodes_as_circuit_tracer(graph, recorded):
    np.testing.assert_array_equal(graph.active_features.numpy(), recorded["active_features"])
    np.testing.assert_allclose(graph.activation_values.numpy(), recorded["activation_values"], rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(graph.logit_tokens.numpy(), recorded["logit_tokens"])
    np.testing.assert_allclose(graph.logit_probabilities.numpy(), recorded["logit_probabilities"], atol=1e-5)
    np.testing.assert_array_equal(np.sort(graph.selected_features.numpy()), np.sort(recorded["selected_features"]))


def test_adjacency_scores_and_pruning_match_circuit_tracer(graph, recorded):
    n_features, n_logits = graph.n_features, graph.n_logits
    ours = torch.cat([graph.adjacency[:n_features], graph.adjacency[-n_logits:]]).numpy()
    theirs = np.concatenate([recorded["feature_rows"], recorded["logit_rows"]])
    scale = np.abs(theirs).max()
    assert np.abs(ours - theirs).max() <= 1e-4 * scale
    assert graph.adjacency[n_features:-n_logits].abs().max() == 0  # error and token rows are empty, as theirs
    np.testing.assert_allclose(graph.scores(), recorded["scores"], atol=1e-4)
    np.testing.assert_array_equal(graph.prune().node_mask.numpy(), recorded["node_mask"])
