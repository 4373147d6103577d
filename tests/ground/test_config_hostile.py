"""Wrong-typed values in config.json: each a ConfigError naming the file and the key, never a plain
ValueError/TypeError/OverflowError from int() or float() of it."""

from __future__ import annotations

import json

import pytest
from support.models import tiny_config

from llama_lens.config import LlamaConfig
from llama_lens.errors import ConfigError


@pytest.mark.parametrize(
    ("key", "value", "what"),
    [
        ("num_hidden_layers", float("inf"), "an integer"),
        ("num_hidden_layers", float("nan"), "an integer"),
        ("rope_theta", 10**400, "a number within float range"),
        ("hidden_size", "64", "an integer"),
        ("rms_norm_eps", [1], "a number"),
        ("tie_word_embeddings", "false", "true or false"),
    ],
    ids=["inf-layers", "nan-layers", "huge-theta", "string-width", "list-eps", "string-tie"],
)
def test_a_wrong_typed_value_is_a_config_error_naming_file_and_key(tmp_path, key, value, what):
    config = tiny_config().to_hf() | {key: value}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=rf"config\.json: {key} must be {what}"):
        LlamaConfig.from_file(path)
