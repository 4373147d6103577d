"""`ll.load_dictionary`: open a dictionary folder in any format llama_lens reads, detected from its files."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import ArgumentError, ConfigError, MissingFileError
from .cross_layer import CrossLayerTranscoder
from .dictionary import Dictionary
from .formats import (
    detect_format,
    read_circuit_tracer,
    read_circuit_tracer_clt,
    read_llama_scope,
    read_saelens,
    read_sparsify,
)


def load_dictionary(
    path: str | os.PathLike,
    *,
    hook_out: str | None = None,
    hookpoint: str | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Dictionary | list[Dictionary] | CrossLayerTranscoder:
    """Opens a sparse dictionary (SAE or transcoder) folder; reads headers only, weights on first use.

    Formats, detected from the files: SAELens (cfg.json + sae_weights.safetensors, 6.x and pre-6.0 configs),
    sparsify (cfg.json + sae.safetensors, in a folder named after its hookpoint, or a folder of such
    folders), Llama Scope (hyperparams.json + checkpoints/final.safetensors) and circuit-tracer transcoder
    sets (config.yaml + layer_{i}.safetensors), and circuit-tracer cross-layer transcoders (config.yaml +
    W_enc_{i} / W_dec_{i}.safetensors), opened as one CrossLayerTranscoder. A folder holding several
    dictionaries gives a list.

    Args:
        path: the folder.
        hook_out: the hook a SAELens transcoder writes, where its cfg.json does not say.
        hookpoint: a sparsify dictionary's hookpoint ("layers.3.mlp"), where its folder is named otherwise.
        device, dtype: where and in what the weights are kept and the math runs.

    Raises:
        MissingFileError: no such folder.
        ConfigError: a folder in no format llama_lens reads, or a site or architecture it cannot map (the file
            and key are named).
    """
    path = Path(path).expanduser()
    if path.is_file():
        path = path.parent
    if not path.is_dir():
        raise MissingFileError(f"{path}: no such dictionary folder")
    found = detect_format(path)
    if found is None:
        children = sorted(p for p in path.iterdir() if p.is_dir() and detect_format(p) == "sparsify")
        if children:  # a sparsify run: one folder per hookpoint
            return [read_sparsify(p).to(device, dtype) for p in children]
        raise ConfigError(
            f"{path}: no dictionary format llama_lens reads (SAELens cfg.json + sae_weights.safetensors, sparsify "
            "cfg.json + sae.safetensors, Llama Scope hyperparams.json + checkpoints/final.safetensors, "
            "circuit-tracer config.yaml + layer_{i}.safetensors or W_enc_{i} / W_dec_{i}.safetensors)"
        )
    if hook_out is not None and found != "saelens":
        raise ArgumentError(f"hook_out= is for SAELens transcoders; {path} is a {found} folder")
    if hookpoint is not None and found != "sparsify":
        raise ArgumentError(f"hookpoint= is for sparsify dictionaries; {path} is a {found} folder")
    if found == "saelens":
        return read_saelens(path, hook_out=hook_out).to(device, dtype)
    if found == "sparsify":
        return read_sparsify(path, hookpoint=hookpoint).to(device, dtype)
    if found == "llama_scope":
        return read_llama_scope(path).to(device, dtype)
    if found == "circuit_tracer_clt":
        return read_circuit_tracer_clt(path).to(device, dtype)
    return [d.to(device, dtype) for d in read_circuit_tracer(path)]
