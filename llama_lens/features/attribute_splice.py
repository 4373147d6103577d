"""The spliced run attribution and ablation start from: every dictionary in place with its error term, each
site's feature activations and error kept as tensors the backward pass can reach.

At a site the activation x (what the model computed there) is replaced by

    out = decode(acts) + error + (x - x.detach())        acts = encode(source), error = x - decode(acts)

whose value is x (to rounding) and whose gradient with respect to x is the identity, so the model's output and
its gradients are the model's own. `acts` and `error` are leaves: d(metric)/d(acts) is the gradient reaching
each feature through its decoder row, d(metric)/d(error) the gradient at the site, and nothing flows back
through the encoder (the identity path carries the gradient upstream instead). The same hooks without
gradients record what ablation needs: each site's source, activations and error, and the residual stream
entering the layers the sites sit in.

A cross-layer transcoder (CLT) is one site per layer i, at its output hook (hooks_out[i]): the features read
at hooks_in[i] are that site's `acts`, and the output of layer j is decoded from the `acts` of layers 0..j, so
the gradient reaching a feature of layer i sums what it writes to every layer j >= i.

Every tensor keeps the batch dimension: [batch, pos, ...], one row per prompt.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..dictionaries.cross_layer import CrossLayerTranscoder
from ..dictionaries.dictionary import Dictionary
from ..errors import ArgumentError, ArgumentTypeError, UnknownNameError, did_you_mean
from ..model.hooks import HookPoint
from .attribute_result import site_layer

AnyDictionary = Dictionary | CrossLayerTranscoder


@dataclass
class SiteRecord:
    """One site's activations in the spliced run: a Dictionary's, or one layer of a CLT's."""

    dictionary: AnyDictionary
    layer: int | None = None  # a CLT's layer: features read at hooks_in[layer], output at hooks_out[layer]
    source: torch.Tensor | None = None  # [batch, pos, d_in] what it read (detached)
    acts: torch.Tensor | None = None  # [batch, pos, d_sae] feature activations (a leaf, with gradients)
    error: torch.Tensor | None = None  # [batch, pos, d_out] x - reconstruction (a leaf, with gradients)
    active: torch.Tensor | None = None  # a CLT layer's features active somewhere [n_active]
    rows: torch.Tensor | None = None  # and their decoder rows to layers layer.. [n_active, n_layers - layer, d_out]

    @property
    def d_sae(self) -> int:
        return self.dictionary.d_sae

    @property
    def path(self):
        return self.dictionary.path


def dictionary_sites(dictionary: AnyDictionary) -> list[str]:
    """The hook points a dictionary replaces: its hook_out, or each layer's output of a CLT."""
    if isinstance(dictionary, CrossLayerTranscoder):
        return list(dictionary.hooks_out)
    return [dictionary.hook_out]


def check_dictionaries(model, dictionaries: AnyDictionary | Iterable[AnyDictionary]) -> list[AnyDictionary]:
    """The dictionaries as a list, each reading and writing hook points the model has, one per site.

    Raises:
        UnknownNameError: a hook point the model lacks (the dictionary's folder and the closest names).
        ArgumentError: no dictionaries, or two replacing the same hook point.
        ArgumentTypeError: something that is not a Dictionary or CrossLayerTranscoder.
    """
    single = isinstance(dictionaries, (Dictionary, CrossLayerTranscoder))
    dictionaries = [dictionaries] if single else list(dictionaries)
    if not dictionaries:
        raise ArgumentError("no dictionaries given: pass one or a list from ll.load_dictionary")
    for dictionary in dictionaries:
        if not isinstance(dictionary, (Dictionary, CrossLayerTranscoder)):
            kind = type(dictionary).__name__
            raise ArgumentTypeError(
                f"dictionaries: expected Dictionary or CrossLayerTranscoder objects (from ll.load_dictionary), "
                f"got {kind}"
            )
        names = (
            dictionary.hooks_in + dictionary.hooks_out
            if isinstance(dictionary, CrossLayerTranscoder)
            else [dictionary.hook_in, dictionary.hook_out]
        )
        for name in dict.fromkeys(names):
            if name not in model.hook_dict:
                raise UnknownNameError(
                    f"{dictionary.path}: the model has no hook point {name!r}{did_you_mean(name, model.hook_dict)}"
                )
    sites = [site for d in dictionaries for site in dictionary_sites(d)]
    if len(set(sites)) != len(sites):
        raise ArgumentError(f"two dictionaries replace the same hook point: {sorted(sites)}")
    return dictionaries


