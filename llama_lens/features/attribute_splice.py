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
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..dictionaries.dictionary import Dictionary
from ..errors import ArgumentError, ArgumentTypeError, UnknownNameError, did_you_mean
from ..model.hooks import HookPoint
from .attribute_result import site_layer


@dataclass
class SiteRecord:
    """One dictionary's activations in the spliced run, for one prompt."""

    dictionary: Dictionary
    source: torch.Tensor | None = None  # [pos, d_in] what it read (detached)
    acts: torch.Tensor | None = None  # [pos, d_sae] feature activations (a leaf, with gradients)
    error: torch.Tensor | None = None  # [pos, d_out] x - reconstruction (a leaf, with gradients)


def check_dictionaries(model, dictionaries: Dictionary | Iterable[Dictionary]) -> list[Dictionary]:
    """The dictionaries as a list, each reading and writing hook points the model has, one per site.

    Raises:
        UnknownNameError: a hook point the model lacks (the dictionary's folder and the closest names).
        ArgumentError: no dictionaries, or two replacing the same hook point.
        ArgumentTypeError: something that is not a Dictionary.
    """
    dictionaries = [dictionaries] if isinstance(dictionaries, Dictionary) else list(dictionaries)
    if not dictionaries:
        raise ArgumentError("no dictionaries given: pass one or a list from ll.load_dictionary")
    for dictionary in dictionaries:
        if not isinstance(dictionary, Dictionary):
            kind = type(dictionary).__name__
            raise ArgumentTypeError(f"expected Dictionary objects (from ll.load_dictionary), got {kind}")
        for name in (dictionary.hook_in, dictionary.hook_out):
            if name not in model.hook_dict:
                raise UnknownNameError(
                    f"{dictionary.path}: the model has no hook point {name!r}{did_you_mean(name, model.hook_dict)}"
                )
    sites = [d.hook_out for d in dictionaries]
    if len(set(sites)) != len(sites):
        raise ArgumentError(f"two dictionaries replace the same hook point: {sorted(sites)}")
    return dictionaries


def splice_recording(
    model, dictionaries: list[Dictionary], records: dict[str, SiteRecord], resid_in: dict[int, torch.Tensor]
) -> list[tuple[str, object]]:
    """Forward hooks for one prompt (batch 1): splice each dictionary as the module docstring says, filling
    `records` (site -> SiteRecord) and `resid_in` (layer -> the residual stream entering it [1, pos, d_model],
    for each layer a site sits in). Gradients reach the leaves when the pass runs with grad enabled."""
    hooks: list[tuple[str, object]] = []
    layers = {site_layer(d.hook_out, model.cfg.n_layers) for d in dictionaries}
    for layer in sorted(layer for layer in layers if 0 <= layer < model.cfg.n_layers):
        # First, so the stream is recorded before a dictionary at hook_resid_pre replaces it.
        hooks.append((f"blocks.{layer}.hook_resid_pre", _recorder(resid_in, layer)))
    for dictionary in dictionaries:
        record = records[dictionary.hook_out] = SiteRecord(dictionary)
        hooks.extend(_site_hooks(record))
    return hooks


def _recorder(resid_in: dict[int, torch.Tensor], layer: int):
    def record(resid: torch.Tensor, *, hook: HookPoint) -> None:
        resid_in[layer] = resid.detach()

    return record


def _site_hooks(record: SiteRecord) -> list[tuple[str, object]]:
    dictionary = record.dictionary

    def read(x: torch.Tensor, *, hook: HookPoint) -> None:
        if x.shape[0] != 1:
            raise ArgumentError(f"attribution runs one prompt at a time, got a batch of {x.shape[0]}")
        record.source = dictionary._flat(x.detach()[0], dictionary.d_in, f"the activation at {hook.name}")

    def replace(x: torch.Tensor, *, hook: HookPoint) -> torch.Tensor:
        if dictionary.is_transcoder:
            if record.source is None:
                raise ArgumentError(f"{dictionary.path}: {hook.name} ran before {dictionary.hook_in}, which it reads")
        else:
            read(x, hook=hook)
        with torch.no_grad():
            flat_in, pre = dictionary.encode_pre(record.source)
            acts = dictionary._activate(flat_in, pre)
        acts = acts.requires_grad_(torch.is_grad_enabled())
        recons = dictionary.decode(acts, record.source).to(x.device)  # [pos, d_out], differentiable in acts
        target = x[0].flatten(-2) if x.shape[-1] != recons.shape[-1] else x[0]  # hook_z: [pos, n_heads * d_head]
        dtype = torch.promote_types(recons.dtype, target.dtype)
        error = (target.detach().to(dtype) - recons.detach().to(dtype)).requires_grad_(torch.is_grad_enabled())
        record.acts, record.error = acts, error
        out = recons.to(dtype) + error + (target - target.detach()).to(dtype)
        return out.reshape(x.shape).to(x.dtype)

    if dictionary.is_transcoder:
        return [(dictionary.hook_in, read), (dictionary.hook_out, replace)]
    return [(dictionary.hook_out, replace)]
