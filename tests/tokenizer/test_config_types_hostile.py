"""Wrong-typed values in tokenizer_config.json and in a GGUF's metadata: each a ConfigError / CheckpointError
naming the file, the key and the type expected (never a TypeError, AttributeError or a silently ignored key)."""

import json
from pathlib import Path

import pytest
from test_tokenizer import byte_level_tokenizer, save

from llama_lens.errors import CheckpointError, ConfigError
from llama_lens.io.gguf_config import gguf_config
from llama_lens.io.gguf_header import GGUFHeader, GGUFTensor
from llama_lens.tokenizer import load_tokenizer
from llama_lens.tokenizer.gguf import gguf_backend_tokenizer, gguf_tokenizer_config


@pytest.fixture(scope="module")
def backend():
    return byte_level_tokenizer()


def _load_with(tmp_path, backend, config):
    folder = save(backend, tmp_path)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return load_tokenizer(folder)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ([1, 2], r"the top level is a list, expected a JSON object"),
        ({"bos_token": 5}, r"key 'bos_token' is 5 \(a int\), expected a token string"),
        ({"bos_token": {"content": 5}}, r"key 'bos_token' is \{'content': 5\} \(a dict\), expected a token string"),
        ({"eos_token": ["<|im_end|>", 2]}, r"key 'eos_token' is 2 \(a int\)"),
        ({"pad_token": ["<|im_end|>"]}, r"key 'pad_token' is \['<\|im_end\|>'\] \(a list\)"),
        ({"unk_token": 0.5}, r"key 'unk_token' is 0.5 \(a float\)"),
        ({"add_bos_token": "yes"}, r"key 'add_bos_token' is 'yes' \(a str\), expected true, false or null"),
        ({"split_special_tokens": 1}, r"key 'split_special_tokens' is 1 \(a int\), expected true, false or null"),
        ({"chat_template": 3}, r"key 'chat_template' is 3 \(a int\), expected a Jinja template string"),
        ({"chat_template": [{"name": "default", "template": 7}]}, r"key 'chat_template' is \[.*\(a list\)"),
        ({"chat_template": {"default": "x"}}, r"key 'chat_template' .*\(a dict\)"),
    ],
)
def test_wrong_typed_tokenizer_config_values_are_named(tmp_path, backend, config, message):
    with pytest.raises(ConfigError, match=rf"tokenizer_config\.json: {message}"):
        _load_with(tmp_path, backend, config)


def test_every_well_typed_form_still_reads(tmp_path, backend):
    tokenizer = _load_with(
        tmp_path,
        backend,
        {
            "bos_token": {"__type": "AddedToken", "content": "<|im_start|>", "lstrip": False},
            "eos_token": ["<|im_end|>", {"content": "<|endoftext|>"}],
            "pad_token": None,
            "add_bos_token": True,
            "split_special_tokens": None,
            "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}],
        },
    )
    assert tokenizer.bos_id == backend.token_to_id("<|im_start|>") and tokenizer.add_bos is True
    assert tokenizer.eos_ids == {backend.token_to_id("<|im_end|>"), backend.token_to_id("<|endoftext|>")}
    assert tokenizer.chat_template == "D"


# ------------------------------------------------------------------------------------------- GGUF tokenizer
TOKENS = ["<unk>", "<s>", "</s>", "a", "b", "ab"]
GPT2 = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": TOKENS, "tokenizer.ggml.merges": ["a b"]}
ITEM = "an array whose item "
LLAMA = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": TOKENS, "tokenizer.ggml.scores": [0.0] * 6}


