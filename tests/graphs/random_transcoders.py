"""Random transcoders for the graph tests, built in memory (no files): per-layer ones as `Dictionary` objects
and a cross-layer one as a `CrossLayerTranscoder` over an in-memory tensor store."""

from __future__ import annotations

from pathlib import Path

import torch

from llama_lens.dictionaries.cross_layer import CrossLayerTranscoder
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


class MemoryTensors:
    """The reads a `CrossLayerTranscoder` makes of its files (`read`, `read_rows`), from tensors in memory."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self.bytes_read = 0

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.tensors[name].to(dtype or self.tensors[name].dtype)

    def read_rows(self, name: str, rows, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.read(name, dtype)[torch.as_tensor(rows, dtype=torch.long)]


def random_clt(
    d_model: int,
    n_layers: int,
    *,
    activation: str = "relu",
    d_sae: int = 32,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> CrossLayerTranscoder:
    """A cross-layer transcoder over every layer (reading blocks.{i}.mlp.hook_in, writing blocks.{j}.hook_mlp_out
    for j >= i), ReLU or circuit-tracer's JumpReLU ("threshold"). Its weights are float32 numbers (the CLT reads
    its files in float32), held in float64 so the graph's float64 arithmetic on them is exact to rounding."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).float().double()

    encoders, decoders = [], []
    for layer in range(n_layers):
        tensors = {
            "W_enc": randn(d_sae, d_model, scale=d_model**-0.5),  # circuit-tracer's layout [d_sae, d_in]
            "b_enc": randn(d_sae, scale=0.3) - 0.3,
            "b_dec": randn(d_model, scale=0.1),
            # later layers' directions smaller, so the writes of all layers below stay of one size
            "W_dec": randn(d_sae, n_layers - layer, d_model, scale=0.3 / n_layers**0.5),
        }
        if activation == "threshold":
            tensors["threshold"] = (torch.rand(d_sae, generator=generator, dtype=torch.float64) * 0.3).float().double()
        store = MemoryTensors(tensors)
        names = [name for name in tensors if name != "W_dec"]
        encoders.append({name: TensorRef(store, name, transposed=name == "W_enc") for name in names})
        decoders.append(TensorRef(store, "W_dec"))
    return CrossLayerTranscoder(
        format="test",
        path=Path("random/clt"),
        n_layers=n_layers,
        d_in=d_model,
        d_sae=d_sae,
        d_out=d_model,
        hooks_in=[f"blocks.{layer}.mlp.hook_in" for layer in range(n_layers)],
        hooks_out=[f"blocks.{layer}.hook_mlp_out" for layer in range(n_layers)],
        encoders=encoders,
        decoders=decoders,
        activation=activation,
        dtype=dtype,
    )
