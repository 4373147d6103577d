"""`ll.train_transcoder_set` on a tiny model: one forward pass fills every layer's store, the set it writes is what
`ll.load_dictionary` and `ll.attribution_graph` read, a second call loads it from the cache, a killed run leaves
nothing under the set's name and resumes, and bad arguments are refused by name."""

import json

import pytest
import torch
from support.models import tiny_config, tiny_model

import llama_lens as ll
from llama_lens.dictionaries import train_set
from llama_lens.dictionaries.train_data import collect_activations, collect_stores
from llama_lens.errors import ArgumentError, ArgumentTypeError, LlamaLensError, UsageError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_LAYERS = 3
FAST = {"d_sae": 96, "k": 6, "batch_tokens": 128, "max_tokens": 128 * 40, "lr": 2e-3, "progress": False}


@pytest.fixture(scope="module")
def model():
    return tiny_model(tiny_config(n_layers=N_LAYERS), seed=1)


@pytest.fixture(scope="module")
def tokens():
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(3, 128, (32, 24), generator=generator)
    rows[:, 0] = 1  # BOS
    return rows


@pytest.fixture(scope="module")
def trained(model, tokens, tmp_path_factory):
    out = tmp_path_factory.mktemp("sets")
    return out, ll.train_transcoder_set(model, tokens=tokens, out=out, **FAST)


def _count_passes(model):
    """A hook on the embedding that counts the model's forward passes."""
    calls = []
    return calls, [("hook_embed", lambda tensor, *, hook: calls.append(len(tensor)))]


def test_one_forward_pass_fills_every_layers_store(model, tokens, tmp_path):
    calls, hooks = _count_passes(model)
    stores = {tmp_path / f"layer_{i}": [f"blocks.{i}.mlp.hook_in", f"blocks.{i}.hook_mlp_out"] for i in range(3)}
    with model.hooks(fwd_hooks=hooks):
        found = collect_stores(model, tokens, stores, batch_rows=16, progress=False, shard_tokens=256)
    assert calls == [16, 16]  # 32 rows in batches of 16, once for all three stores
    # Each store holds what collecting its hooks alone would have (in fp32 here, as collect_activations stores).
    alone = collect_activations(model, tokens, hook_names=stores[tmp_path / "layer_2"], folder=tmp_path / "alone",
                                progress=False)  # fmt: skip
    for i in (0, 5, 31):
        for hook in stores[tmp_path / "layer_2"]:
            assert torch.equal(found[tmp_path / "layer_2"][i][hook], alone[i][hook])
    assert found[tmp_path / "layer_0"].hook_names == stores[tmp_path / "layer_0"]
    # A second call finds the stores finished and runs nothing.
    with model.hooks(fwd_hooks=hooks):
        collect_stores(model, tokens, stores, batch_rows=16, progress=False)
    assert calls == [16, 16]


def test_bos_tokens_are_left_out_of_the_stores(model, tokens, tmp_path):
    rows = tokens.clone()
    rows[::3, 7] = 1  # a BOS inside some rows too, where a text starts in a stream of texts
    hooks = ["blocks.0.mlp.hook_in", "blocks.0.hook_mlp_out"]
    (store,) = collect_stores(model, rows, {tmp_path / "s": hooks}, progress=False, skip_token=1).values()
    kept = int((rows != 1).sum())
    assert len(store.prompt) == kept
    for i in (0, 3):  # the stored rows are the non-BOS positions, with their activations
        positions = (rows[i] != 1).nonzero().squeeze(-1)
        assert torch.equal(store[i]["position"], positions)
        _, cache = model.run_with_cache(rows[i : i + 1], names_filter=lambda name: name in hooks)
        torch.testing.assert_close(store[i][hooks[1]], cache[hooks[1]][0, positions])
    # The same tokens stored with BOS are another store: the note of what it holds says so.
    (again,) = collect_stores(model, rows, {tmp_path / "s": hooks}, progress=False).values()
    assert len(again.prompt) == rows.numel()


