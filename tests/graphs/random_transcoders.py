"""Random per-layer transcoders for the graph tests, built in memory (no files) as `Dictionary` objects."""

from __future__ import annotations

from pathlib import Path

import torch

from llama_lens.dictionaries.dictionary import Dictionary, TensorRef


def random_transcoders(
    d_model: int,
    n_layers: int,
    *,
    activation: str = "relu",
    skip: bool = False,
    d_sae: int = 48,
    k: int = 6,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> list[Dictionary]:
    """One transcoder per layer reading blocks.{i}.mlp.hook_in and writing blocks.{i}.hook_mlp_out; about a
    third of the features fire on the tiny model's MLP inputs (norm ~ sqrt(d_model))."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale):
        return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale

    out = []
    for layer in range(n_layers):
        tensors = {
            "W_enc": randn(d_model, d_sae, scale=d_model**-0.5),
            "b_enc": randn(d_sae, scale=0.3) - 0.3,
            "W_dec": randn(d_sae, d_model, scale=0.3),
            "b_dec": randn(d_model, scale=0.1),
        }
        if skip:
            tensors["W_skip"] = randn(d_model, d_model, scale=0.3 * d_model**-0.5)
        if activation in ("jumprelu", "threshold"):
            tensors["threshold"] = torch.rand(d_sae, generator=generator, dtype=torch.float64) * 0.3
        out.append(
            Dictionary(
                format="test",
                architecture=activation,
                path=Path(f"random/layer_{layer}"),
                hook_in=f"blocks.{layer}.mlp.hook_in",
                hook_out=f"blocks.{layer}.hook_mlp_out",
                d_in=d_model,
                d_sae=d_sae,
                d_out=d_model,
                params={name: TensorRef(None, name) for name in tensors},
                activation=activation,
                k=k if activation == "topk" else None,
                dtype=dtype,
                _loaded={name: t.to(dtype) for name, t in tensors.items()},
            )
        )
    return out
