"""llama.cpp's own conventions, written out independently of llama_lens: the oracle its GGUF tests check against,
and a writer of llama.cpp-style GGUF files of our state dicts (with the `gguf` package's own writer)."""

import math

import numpy as np
import torch


def llama_cpp_permute(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF's rotate-half q/k rows to Meta's interleaved order (how a
    llama GGUF stores q/k weights and biases)."""
    return (
        weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


# Where the float16 scales sit in each K-quant block (ggml-common.h: block_q2_K ... block_q6_K), for the types
# gguf cannot quantize: random blocks get finite scales there, so every value dequantizes to a number.
K_QUANT_SCALE_OFFSETS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}

# canonical name -> GGUF name, written out here (not taken from gguf_io) so the test checks the table.
GGUF_NAMES = {
    "embed.weight": "token_embd.weight",
    "ln1.weight": "attn_norm.weight",
    "attn.q_proj.weight": "attn_q.weight",
    "attn.k_proj.weight": "attn_k.weight",
    "attn.v_proj.weight": "attn_v.weight",
    "attn.o_proj.weight": "attn_output.weight",
    "ln2.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "ln_final.weight": "output_norm.weight",
    "unembed.weight": "output.weight",
}


def gguf_name(canonical: str) -> str:
    if canonical.startswith("blocks."):
        _, layer, rest = canonical.split(".", 2)
        return f"blk.{layer}.{GGUF_NAMES[rest]}"
    return GGUF_NAMES[canonical]


def llama_cpp_rope_factors(cfg) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors: Llama 3.1's RoPE factors (rope_freqs.weight)."""
    rs = cfg.rope_scaling
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.d_head, 2, dtype=torch.float32) / cfg.d_head))
    low_freq_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_freq_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    rope_factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            rope_factors.append(1)
        elif wavelen > low_freq_wavelen:
            rope_factors.append(rs.factor)
        else:
            smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
                rs.high_freq_factor - rs.low_freq_factor
            )
            rope_factors.append(1 / ((1 - smooth) / rs.factor + smooth))
    return torch.tensor(rope_factors, dtype=torch.float32)


def random_blocks(qtype: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """[rows, bytes per row] of random blocks of a K-quant, with finite random float16 scales."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block_size, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    blocks = rng.integers(0, 256, size=(rows * cols // block_size, block_bytes), dtype=np.uint8)
    for offset in K_QUANT_SCALE_OFFSETS[qtype]:
        scales = rng.uniform(1e-4, 2e-3, size=len(blocks)).astype(np.float16)
        blocks[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, cols // block_size * block_bytes)


def write_gguf(
    path,
    cfg,
    state,
    *,
    qtype: str = "F32",
    arch: str = "llama",
    extra_metadata=None,
    tokenizer=None,
    tensor_types=None,
    seed: int = 0,
    rope_factors_scale: float | None = None,
):
    """A llama.cpp-style GGUF of `state` (our names, HF layout): q/k permuted, matrices in `qtype`, norms F32.

    Returns:
        stored name -> the bytes written for it, as a numpy array (what `gguf.quants.dequantize` reads).
    """
    import gguf
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.n_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.d_model)
    writer.add_feed_forward_length(cfg.d_mlp)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_key_length(cfg.d_head)
    writer.add_value_length(cfg.d_head)
    writer.add_rope_dimension_count(cfg.d_head)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.d_vocab)
    if cfg.rope_scaling is not None and cfg.rope_scaling.kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(cfg.rope_scaling.factor)
    elif cfg.rope_scaling is not None:  # llama3: llama.cpp stores the factors as a tensor
        factors = llama_cpp_rope_factors(cfg) * (rope_factors_scale or 1.0)
        writer.add_tensor("rope_freqs.weight", factors.numpy())
    for key, value in (extra_metadata or {}).items():
        writer.add_key_value(key, value[0], value[1])
    if tokenizer is not None:
        tokenizer(writer)
    written = {}
    for name, tensor in state.items():
        if name == "unembed.weight" and cfg.tie_embeddings:
            continue
        values = tensor.detach().float()
        if name.endswith("q_proj.weight"):
            values = llama_cpp_permute(values, cfg.n_heads)
        elif name.endswith("k_proj.weight"):
            values = llama_cpp_permute(values, cfg.n_kv_heads)
        values = values.numpy()
        kind = (tensor_types or {}).get(name, qtype if values.ndim == 2 else "F32")
        ggml_type = GGMLQuantizationType[kind]
        if kind in K_QUANT_SCALE_OFFSETS:
            data = random_blocks(kind, *values.shape, rng)
        elif kind == "I8":
            data = rng.integers(-128, 128, size=values.shape, dtype=np.int8)
        else:
            data = quantize(values, ggml_type)
        if kind in ("F32", "F16", "I8"):
            writer.add_tensor(gguf_name(name), data)
        else:
            writer.add_tensor(gguf_name(name), data, raw_shape=data.shape, raw_dtype=ggml_type)
        written[gguf_name(name)] = (data, ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written
