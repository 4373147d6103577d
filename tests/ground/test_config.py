"""config.json (transformers 4.x and 5.x) and params.json (Meta) read into one LlamaConfig."""

import json

import pytest
from support.models import tiny_config

from llama_lens.config import LlamaConfig, RopeScaling, meta_d_mlp
from llama_lens.errors import ConfigError

# config.json files as published (values abridged to what matters), written by transformers 4.x.
LLAMA_2_7B_HF = {
    "architectures": ["LlamaForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 4096,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.31.0.dev0",
    "use_cache": True,
    "vocab_size": 32000,
}
LLAMA_3_2_1B_HF = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 8192,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 16,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}
SMOLLM2_135M_HF = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "hidden_act": "silu",
    "hidden_size": 576,
    "initializer_range": 0.041666666666666664,
    "intermediate_size": 1536,
    "is_llama_config": True,
    "max_position_embeddings": 8192,
    "model_type": "llama",
    "num_attention_heads": 9,
    "num_hidden_layers": 30,
    "num_key_value_heads": 3,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_interleaved": False,
    "rope_scaling": None,
    "rope_theta": 100000,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.1",
    "use_cache": True,
    "vocab_size": 49152,
}


def test_llama_2_config_4x():
    cfg = LlamaConfig.from_hf(LLAMA_2_7B_HF)
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_head) == (4096, 32, 32, 32, 128)
    assert (cfg.d_mlp, cfg.d_vocab, cfg.norm_eps, cfg.rope_theta) == (11008, 32000, 1e-5, 10000.0)
    assert cfg.rope_scaling is None and not cfg.tie_embeddings and cfg.checkpoint_dtype == "float16"
    assert cfg.eos_token_ids == (2,) and cfg.n_rep == 1


def test_llama_3_2_config_4x_head_dim_tie_and_llama3_rope():
    cfg = LlamaConfig.from_hf(LLAMA_3_2_1B_HF)
    assert (cfg.d_head, cfg.n_rep, cfg.tie_embeddings, cfg.rope_theta) == (64, 4, True, 500000.0)
    assert cfg.rope_scaling == RopeScaling(
        kind="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
    )
    assert cfg.eos_token_ids == (128001, 128008, 128009)


def test_smollm2_config():
    cfg = LlamaConfig.from_hf(SMOLLM2_135M_HF)
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_head) == (576, 30, 9, 3, 64)
    assert (cfg.d_mlp, cfg.d_vocab, cfg.rope_theta, cfg.tie_embeddings) == (1536, 49152, 100000.0, True)


def test_config_5x_rope_parameters():
    config = {k: v for k, v in LLAMA_3_2_1B_HF.items() if k not in {"rope_scaling", "rope_theta", "torch_dtype"}}
    config |= {"rope_parameters": LLAMA_3_2_1B_HF["rope_scaling"] | {"rope_theta": 500000.0}, "dtype": "bfloat16"}
    assert LlamaConfig.from_hf(config) == LlamaConfig.from_hf(LLAMA_3_2_1B_HF)


def test_old_rope_scaling_type_key():
    config = LLAMA_2_7B_HF | {"rope_scaling": {"type": "linear", "factor": 2.0}}
    assert LlamaConfig.from_hf(config).rope_scaling == RopeScaling(kind="linear", factor=2.0)
    dynamic = LlamaConfig.from_hf(LLAMA_2_7B_HF | {"rope_scaling": {"type": "dynamic", "factor": 2.0}})
    assert dynamic.rope_scaling.original_max_position_embeddings == 4096


ROUND_TRIP = {
    "plain": {},
    "head_dim": dict(d_head=24),
    "biases": dict(attention_bias=True, mlp_bias=True),
    "tied": dict(tie_embeddings=True),
    "mqa": dict(n_kv_heads=1),
    "linear": dict(rope_scaling=RopeScaling(kind="linear", factor=4.0)),
    "dynamic": dict(rope_scaling=RopeScaling(kind="dynamic", factor=2.0, original_max_position_embeddings=256)),
    "llama3": dict(
        rope_scaling=RopeScaling(
            kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16
        )
    ),
}


