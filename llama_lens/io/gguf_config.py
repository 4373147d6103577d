"""The LlamaConfig a GGUF file's metadata describe (`gguf_config`), and Llama 3.1's RoPE scaling recovered from
the factors llama.cpp stores in place of its parameters.

Architectures (`general.architecture`, as llama.cpp's `convert_hf_to_gguf.py` writes them): "llama" (Llama 1-3,
SmolLM, TinyLlama, and Mistral, which the converter writes as "llama"), "qwen2" (Qwen2/2.5 and the models distilled
onto them: biases on q, k and v) and "qwen3" (RMSNorm on each head's q and k, `attn_q_norm`/`attn_k_norm`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..config import ARCHITECTURES, LlamaConfig, RopeScaling
from ..errors import CheckpointError, ConfigError
from .gguf_header import GGUFHeader
from .gguf_quants import check_qtype, read_gguf_into

# general.architecture -> the LlamaConfig model_type it is read as. Mistral has no architecture of its own here:
# the converter writes MistralForCausalLM as "llama", without its sliding window (see docs/gguf.md).
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

# `{arch}.*` metadata keys (the same for the three architectures): those read into the config, and those ignored on
# purpose (anything else is refused, as config.json keys are). `vocab_size` and the rope scaling keys are read too.
GGUF_KEYS_READ = frozenset(
    {
        "block_count",
        "embedding_length",
        "feed_forward_length",
        "attention.head_count",
        "attention.head_count_kv",
        "attention.key_length",
        "attention.value_length",
        "attention.layer_norm_rms_epsilon",
        "rope.freq_base",
        "rope.dimension_count",
        "rope.scaling.type",
        "rope.scaling.factor",
        "rope.scale_linear",
        "context_length",
        "vocab_size",
        "expert_count",
    }
)
# rope.scaling.finetuned: whether the model was fine-tuned at the scaled length (a fact about training);
# rope.scaling.original_context_length: linear scaling does not read it (YaRN does, and is refused);
# expert_used_count: means something only beside an expert_count, which is refused above 0;
# tensor_data_layout: a note some converters wrote about the q/k order, which is llama.cpp's in every llama GGUF.
GGUF_KEYS_IGNORED = frozenset(
    {"rope.scaling.finetuned", "rope.scaling.original_context_length", "expert_used_count", "tensor_data_layout"}
)


def gguf_config(header: GGUFHeader) -> LlamaConfig:
    """The LlamaConfig a GGUF's `{arch}.*` metadata (and its tensors' shapes) describe.

    The architecture gives the model_type (GGUF_ARCHITECTURES); the tensors present give what the metadata do not
    say: tied embeddings (no output.weight), biases (llama: on q/k/v/o and the MLP when stored; qwen2: always on
    q/k/v; qwen3: on q/k/v/o when stored).

    Raises:
        ConfigError: naming the file and key, for an architecture other than llama, qwen2 and qwen3, a missing
            required key, a key that changes the forward pass in a way llama_lens does not implement (mixture of
            experts, YaRN, partial rotary, pooling for embeddings), or an unknown `{arch}.*` key.
    """
    meta, source = header.metadata, str(header.path)
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or arch not in GGUF_ARCHITECTURES:
        raise ConfigError(
            f"{source}: general.architecture is {arch!r}; llama_lens reads GGUF files of the "
            f"{', '.join(repr(a) for a in GGUF_ARCHITECTURES)} architectures (Llama 1-3, SmolLM, TinyLlama, Mistral "
            "7B as llama.cpp converts it, Qwen2/2.5, Qwen3, ...); for other models load their Hugging Face folder"
        )
    model_type = GGUF_ARCHITECTURES[arch]
    prefix = f"{arch}."
    keys = {key.removeprefix(prefix) for key in meta if key.startswith(prefix)}
    unknown = sorted(keys - GGUF_KEYS_READ - GGUF_KEYS_IGNORED)
    if unknown:
        raise ConfigError(
            f"{source}: unsupported metadata key(s) {[prefix + k for k in unknown]}. They may change the forward "
            f"pass, which llama_lens implements as transformers' {ARCHITECTURES[model_type][0]} does without them"
        )

    def number(key: str, default: Any = None, *, kind: type = int) -> Any:
        value = meta.get(prefix + key, default)
        if value is None:
            raise ConfigError(f"{source}: required metadata key {prefix + key!r} is missing")
        # The type first (a string or an array has no isfinite); a float32 inf or NaN is not an integer either
        # (and int() of one raises an unrelated error).
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        integral = is_number and (isinstance(value, int) or (math.isfinite(value) and value == int(value)))
        if not is_number or (kind is int and not integral):
            raise ConfigError(
                f"{source}: {prefix + key} must be {'an integer' if kind is int else 'a number'}, got {value!r:.60} "
                f"(a {type(value).__name__})"
            )
        return kind(value)

    if number("expert_count", 0) > 0:
        raise ConfigError(
            f"{source}: {prefix}expert_count is {meta[prefix + 'expert_count']} (a mixture of experts, such as "
            "Mixtral); llama_lens implements dense models only"
        )
    d_model, n_heads = number("embedding_length"), number("attention.head_count")
    d_head = number("attention.key_length", d_model // n_heads if n_heads else 0)
    if number("attention.value_length", d_head) != d_head:
        raise ConfigError(
            f"{source}: {prefix}attention.value_length differs from key_length; llama_lens implements attention "
            "with one d_head for queries, keys and values"
        )
    if number("rope.dimension_count", d_head) != d_head:
        raise ConfigError(
            f"{source}: {prefix}rope.dimension_count is {meta[prefix + 'rope.dimension_count']} but d_head is "
            f"{d_head}; partial rotary embeddings are not supported"
        )
    embedding = header.tensors.get("token_embd.weight")
    if embedding is None:
        raise CheckpointError(f"{source}: missing tensor 'token_embd.weight'; not a complete model")
    # The embedding's rows are the model's vocabulary (a token list may be shorter than a padded embedding).
    d_vocab = number("vocab_size", embedding.shape[0])
    rope_theta = number("rope.freq_base", 10000.0, kind=float)
    eos = _token_id(meta, "tokenizer.ggml.eos_token_id", source)
    has_q_bias = "blk.0.attn_q.bias" in header.tensors
    fields = dict(
        model_type=model_type,
        d_model=d_model,
        n_layers=number("block_count"),
        n_heads=n_heads,
        n_kv_heads=number("attention.head_count_kv", n_heads),
        d_head=d_head,
        d_mlp=number("feed_forward_length"),
        d_vocab=d_vocab,
        rope_theta=rope_theta,
        rope_scaling=_rope_scaling(header, prefix, d_head, rope_theta),
        # GGUF stores epsilon as float32 (1e-5 becomes 9.99999975e-06); the original config's value is the
        # shortest decimal that rounds to it.
        norm_eps=float(np.format_float_positional(np.float32(number("attention.layer_norm_rms_epsilon", kind=float)))),
        # llama.cpp ties the embeddings when a file has no output.weight.
        tie_embeddings="output.weight" not in header.tensors,
        # Qwen2 always has q/k/v biases (without one on o); a missing one is then named as a missing tensor.
        attention_bias=has_q_bias and model_type in ("llama", "qwen3"),
        qkv_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
        mlp_bias="blk.0.ffn_up.bias" in header.tensors and model_type == "llama",
        max_position_embeddings=number("context_length", 2048),
        bos_token_id=_token_id(meta, "tokenizer.ggml.bos_token_id", source),
        eos_token_ids=(eos,) if eos is not None else (),
        pad_token_id=_token_id(meta, "tokenizer.ggml.padding_token_id", source),
    )
    try:
        return LlamaConfig(**fields)
    except ValueError as err:
        raise ConfigError(f"{source}: {str(err).removeprefix('config: ')}") from None


def _token_id(meta: dict[str, Any], key: str, source: str) -> int | None:
    value = meta.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ConfigError(f"{source}: metadata key {key!r} must be a token id (an integer >= 0), got {value!r:.60}")
    return value


def _rope_scaling(header: GGUFHeader, prefix: str, d_head: int, rope_theta: float) -> RopeScaling | None:
    meta, source = header.metadata, str(header.path)
    kind = meta.get(prefix + "rope.scaling.type", "none")
    factor = meta.get(prefix + "rope.scaling.factor", meta.get(prefix + "rope.scale_linear"))
    if kind == "none" and prefix + "rope.scale_linear" in meta:
        kind = "linear"  # older files: only `rope.scale_linear`
    if "rope_freqs.weight" in header.tensors:
        if kind != "none":
            raise ConfigError(f"{source}: holds rope_freqs.weight and sets {prefix}rope.scaling.type={kind!r}")
        return _llama3_scaling(header, d_head, rope_theta)
    if kind == "none":
        return None
    if kind != "linear":
        raise ConfigError(
            f"{source}: {prefix}rope.scaling.type is {kind!r}; llama_lens implements 'none' and 'linear' RoPE "
            "scaling for GGUF files (and Llama 3.1's, stored as rope_freqs.weight)"
        )
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not factor > 0:
        raise ConfigError(f"{source}: linear RoPE scaling needs a positive {prefix}rope.scaling.factor, got {factor!r}")
    return RopeScaling(kind="linear", factor=float(factor))


def llama3_rope_factors(d_head: int, rope_theta: float, scaling: RopeScaling) -> torch.Tensor:
    """[d_head / 2] the factor dividing each RoPE frequency under Llama 3.1's scaling, as llama.cpp's converter
    computes them for rope_freqs.weight (1 for high frequencies, `factor` for low ones, smoothed between)."""
    freqs = 1.0 / (rope_theta ** (torch.arange(0, d_head, 2, dtype=torch.float32) / d_head))
    original = scaling.original_max_position_embeddings
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            factors.append(1.0)
        elif wavelen > original / low:
            factors.append(scaling.factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / scaling.factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def _llama3_scaling(header: GGUFHeader, d_head: int, rope_theta: float) -> RopeScaling:
    """Llama 3.1's rope scaling recovered from the factors llama.cpp stores: the file keeps the factors only, so
    the usual parameters (low 1, high 4, original context 8192, factor the largest) must reproduce them."""
    stored = header.tensors["rope_freqs.weight"]
    check_qtype(stored.name, stored.qtype, header.path)
    if stored.shape != (d_head // 2,):
        raise ConfigError(f"{header.path}: rope_freqs.weight has shape {list(stored.shape)}, expected [{d_head // 2}]")
    factors = torch.empty(stored.shape, dtype=torch.float32)
    with open(header.path, "rb") as file:
        read_gguf_into(file, stored.start, stored.qtype, factors, what="'rope_freqs.weight'")
    scaling = RopeScaling(
        kind="llama3",
        factor=float(factors.max()),
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    )
    if not torch.allclose(factors, llama3_rope_factors(d_head, rope_theta, scaling), rtol=1e-6, atol=0):
        raise ConfigError(
            f"{header.path}: rope_freqs.weight holds RoPE factors that Llama 3.1's scaling with low_freq_factor 1, "
            "high_freq_factor 4 and an original context of 8192 does not give; llama_lens cannot tell the "
            "parameters from the factors alone: load the model's Hugging Face folder"
        )
    return scaling
