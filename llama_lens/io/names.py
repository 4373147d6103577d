"""What a Llama checkpoint's files and tensors are called, how they are shaped, and how q/k rows are ordered.

Every layout is read into the parameter names of `HookedLlama` (the "canonical" names: `embed.weight`,
`blocks.{i}.attn.q_proj.weight`, ...). This module holds the data that says how:
- `HF_TO_CANONICAL` / `META_TO_CANONICAL`: stored name -> canonical name, with `{i}` for the layer index
  (`rename` looks a name up in either direction, `inverse` turns a table around);
- `META_SPLIT_DIM`: the axis each weight of a Meta release is split on across model-parallel shards;
- `permute_qk_to_rotate_half` / `permute_qk_to_interleaved`: Meta's (and llama.cpp's) interleaved RoPE row
  order of q/k weights to Hugging Face's rotate-half order and back;
- `param_shapes` / `block_param_shapes`: the shape the config implies for each canonical name.

Nothing here reads a file.
"""

from __future__ import annotations

import re

import torch

from ..config import LlamaConfig

HF_INDEX_FILE = "model.safetensors.index.json"
HF_SINGLE_FILE = "model.safetensors"

# --------------------------------------------------------------------------------------------- rename tables
# `{i}` is the layer index. Each table maps a stored name to the parameter name of HookedLlama.
HF_TO_CANONICAL = {
    "model.embed_tokens.weight": "embed.weight",
    "model.layers.{i}.input_layernorm.weight": "blocks.{i}.ln1.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blocks.{i}.attn.q_proj.weight",
    "model.layers.{i}.self_attn.q_proj.bias": "blocks.{i}.attn.q_proj.bias",
    "model.layers.{i}.self_attn.k_proj.weight": "blocks.{i}.attn.k_proj.weight",
    "model.layers.{i}.self_attn.k_proj.bias": "blocks.{i}.attn.k_proj.bias",
    "model.layers.{i}.self_attn.v_proj.weight": "blocks.{i}.attn.v_proj.weight",
    "model.layers.{i}.self_attn.v_proj.bias": "blocks.{i}.attn.v_proj.bias",
    "model.layers.{i}.self_attn.o_proj.weight": "blocks.{i}.attn.o_proj.weight",
    "model.layers.{i}.self_attn.o_proj.bias": "blocks.{i}.attn.o_proj.bias",
    "model.layers.{i}.self_attn.q_norm.weight": "blocks.{i}.attn.q_norm.weight",  # Qwen3
    "model.layers.{i}.self_attn.k_norm.weight": "blocks.{i}.attn.k_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blocks.{i}.ln2.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blocks.{i}.mlp.gate_proj.weight",
    "model.layers.{i}.mlp.gate_proj.bias": "blocks.{i}.mlp.gate_proj.bias",
    "model.layers.{i}.mlp.up_proj.weight": "blocks.{i}.mlp.up_proj.weight",
    "model.layers.{i}.mlp.up_proj.bias": "blocks.{i}.mlp.up_proj.bias",
    "model.layers.{i}.mlp.down_proj.weight": "blocks.{i}.mlp.down_proj.weight",
    "model.layers.{i}.mlp.down_proj.bias": "blocks.{i}.mlp.down_proj.bias",
    "model.norm.weight": "ln_final.weight",
    "lm_head.weight": "unembed.weight",
}

# Meta's names: w1 is the gate, w3 the up projection, w2 the down projection.
META_TO_CANONICAL = {
    "tok_embeddings.weight": "embed.weight",
    "layers.{i}.attention_norm.weight": "blocks.{i}.ln1.weight",
    "layers.{i}.attention.wq.weight": "blocks.{i}.attn.q_proj.weight",
    "layers.{i}.attention.wk.weight": "blocks.{i}.attn.k_proj.weight",
    "layers.{i}.attention.wv.weight": "blocks.{i}.attn.v_proj.weight",
    "layers.{i}.attention.wo.weight": "blocks.{i}.attn.o_proj.weight",
    "layers.{i}.ffn_norm.weight": "blocks.{i}.ln2.weight",
    "layers.{i}.feed_forward.w1.weight": "blocks.{i}.mlp.gate_proj.weight",
    "layers.{i}.feed_forward.w3.weight": "blocks.{i}.mlp.up_proj.weight",
    "layers.{i}.feed_forward.w2.weight": "blocks.{i}.mlp.down_proj.weight",
    "norm.weight": "ln_final.weight",
    "output.weight": "unembed.weight",
}

