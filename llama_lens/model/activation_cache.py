"""The activation cache `run_with_cache` returns, with TransformerLens' look-ups and stacking helpers.

Keys are full hook names ("blocks.3.hook_resid_post"), or TransformerLens shorthands resolved by
`utils.get_act_name`: `cache["pattern", 0]`, `cache["resid_post", -1]` (negative layers count from
`cfg.n_layers`), `cache["q", 3, "attn"]`, `cache["embed"]`. Gradients saved by `run_with_cache(incl_bwd=True)`
sit under "<hook name>_grad".

Shapes use the glossary of model.py; `[batch, pos, ...]` loses its batch dimension after `remove_batch_dim()`.
The helpers follow TransformerLens' definitions with one difference made explicit: llama_lens does not fold the
RMSNorm weights into the next matrices, so where TransformerLens' default (folded) model needs no weight,
`logit_attrs` multiplies by `ln_final.w` itself: the attributions still add up to the logits.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch

from ..errors import ArgumentError, UnknownNameError, did_you_mean
from .hook_names import PosSlice, apply_pos_slice, get_act_name, ungroup_kv
from .protocols import LanguageModel


class ActivationCache:
    """Activations saved by `run_with_cache`, keyed by hook name (dict-like: `.keys()`, `in`, `len`).

    Args:
        activations: hook name -> tensor, in forward order.
        layer_indices: the model's loaded layers.
        model: the model the activations came from (for `cfg`, the final norm and the unembedding).
        has_batch_dim: False once `remove_batch_dim()` dropped the batch dimension.
    """

    def __init__(
        self,
        activations: dict[str, torch.Tensor],
        layer_indices: Sequence[int],
        model: LanguageModel | None = None,
        *,
        has_batch_dim: bool = True,
    ) -> None:
        self._acts = activations
        self.layer_indices = list(layer_indices)
        self.model = model
        self.has_batch_dim = has_batch_dim

    # ------------------------------------------------------------------ look-up
    @property
    def n_layers(self) -> int:
        """The model's layer count (negative layers count back from it)."""
        if self.model is not None:
            return self.model.cfg.n_layers
        return self.layer_indices[-1] + 1 if self.layer_indices else 0

    def full_name(self, key: str | tuple) -> str:
        """The hook name a key stands for: a full name, a shorthand ("embed"), or (name, layer[, layer_type])."""
        if isinstance(key, str):
            return key if key in self._acts else get_act_name(key)
        if not isinstance(key, tuple) or not key or not isinstance(key[0], str):
            raise ArgumentError(f"cache keys are names or (name, layer[, layer_type]) tuples, got {key!r}")
        name, *rest = key
        if rest and isinstance(rest[0], int) and not isinstance(rest[0], bool) and rest[0] < 0:
            rest[0] += self.n_layers
        return get_act_name(name, *rest)

    def __getitem__(self, key: str | tuple) -> torch.Tensor:
        name = self.full_name(key)
        try:
            return self._acts[name]
        except KeyError:
            where = f"{name!r}" if name == key else f"{name!r} (from {key!r})"
            message = f"no activation in this cache {where}"
            raise UnknownNameError(message + did_you_mean(name, self._acts, hint="see cache.keys()")) from None

    def __contains__(self, key: object) -> bool:
        if isinstance(key, (str, tuple)):
            try:
                return self.full_name(key) in self._acts
            except ValueError:
                return False
        return False

    def __iter__(self) -> Iterator[str]:
        return iter(self._acts)

    def __len__(self) -> int:
        return len(self._acts)

    def keys(self):
        return self._acts.keys()

    def values(self):
        return self._acts.values()

    def items(self):
        return self._acts.items()

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} activations, layers {self.layer_indices})"

    def _like(self, activations: dict[str, torch.Tensor], *, has_batch_dim: bool | None = None) -> ActivationCache:
        batch_dim = self.has_batch_dim if has_batch_dim is None else has_batch_dim
        return ActivationCache(activations, self.layer_indices, self.model, has_batch_dim=batch_dim)

    def to(self, device: str | torch.device) -> ActivationCache:
        """A copy of the cache with every tensor moved to `device`."""
        return self._like({k: v.to(device) for k, v in self._acts.items()})

    def remove_batch_dim(self) -> ActivationCache:
        """Drops the batch dimension of a one-prompt cache, in place (as TransformerLens); returns the cache."""
        if self.has_batch_dim:
            sizes = {t.shape[0] for t in self._acts.values()}
            if sizes - {1}:
                raise ArgumentError(f"remove_batch_dim needs a batch of one prompt, this cache holds {max(sizes)}")
            self._acts = {k: v[0] for k, v in self._acts.items()}
            self.has_batch_dim = False
        return self

    # ------------------------------------------------------------------ stacking over layers
    def _check_layer(self, layer: int | None) -> int:
        """TransformerLens' layer argument: None and -1 mean the input of the unembedding (= n_layers)."""
        n_layers = self.n_layers
        if layer is None or layer == -1:
            return n_layers
        if not isinstance(layer, int) or not 0 <= layer <= n_layers:
            raise ArgumentError(
                f"layer must be in [0, n_layers={n_layers}] or -1/None (the unembedding), got {layer!r}"
            )
        return layer

    def stack(self, hook: str, layers: Iterable[int] | None = None) -> torch.Tensor:
        """Stacks `blocks.{i}.{hook}` over layers, e.g. `cache.stack("attn.hook_pattern")`.

        Returns:
            [n_layers_stacked, *activation_shape]
        """
        layers = self.layer_indices if layers is None else list(layers)
        return torch.stack([self[f"blocks.{i}.{hook}"] for i in layers])

    def stack_activation(self, activation_name: str, layer: int = -1, sublayer_type: str | None = None) -> torch.Tensor:
        """TransformerLens' `stack_activation`: one activation over the layers below `layer` (-1: all).

        Args:
            activation_name: a short name ("resid_post", "pattern", "scale", ...).
            layer: stack layers [0, layer); -1 for every layer.
            sublayer_type: "ln1", "ln2", "attn", "mlp" where the short name needs it.

        Returns:
            [n_layers_stacked, *activation_shape]
        """
        stop = self.n_layers if layer == -1 else layer
        return torch.stack([self[get_act_name(activation_name, i, sublayer_type)] for i in range(stop)])

    def ungroup(self, name: str, layer: int) -> torch.Tensor:
        """`hook_k`, `hook_v`, `hook_rot_k` (or their gradients) of one layer, per query head: key/value head
        `h // n_rep` repeated for query head `h`.

        Returns:
            [batch, pos, n_heads, d_head]
        """
        return ungroup_kv(self[name, layer], self.model.cfg.n_heads)

    # ------------------------------------------------------------------ residual stream
    def _ln_scale(self, layer: int, mlp_input: bool, pos_slice: PosSlice) -> torch.Tensor:
        if layer == self.n_layers:
            name = "ln_final.hook_scale"
        else:
            name = f"blocks.{layer}.ln{2 if mlp_input else 1}.hook_scale"
        if name not in self._acts:
            raise UnknownNameError(
                f"apply_ln needs {name!r} in the cache; run run_with_cache without a names_filter that drops it"
            )
        return apply_pos_slice(self._acts[name], pos_slice, dim=-2)

    def apply_ln_to_stack(
        self,
        residual_stack: torch.Tensor,
        layer: int | None = None,
        mlp_input: bool = False,
        pos_slice: PosSlice = None,
        recompute_ln: bool = False,
    ) -> torch.Tensor:
        """Divides residual-stream components by the RMSNorm scale that `layer` applied to their sum (the cached
        `hook_scale`), as TransformerLens does: what each component contributes to that layer's normalized input.

        As in TransformerLens, the norm's weight is not applied (TransformerLens folds it into the next matrices;
        llama_lens does not, so multiply by `blocks[layer].ln1.w` or `ln_final.w` where you need it).

        Args:
            residual_stack: [n_components, batch, pos, d_model] (pos already sliced by `pos_slice`).
            layer: the layer whose input this is, in [0, n_layers]; None or -1 for the unembedding (ln_final).
            mlp_input: use ln2 (the MLP's input) instead of ln1.
            pos_slice: the positions `residual_stack` holds, applied to the cached scale.
            recompute_ln: at the unembedding, apply `ln_final` (weight included) to each component with its own
                statistics instead: the logit lens (TransformerLens' `recompute_ln`).

        Returns:
            [n_components, batch, pos, d_model]
        """
        layer = self._check_layer(layer)
        if recompute_ln and layer == self.n_layers:
            return self.model.ln_final(residual_stack)
        return residual_stack / self._ln_scale(layer, mlp_input, pos_slice)

    def accumulated_resid(
        self,
        layer: int | None = None,
        incl_mid: bool = False,
        apply_ln: bool = False,
        pos_slice: PosSlice = None,
        mlp_input: bool = False,
        return_labels: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
        """The residual stream as it grows (TransformerLens' definition): resid_pre of layers 0..`layer`, with
        resid_mid of the layers before `layer` when `incl_mid`, and "final_post" (the last resid_post) when
        `layer` is the unembedding.

        Args:
            layer: the last layer whose resid_pre is included, in [0, n_layers]; None or -1: the unembedding.
            incl_mid: add each layer's resid_mid after its resid_pre (layers before `layer`).
            apply_ln: scale by `layer`'s RMSNorm (`apply_ln_to_stack`); at the unembedding, apply `ln_final` to
                each component on its own (the logit lens: `model.unembed(cache.accumulated_resid(apply_ln=True))`).
            pos_slice: keep these positions (an int drops the pos dimension).
            mlp_input: add `layer`'s own resid_mid (the MLP's input) at the end.
            return_labels: also return labels such as "3_pre", "3_mid", "final_post".

        Returns:
            [n_components, batch, pos, d_model] (and the labels).
        """
        layer = self._check_layer(layer)
        n_layers = self.n_layers
        tensors, labels = [], []
        for i in range(layer + 1):
            if i == n_layers:
                tensors.append(self["resid_post", n_layers - 1])
                labels.append("final_post")
                continue
            tensors.append(self["resid_pre", i])
            labels.append(f"{i}_pre")
            if (incl_mid and i < layer) or (mlp_input and i == layer):
                tensors.append(self["resid_mid", i])
                labels.append(f"{i}_mid")
        stacked = torch.stack([apply_pos_slice(t, pos_slice, dim=-2) for t in tensors])
        if apply_ln:
            stacked = self.apply_ln_to_stack(stacked, layer, mlp_input, pos_slice, recompute_ln=layer == n_layers)
        return (stacked, labels) if return_labels else stacked

    def decompose_resid(
        self,
        layer: int | None = None,
        mlp_input: bool = False,
        mode: str = "all",
        apply_ln: bool = False,
        pos_slice: PosSlice = None,
        incl_embeds: bool = True,
        return_labels: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
        """The input of `layer` as the sum of its parts (TransformerLens' definition): the embedding, then
        attn_out and mlp_out of each layer below `layer` (RoPE adds no positional embedding).

        Args:
            layer: in [0, n_layers]; None or -1: the unembedding's input (every layer's outputs).
            mlp_input: decompose the MLP input of `layer` instead (adds `layer`'s attn_out).
            mode: "all", "attn" (attention outputs only) or "mlp" (MLP outputs only).
            apply_ln: divide by `layer`'s cached RMSNorm scale (`apply_ln_to_stack`).
            pos_slice: keep these positions (an int drops the pos dimension).
            incl_embeds: include the token embedding.
            return_labels: also return labels such as "embed", "3_attn_out", "3_mlp_out".

        Returns:
            [n_components, batch, pos, d_model] (and the labels); without apply_ln and with every part included,
            the parts sum to the residual stream entering `layer`.
        """
        if mode not in ("all", "attn", "mlp"):
            raise ArgumentError(f"mode must be 'all', 'attn' or 'mlp', got {mode!r}")
        layer = self._check_layer(layer)
        tensors, labels = [], []
        if incl_embeds:
            tensors.append(self["hook_embed"])
            labels.append("embed")
        for i in range(layer):
            if mode != "mlp":
                tensors.append(self["attn_out", i])
                labels.append(f"{i}_attn_out")
            if mode != "attn":
                tensors.append(self["mlp_out", i])
                labels.append(f"{i}_mlp_out")
        if mlp_input and mode != "mlp":
            tensors.append(self["attn_out", layer])
            labels.append(f"{layer}_attn_out")
        if not tensors:
            raise ArgumentError(
                f"decompose_resid(layer={layer}, mode={mode!r}, incl_embeds=False) selects no component"
            )
        stacked = torch.stack([apply_pos_slice(t, pos_slice, dim=-2) for t in tensors])
        if apply_ln:
            stacked = self.apply_ln_to_stack(stacked, layer, mlp_input, pos_slice)
        return (stacked, labels) if return_labels else stacked

    def stack_head_results(
        self,
        layer: int = -1,
        return_labels: bool = False,
        incl_remainder: bool = False,
        pos_slice: PosSlice = None,
        apply_ln: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
        """Every attention head's write into the residual stream, for the layers below `layer` (TransformerLens'
        definition): `z[:, :, h] @ W_O[h]` per head, labelled "L{layer}H{head}".

        Computed from the cached `hook_z` and the weights (no need to hook `hook_result`). The output bias of a
        layer with `attention_bias` is not part of any head: it goes into the remainder.

        Args:
            layer: heads of layers [0, layer); -1 for all.
            incl_remainder: add one more component, the residual stream entering `layer` minus every head's
                result (embedding, MLPs, biases), labelled "remainder".
            pos_slice: keep these positions (an int drops the pos dimension).
            apply_ln: divide by `layer`'s cached RMSNorm scale.

        Returns:
            [n_layers_used * n_heads (+1), batch, pos, d_model] (and the labels).
        """
        layer = self._check_layer(layer)
        n_heads = self.model.cfg.n_heads
        parts, labels = [], []
        for i in range(layer):
            z = apply_pos_slice(self["z", i], pos_slice, dim=-3)  # [batch, pos, n_heads, d_head]
            w_o = self.model.blocks[i].attn.W_O  # [n_heads, d_head, d_model]
            parts.append(torch.einsum("...hd,hdm->h...m", z, w_o.to(z.dtype)))
            labels += [f"L{i}H{h}" for h in range(n_heads)]
        if parts:
            stacked = torch.cat(parts)
        else:
            shape = apply_pos_slice(self["hook_embed"], pos_slice, dim=-2).shape
            stacked = self["hook_embed"].new_zeros(0, *shape)
        if incl_remainder:
            total = self["resid_post", layer - 1] if layer > 0 else self["hook_embed"]
            remainder = apply_pos_slice(total, pos_slice, dim=-2) - stacked.sum(0)
            stacked = torch.cat([stacked, remainder[None]])
            labels.append("remainder")
        if apply_ln:
            stacked = self.apply_ln_to_stack(stacked, layer, pos_slice=pos_slice)
        return (stacked, labels) if return_labels else stacked

    def logit_attrs(
        self,
        residual_stack: torch.Tensor,
        tokens: int | str | torch.Tensor | Sequence[int],
        incorrect_tokens: int | str | torch.Tensor | Sequence[int] | None = None,
        pos_slice: PosSlice = None,
        has_batch_dim: bool = True,
    ) -> torch.Tensor:
        """How much each component of a residual stack adds to the logit of `tokens` (or to the logit difference
        `tokens - incorrect_tokens`): TransformerLens' `logit_attrs`, made exact for unfolded weights.

        Each component is divided by the final RMSNorm's cached scale, multiplied by `ln_final.w` and dotted with
        the token's unembedding column, so the attributions of a full decomposition add up to the logit.

        Args:
            residual_stack: [n_components, batch, pos, d_model] (pos already sliced by `pos_slice`).
            tokens: a token (id or text) or ids [batch] (one per prompt) / [batch, pos].
            incorrect_tokens: same shape as `tokens`, for logit differences.
            pos_slice: the positions `residual_stack` holds.
            has_batch_dim: False when the stack has no batch dimension.

        Returns:
            [n_components, batch, pos] (dimensions as in the stack).
        """
        del has_batch_dim  # shapes broadcast either way
        directions = self.model.tokens_to_residual_directions(tokens)
        if incorrect_tokens is not None:
            wrong = self.model.tokens_to_residual_directions(incorrect_tokens)
            if wrong.shape != directions.shape:
                raise ArgumentError(
                    f"tokens and incorrect_tokens must have the same shape, got {tuple(directions.shape)[:-1]} and "
                    f"{tuple(wrong.shape)[:-1]}"
                )
            directions = directions - wrong
        scaled = self.apply_ln_to_stack(residual_stack, -1, pos_slice=pos_slice) * self.model.ln_final.w
        return (scaled * directions.to(scaled.dtype)).sum(-1)