@pytest.mark.parametrize("shape", ROUND_TRIP)
def test_config_written_by_transformers_5x_reads_back(shape):
    """to_hf -> transformers' LlamaConfig -> its to_dict (5.x: rope_parameters, dtype) -> from_hf."""
    from transformers import LlamaConfig as HFConfig

    cfg = tiny_config(**ROUND_TRIP[shape], checkpoint_dtype="bfloat16")
    written = HFConfig(**cfg.to_hf()).to_dict()
    assert "rope_parameters" in written  # the 5.x shape
    assert LlamaConfig.from_hf(json.loads(json.dumps(written))) == cfg


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sliding_window": 4096}, r"unsupported key\(s\) \['sliding_window'\]"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn' is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"model_type": "gemma"}, "model_type is 'gemma'"),
        ({"rope_interleaved": True}, "rope_interleaved"),
        ({"rope_scaling": {"rope_type": "linear"}}, "needs a 'factor'"),
        (
            {"rope_scaling": {"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}},
            r"rope_scaling of type 'linear' has unsupported key\(s\) \['partial_rotary_factor'\]",
        ),
        ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false, got 'false'"),
        ({"hidden_size": "4096"}, "hidden_size must be an integer, got '4096'"),
        ({"rms_norm_eps": [1e-5]}, r"rms_norm_eps must be a number, got \[1e-05\]"),
        ({"rope_scaling": {"rope_type": "linear", "factor": "8"}}, "rope_scaling: factor must be a number, got '8'"),
        ({"rope_scaling": "linear"}, "rope_scaling must be an object"),
    ],
)
def test_unsupported_hf_keys_are_named(change, message):
    with pytest.raises(ValueError, match=message):
        LlamaConfig.from_hf(LLAMA_2_7B_HF | change)


def test_missing_hf_key_is_named():
    config = {k: v for k, v in LLAMA_2_7B_HF.items() if k != "intermediate_size"}
    with pytest.raises(ValueError, match="required key 'intermediate_size' is missing"):
        LlamaConfig.from_hf(config)


LLAMA3_ROPE = LLAMA_3_2_1B_HF["rope_scaling"]


# Values of the right type that would load and then give NaN logits, or divide by zero, in the first forward.
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_attention_heads": 0}, "config.json: num_attention_heads must be a positive integer, got 0"),
        ({"hidden_size": -8}, "config.json: hidden_size must be a positive integer, got -8"),
        ({"rope_theta": 0}, "config.json: rope_theta must be a positive number, got 0"),
        ({"rms_norm_eps": -1}, "config.json: rms_norm_eps must be at least 0, got -1"),
        ({"rms_norm_eps": float("nan")}, "config.json: rms_norm_eps must be a number, got nan"),
        ({"max_position_embeddings": 0}, "config.json: max_position_embeddings must be a positive integer, got 0"),
        ({"rope_scaling": {"type": "linear", "factor": 0}}, "rope_scaling: factor must be a positive number, got 0"),
        (
            {"rope_scaling": LLAMA3_ROPE | {"low_freq_factor": 0}},
            "rope_scaling: low_freq_factor must be a positive number, got 0",
        ),
        (
            {"rope_scaling": LLAMA3_ROPE | {"low_freq_factor": 4.0}},
            "rope_scaling needs low_freq_factor < high_freq_factor, got 4 and 4",
        ),
        ({"eos_token_id": ["a"]}, r"eos_token_id must be a token id or a list of them, got \['a'\]"),
        ({"eos_token_id": "2"}, r"eos_token_id must be a token id or a list of them, got \['2'\]"),
    ],
)
def test_values_that_would_break_the_forward_are_named(change, message):
    with pytest.raises(ValueError, match=message):
        LlamaConfig.from_hf(LLAMA_2_7B_HF | change, source="config.json")


def test_dynamic_rope_without_max_position_embeddings_takes_the_default():
    config = LLAMA_2_7B_HF | {"rope_scaling": {"type": "dynamic", "factor": 2.0}, "max_position_embeddings": None}
    assert LlamaConfig.from_hf(config).rope_scaling.original_max_position_embeddings == 2048


def test_meta_values_that_would_break_the_forward_are_named():
    for change, message in [
        ({"n_heads": 0}, "params.json: n_heads must be a positive integer, got 0"),
        ({"multiple_of": 0}, "params.json: multiple_of must be a positive integer, got 0"),
        ({"rope_theta": -1.0}, "params.json: rope_theta must be a positive number, got -1"),
        ({"norm_eps": -1e-5}, "params.json: norm_eps must be at least 0, got -1e-05"),
        ({"use_scaled_rope": True, "rope_high_freq_factor": 1.0}, "params.json: llama3 rope scaling needs 0 <"),
    ]:
        with pytest.raises(ValueError, match=message):
            LlamaConfig.from_meta(LLAMA_3_8B_META | change)


def test_bad_json_file_is_named(tmp_path):
    (tmp_path / "config.json").write_bytes(b'{"hidden_size": "\xff"}')
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        LlamaConfig.from_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        LlamaConfig.from_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="config.json: expected a JSON object of config keys, got list"):
        LlamaConfig.from_file(tmp_path / "config.json")


def test_rope_keys_transformers_writes_are_accepted():
    # transformers 5.x keeps rope_theta inside rope_parameters; linear configs often carry the original length.
    cfg = LlamaConfig.from_hf(
        LLAMA_2_7B_HF
        | {
            "rope_scaling": None,
            "rope_parameters": {
                "rope_type": "linear",
                "factor": 2.0,
                "rope_theta": 10000.0,
                "original_max_position_embeddings": 4096,
            },
        }
    )
    assert cfg.rope_scaling.kind == "linear" and cfg.rope_scaling.factor == 2.0


