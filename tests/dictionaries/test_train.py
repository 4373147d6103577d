"""Training dictionaries on a tiny model: the loss falls, what is written loads with ll.load_dictionary and computes
what the trainer held, a killed run resumes to the same weights, and bad settings are refused by name."""

import json

import pytest
import torch
from safetensors.torch import load_file
from support.models import tiny_config, tiny_model

import llama_lens as ll
from llama_lens.dictionaries import train as train_module
from llama_lens.errors import ArgumentError, ArgumentTypeError, CheckpointError, ConfigError, UsageError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SAE = {"hook_in": "blocks.1.hook_resid_post"}
TRANSCODER = {"hook_in": "blocks.1.mlp.hook_in", "hook_out": "blocks.1.hook_mlp_out"}
FAST = {"d_sae": 96, "k": 6, "batch_tokens": 128, "progress": False, "threads": 1, "buffer_tokens": 512}


@pytest.fixture(scope="module")
def model():
    return tiny_model(tiny_config(n_layers=2), seed=1)


@pytest.fixture(scope="module")
def tokens():
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(3, 128, (48, 24), generator=generator)
    rows[:, 0] = 1  # BOS
    return rows


@pytest.fixture(scope="module")
def store(model, tokens, tmp_path_factory):
    """One activation store with every hook the tests train on."""
    from llama_lens.dictionaries.train_data import collect_activations

    hooks = [SAE["hook_in"], *TRANSCODER.values()]
    return collect_activations(model, tokens, hook_names=hooks, folder=tmp_path_factory.mktemp("store"), progress=False)


KINDS = {
    "topk_sae": SAE | {"architecture": "topk", "lr": 2e-3},
    "topk_transcoder": TRANSCODER | {"architecture": "topk", "lr": 2e-3},
    "standard_sae": SAE | {"architecture": "standard", "lr": 3e-3, "l1_coefficient": 1e-3},
    "standard_transcoder": TRANSCODER | {"architecture": "standard", "lr": 3e-3, "l1_coefficient": 1e-3},
}


@pytest.mark.parametrize("kind", KINDS)
def test_loss_falls_and_the_saved_dictionary_computes_what_the_trainer_held(store, tmp_path, kind):
    coder = ll.train_dictionary(store, out=tmp_path / kind, max_tokens=128 * 60, **KINDS[kind], **FAST)
    assert len(coder.losses) == 60
    first, last = sum(coder.losses[:5]) / 5, sum(coder.losses[-5:]) / 5
    assert last < 0.8 * first, f"{kind}: FVU {first:.3f} -> {last:.3f}"
    assert coder.info["steps"] == 60 and coder.info["final_fvu"] == coder.losses[-1]

    loaded = ll.load_dictionary(tmp_path / kind)
    spec = KINDS[kind]
    assert (loaded.hook_in, loaded.hook_out) == (spec["hook_in"], spec.get("hook_out", spec["hook_in"]))
    assert (
        loaded.architecture
        == {"topk": "topk", "standard": "transcoder" if "hook_out" in spec else "standard"}[spec["architecture"]]
    )
    assert loaded.k == (6 if spec["architecture"] == "topk" else None)
    x = torch.cat([store[i][spec["hook_in"]] for i in range(4)]).float()
    with torch.no_grad():
        acts = coder.encode(x)
        torch.testing.assert_close(loaded.encode(x), acts, atol=1e-5, rtol=0)
        torch.testing.assert_close(loaded.decode(acts), coder.decode(acts), atol=1e-5, rtol=0)
        torch.testing.assert_close(loaded(x), coder(x), atol=1e-5, rtol=0)
    if spec["architecture"] == "topk":
        assert int((acts > 0).sum(-1).max()) <= 6


def test_files_are_saelens_6_layout(store, tmp_path):
    ll.train_dictionary(store, out=tmp_path, max_tokens=256, **KINDS["topk_transcoder"], **FAST)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 6 and cfg["apply_b_dec_to_input"] is False
    assert cfg["metadata"]["hook_name"] == "blocks.1.mlp.hook_in"
    assert cfg["metadata"]["hook_name_out"] == "blocks.1.hook_mlp_out"
    assert cfg["metadata"]["sae_lens_version"].startswith("6.")
    shapes = {name: tuple(t.shape) for name, t in load_file(tmp_path / "sae_weights.safetensors").items()}
    assert shapes == {"W_enc": (64, 96), "b_enc": (96,), "W_dec": (96, 64), "b_dec": (64,)}


def test_training_from_the_model_collects_the_store_first(model, tokens, tmp_path):
    coder = ll.train_dictionary(model, tokens=tokens, out=tmp_path, max_tokens=256, **KINDS["topk_sae"], **FAST)
    stored = ll.ActivationDataset(tmp_path / "activations")
    assert stored.hook_names == [SAE["hook_in"]] and len(stored) == tokens.numel()
    _, cache = model.run_with_cache(tokens[:1], names_filter=SAE["hook_in"])
    torch.testing.assert_close(stored[3][SAE["hook_in"]], cache[SAE["hook_in"]][0, 3])
    assert len(coder.losses) == 2


