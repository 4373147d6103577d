"""Hostile tuned-lens folders: sizes checked against the params file before anything is allocated, wrong-typed
config values named, and a save that fails half way keeps the lens that was there."""

from __future__ import annotations

import json
import os

import pytest
import torch

import llama_lens.lens.tuned as tuned
from llama_lens.errors import LensFileError, UsageError
from llama_lens.lens.tuned import TunedLens


def saved_lens(tmp_path, name="lens"):
    lens = TunedLens(8, 2)
    with torch.no_grad():
        for param in lens.parameters():
            param.normal_()
    return lens, lens.save(tmp_path / name)


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n_layers": 10**9}, r"key 'n_layers' must be an integer from 1 to"),
        ({"d_model": 10**9}, r"key 'd_model' must be an integer from 1 to"),
        ({"d_model": 16}, r"params.safetensors: tensor 'embed.weight' is \(8, 8\), expected \(16, 16\)"),
        ({"n_layers": "2"}, r"key 'n_layers' must be an integer"),
        ({"bias": "false"}, r"key 'bias' must be true or false"),
        ({"losses": ["x"]}, r"key 'losses' must be a list of numbers"),
        ({"info": [1, 2]}, r"key 'info' must be a JSON object"),
        ({"labels": ["embed", "0_post", "7_post"]}, r"tensor '7_post.weight' is None"),
    ],
    ids=["billion-layers", "huge-d_model", "d_model-mismatch", "string-layers", "string-bias", "string-losses",
         "list-info", "extra-label"],
)  # fmt: skip
def test_a_hostile_config_is_refused_by_file_and_key(tmp_path, changes, message):
    _, folder = saved_lens(tmp_path)
    edit_config(folder, **changes)
    with pytest.raises(LensFileError, match=message):
        TunedLens.load(folder)


def test_a_config_nested_too_deeply_is_refused_by_name(tmp_path):
    _, folder = saved_lens(tmp_path)
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(LensFileError, match=r"config\.json: JSON nested too deeply"):
        TunedLens.load(folder)


def test_a_package_lens_with_a_billion_layers_is_refused_before_allocating(tmp_path):
    folder = tmp_path / "package"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"d_model": 8, "num_hidden_layers": 10**9}))
    torch.save({"0.weight": torch.zeros(8, 8), "0.bias": torch.zeros(8)}, folder / "params.pt")
    with pytest.raises(LensFileError, match=r"key 'num_hidden_layers' must be an integer from 1 to"):
        TunedLens.load(folder)


def test_a_save_that_fails_half_way_keeps_the_old_lens(tmp_path, monkeypatch):
    old, folder = saved_lens(tmp_path)
    from safetensors import torch as safetensors_torch

    def failing_save(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half a file")
        raise UsageError("disk full")  # stands for the write's own failure (ENOSPC)

    monkeypatch.setattr(safetensors_torch, "save_file", failing_save)
    with pytest.raises(UsageError, match="disk full"):
        TunedLens(8, 2).save(folder)
    monkeypatch.undo()
    reloaded = TunedLens.load(folder)
    for name, tensor in old.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor)
    assert sorted(os.listdir(folder)) == [tuned.CONFIG_FILE, tuned.PARAMS_FILE]
