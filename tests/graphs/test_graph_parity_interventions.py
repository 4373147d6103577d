"""Parity of graph interventions with circuit-tracer 0.5.0's `feature_intervention`, on the graph of
test_graph_parity.py (SmolLM2-135M-Instruct in float32, 30 small random ReLU transcoders).

Three features of the graph, each set to 0 and to half its activation, then two at once (one set to 0, the other
to five times its activation), each run three ways, circuit-tracer's protocols under our names:

    model                   freeze_attention=False: the model's own MLPs, nothing frozen
    model_frozen_attention  freeze_attention=True (its default): attention patterns frozen, norm scales move
    model_constrained       constrained_layers=range(30): patterns, norm scales and MLP outputs frozen (direct effects)

circuit-tracer's logits (of the graph's logit tokens minus the mean logit, at the last position) were recorded by
`scripts/parity/record_graph.py --interventions` into data/graph_parity_interventions.npz (2.7 kB).
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import llama_lens as ll

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GRAPH = Path(__file__).parent / "data" / "graph_parity.npz"
INTERVENTIONS = Path(__file__).parent / "data" / "graph_parity_interventions.npz"
RECORDER = Path(__file__).parents[2] / "scripts" / "parity" / "record_graph.py"
PROTOCOLS = ("model", "model_frozen_attention", "model_constrained")


@pytest.fixture(scope="module")
def setup(demo_path, tmp_path_factory):
    spec = importlib.util.spec_from_file_location("record_graph", RECORDER)
    recorder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recorder)
    b_enc = np.load(GRAPH)["b_enc"]
    folder = recorder.write_set(tmp_path_factory.mktemp("transcoders") / "set", b_enc)
    model = ll.load(demo_path, dtype=torch.float32, progress=False)
    transcoders = ll.load_dictionary(folder)
    recorded = dict(np.load(INTERVENTIONS))
    graph = ll.attribution_graph(
        model,
        torch.as_tensor(recorded["tokens"]),
        transcoders,
        max_feature_nodes=recorder.MAX_FEATURE_NODES,
        batch_size=recorder.BATCH_SIZE,
    )
    return model, transcoders, graph, recorded


def _cases(recorded) -> list[list[tuple[int, int, int, float]]]:
    """The recorded cases [n_cases, 2, 4] as lists of (layer, pos, feature, value); a NaN value pads a
    one-feature case."""
    cases = []
    for rows in recorded["cases"]:
        kept = rows[~np.isnan(rows[:, 3])]
        cases.append([(int(layer), int(pos), int(feature), float(value)) for layer, pos, feature, value in kept])
    return cases


def test_interventions_match_circuit_tracer(setup):
    model, transcoders, graph, recorded = setup
    np.testing.assert_array_equal(graph.logit_tokens.numpy(), recorded["logit_tokens"])
    scale = np.abs(recorded["clean"]).max()  # the size of a logit: what float32 rounds
    cases = _cases(recorded)
    assert len(cases) == 7 and len(cases[-1]) == 2
    for i, case in enumerate(cases):
        result = graph.intervene(model, transcoders, case)
        for name in PROTOCOLS:
            theirs = recorded[name][i] - recorded["clean"]  # circuit-tracer's change of each logit node
            ours = getattr(result, name).numpy()
            assert np.abs(theirs).max() > 3e-5 * scale, (i, name)  # a change above rounding, to compare
            assert np.abs(ours - theirs).max() <= 1e-5 * scale, (i, name, ours[:3], theirs[:3])
        # circuit-tracer's constrained run is the graph's direct effect.
        assert np.abs(result.direct.numpy() - (recorded["model_constrained"][i] - recorded["clean"])).max() <= (
            1e-5 * scale
        )


def test_the_protocols_differ_on_this_graph(setup):
    # The three protocols are not one run under three names: on this graph they disagree well beyond rounding.
    recorded = setup[3]
    changes = {name: recorded[name] - recorded["clean"] for name in PROTOCOLS}
    size = max(np.abs(change).max() for change in changes.values())
    for first, second in [("model", "model_frozen_attention"), ("model_frozen_attention", "model_constrained")]:
        assert np.abs(changes[first] - changes[second]).max() > 0.1 * size
