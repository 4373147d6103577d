"""A cross-layer transcoder (CLT): features read at one layer's MLP input and write to the MLP outputs of that
layer and every later one, as circuit-tracer's CrossLayerTranscoder does.

Shapes (the model's glossary, plus):
    n_layers    layers the CLT spans (all the model's)
    d_in        width it reads at each layer (d_model at the MLP's input)
    d_sae       features per layer
    d_out       width it writes at each layer (d_model at the MLP's output)

The math, for features of layer i and the output of layer j >= i:

    pre_i  = x_i @ W_enc_i.T + b_enc_i                       x_i read at hook_in(i)       [..., d_sae]
    acts_i = relu(pre_i)  or  pre_i * (pre_i > threshold_i)  (circuit-tracer's JumpReLU, without a ReLU)
    out_j  = b_dec_j + sum over i <= j of acts_i @ W_dec_i[:, j - i]                         [..., d_out]

On disk (circuit-tracer's `to_safetensors`): W_enc_{i}.safetensors holds W_enc_{i} [d_sae, d_in], b_enc_{i},
b_dec_{i} and threshold_{i}; W_dec_{i}.safetensors holds W_dec_{i} [d_sae, n_layers - i, d_out]. The encoders
and biases are read on first use; decoder rows (a feature's directions to every later layer at once) only for
the features that fired.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ArgumentError
from .dictionary import TensorRef


@dataclass
class CrossLayerTranscoder:
    """A cross-layer transcoder over `n_layers` layers; see the module docstring for the math.

    Built by `ll.load_dictionary` from a circuit-tracer CLT folder. `encode_layer` / `decode_layer` work one
    layer at a time (what splicing does); `encode` / `decode` / `forward` take every layer at once, stacked on
    a leading dimension of n_layers, as circuit-tracer's do.

    Attributes:
        hooks_in: the hook each layer's features read ("blocks.{i}.mlp.hook_in").
        hooks_out: the hook each layer's output is written to ("blocks.{i}.hook_mlp_out").
        activation: "relu" or "threshold" (circuit-tracer's JumpReLU).
    """

    format: str
    path: Path
    n_layers: int
    d_in: int
    d_sae: int
    d_out: int
    hooks_in: list[str]
    hooks_out: list[str]
    encoders: list[dict[str, TensorRef]]  # per layer: W_enc, b_enc, b_dec and, for a JumpReLU, threshold
    decoders: list[TensorRef]  # per layer: W_dec_{i} [d_sae, n_layers - i, d_out]
    activation: str = "relu"
    architecture: str = "cross_layer_transcoder"
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _loaded: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------------------------------ parameters
    @property
    def is_transcoder(self) -> bool:
        return True

    @property
    def has_skip(self) -> bool:
        return False  # circuit-tracer's files hold no W_skip for a CLT

    @property
    def bytes_read(self) -> int:
        """Bytes read from the CLT's files since it was opened."""
        refs = [ref for layer in self.encoders for ref in layer.values()] + list(self.decoders)
        return sum(file.bytes_read for file in {ref.file for ref in refs})

    def _check_layer(self, layer: int) -> int:
        if isinstance(layer, bool) or not hasattr(layer, "__index__") or not 0 <= layer.__index__() < self.n_layers:
            raise ArgumentError(f"layer must be an int in [0, {self.n_layers}) for the CLT {self.path}; got {layer!r}")
        return layer.__index__()

    def param(self, layer: int, name: str) -> torch.Tensor:
        """Layer `layer`'s W_enc [d_in, d_sae], b_enc [d_sae], b_dec [d_out] or threshold [d_sae], read on first
        use and kept."""
        key = (self._check_layer(layer), name)
        if key not in self._loaded:
            ref = self.encoders[layer][name]
            # Read as stored and cast once: a float64 file read with dtype=float64 keeps every bit (a float32
            # step between would round it), and a bf16 file widens exactly.
            tensor = ref.file.read(ref.name)
            if ref.transposed:
                tensor = tensor.T.contiguous()
            self._loaded[key] = tensor.to(self.device, self.dtype)
        return self._loaded[key]

    def W_enc(self, layer: int) -> torch.Tensor:
        return self.param(layer, "W_enc")

    def W_dec_rows(self, layer: int, ids: torch.Tensor | list[int]) -> torch.Tensor:
        """Decoder directions of layer `layer`'s features `ids` to the outputs of layers layer..n_layers-1:
        [len(ids), n_layers - layer, d_out], reading only those rows from disk."""
        ref = self.decoders[self._check_layer(layer)]
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1).cpu()
        return ref.file.read_rows(ref.name, ids).to(self.device, self.dtype)  # as stored, cast once (see param)

    def W_dec(self, layer: int) -> torch.Tensor:
        """Layer `layer`'s whole decoder [d_sae, n_layers - layer, d_out] (prefer W_dec_rows)."""
        return self.W_dec_rows(layer, torch.arange(self.d_sae))

    def splice_memory(self, rows: int, active_features: int | None = None) -> tuple[int, int]:
        """(bytes held once spliced, bytes a spliced pass holds) for `rows` tokens per pass, as
        `ll.plan(..., dictionaries=[clt])` counts them. Held: every layer's encoder, biases and thresholds. A pass
        keeps, for every layer until its end (a later layer's output reads all earlier layers' features): the
        input, pre-activations, activations, the active features' activations and their decoder rows to this
        and every later layer, `active_features` per layer (default every feature: an upper bound); plus one
        output's reconstruction and error, and the mask that finds the active features."""
        size = self.dtype.itemsize
        held = sum(math.prod(ref.file.shape(ref.name)) for layer in self.encoders for ref in layer.values())
        active = self.d_sae if active_features is None else min(active_features, self.d_sae)
        per_layer = rows * (self.d_in + 2 * self.d_sae + active) * size
        rows_read = active * self.d_out * sum(self.n_layers - layer for layer in range(self.n_layers)) * size
        stored = self.decoders[0].file.stored_dtype(self.decoders[0].name).itemsize
        largest_read = active * self.n_layers * self.d_out * stored  # layer 0's rows as stored, before the cast
        working = self.n_layers * per_layer + rows_read + largest_read + rows * (self.d_sae + 2 * self.d_out * size)
        return held * size, working

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> CrossLayerTranscoder:
        """Moves (in place) what was read, and where later reads go; returns self."""
        self.device = torch.device(device) if device is not None else self.device
        self.dtype = dtype or self.dtype
        self._loaded = {key: t.to(self.device, self.dtype) for key, t in self._loaded.items()}
        return self

    # ----------------------------------------------------------------------------------------------- math
    def _check_width(self, x: torch.Tensor, width: int, what: str) -> torch.Tensor:
        if x.shape[-1] != width:
            raise ArgumentError(f"{what} has last dimension {x.shape[-1]}; this CLT takes {width} ({self.path})")
        return x.to(self.device, self.dtype)

    def encode_pre(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Pre-activations [..., d_sae] of layer `layer`'s features from x [..., d_in] read at hooks_in[layer]."""
        x = self._check_width(x, self.d_in, "x")
        return x @ self.W_enc(layer) + self.param(layer, "b_enc")

    def activate(self, pre: torch.Tensor, layer: int) -> torch.Tensor:
        if self.activation == "threshold":
            return pre * (pre > self.param(layer, "threshold")).to(pre.dtype)
        return F.relu(pre)

    def encode_layer(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Feature activations [..., d_sae] of layer `layer` from x [..., d_in] read at hooks_in[layer]."""
        return self.activate(self.encode_pre(x, layer), layer)

    def decoded_rows(self, acts: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(the activations of the features of layer `layer` active somewhere in `acts` [..., n_active], and
        their decoder rows [n_active, n_layers - layer, d_out]): all that layer's features write anywhere."""
        acts = self._check_width(acts, self.d_sae, "acts")
        active = acts.reshape(-1, self.d_sae).ne(0).any(0).nonzero().squeeze(-1)
        return acts[..., active], self.W_dec_rows(layer, active)

    def decode_layer(self, acts: Sequence[torch.Tensor], layer: int) -> torch.Tensor:
        """The output [..., d_out] at hooks_out[layer] from the activations of layers 0..layer (`acts[i]`
        [..., d_sae]; later entries are ignored)."""
        if len(acts) <= self._check_layer(layer):
            raise ArgumentError(f"decode_layer({layer}) needs the activations of layers 0..{layer}; got {len(acts)}")
        out = self.param(layer, "b_dec")
        for source in range(layer + 1):
            values, rows = self.decoded_rows(acts[source], source)
            out = out + values @ rows[:, layer - source]
        return out

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations [n_layers, ..., d_sae] of inputs x [n_layers, ..., d_in] (layer i's at x[i])."""
        if x.shape[0] != self.n_layers:
            raise ArgumentError(f"x must have a leading dimension of n_layers = {self.n_layers}, got {list(x.shape)}")
        return torch.stack([self.encode_layer(x[layer], layer) for layer in range(self.n_layers)])

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        """Outputs [n_layers, ..., d_out] from activations [n_layers, ..., d_sae], reading each layer's decoder
        rows once, for the features active somewhere."""
        if acts.shape[0] != self.n_layers:
            raise ArgumentError(f"acts must have a leading dimension of n_layers = {self.n_layers}")
        out = [self.param(layer, "b_dec").expand(*acts.shape[1:-1], self.d_out) for layer in range(self.n_layers)]
        for source in range(self.n_layers):
            values, rows = self.decoded_rows(acts[source], source)
            if values.shape[-1]:
                written = torch.einsum("...f,fld->l...d", values, rows)  # to layers source..n_layers-1
                for offset in range(self.n_layers - source):
                    out[source + offset] = out[source + offset] + written[offset]
        return torch.stack(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """decode(encode(x)): the outputs [n_layers, ..., d_out] from inputs [n_layers, ..., d_in]."""
        return self.decode(self.encode(x))

    __call__ = forward

    def __repr__(self) -> str:
        return (
            f"CrossLayerTranscoder({self.format}, {self.n_layers} layers, {self.hooks_in[0]} -> "
            f"{self.hooks_out[0]} ...; d_in={self.d_in}, d_sae={self.d_sae} per layer, d_out={self.d_out}, "
            f"activation={self.activation})"
        )
