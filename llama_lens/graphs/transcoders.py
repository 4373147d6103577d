"""What an attribution graph needs from a set of transcoders, and that protocol for per-layer transcoders.

Shapes (the model's glossary, plus):
    n           features asked about at once
    d_sae       features of one layer's transcoder

The graph treats the transcoders as a linear read-out and a linear write-in around one nonlinearity:

    pre_f        = enc_f . mlp_in[layer, pos] + enc_const_f          (a feature's pre-activation)
    mlp_out[l']  = sum_f  write_f[l']  +  out_bias[l']  +  mlp_in[l'] @ W_skip[l'].T  (+ the error node)

A per-layer transcoder writes only its own layer (l' = layer); a cross-layer transcoder writes every layer from
its own up. `TranscoderSet` is the protocol; `PerLayerTranscoders` implements it over `Dictionary` objects from
`ll.load_dictionary`, and `CrossLayerTranscoders` (graphs/transcoders_clt.py) over a `CrossLayerTranscoder`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from ..dictionaries.cross_layer import CrossLayerTranscoder
from ..dictionaries.dictionary import Dictionary
from ..errors import ArgumentError, ArgumentTypeError
from .transcoders_clt import CrossLayerTranscoders


class TranscoderSet(Protocol):
    """The five questions the graph asks of a transcoder set (per-layer or cross-layer)."""

    n_layers: int

    def encode(self, layer: int, mlp_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pre-activations, activations), both [pos, d_sae], of the features reading `mlp_in` [pos, d_model]."""

    def encoder_rows(self, layer: int, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(enc [n, d_model], enc_const [n]): each feature's pre-activation as a linear function of mlp_in."""

    def decoder_rows(self, layer: int, features: torch.Tensor, acts: torch.Tensor) -> dict[int, torch.Tensor]:
        """What features of `layer` with activations `acts` [n] write: {output layer: [n, d_model]}."""

    def output_bias(self, layer: int) -> torch.Tensor:
        """The constant [d_model] written to `layer`'s MLP output."""

    def skip_weight(self, layer: int) -> torch.Tensor | None:
        """W_skip [d_model, d_model] (mlp_out += mlp_in @ W_skip.T) at `layer`, or None."""


class PerLayerTranscoders:
    """One transcoder per layer, each reading `blocks.{i}.mlp.hook_in` and writing `blocks.{i}.hook_mlp_out`.

    Args:
        dictionaries: the transcoders, one per layer of the model, in any order (each knows its layer).
        n_layers: the model's layer count.
        dtype: the dtype the graph computes in.
    """

    def __init__(self, dictionaries: Sequence[Dictionary], n_layers: int, *, dtype: torch.dtype) -> None:
        by_layer: dict[int, Dictionary] = {}
        for dictionary in dictionaries:
            if not isinstance(dictionary, Dictionary):
                raise ArgumentTypeError(
                    f"transcoders must be Dictionary objects from ll.load_dictionary, got {type(dictionary).__name__}"
                )
            by_layer[_layer_of(dictionary)] = dictionary
        missing = [layer for layer in range(n_layers) if layer not in by_layer]
        if missing:
            raise ArgumentError(
                f"an attribution graph needs a transcoder at every layer; none for layers {missing} "
                f"(got layers {sorted(by_layer)}); load a complete set"
            )
        self.n_layers = n_layers
        self.dictionaries = [by_layer[layer].to(dtype=dtype) for layer in range(n_layers)]

    def encode(self, layer: int, mlp_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dictionary = self.dictionaries[layer]
        x, pre = dictionary.encode_pre(mlp_in)
        return pre, dictionary._activate(x, pre)

    def encoder_rows(self, layer: int, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dictionary = self.dictionaries[layer]
        # pre = (x * input_scale - b_dec [if applied]) @ W_enc + b_enc, linear in x.
        columns = dictionary.W_enc[:, features].T  # [n, d_model]
        const = dictionary._bias("b_enc", dictionary.d_sae)[features]
        if dictionary.apply_b_dec_to_input:
            const = const - columns @ dictionary.param("b_dec")
        return columns * dictionary.input_scale, const

    def decoder_rows(self, layer: int, features: torch.Tensor, acts: torch.Tensor) -> dict[int, torch.Tensor]:
        dictionary = self.dictionaries[layer]
        if dictionary.rescale_acts_by_decoder_norm:
            acts = acts / dictionary.W_dec[features].norm(dim=-1)
        rows = dictionary.W_dec_rows(features) * acts[:, None] / dictionary.output_scale
        return {layer: rows}

    def output_bias(self, layer: int) -> torch.Tensor:
        dictionary = self.dictionaries[layer]
        return dictionary._bias("b_dec", dictionary.d_out) / dictionary.output_scale

    def skip_weight(self, layer: int) -> torch.Tensor | None:
        dictionary = self.dictionaries[layer]
        return dictionary.param("W_skip") if dictionary.has_skip else None


def _layer_of(dictionary: Dictionary) -> int:
    """The layer of a transcoder from mlp.hook_in to hook_mlp_out; anything else refused by name."""
    parts_in = dictionary.hook_in.split(".")
    expected = None
    if len(parts_in) >= 2 and parts_in[0] == "blocks" and parts_in[1].isdigit():
        layer = int(parts_in[1])
        expected = (f"blocks.{layer}.mlp.hook_in", f"blocks.{layer}.hook_mlp_out")
        if (dictionary.hook_in, dictionary.hook_out) == expected:
            if dictionary.normalize_activations != "none":
                raise ArgumentError(
                    f"{dictionary.path}: this transcoder normalizes its input ({dictionary.normalize_activations}),"
                    " which is not linear; attribution graphs take transcoders without input normalization"
                )
            if dictionary.activation == "gated":
                raise ArgumentError(f"{dictionary.path}: gated dictionaries are not supported in attribution graphs")
            return layer
    raise ArgumentError(
        f"{dictionary.path} reads {dictionary.hook_in} and writes {dictionary.hook_out}; attribution graphs take "
        "MLP transcoders reading blocks.{i}.mlp.hook_in and writing blocks.{i}.hook_mlp_out"
    )


def as_transcoder_set(transcoders, n_layers: int, *, dtype: torch.dtype) -> TranscoderSet:
    """`transcoders` as a TranscoderSet: a list of Dictionary objects or a CrossLayerTranscoder is wrapped, a
    TranscoderSet passes."""
    if isinstance(transcoders, (list, tuple)) and len(transcoders) == 1 and _is_clt(transcoders[0]):
        transcoders = transcoders[0]  # [clt], as ll.spliced takes it
    if _is_clt(transcoders):
        return CrossLayerTranscoders(transcoders, n_layers, dtype=dtype)
    if isinstance(transcoders, Dictionary):
        transcoders = [transcoders]
    if isinstance(transcoders, (list, tuple)):
        return PerLayerTranscoders(transcoders, n_layers, dtype=dtype)
    needed = ("encode", "encoder_rows", "decoder_rows", "output_bias", "skip_weight")
    if all(hasattr(transcoders, name) for name in needed) and getattr(transcoders, "n_layers", None) == n_layers:
        return transcoders
    raise ArgumentTypeError(
        f"transcoders must be a list of per-layer Dictionary objects (ll.load_dictionary of a transcoder set), a "
        f"CrossLayerTranscoder or a TranscoderSet with n_layers={n_layers}, got {type(transcoders).__name__}"
    )


def _is_clt(transcoders) -> bool:
    return isinstance(transcoders, CrossLayerTranscoder)
