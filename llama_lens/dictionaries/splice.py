"""Splicing: the model runs with dictionaries in place of the activations they reconstruct.

An SAE at hook h replaces the activation x there with decode(encode(x)); a transcoder reading h_in and writing
h_out replaces the activation at h_out with its reconstruction from h_in. With the error term, the
replacement is recons + (x - recons), which equals x but for rounding, and through which gradients reach the
features: the reference for attribution, and a check that splicing is wired right.

The cache gets SAELens' names under the site each dictionary replaces (hook_out):
    <site>.hook_sae_input      x the dictionary read                 [batch, pos, d_in]
    <site>.hook_sae_acts_pre   pre-activations                       [batch, pos, d_sae]
    <site>.hook_sae_acts_post  feature activations                   [batch, pos, d_sae]
    <site>.hook_sae_recons     reconstruction                        [batch, pos, d_out]
    <site>.hook_sae_error      activation - reconstruction           [batch, pos, d_out]

Splices are ordinary forward hooks, so they work with other hooks, `generate` and its KV cache.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

from ..errors import ArgumentError, UnknownNameError, did_you_mean
from ..model.activation_cache import ActivationCache
from ..model.hooks import HookedModule, HookPoint
from .dictionary import Dictionary

SAE_POINTS = ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons", "hook_sae_error")


def splice_hooks(
    model: HookedModule,
    dictionaries: Dictionary | Iterable[Dictionary],
    *,
    use_error_term: bool = False,
    records: dict[str, torch.Tensor] | None = None,
) -> list[tuple[str, object]]:
    """Forward hooks (name, fn) that splice `dictionaries` in; pass them to `model.hooks(...)`.

    Args:
        use_error_term: add back what each dictionary misses, so the model's output is unchanged.
        records: where to put each dictionary's activations under SAELens' names (see the module docstring).
    """
    dictionaries = [dictionaries] if isinstance(dictionaries, Dictionary) else list(dictionaries)
    sites = [d.hook_out for d in dictionaries]
    if len(set(sites)) != len(sites):
        raise ArgumentError(f"two dictionaries replace the same hook point: {sorted(sites)}")
    hooks: list[tuple[str, object]] = []
    for dictionary in dictionaries:
        for name in {dictionary.hook_in, dictionary.hook_out}:
            if name not in model.hook_dict:
                raise UnknownNameError(
                    f"{dictionary.path}: the model has no hook point {name!r}{did_you_mean(name, model.hook_dict)}"
                )
        hooks.extend(_dictionary_hooks(dictionary, use_error_term, records))
    return hooks


def _dictionary_hooks(dictionary: Dictionary, use_error_term: bool, records: dict | None):
    site = dictionary.hook_out
    inputs: list[torch.Tensor] = []  # a transcoder's input, from hook_in to hook_out of the same forward

    def replace(x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        # `x` is the activation replaced; `source` what the dictionary reads (x itself for an SAE).
        flat_in, pre = dictionary.encode_pre(source)
        acts = dictionary._activate(flat_in, pre)
        recons = dictionary.decode(acts, source)
        target = x.flatten(-2) if x.shape[-1] != recons.shape[-1] else x
        error = target.to(recons.dtype) - recons
        if records is not None:
            values = (dictionary._flat(source, dictionary.d_in, "x"), pre, acts, recons, error)
            for point, value in zip(SAE_POINTS, values):
                records[f"{site}.{point}"] = value.detach()
        out = recons + error.detach() if use_error_term else recons
        return out.reshape(x.shape).to(x.dtype)

    if not dictionary.is_transcoder:
        return [(site, lambda x, *, hook: replace(x, x))]

    def save_input(x: torch.Tensor, *, hook: HookPoint) -> None:
        inputs[:] = [x]

    def write_output(y: torch.Tensor, *, hook: HookPoint) -> torch.Tensor:
        if not inputs:
            raise ArgumentError(f"{dictionary.path}: {site} ran before {dictionary.hook_in}, which it reads")
        return replace(y, inputs.pop())

    return [(dictionary.hook_in, save_input), (site, write_output)]


@contextmanager
def spliced(
    model: HookedModule, dictionaries: Dictionary | Iterable[Dictionary], *, use_error_term: bool = False
) -> Iterator[HookedModule]:
    """`with ll.spliced(model, dictionaries): model(tokens)` runs the model with the dictionaries in place."""
    with model.hooks(splice_hooks(model, dictionaries, use_error_term=use_error_term)):
        yield model


def run_with_dictionaries(
    model: HookedModule,
    *args,
    dictionaries: Dictionary | Iterable[Dictionary],
    use_error_term: bool = False,
    names_filter=None,
    **kwargs,
) -> tuple[torch.Tensor, ActivationCache]:
    """`model.run_with_cache` with `dictionaries` spliced in; the cache also holds each dictionary's
    `<site>.hook_sae_*` activations (see the module docstring). Other keywords go to `run_with_cache`."""
    records: dict[str, torch.Tensor] = {}
    hooks = splice_hooks(model, dictionaries, use_error_term=use_error_term, records=records)
    fwd_hooks = list(kwargs.pop("fwd_hooks", ())) + hooks
    output, cache = model.run_with_cache(*args, names_filter=names_filter, fwd_hooks=fwd_hooks, **kwargs)
    merged = dict(cache._acts) | records
    return output, ActivationCache(merged, cache.layer_indices, cache.model, has_batch_dim=cache.has_batch_dim)
