"""Writes checkpoints: Hugging Face safetensors shards + index + config.json, or Meta .pth shards + params.json.

The inverse of the loader, for tests, benchmarks, the synthetic checkpoint script and the embedded demo model:

    write_hf_checkpoint(folder, cfg, state, shards=3)     # weights in memory, under our parameter names
    write_meta_checkpoint(folder, cfg, state, mp=2)       # Meta names, q/k interleaved, split over 2 ranks
    write_safetensors_shards(folder, groups, tensor_for)  # one shard at a time, each tensor made on demand
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from ..config import LlamaConfig, meta_d_mlp
from ..errors import ArgumentError
from ..files import atomic_path, write_text_atomic
from ..validate import resolve_dtype
from .names import (
    HF_INDEX_FILE,
    HF_SINGLE_FILE,
    HF_TO_CANONICAL,
    META_PERMUTED,
    META_TO_CANONICAL,
    inverse,
    layer_template,
    meta_split_dim,
    param_shapes,
    permute_qk_to_interleaved,
    rename,
)


# ------------------------------------------------------------------------------------------ safetensors
def write_safetensors_shards(
    folder: str | os.PathLike, groups: list[list[str]], tensor_for: Callable[[str], torch.Tensor]
) -> Path:
    """Writes safetensors shards, one group of tensors per shard, as `save_pretrained` lays them out.

    One group is written as `model.safetensors`; several as `model-0000k-of-0000N.safetensors` plus
    `model.safetensors.index.json`. Only one shard's tensors are in memory at a time.

    Args:
        folder: an existing folder.
        groups: the stored (Hugging Face) names of each shard's tensors, in order.
        tensor_for: stored name -> the tensor to store (called once per name, shard by shard).

    Returns:
        the folder.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    if len(groups) == 1:
        tensors = {name: tensor_for(name).contiguous() for name in groups[0]}
        with atomic_path(folder / HF_SINGLE_FILE) as temporary:
            save_file(tensors, temporary, metadata={"format": "pt"})
        return folder
    weight_map: dict[str, str] = {}
    total = 0
    for k, group in enumerate(groups, start=1):
        file_name = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: tensor_for(name).contiguous() for name in group}
        with atomic_path(folder / file_name) as temporary:
            save_file(tensors, temporary, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, file_name)
        total += sum(t.nbytes for t in tensors.values())
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    write_text_atomic(folder / HF_INDEX_FILE, json.dumps(index, indent=2) + "\n")
    return folder


def split_evenly(sizes: dict[str, int], parts: int) -> list[list[str]]:
    """Names split into `parts` consecutive, non-empty groups of about equal size (bytes).

    Raises:
        ArgumentError (a ValueError): for `parts` outside [1, number of names].
    """
    if not 1 <= parts <= len(sizes):
        raise ArgumentError(f"shards must be between 1 and the number of tensors ({len(sizes)}), got {parts}")
    total, done, owners = sum(sizes.values()), 0, []
    for size in sizes.values():
        # the shard whose share of the bytes holds this tensor's midpoint
        owners.append(min(int((done + size / 2) / total * parts), parts - 1))
        done += size
    if len(set(owners)) < parts:  # a shard would be empty (one huge tensor): split by count instead
        owners = [k * parts // len(sizes) for k in range(len(sizes))]
    groups: list[list[str]] = [[] for _ in range(parts)]
    for owner, name in zip(owners, sizes, strict=True):
        groups[owner].append(name)
    return groups


def split_by_max_bytes(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Names split into consecutive groups of at most `max_bytes` each (a larger tensor gets a group alone)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes.items():
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


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

    Args:
        path: the folder to write (created).
        cfg: the model's shape.
        state: weights under our names (see `names.param_shapes`).
        shards: number of safetensors files.
        dtype: dtype to store (default: as given).

    Returns:
        the folder.
    """
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
    groups = split_evenly({name: tensor.nbytes for name, tensor in tensors.items()}, shards)
    write_safetensors_shards(folder, groups, tensors.__getitem__)
    stored_dtype = next(iter(tensors.values())).dtype
    config = cfg.to_hf() | {"torch_dtype": str(stored_dtype).removeprefix("torch.")}
    write_text_atomic(folder / "config.json", json.dumps(config, indent=2))
    return folder


# ------------------------------------------------------------------------------------------------- Meta
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
        ArgumentError (a ValueError): for a config params.json cannot express.
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
        tensor = state[name].to(dtype or state[name].dtype)
        heads_attr = META_PERMUTED.get(layer_template(meta_name)[0])
        if heads_attr is not None:
            tensor = permute_qk_to_interleaved(tensor, getattr(cfg, heads_attr))
        split_dim = meta_split_dim(meta_name, vocab_parallel=vocab_parallel)
        if split_dim is None:
            pieces = [tensor] * mp
        else:
            if tensor.shape[split_dim] % mp:
                raise ArgumentError(f"{meta_name}: dim {split_dim} of {list(tensor.shape)} does not split over mp={mp}")
            pieces = tensor.chunk(mp, dim=split_dim)
        for rank, piece in zip(ranks, pieces, strict=True):
            rank[meta_name] = piece.clone()  # a fresh storage each, so a shard file holds only its piece
    if rope_freqs:
        freqs = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.d_head, 2).float() / cfg.d_head)
        for rank in ranks:
            rank["rope.freqs"] = freqs.clone()
    for k, rank in enumerate(ranks):
        with atomic_path(folder / f"consolidated.{k:02d}.pth") as temporary:
            torch.save(rank, temporary)
    write_text_atomic(folder / "params.json", json.dumps(params, indent=2))
    return folder


def meta_params(cfg: LlamaConfig, *, vocab_size_in_params: bool = True) -> dict:
    """The params.json dict of a config, with multiple_of / ffn_dim_multiplier that reproduce its d_mlp.

    Raises:
        ArgumentError (a ValueError): for another architecture than Llama, biases or a rope scaling params.json
            cannot express.
    """
    if cfg.model_type != "llama":
        raise ArgumentError(f"Meta checkpoints hold Llama models only, not {cfg.architecture}; use write_hf_checkpoint")
    if cfg.attention_bias or cfg.mlp_bias:
        raise ArgumentError("Meta checkpoints have no biases; use write_hf_checkpoint for attention_bias/mlp_bias")
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
            raise ArgumentError(f"params.json cannot express rope scaling {scaling}; only Llama 3.1's scaled RoPE")
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
        raise ArgumentError(f"no multiple_of / ffn_dim_multiplier gives d_mlp={d_mlp} for d_model={d_model}")
    return {"multiple_of": 1, "ffn_dim_multiplier": multiplier}