def splice_recording(
    model, dictionaries: list[AnyDictionary], records: dict[str, SiteRecord], resid_in: dict[int, torch.Tensor]
) -> list[tuple[str, object]]:
    """Forward hooks: splice each dictionary as the module docstring says, filling `records` (site ->
    SiteRecord) and `resid_in` (layer -> the residual stream entering it [batch, pos, d_model], for each layer a
    site sits in). Gradients reach the leaves when the pass runs with grad enabled."""
    hooks: list[tuple[str, object]] = []
    sites = [site for d in dictionaries for site in dictionary_sites(d)]
    layers = {site_layer(site, model.cfg.n_layers) for site in sites}
    for layer in sorted(layer for layer in layers if 0 <= layer < model.cfg.n_layers):
        # First, so the stream is recorded before a dictionary at hook_resid_pre replaces it.
        hooks.append((f"blocks.{layer}.hook_resid_pre", _recorder(resid_in, layer)))
    for dictionary in dictionaries:
        if isinstance(dictionary, CrossLayerTranscoder):
            layer_records = [SiteRecord(dictionary, layer) for layer in range(dictionary.n_layers)]
            records.update(zip(dictionary.hooks_out, layer_records))
            hooks.extend(_cross_layer_hooks(dictionary, layer_records))
        else:
            record = records[dictionary.hook_out] = SiteRecord(dictionary)
            hooks.extend(_site_hooks(record))
    return hooks


def _recorder(resid_in: dict[int, torch.Tensor], layer: int):
    def record(resid: torch.Tensor, *, hook: HookPoint) -> None:
        resid_in[layer] = resid.detach()

    return record


def _replace(record: SiteRecord, x: torch.Tensor, recons: torch.Tensor) -> torch.Tensor:
    """Records the error leaf and returns recons + error + (x - x.detach()) in x's shape and dtype."""
    target = x.flatten(-2) if x.shape[-1] != recons.shape[-1] else x  # hook_z: [batch, pos, n_heads * d_head]
    recons = recons.to(x.device).expand(target.shape)
    dtype = torch.promote_types(recons.dtype, target.dtype)
    error = (target.detach().to(dtype) - recons.detach().to(dtype)).requires_grad_(torch.is_grad_enabled())
    record.error = error
    out = recons.to(dtype) + error + (target - target.detach()).to(dtype)
    return out.reshape(x.shape).to(x.dtype)


def _leaf(acts: torch.Tensor) -> torch.Tensor:
    return acts.detach().requires_grad_(torch.is_grad_enabled())


def _site_hooks(record: SiteRecord) -> list[tuple[str, object]]:
    dictionary = record.dictionary

    def read(x: torch.Tensor, *, hook: HookPoint) -> None:
        record.source = dictionary._flat(x.detach(), dictionary.d_in, f"the activation at {hook.name}")

    def replace(x: torch.Tensor, *, hook: HookPoint) -> torch.Tensor:
        if dictionary.is_transcoder:
            if record.source is None:
                raise ArgumentError(f"{dictionary.path}: {hook.name} ran before {dictionary.hook_in}, which it reads")
        else:
            read(x, hook=hook)
        with torch.no_grad():
            flat_in, pre = dictionary.encode_pre(record.source)
            acts = dictionary._activate(flat_in, pre)
        record.acts = _leaf(acts)
        recons = dictionary.decode(record.acts, record.source)  # [batch, pos, d_out], differentiable in acts
        return _replace(record, x, recons)

    if dictionary.is_transcoder:
        return [(dictionary.hook_in, read), (dictionary.hook_out, replace)]
    return [(dictionary.hook_out, replace)]


def _cross_layer_hooks(clt: CrossLayerTranscoder, records: list[SiteRecord]) -> list[tuple[str, object]]:
    def read(layer: int):
        record = records[layer]

        def hook(x: torch.Tensor, *, hook: HookPoint) -> None:
            if layer == 0:  # a new pass: what the CLT read before belongs to another
                for other in records:
                    other.source = other.acts = other.error = None
            record.source = clt._check_width(x.detach(), clt.d_in, f"the activation at {hook.name}")
            with torch.no_grad():
                acts = clt.encode_layer(record.source, layer)
            record.active = acts.reshape(-1, clt.d_sae).ne(0).any(0).nonzero().squeeze(-1)
            record.rows = clt.W_dec_rows(layer, record.active)  # only the features that fired are read
            record.acts = _leaf(acts)

        return hook

    def write(layer: int):
        def hook(y: torch.Tensor, *, hook: HookPoint) -> torch.Tensor:
            missing = [i for i in range(layer + 1) if records[i].acts is None]
            if missing:
                raise ArgumentError(
                    f"{clt.path}: the CLT's output at {hook.name} is written by the features of layers 0..{layer}, "
                    f"but this pass did not read layers {missing}; attribution runs every prompt from the tokens"
                )
            # Layer `layer`'s output from the features of layers 0..layer: differentiable in each one's acts.
            recons = clt.param(layer, "b_dec")
            for source in records[: layer + 1]:
                recons = recons + source.acts[..., source.active] @ source.rows[:, layer - source.layer]
            return _replace(records[layer], y, recons)

        return hook

    hooks = [(name, read(layer)) for layer, name in enumerate(clt.hooks_in)]
    return hooks + [(name, write(layer)) for layer, name in enumerate(clt.hooks_out)]
