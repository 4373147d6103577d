"""The model run on a graph's prompt with its MLPs replaced by transcoders, for checking a graph's predictions.

In the spliced runs each MLP output becomes its clean value plus the change of the transcoder's reconstruction
(feature writes and skip connection), so the error nodes keep their clean values; in the model runs the model's
own MLPs run and only the intervened features' change of write is added. Seven ways to run it, from the graph's
own linear model to the model itself:

    linear   attention patterns and norm scales frozen; the graph's feature nodes move by exactly the change
             of their pre-activation (the activation function's slope at an active feature is 1), every other
             feature holds its clean activation. This is the graph's linear model, run through the hooked model.
    frozen   patterns and scales frozen; every feature through its activation function (features can switch
             on or off, TopK can swap).
    frozen_attention
             patterns frozen, norm scales move, errors frozen (spliced).
    actual   nothing frozen but the error nodes: attention patterns and norm scales move.
    model    the model's own MLPs; the intervened features' change of write is added to their MLP output,
             nothing frozen: circuit-tracer's `feature_intervention(..., freeze_attention=False)`.
    model_frozen_attention
             as `model` with the attention patterns frozen (norm scales move): circuit-tracer's default,
             `feature_intervention(..., freeze_attention=True)`.
    model_constrained
             patterns, norm scales and every MLP output frozen (a skip connection still passes on the change of
             its input); only the intervened features' write is added: their direct effects, circuit-tracer's
             `feature_intervention(..., constrained_layers=range(n_layers))`.

In the model runs an intervened feature's change is its new value minus its activation in that run (as
circuit-tracer computes it), except in `model_constrained`, where it is minus its clean activation.
Interventions set features' activations; an intervened feature ignores what reaches it from below.
Shapes: pos, d_model, d_sae (features of one layer's transcoder), n_logits.
"""

from __future__ import annotations

import torch

from .transcoders import TranscoderSet

MODES = ("linear", "frozen", "frozen_attention", "actual", "model", "model_frozen_attention", "model_constrained")
MODEL_MODES = ("model", "model_frozen_attention", "model_constrained")  # the model's own MLPs, not the transcoders
FROZEN_MODES = ("linear", "frozen", "model_constrained")  # attention patterns and norm scales at their clean values
PATTERN_FROZEN_MODES = (*FROZEN_MODES, "frozen_attention", "model_frozen_attention")
_FROZEN = ("hook_scale", "hook_pattern")