def test_the_set_loads_as_per_layer_topk_transcoders_and_builds_a_graph(model, tokens, trained):
    _, transcoders = trained
    assert transcoders.trained and len(transcoders) == N_LAYERS
    loaded = ll.load_dictionary(transcoders.path)  # sparsify's layout: a folder of layers.{i}.mlp folders
    assert sorted((d.hook_in, d.hook_out) for d in loaded) == [
        (f"blocks.{i}.mlp.hook_in", f"blocks.{i}.hook_mlp_out") for i in range(N_LAYERS)
    ]
    for layer, dictionary in enumerate(transcoders):
        assert dictionary.hook_in == f"blocks.{layer}.mlp.hook_in"
        assert (dictionary.activation, dictionary.k, dictionary.d_sae) == ("topk", 6, 96)
    info = json.loads((transcoders.path / "set.json").read_text())
    assert [layer["layer"] for layer in info["layers"]] == list(range(N_LAYERS))
    assert all(layer["steps"] == 40 for layer in info["layers"])
    assert info["n_tokens"] == int((tokens != 1).sum())  # BOS left out
    # Trained, not just written: the MLP outputs are reconstructed far better than by their mean (FVU 1).
    fvus = transcoders.held_out_fvu(model, tokens[:8])
    assert len(fvus) == N_LAYERS and max(fvus) < 0.8, fvus
    with pytest.raises(ArgumentError, match="tokens must be a LongTensor"):
        transcoders.held_out_fvu(model, tokens[0])
    graph = ll.attribution_graph(model, tokens[0, :10], transcoders)
    assert graph.n_features > 0 and graph.n_errors == N_LAYERS * 10
    # The graph's linear model is the transcoders' own: incoming edges plus constants give every node's value.
    rows = graph.n_features
    values = graph.adjacency[:rows].sum(1) + graph.node_constants[:rows]
    torch.testing.assert_close(values, graph.node_values[:rows], rtol=1e-4, atol=1e-4)
    # Nothing but the set is left behind: the activation stores and training runs are gone.
    assert sorted(p.name for p in transcoders.path.parent.iterdir()) == [transcoders.path.name]


def test_a_second_call_loads_the_set_without_training(model, tokens, trained, monkeypatch):
    out, first = trained

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(train_set, "train_dictionary", no_training)
    monkeypatch.setattr(train_set, "collect_stores", no_training)
    again = ll.train_transcoder_set(model, tokens=tokens, out=out, **FAST)
    assert not again.trained and again.path == first.path
    assert again.info == first.info
    for a, b in zip(again, first):
        assert torch.equal(a.W_enc, b.W_enc) and torch.equal(a.W_dec, b.W_dec)
    # threads and progress do not change the set; a training setting does (another folder).
    assert ll.train_transcoder_set(model, tokens=tokens, out=out, **FAST | {"threads": 2}).path == first.path
    with pytest.raises(AssertionError, match="trained again"):
        ll.train_transcoder_set(model, tokens=tokens, out=out, **FAST | {"seed": 1})