# Stored tensors we skip on purpose: RoPE frequencies, which the model recomputes from the config
# (transformers < 4.31 saved `inv_freq` buffers; Llama 2's consolidated files hold `rope.freqs`).
HF_IGNORED = frozenset({"model.layers.{i}.self_attn.rotary_emb.inv_freq"})
META_IGNORED = frozenset({"rope.freqs"})

# Axis along which Meta's model-parallel code splits each weight: column-parallel layers (wq, wk, wv, w1, w3,
# output) split their output rows (dim 0), row-parallel layers (wo, w2) their input columns (dim 1). Norms are
# replicated. The embedding is split on dim 1 by Llama 2 (ParallelEmbedding) and on dim 0 by Llama 3
# (VocabParallelEmbedding), so its axis is found from the shapes.
META_SPLIT_DIM = {
    "layers.{i}.attention.wq.weight": 0,
    "layers.{i}.attention.wk.weight": 0,
    "layers.{i}.attention.wv.weight": 0,
    "layers.{i}.feed_forward.w1.weight": 0,
    "layers.{i}.feed_forward.w3.weight": 0,
    "output.weight": 0,
    "layers.{i}.attention.wo.weight": 1,
    "layers.{i}.feed_forward.w2.weight": 1,
}

# Meta q/k weights to permute on read, with the config attribute giving their number of heads.
META_PERMUTED = {
    "layers.{i}.attention.wq.weight": "n_heads",
    "layers.{i}.attention.wk.weight": "n_kv_heads",
}


# ------------------------------------------------------------------------------------------------ renaming
_LAYER = re.compile(r"\.(\d+)\.")


def layer_template(name: str) -> tuple[str, int | None]:
    """The name with its layer index replaced by `{i}`, and that index (None outside the layers).

    ("model.layers.{i}.mlp.up_proj.weight", 3) for "model.layers.3.mlp.up_proj.weight".
    """
    match = _LAYER.search(name)
    if match is None:
        return name, None
    return name[: match.start()] + ".{i}." + name[match.end() :], int(match.group(1))


def rename(name: str, table: dict[str, str]) -> str | None:
    """Looks `name` up in a rename table (either direction); None when the table does not hold it."""
    template, layer = layer_template(name)
    target = table.get(template)
    if target is None:
        return None
    return target if layer is None else target.replace("{i}", str(layer))


def inverse(table: dict[str, str]) -> dict[str, str]:
    """The same table read the other way (canonical name -> stored name)."""
    return {canonical: stored for stored, canonical in table.items()}


def meta_split_dim(meta_name: str, *, vocab_parallel: bool) -> int | None:
    """The axis a Meta weight is split on across model-parallel shards (None: replicated).

    Args:
        meta_name: the stored name ("layers.3.attention.wq.weight").
        vocab_parallel: the embedding is split over the vocabulary (Llama 3), not over d_model (Llama 2).
    """
    template = layer_template(meta_name)[0]
    if template == "tok_embeddings.weight":
        return 0 if vocab_parallel else 1
    return META_SPLIT_DIM.get(template)


