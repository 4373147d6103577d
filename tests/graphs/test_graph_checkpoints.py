"""An attribution graph is the same whichever checkpoint layout the model was read from (Hugging Face, Meta's
consolidated.*.pth, an F32 GGUF), loaded whole or streamed, with its unembedding held or streamed."""

import pytest
import torch
from random_transcoders import random_transcoders
from support.llama_cpp import write_gguf
from support.models import tiny_config

import llama_lens as ll
from llama_lens.testing import random_state_dict, write_hf_checkpoint, write_meta_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_LAYERS = 3
CFG = tiny_config(n_layers=N_LAYERS)


def _f32_gguf(path, state):
    """A llama.cpp-style F32 GGUF of `state` (q/k rows permuted as convert_hf_to_gguf.py does)."""
    pytest.importorskip("gguf")
    write_gguf(path, CFG, state, qtype="F32")
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("graph_checkpoints")
    state = random_state_dict(CFG, seed=2)
    return {
        "hf": write_hf_checkpoint(folder / "hf", CFG, state, shards=2),
        "meta": write_meta_checkpoint(folder / "meta", CFG, state, mp=2),
        "gguf": _f32_gguf(folder / "tiny.gguf", state),
    }


def graph_of(path, **load_kwargs):
    model = ll.load(path, dtype=torch.float64, progress=False, index_cache=False, **load_kwargs)
    transcoders = random_transcoders(CFG.d_model, N_LAYERS, activation="relu", skip=True, seed=3)
    tokens = torch.randint(3, CFG.d_vocab, (8,), generator=torch.Generator().manual_seed(4))
    return ll.attribution_graph(model, tokens, transcoders, batch_size=8, max_feature_nodes=30)


@pytest.fixture(scope="module")
def reference(checkpoints):
    return graph_of(checkpoints["hf"])


@pytest.mark.parametrize(
    ("layout", "load_kwargs"),
    [
        ("hf", dict(stream=True)),
        ("hf", dict(stream=True, unembed="stream")),
        ("meta", {}),
        ("meta", dict(stream=True)),
        ("gguf", {}),
        ("gguf", dict(stream=True)),
    ],
    ids=["hf-streamed", "hf-streamed-unembed", "meta", "meta-streamed", "gguf", "gguf-streamed"],
)
def test_every_layout_loaded_or_streamed_gives_the_same_graph(checkpoints, reference, layout, load_kwargs):
    graph = graph_of(checkpoints[layout], **load_kwargs)
    assert reference.n_features == 30 and reference.adjacency.abs().max() > 1e-2
    assert torch.equal(graph.active_features, reference.active_features)
    assert torch.equal(graph.selected_features, reference.selected_features)
    assert torch.equal(graph.logit_tokens, reference.logit_tokens)
    # The same float32 weights in another layout (q/k rows permuted, model-parallel pieces joined): the same
    # numbers up to the order of float64 sums.
    torch.testing.assert_close(graph.adjacency, reference.adjacency, rtol=0, atol=1e-10)
    torch.testing.assert_close(graph.node_constants, reference.node_constants, rtol=0, atol=1e-10)
    torch.testing.assert_close(graph.node_values, reference.node_values, rtol=0, atol=1e-10)
