"""The graph's transcoder protocol (graphs/transcoders.py) for a cross-layer transcoder.

A CLT feature of layer i reads blocks.{i}.mlp.hook_in like a per-layer transcoder's, but writes every MLP output
from layer i up: `decoder_rows` answers with one entry per output layer,

    write_f[j] = act_f * W_dec_i[f, j - i]        for j = i .. n_layers - 1

so the graph's sources at layer j hold the writes of the features of layers 0..j, and the error node at layer j
is what they leave unexplained there (true MLP output - all writes to j - b_dec_j). circuit-tracer's CLT files
hold no skip connection: `skip_weight` is None at every layer.

The CLT is not changed: its tensors are cast to the graph's dtype as they are read (a float32 CLT on a float64
model gives float32 weights computed in float64).
"""

from __future__ import annotations

import torch

from ..dictionaries.cross_layer import CrossLayerTranscoder
from ..errors import ArgumentError


class CrossLayerTranscoders:
    """A `CrossLayerTranscoder` as a `TranscoderSet` for `ll.attribution_graph`.

    Args:
        clt: the CLT (`ll.load_dictionary` of a circuit-tracer CLT folder), spanning every layer of the model and
            reading blocks.{i}.mlp.hook_in, writing blocks.{i}.hook_mlp_out.
        n_layers: the model's layer count.
        dtype: the dtype the graph computes in.
    """

    def __init__(self, clt: CrossLayerTranscoder, n_layers: int, *, dtype: torch.dtype) -> None:
        if clt.n_layers != n_layers:
            raise ArgumentError(
                f"{clt.path}: the CLT spans {clt.n_layers} layers and the model has {n_layers}; an attribution "
                "graph needs a CLT over every layer of the model"
            )
        expected_in = [f"blocks.{layer}.mlp.hook_in" for layer in range(n_layers)]
        expected_out = [f"blocks.{layer}.hook_mlp_out" for layer in range(n_layers)]
        if clt.hooks_in != expected_in or clt.hooks_out != expected_out:
            raise ArgumentError(
                f"{clt.path}: the CLT reads {clt.hooks_in[0]} and writes {clt.hooks_out[0]} (at layer 0); "
                "attribution graphs take CLTs reading blocks.{i}.mlp.hook_in and writing blocks.{i}.hook_mlp_out "
                "(config.yaml: feature_input_hook: mlp.hook_in, feature_output_hook: hook_mlp_out)"
            )
        self.clt = clt
        self.n_layers = n_layers
        self.dtype = dtype

    def _param(self, layer: int, name: str) -> torch.Tensor:
        return self.clt.param(layer, name).to(self.dtype)

    def encode(self, layer: int, mlp_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre = mlp_in.to(self._param(layer, "b_enc").device, self.dtype) @ self._param(layer, "W_enc")
        pre = pre + self._param(layer, "b_enc")
        if self.clt.activation == "threshold":  # circuit-tracer's JumpReLU: pre * (pre > threshold)
            return pre, pre * (pre > self._param(layer, "threshold")).to(pre.dtype)
        return pre, torch.relu(pre)

    def encoder_rows(self, layer: int, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # pre = mlp_in @ W_enc + b_enc; W_enc is [d_in, d_sae].
        return self._param(layer, "W_enc")[:, features].T, self._param(layer, "b_enc")[features]

    def decoder_rows(self, layer: int, features: torch.Tensor, acts: torch.Tensor) -> dict[int, torch.Tensor]:
        rows = self.clt.W_dec_rows(layer, features).to(self.dtype)  # [n, n_layers - layer, d_model]
        rows = rows * acts.to(rows.device, self.dtype)[:, None, None]
        return {layer + offset: rows[:, offset] for offset in range(self.n_layers - layer)}

    def output_bias(self, layer: int) -> torch.Tensor:
        return self._param(layer, "b_dec")

    def skip_weight(self, layer: int) -> torch.Tensor | None:
        return None