@pytest.mark.parametrize("kind", ["topk_sae", "topk_transcoder", "standard_sae"])
def test_a_killed_run_resumes_to_the_same_weights(store, tmp_path, monkeypatch, kind):
    options = KINDS[kind] | FAST | {"max_tokens": 128 * 12, "checkpoint_every": 4, "shuffle": True}
    whole = ll.train_dictionary(store, out=tmp_path / "whole", **options)

    real_step, calls = train_module._step, []

    def killed_at_step_7(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "_step", killed_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        ll.train_dictionary(store, out=tmp_path / "killed", **options)
    assert not (tmp_path / "killed" / "cfg.json").exists()  # the dictionary is written when the run ends
    monkeypatch.setattr(train_module, "_step", real_step)
    resumed = ll.train_dictionary(store, out=tmp_path / "killed", **options)
    assert resumed.losses == whole.losses
    for name in ("W_in", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(resumed, name), getattr(whole, name)), name
    assert load_file(tmp_path / "killed" / "sae_weights.safetensors").keys() == {"W_enc", "b_enc", "W_dec", "b_dec"}
    for name, tensor in load_file(tmp_path / "whole" / "sae_weights.safetensors").items():
        assert torch.equal(load_file(tmp_path / "killed" / "sae_weights.safetensors")[name], tensor), name


def test_a_finished_run_returns_without_training(store, tmp_path, monkeypatch):
    options = KINDS["topk_sae"] | FAST | {"max_tokens": 128 * 3}
    first = ll.train_dictionary(store, out=tmp_path, **options)
    monkeypatch.setattr(train_module, "_step", lambda *a, **k: pytest.fail("a finished run trained again"))
    again = ll.train_dictionary(store, out=tmp_path, **options | {"progress": False, "checkpoint_every": 7})
    assert again.losses == first.losses and torch.equal(again.W_dec, first.W_dec)
    assert 0 < again.info["l0_last_step"] == first.info["l0_last_step"] <= 6


def test_out_with_another_run_is_refused_by_name(store, tmp_path):
    ll.train_dictionary(store, out=tmp_path, max_tokens=256, **KINDS["topk_sae"], **FAST)
    with pytest.raises(UsageError, match=r"d_sae: 96 -> 80.*checkpoint\.safetensors"):
        ll.train_dictionary(store, out=tmp_path, max_tokens=256, **KINDS["topk_sae"], **FAST | {"d_sae": 80})


def test_damaged_checkpoint_is_named(store, tmp_path):
    (tmp_path / "checkpoint.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="checkpoint.safetensors.*delete it"):
        ll.train_dictionary(store, out=tmp_path, max_tokens=256, **KINDS["topk_sae"], **FAST)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"architecture": "jumprelu"}, ArgumentError, "architecture 'jumprelu'.*'topk', 'standard'"),
        ({"k": 200}, ArgumentError, "k=200 is more than d_sae=96"),
        ({"d_sae": 0}, ArgumentError, "d_sae must be an integer >= 1"),
        ({"lr": -1.0}, ArgumentError, "lr must be a finite number > 0"),
        ({"momentum": 1.0}, ArgumentError, r"momentum must lie in \(0, 1\)"),
        ({"max_tokens": 64}, ArgumentError, "max_tokens=64 is less than one step of batch_tokens=128"),
        ({"hook_in": "blocks.1.hook_nothing"}, ConfigError, "hook_in: hook 'blocks.1.hook_nothing'"),
        ({"hook_in": "blocks.1.hook_mlp_in"}, ArgumentError, "another name for 'blocks.1.hook_resid_mid'"),
        ({"d_sea": 3}, ArgumentTypeError, "unknown training option 'd_sea'.*d_sae"),
    ],
)
def test_bad_settings_are_refused_by_name(store, tmp_path, options, error, match):
    with pytest.raises(error, match=match):
        ll.train_dictionary(store, out=tmp_path, **(SAE | FAST | options))


def test_bad_data_is_refused_by_name(model, store, tokens, tmp_path):
    with pytest.raises(ll.UnknownNameError, match="blocks.0.hook_resid_post.*not in the activation store"):
        ll.train_dictionary(store, out=tmp_path, **FAST | {"hook_in": "blocks.0.hook_resid_post"})
    with pytest.raises(ArgumentError, match=r"holds 1152 tokens, fewer than one step of batch_tokens=2048"):
        ll.train_dictionary(store, out=tmp_path, **SAE | FAST | {"batch_tokens": 2048})
    with pytest.raises(ArgumentError, match="needs tokens="):
        ll.train_dictionary(model, out=tmp_path, **SAE | FAST)
    with pytest.raises(ArgumentError, match=r"LongTensor \[n_rows, pos\].*\(24,\)"):
        ll.train_dictionary(model, tokens=tokens[0], out=tmp_path, **SAE | FAST)
    with pytest.raises(ArgumentError, match="for training from a model"):
        ll.train_dictionary(store, tokens=tokens, out=tmp_path, **SAE | FAST)
    with pytest.raises(ArgumentTypeError, match="activation store .* or a model, got int"):
        ll.train_dictionary(3, out=tmp_path, **SAE | FAST)
    with pytest.raises(ll.MissingFileError, match="no activation store"):
        ll.train_dictionary(tmp_path / "nowhere", out=tmp_path, **SAE | FAST)