class ReplacementRuns:
    """Runs of one prompt with interventions on its transcoder features (see the module docstring).

    Args:
        model: a HookedLlama holding all its layers.
        tokens: the prompt [pos].
        transcoders: a TranscoderSet with one layer per model layer.
        logit_tokens: the tokens whose demeaned logits at the last position a run returns [n_logits].
        dtype: what the transcoders compute in (float64 for a float64 model, float32 otherwise).
    """

    def __init__(self, model, tokens: torch.Tensor, transcoders: TranscoderSet, logit_tokens, dtype) -> None:
        self.model, self.transcoders, self.dtype = model, transcoders, dtype
        self.tokens = tokens[None].to(model.device)
        self.logit_tokens = torch.as_tensor(logit_tokens)
        wanted = ("mlp.hook_in", "hook_mlp_out", *_FROZEN)
        with torch.no_grad():
            _, cache = model.run_with_cache(
                self.tokens, names_filter=lambda name: name.endswith(wanted), check_memory=False
            )
        self.frozen = {name: tensor for name, tensor in cache.items() if name.endswith(_FROZEN)}
        n_layers = model.cfg.n_layers
        self.mlp_in = [cache[f"blocks.{layer}.mlp.hook_in"][0].to(dtype) for layer in range(n_layers)]
        self.mlp_out = [cache[f"blocks.{layer}.hook_mlp_out"][0].to(dtype) for layer in range(n_layers)]
        encoded = [transcoders.encode(layer, self.mlp_in[layer]) for layer in range(n_layers)]
        self.pre = [pre for pre, _ in encoded]  # [pos, d_sae] per layer
        self.acts = [acts for _, acts in encoded]

    def run(
        self,
        mode: str,
        sets: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
        linear_nodes: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """The demeaned logits of `logit_tokens` at the last position [n_logits].

        Args:
            mode: one of MODES.
            sets: {layer: (positions [k], features [k], new activations [k])}: the intervention.
            linear_nodes: {layer: (positions [k], features [k])}: the graph's feature nodes, which move
                linearly in the "linear" mode.
        """
        n_layers = self.model.cfg.n_layers
        pending = [torch.zeros_like(out) for out in self.mlp_out]  # change of each MLP output [pos, d_model]
        read = self._read_model if mode in MODEL_MODES else self._read

        def on_mlp_in(tensor: torch.Tensor, *, hook) -> None:
            read(_layer_of(hook), mode, sets, linear_nodes, tensor[0].to(self.dtype), pending)

        def on_mlp_out(tensor: torch.Tensor, *, hook) -> torch.Tensor:
            layer = _layer_of(hook)
            # The real MLP ran; in the spliced modes its output is replaced by the clean one plus the change,
            # so the error (what the transcoder misses) keeps its clean value; model_constrained freezes it whole.
            live = mode in ("model", "model_frozen_attention")
            base = tensor[0].to(self.dtype) if live else self.mlp_out[layer]
            return (base + pending[layer]).to(tensor.dtype)[None]

        hooks = [(f"blocks.{layer}.mlp.hook_in", on_mlp_in) for layer in range(n_layers)]
        hooks += [(f"blocks.{layer}.hook_mlp_out", on_mlp_out) for layer in range(n_layers)]
        if mode in FROZEN_MODES:
            hooks += [(name, _keep(value)) for name, value in self.frozen.items()]
        elif mode in PATTERN_FROZEN_MODES:
            hooks += [(name, _keep(value)) for name, value in self.frozen.items() if name.endswith("hook_pattern")]
        else:
            # A hook on the pattern (here one that changes nothing) keeps attention on the written-out path the
            # clean run took to cache it, so the clean values here and the run's own agree to the last bit.
            hooks += [(name, _identity) for name in self.frozen if name.endswith("hook_pattern")]
        with torch.no_grad(), self.model.hooks(fwd_hooks=hooks):
            logits = self.model(self.tokens)[0, -1].to(self.dtype)
        return (logits - logits.mean())[self.logit_tokens.to(logits.device)].cpu()

    # ----------------------------------------------------------------------------------------- hooks
    def _read(self, layer: int, mode: str, sets, linear_nodes, x: torch.Tensor, pending: list) -> None:
        """At a layer's MLP input: the change of its features' activations, written into `pending`."""
        delta_in = x - self.mlp_in[layer]  # [pos, d_model]
        if mode == "linear":
            positions, features = linear_nodes.get(layer, (_no_ids(), _no_ids()))
            encoders, _ = self.transcoders.encoder_rows(layer, features)
            delta = torch.zeros_like(self.acts[layer])
            delta[positions, features] = (encoders * delta_in[positions]).sum(-1)
        else:
            _, acts = self.transcoders.encode(layer, x)
            delta = acts - self.acts[layer]
        if layer in sets:
            positions, features, values = sets[layer]
            delta[positions, features] = values.to(delta) - self.acts[layer][positions, features]
        self._add_writes(layer, delta, pending)
        skip = self.transcoders.skip_weight(layer)
        if skip is not None:
            pending[layer] += delta_in @ skip.T

    def _read_model(self, layer: int, mode: str, sets, linear_nodes, x: torch.Tensor, pending: list) -> None:
        """The model modes: only the intervened features write a change, from their activation in this run (from
        their clean activation in model_constrained, where the skip connection also passes on its input's change)."""
        if mode == "model_constrained":
            skip = self.transcoders.skip_weight(layer)
            if skip is not None:
                pending[layer] += (x - self.mlp_in[layer]) @ skip.T
            acts = self.acts[layer]
        elif layer in sets:
            _, acts = self.transcoders.encode(layer, x)
        if layer not in sets:
            return
        positions, features, values = sets[layer]
        delta = torch.zeros_like(acts)
        delta[positions, features] = values.to(acts) - acts[positions, features]
        self._add_writes(layer, delta, pending)

    def _add_writes(self, layer: int, delta: torch.Tensor, pending: list) -> None:
        """Adds what a change of activations `delta` [pos, d_sae] writes (to its layer, or later ones for a
        cross-layer transcoder) to `pending`."""
        positions, features = delta.nonzero(as_tuple=True)
        if len(features) == 0:
            return
        for out_layer, rows in self.transcoders.decoder_rows(layer, features, delta[positions, features]).items():
            pending[out_layer].index_add_(0, positions, rows.to(pending[out_layer]))


def _keep(value: torch.Tensor):
    def hook(tensor: torch.Tensor, *, hook) -> torch.Tensor:
        return value

    return hook


def _identity(tensor: torch.Tensor, *, hook) -> None:
    return None


def _no_ids() -> torch.Tensor:
    return torch.zeros(0, dtype=torch.long)


def _layer_of(hook) -> int:
    return int(hook.name.split(".")[1])