# --------------------------------------------------------------------------------------- q/k permutation
def permute_qk_to_rotate_half(weight: torch.Tensor, n_heads: int, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Meta's interleaved RoPE layout of q/k rows to Hugging Face's rotate-half layout.

    Within each head Meta pairs rows (0, 1), (2, 3), ...; Hugging Face pairs row j with row j + d_head // 2.
    This is `permute` of transformers' convert_llama_weights_to_hf.py, and undoes llama.cpp's `permute` in
    convert_hf_to_gguf.py (a GGUF stores q/k in Meta's layout).

    Args:
        weight: [n_heads * d_head, d_model] (or [n_heads * d_head] for a bias).
        n_heads: heads in this projection (n_kv_heads for k).
        out: a contiguous tensor of the same shape (any dtype, `weight`'s device) to write the result into,
            cast on the way, without an intermediate copy.

    Returns:
        [n_heads * d_head, d_model]: a new tensor, or `out`.
    """
    rows, rest = weight.shape[0], weight.shape[1:]
    interleaved = weight.reshape(n_heads, rows // n_heads // 2, 2, *rest)  # [n_heads, d_head / 2, 2, ...]
    if out is None:
        return interleaved.transpose(1, 2).reshape(weight.shape)
    # `out` seen in Meta's row order: [n_heads, d_head / 2, 2, ...]
    out.view(n_heads, 2, rows // n_heads // 2, *rest).transpose(1, 2).copy_(interleaved)
    return out


def permute_qk_to_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `permute_qk_to_rotate_half` (used to write Meta checkpoints).

    Args:
        weight: [n_heads * d_head, d_model] (or [n_heads * d_head]) in rotate-half order.
        n_heads: heads in this projection (n_kv_heads for k).

    Returns:
        [n_heads * d_head, d_model] in Meta's interleaved order, a new tensor.
    """
    rows, rest = weight.shape[0], weight.shape[1:]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *rest).transpose(1, 2).reshape(weight.shape)


# ----------------------------------------------------------------------------------------- expected shapes
def block_param_shapes(cfg: LlamaConfig, layer: int) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape of every parameter of decoder layer `layer`."""
    d_model, d_mlp = cfg.d_model, cfg.d_mlp
    d_q, d_kv = cfg.n_heads * cfg.d_head, cfg.n_kv_heads * cfg.d_head
    prefix = f"blocks.{layer}."
    shapes = {
        "ln1.weight": (d_model,),
        "attn.q_proj.weight": (d_q, d_model),
        "attn.k_proj.weight": (d_kv, d_model),
        "attn.v_proj.weight": (d_kv, d_model),
        "attn.o_proj.weight": (d_model, d_q),
    }
    if cfg.has_qkv_bias:
        shapes |= {"attn.q_proj.bias": (d_q,), "attn.k_proj.bias": (d_kv,), "attn.v_proj.bias": (d_kv,)}
    if cfg.has_o_bias:
        shapes["attn.o_proj.bias"] = (d_model,)
    if cfg.qk_norm:
        shapes |= {"attn.q_norm.weight": (cfg.d_head,), "attn.k_norm.weight": (cfg.d_head,)}
    shapes |= {
        "ln2.weight": (d_model,),
        "mlp.gate_proj.weight": (d_mlp, d_model),
        "mlp.up_proj.weight": (d_mlp, d_model),
        "mlp.down_proj.weight": (d_model, d_mlp),
    }
    if cfg.mlp_bias:
        shapes |= {"mlp.gate_proj.bias": (d_mlp,), "mlp.up_proj.bias": (d_mlp,), "mlp.down_proj.bias": (d_model,)}
    return {prefix + name: shape for name, shape in shapes.items()}


def param_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape of every parameter of the full model, in forward order.

    `unembed.weight` is listed even for tied embeddings, where it is the same tensor as `embed.weight`.
    """
    shapes = {"embed.weight": (cfg.d_vocab, cfg.d_model)}
    for layer in range(cfg.n_layers):
        shapes |= block_param_shapes(cfg, layer)
    return shapes | {"ln_final.weight": (cfg.d_model,), "unembed.weight": (cfg.d_vocab, cfg.d_model)}


def is_norm_weight(param: str) -> bool:
    """Whether a canonical name is an RMSNorm weight (ln1, ln2, ln_final, and Qwen3's q_norm/k_norm)."""
    return ".ln" in f".{param}" or param.endswith(("q_norm.weight", "k_norm.weight"))


def component(param: str | None) -> str | None:
    """The part of the model a canonical name belongs to: embed, attn, mlp, norm or head (None for None)."""
    if param is None:
        return None
    if param == "embed.weight":
        return "embed"
    if param == "unembed.weight":
        return "head"
    if is_norm_weight(param):
        return "norm"
    return "attn" if ".attn." in param else "mlp"
