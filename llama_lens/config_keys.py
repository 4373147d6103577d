"""What each key of a config file means to llama_lens: read (for which architectures), ignored on purpose (with
the reason), or, by being in no table here, refused. Data only; `config.LlamaConfig.from_hf` / `from_meta` use it.
"""

from __future__ import annotations

# ---------------------------------------------------------------------------------------------------------
# Keys of a Hugging Face config.json that do not change the forward pass of a Llama, so we ignore them.
# Generic PretrainedConfig attributes, generation defaults and bookkeeping.
HF_IGNORED_KEYS = frozenset(
    {
        "architectures",
        "transformers_version",
        "_name_or_path",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "initializer_range",
        "use_cache",
        "attention_dropout",
        "is_llama_config",
        "return_dict",
        "output_hidden_states",
        "output_attentions",
        "torchscript",
        "use_bfloat16",
        "tf_legacy_loss",
        "pruned_heads",
        "tie_encoder_decoder",
        "is_decoder",
        "is_encoder_decoder",
        "add_cross_attention",
        "cross_attention_hidden_size",
        "chunk_size_feed_forward",
        "id2label",
        "label2id",
        "problem_type",
        "tokenizer_class",
        "prefix",
        "task_specific_params",
        "finetuning_task",
        "decoder_start_token_id",
        "sep_token_id",
        "max_length",
        "min_length",
        "do_sample",
        "early_stopping",
        "num_beams",
        "num_beam_groups",
        "diversity_penalty",
        "temperature",
        "top_k",
        "top_p",
        "typical_p",
        "repetition_penalty",
        "length_penalty",
        "no_repeat_ngram_size",
        "encoder_no_repeat_ngram_size",
        "bad_words_ids",
        "num_return_sequences",
        "output_scores",
        "return_dict_in_generate",
        "forced_bos_token_id",
        "forced_eos_token_id",
        "remove_invalid_values",
        "exponential_decay_length_penalty",
        "suppress_tokens",
        "begin_suppress_tokens",
        "output_router_logits",
        # Splits the projections into slices in transformers 4.x only to mimic the pretraining layout; the
        # result is the same matmul up to float rounding.
        "pretraining_tp",
    }
)

# Keys of config.json every architecture reads.
HF_SHARED_KEYS = frozenset(
    {
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "hidden_act",
        "rms_norm_eps",
        "rope_theta",
        "rope_scaling",
        "rope_parameters",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "max_position_embeddings",
        "torch_dtype",
        "dtype",
        "rope_interleaved",
        "model_type",
    }
)

# Keys an architecture's class does not read although its config files may carry them.
HF_ARCHITECTURE_IGNORED = {
    # transformers' Qwen2Attention always puts biases on q, k and v and none on o, whatever this says.
    "qwen2": frozenset({"attention_bias"}),
}

# Keys of a Meta params.json that we ignore: they size the reference code's caches, not the model.
META_IGNORED_KEYS = frozenset({"max_batch_size", "max_seq_len"})


# Keys of config.json each architecture reads beyond the ones all of them share (see `LlamaConfig.from_hf`).
HF_ARCHITECTURE_KEYS = {
    "llama": frozenset({"attention_bias", "mlp_bias"}),
    "mistral": frozenset({"sliding_window"}),
    "qwen2": frozenset({"use_sliding_window", "sliding_window", "max_window_layers", "layer_types"}),
    "qwen3": frozenset({"attention_bias", "use_sliding_window", "sliding_window", "max_window_layers", "layer_types"}),
}
# transformers' class defaults for keys a config.json may leave out, where they differ from Llama's; a file
# without the key means what transformers makes of it. (An explicit null is read as null.)
HF_ARCHITECTURE_DEFAULTS = {
    "llama": {},
    "mistral": {"num_key_value_heads": 8, "sliding_window": 4096},
    "qwen2": {"num_key_value_heads": 32, "sliding_window": 4096, "max_window_layers": 28},
    "qwen3": {"num_key_value_heads": 32, "head_dim": 128, "sliding_window": 4096, "max_window_layers": 28},
}