# ------------------------------------------------------------------------------------- Meta params.json
LLAMA_2_7B_META = {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05, "vocab_size": -1}
LLAMA_3_8B_META = {
    "dim": 4096,
    "n_layers": 32,
    "n_heads": 32,
    "n_kv_heads": 8,
    "vocab_size": 128256,
    "multiple_of": 1024,
    "ffn_dim_multiplier": 1.3,
    "norm_eps": 1e-05,
    "rope_theta": 500000.0,
}
LLAMA_3_1_8B_META = LLAMA_3_8B_META | {"use_scaled_rope": True}
LLAMA_3_2_1B_META = {
    "dim": 2048,
    "ffn_dim_multiplier": 1.5,
    "multiple_of": 256,
    "n_heads": 32,
    "n_kv_heads": 8,
    "n_layers": 16,
    "norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "use_scaled_rope": True,
    "vocab_size": 128256,
}
LLAMA_2_70B_META = {
    "dim": 8192,
    "multiple_of": 4096,
    "ffn_dim_multiplier": 1.3,
    "n_heads": 64,
    "n_kv_heads": 8,
    "n_layers": 80,
    "norm_eps": 1e-05,
    "vocab_size": -1,
}


def test_llama_2_7b_params_give_metas_numbers():
    cfg = LlamaConfig.from_meta(LLAMA_2_7B_META, d_vocab=32000)
    assert (cfg.d_mlp, cfg.d_vocab, cfg.n_kv_heads, cfg.d_head, cfg.rope_theta) == (11008, 32000, 32, 128, 10000.0)
    with pytest.raises(ValueError, match="vocab_size is -1; pass d_vocab"):
        LlamaConfig.from_meta(LLAMA_2_7B_META)


def test_llama_3_8b_params_give_metas_numbers():
    cfg = LlamaConfig.from_meta(LLAMA_3_8B_META)
    assert (cfg.d_mlp, cfg.d_vocab, cfg.n_kv_heads, cfg.n_rep, cfg.rope_theta) == (14336, 128256, 8, 4, 500000.0)
    assert cfg.rope_scaling is None


@pytest.mark.parametrize(
    ("params", "d_mlp"), [(LLAMA_3_2_1B_META, 8192), (LLAMA_2_70B_META, 28672), (LLAMA_3_1_8B_META, 14336)]
)
def test_more_meta_d_mlp(params, d_mlp):
    assert LlamaConfig.from_meta(params, d_vocab=32000).d_mlp == d_mlp
    assert meta_d_mlp(params["dim"], params["multiple_of"], params.get("ffn_dim_multiplier")) == d_mlp


def test_use_scaled_rope_is_llama_3_1_scaling():
    cfg = LlamaConfig.from_meta(LLAMA_3_1_8B_META)
    assert cfg.rope_scaling == RopeScaling(
        kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
    )


def test_unknown_meta_key_is_named():
    with pytest.raises(ValueError, match=r"unsupported key\(s\) \['moe_args'\]"):
        LlamaConfig.from_meta(LLAMA_3_8B_META | {"moe_args": {}})
    with pytest.raises(ValueError, match="required key 'dim' is missing"):
        LlamaConfig.from_meta({k: v for k, v in LLAMA_3_8B_META.items() if k != "dim"})


def test_meta_values_of_the_wrong_type_are_named():
    with pytest.raises(ValueError, match="params.json: use_scaled_rope must be true or false, got 'yes'"):
        LlamaConfig.from_meta(LLAMA_3_8B_META | {"use_scaled_rope": "yes"})
    with pytest.raises(ValueError, match="params.json: n_layers must be an integer, got 32.5"):
        LlamaConfig.from_meta(LLAMA_3_8B_META | {"n_layers": 32.5})


def test_invalid_numbers_are_refused():
    with pytest.raises(ValueError, match=r"n_heads \(32\) must be a multiple of n_kv_heads \(5\)"):
        LlamaConfig.from_meta(LLAMA_3_8B_META | {"n_kv_heads": 5})


def test_rope_scaling_built_in_python_is_checked():
    shape = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_head=16, d_mlp=128, d_vocab=100)
    with pytest.raises(ConfigError, match="rope scaling kind must be 'linear', 'dynamic' or 'llama3', got 'yarn'"):
        LlamaConfig(**shape, rope_scaling=RopeScaling(kind="yarn", factor=2.0))
    with pytest.raises(ConfigError, match="llama3 rope scaling needs a positive original_max_position_embeddings"):
        LlamaConfig(
            **shape, rope_scaling=RopeScaling(kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
        )