@pytest.mark.parametrize(
    ("meta", "key", "shown", "expected"),
    [
        (GPT2 | {"tokenizer.ggml.model": 2}, "model", r"2 \(a int\)", "a string"),
        (GPT2 | {"tokenizer.ggml.tokens": "ab"}, "tokens", r"'ab' \(a str\)", "an array of strings"),
        (GPT2 | {"tokenizer.ggml.tokens": ["a", 3]}, "tokens", ITEM + r"1 is 3 \(a int\)", "an array of"),
        (
            GPT2 | {"tokenizer.ggml.token_type": ["1"] * 6},
            "token_type",
            ITEM + r"0 is '1' \(a str\)",
            "an array of int",
        ),
        (GPT2 | {"tokenizer.ggml.merges": ["ab"]}, "merges", ITEM + r"0 is 'ab' \(a str\)", "an array of 'left right'"),
        (GPT2 | {"tokenizer.ggml.merges": "a b"}, "merges", r"'a b' \(a str\)", "an array of 'left right'"),
        (GPT2 | {"tokenizer.ggml.pre": ["smollm"]}, "pre", r"\['smollm'\] \(a list\)", "a string"),
        (LLAMA | {"tokenizer.ggml.scores": ["0"] * 6}, "scores", ITEM + r"0 is '0' \(a str\)", "an array of numbers"),
        (LLAMA | {"tokenizer.ggml.add_space_prefix": "no"}, "add_space_prefix", r"'no' \(a str\)", "a bool"),
        (LLAMA | {"tokenizer.ggml.unknown_token_id": "0"}, "unknown_token_id", r"'0' \(a str\)", "a token id"),
    ],
)
def test_wrong_typed_gguf_tokenizer_metadata_is_named(meta, key, shown, expected):
    with pytest.raises(
        CheckpointError, match=rf"^m\.gguf: metadata key 'tokenizer\.ggml\.{key}' is {shown}, expected {expected}"
    ):
        gguf_backend_tokenizer(meta, "m.gguf")


def test_a_wrong_typed_gguf_chat_template_is_named():
    with pytest.raises(
        CheckpointError, match=r"m\.gguf: metadata key 'tokenizer.chat_template' is 3 \(a int\), expected a string"
    ):
        gguf_tokenizer_config(LLAMA | {"tokenizer.chat_template": 3}, "m.gguf")
    assert gguf_tokenizer_config(LLAMA | {"tokenizer.chat_template": "{{ x }}"}, "m.gguf")["chat_template"] == "{{ x }}"
    assert gguf_backend_tokenizer(GPT2, "m.gguf").encode("ab").ids == [5]


# ----------------------------------------------------------------------------------------------- GGUF config
BASE = {
    "general.architecture": "llama",
    "llama.embedding_length": 64,
    "llama.attention.head_count": 4,
    "llama.block_count": 2,
    "llama.feed_forward_length": 128,
    "llama.attention.layer_norm_rms_epsilon": 1e-5,
}


def _header(meta):
    embedding = GGUFTensor("token_embd.weight", "F32", (128, 64), 0, 128 * 64 * 4)
    return GGUFHeader(Path("m.gguf"), 3, meta, {"token_embd.weight": embedding})


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("general.architecture", ["llama"], r"general.architecture is \['llama'\]"),
        ("llama.block_count", "2", r"llama.block_count must be an integer, got '2' \(a str\)"),
        ("llama.context_length", [1], r"llama.context_length must be an integer, got \[1\] \(a list\)"),
        ("llama.rope.freq_base", "1e4", r"llama.rope.freq_base must be a number, got '1e4' \(a str\)"),
        ("llama.attention.layer_norm_rms_epsilon", True, r"layer_norm_rms_epsilon must be a number, got True"),
        ("llama.expert_count", [2], r"llama.expert_count must be an integer, got \[2\]"),
        ("tokenizer.ggml.bos_token_id", "1", r"'tokenizer.ggml.bos_token_id' must be a token id .*got '1'"),
        ("llama.rope.scaling.type", ["linear"], r"llama.rope.scaling.type is \['linear'\]"),
    ],
)
def test_wrong_typed_gguf_config_metadata_is_named(key, value, message):
    assert gguf_config(_header(BASE)).n_layers == 2
    with pytest.raises(ConfigError, match=rf"^m\.gguf: .*{message}"):
        gguf_config(_header(BASE | {key: value}))
