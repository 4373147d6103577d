"""Random Llama weights written in every checkpoint layout, for tests and benchmarks.

cfg = LlamaConfig(d_model=64, n_layers=2, ...)
state = random_state_dict(cfg)                        # our parameter names
write_hf_checkpoint(tmp / "hf", cfg, state, shards=3)  # model-0000k-of-00003.safetensors + index + config
write_meta_checkpoint(tmp / "meta", cfg, state, mp=2)  # consolidated.0k.pth + params.json
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .checkpoint import (
    HF_INDEX_FILE,
    HF_SINGLE_FILE,
    HF_TO_CANONICAL,
    META_PERMUTED,
    META_SPLIT_DIM,
    META_TO_CANONICAL,
    _template,
    inverse,
    param_shapes,
    permute_qk_to_interleaved,
    rename,
    resolve_dtype,
)
from .config import LlamaConfig, meta_d_mlp


def random_state_dict(cfg: LlamaConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Plausible random weights under our parameter names (see `checkpoint.param_shapes`).

    Matrices and biases are normal with std 0.02, norm weights 1 + normal noise (std 0.1), so activations
    keep a sensible scale through many layers. With tied embeddings `unembed.weight` is the same tensor
    object as `embed.weight`.
    """
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in param_shapes(cfg).items():
        if name == "unembed.weight" and cfg.tie_embeddings:
            state[name] = state["embed.weight"]
            continue
        values = torch.randn(shape, generator=generator)
        if ".ln" in f".{name}":
            values = 1 + 0.1 * values
        else:
            values = 0.02 * values
        state[name] = values.to(dtype)
    return state


def write_hf_checkpoint(
    path: str | os.PathLike,
    cfg: LlamaConfig,
    state: dict[str, torch.Tensor],
    *,
    shards: int = 1,
    dtype: torch.dtype | str | None = None,
) -> Path:
    """Writes a Hugging Face folder: config.json and `model.safetensors`, or `shards` shard files + index.

    Tensors are split over the shards in forward order with about equal bytes per shard, as
    `save_pretrained` does. A tied model stores no lm_head.

    Returns:
        the folder.
    """
    from safetensors.torch import save_file

    dtype = resolve_dtype(dtype)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    to_hf = inverse(HF_TO_CANONICAL)
    tensors = {}
    for name in param_shapes(cfg):
        if name == "unembed.weight" and cfg.tie_embeddings:
            continue
        tensor = state[name]
        tensors[rename(name, to_hf)] = tensor.to(dtype or tensor.dtype).contiguous()
    groups = _split_evenly(list(tensors.items()), shards)
    if shards == 1:
        save_file(tensors, folder / HF_SINGLE_FILE, metadata={"format": "pt"})
    else:
        weight_map = {}
        for k, group in enumerate(groups, start=1):
            file_name = f"model-{k:05d}-of-{shards:05d}.safetensors"
            save_file(dict(group), folder / file_name, metadata={"format": "pt"})
            weight_map |= {name: file_name for name, _ in group}
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / HF_INDEX_FILE).write_text(json.dumps(index, indent=2))
    stored_dtype = next(iter(tensors.values())).dtype
    config = cfg.to_hf() | {"torch_dtype": str(stored_dtype).removeprefix("torch.")}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def write_meta_checkpoint(
    path: str | os.PathLike,
    cfg: LlamaConfig,
    state: dict[str, torch.Tensor],
    *,
    mp: int = 1,
    dtype: torch.dtype | str | None = None,
    vocab_parallel: bool = False,
    vocab_size_in_params: bool = True,
    rope_freqs: bool = False,
) -> Path:
    """Writes a Meta release folder: `consolidated.00.pth` … (one per model-parallel rank) + params.json.

    The inverse of the loader: Meta names, q/k rows permuted back to Meta's interleaved RoPE layout, each
    weight split over `mp` ranks along the axis Meta's model-parallel layers split it.

    Args:
        path: the folder to write.
        cfg: the model's shape; must be expressible in params.json (no biases, rope scaling "llama3" only).
        state: weights under our names.
        mp: model-parallel ranks.
        dtype: dtype to store (default: as given).
        vocab_parallel: split the embedding over the vocabulary (Llama 3) instead of d_model (Llama 2).
        vocab_size_in_params: write the vocabulary size; False writes -1, as Llama 2's params.json does.
        rope_freqs: also store Llama 2's `rope.freqs` tensor (which the loader skips).

    Returns:
        the folder.

    Raises:
        ValueError: for a config params.json cannot express.
    """
    dtype = resolve_dtype(dtype)
    params = meta_params(cfg, vocab_size_in_params=vocab_size_in_params)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    to_meta = inverse(META_TO_CANONICAL)
    ranks: list[dict[str, torch.Tensor]] = [{} for _ in range(mp)]
    for name in param_shapes(cfg):
        if name == "unembed.weight" and cfg.tie_embeddings:
            continue  # a Meta folder without output.weight is read as tied
        meta_name = rename(name, to_meta)
        template = _template(meta_name)[0]
        tensor = state[name].to(dtype or state[name].dtype)
        heads_attr = META_PERMUTED.get(template)
        if heads_attr is not None:
            tensor = permute_qk_to_interleaved(tensor, getattr(cfg, heads_attr))
        if template == "tok_embeddings.weight":
            split_dim = 0 if vocab_parallel else 1
        else:
            split_dim = META_SPLIT_DIM.get(template)
        if split_dim is None:
            pieces = [tensor] * mp
        else:
            if tensor.shape[split_dim] % mp:
                raise ValueError(f"{meta_name}: dim {split_dim} of {list(tensor.shape)} does not split over mp={mp}")
            pieces = tensor.chunk(mp, dim=split_dim)
        for rank, piece in zip(ranks, pieces, strict=True):
            rank[meta_name] = piece.clone()  # a fresh storage each, so a shard file holds only its piece
    if rope_freqs:
        freqs = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.d_head, 2).float() / cfg.d_head)
        for rank in ranks:
            rank["rope.freqs"] = freqs.clone()
    for k, rank in enumerate(ranks):
        torch.save(rank, folder / f"consolidated.{k:02d}.pth")
    (folder / "params.json").write_text(json.dumps(params, indent=2))
    return folder