def test_the_cache_lives_under_llama_lens_home(model, tokens, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_LENS_HOME", str(tmp_path))
    transcoders = ll.train_transcoder_set(model, tokens=tokens[:8], model_name="tiny", **FAST | {"max_tokens": 128})
    assert transcoders.path.parent == tmp_path / "dictionaries" / "tiny"
    assert transcoders.path.name.startswith("transcoders-topk-96-k6-")
    # Keeping the BOS tokens is another set, trained on every token.
    with_bos = ll.train_transcoder_set(
        model, tokens=tokens[:8], model_name="tiny", leave_out_bos=False, **FAST | {"max_tokens": 128}
    )
    assert with_bos.path != transcoders.path and with_bos.info["n_tokens"] == tokens[:8].numel()


def test_a_killed_run_leaves_no_set_and_resumes(model, tokens, tmp_path, monkeypatch):
    real = train_set.train_dictionary
    trained_layers = []

    def dies_after_one_layer(store, *, out, config):
        if trained_layers:
            raise KeyboardInterrupt  # the run is stopped while layer 1 trains
        trained_layers.append(config.hook_in)
        return real(store, out=out, config=config)

    monkeypatch.setattr(train_set, "train_dictionary", dies_after_one_layer)
    with pytest.raises(KeyboardInterrupt):
        ll.train_transcoder_set(model, tokens=tokens, out=tmp_path, **FAST)
    (partial,) = tmp_path.iterdir()
    assert partial.name.endswith(".partial")  # nothing under the set's own name
    assert (partial / "set" / "layers.0.mlp" / "cfg.json").is_file()

    resumed = []
    monkeypatch.setattr(train_set, "train_dictionary", lambda store, *, out, config: resumed.append(config.hook_in)
                        or real(store, out=out, config=config))  # fmt: skip
    transcoders = ll.train_transcoder_set(model, tokens=tokens, out=tmp_path, **FAST)
    assert resumed == [f"blocks.{i}.mlp.hook_in" for i in range(1, N_LAYERS)]  # layer 0 was finished
    assert [p.name for p in tmp_path.iterdir()] == [transcoders.path.name]
    assert len(transcoders) == N_LAYERS


def test_a_half_written_folder_is_not_taken_as_a_set(model, tokens, trained, tmp_path):
    _, whole = trained
    half = tmp_path / whole.path.name
    half.mkdir()
    for name in ("layers.0.mlp", "layers.1.mlp"):  # a copy cut short: some layers, no set.json
        (half / name).mkdir()
        for file in (whole.path / name).iterdir():
            (half / name / file.name).write_bytes(file.read_bytes())
    with pytest.raises(UsageError, match="set.json"):
        ll.train_transcoder_set(model, tokens=tokens, out=tmp_path, **FAST)
    (half / "set.json").write_text("{not json")
    with pytest.raises(UsageError, match="set.json"):
        ll.train_transcoder_set(model, tokens=tokens, out=tmp_path, **FAST)


@pytest.mark.parametrize(
    ("arguments", "error", "named"),
    [
        ({"architecture": "standard"}, ArgumentError, "architecture"),
        ({"hook_in": "blocks.0.hook_resid_post"}, ArgumentError, "hook_in"),
        ({"d_sae": 0}, ArgumentError, "d_sae"),
        ({"k": 200}, ArgumentError, "k=200"),
        ({"d_sea": 96}, ArgumentTypeError, "d_sea"),
        ({"model_name": "a/b"}, ArgumentError, "model_name"),
        ({"tokens": None}, ArgumentError, "texts= .* or tokens="),
        ({"tokens": torch.zeros(4, 8)}, ArgumentError, "tokens must be a LongTensor"),
        ({"tokens": None, "texts": ["a text"]}, ArgumentError, "no tokenizer"),
        ({"tokens": None, "texts": "a text"}, ArgumentTypeError, "texts must be a list"),
        ({"leave_out_bos": "yes"}, ArgumentTypeError, "leave_out_bos"),
    ],
)
def test_bad_arguments_are_refused_by_name(model, tokens, tmp_path, arguments, error, named):
    kwargs = {"tokens": tokens, "out": tmp_path} | FAST | arguments
    if kwargs.get("tokens") is None:
        kwargs.pop("tokens")
    with pytest.raises(error, match=named) as caught:
        ll.train_transcoder_set(model, **kwargs)
    assert isinstance(caught.value, LlamaLensError)
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_a_model_that_is_not_one_is_refused(tmp_path, tokens):
    with pytest.raises(ArgumentTypeError, match="model must be a HookedLlama"):
        ll.train_transcoder_set("SmolLM2", tokens=tokens, out=tmp_path, **FAST)