def meta_params(cfg: LlamaConfig, *, vocab_size_in_params: bool = True) -> dict:
    """The params.json dict of a config, with multiple_of / ffn_dim_multiplier that reproduce its d_mlp.

    Raises:
        ValueError: for biases or a rope scaling params.json cannot express.
    """
    if cfg.attention_bias or cfg.mlp_bias:
        raise ValueError("Meta checkpoints have no biases; use write_hf_checkpoint for attention_bias/mlp_bias")
    params = {
        "dim": cfg.d_model,
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.n_kv_heads,
        "vocab_size": cfg.d_vocab if vocab_size_in_params else -1,
        "norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_seq_len": cfg.max_position_embeddings,
    }
    if cfg.d_head != cfg.d_model // cfg.n_heads:
        params["head_dim"] = cfg.d_head
    params |= _meta_mlp_params(cfg.d_model, cfg.d_mlp)
    scaling = cfg.rope_scaling
    if scaling is not None:
        fixed_by_meta = scaling.low_freq_factor == 1.0 and scaling.original_max_position_embeddings == 8192
        if scaling.kind != "llama3" or not fixed_by_meta:
            raise ValueError(f"params.json cannot express rope scaling {scaling}; only Llama 3.1's scaled RoPE")
        params |= {
            "use_scaled_rope": True,
            "rope_scaling_factor": scaling.factor,
            "rope_high_freq_factor": scaling.high_freq_factor,
        }
    return params


def _meta_mlp_params(d_model: int, d_mlp: int) -> dict:
    """multiple_of (and ffn_dim_multiplier if needed) for which Meta's formula gives d_mlp."""
    for multiple_of in (256, 128, 64, 32, 16, 8, 4, 2, 1):
        if meta_d_mlp(d_model, multiple_of, None) == d_mlp:
            return {"multiple_of": multiple_of}
    # int(multiplier * hidden) lands on d_mlp when the multiplier aims half a unit above it.
    hidden = int(2 * (4 * d_model) / 3)
    multiplier = (d_mlp + 0.5) / hidden
    if meta_d_mlp(d_model, 1, multiplier) != d_mlp:
        raise ValueError(f"no multiple_of / ffn_dim_multiplier gives d_mlp={d_mlp} for d_model={d_model}")
    return {"multiple_of": 1, "ffn_dim_multiplier": multiplier}


def _split_evenly(items: list[tuple[str, torch.Tensor]], parts: int) -> list[list[tuple[str, torch.Tensor]]]:
    """`parts` consecutive, non-empty groups of about equal bytes."""
    if not 1 <= parts <= len(items):
        raise ValueError(f"shards must be between 1 and the number of tensors ({len(items)}), got {parts}")
    sizes = [t.numel() * t.element_size() for _, t in items]
    total, done, owners = sum(sizes), 0, []
    for size in sizes:
        # the shard whose share of the bytes holds this tensor's midpoint
        owners.append(min(int((done + size / 2) / total * parts), parts - 1))
        done += size
    if len(set(owners)) < parts:  # a shard would be empty (one huge tensor): split by count instead
        owners = [k * parts // len(items) for k in range(len(items))]
    groups: list[list[tuple[str, torch.Tensor]]] = [[] for _ in range(parts)]
    for owner, item in zip(owners, items, strict=True):
        groups[owner].append(item)
    return groups
