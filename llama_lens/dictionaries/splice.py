"""Splicing: the model runs with dictionaries in place of the activations they reconstruct.

An SAE at hook h replaces the activation x there with decode(encode(x)); a transcoder reading h_in and writing
h_out replaces the activation at h_out with its reconstruction from h_in. With the error term, the
replacement is recons + (x - recons) with the error detached, as in SAELens: gradients reach the features
through recons, and the forward pass is the model's own (the reference for attribution, and a check that
splicing is wired right). It is computed as x + (recons - recons.detach()), which has those gradients and
equals x exactly, where recons + error would differ from x by rounding.

The cache gets SAELens' names under the site each dictionary replaces (hook_out):
    <site>.hook_sae_input      x the dictionary read                 [batch, pos, d_in]
    <site>.hook_sae_acts_pre   pre-activations                       [batch, pos, d_sae]
    <site>.hook_sae_acts_post  feature activations                   [batch, pos, d_sae]
    <site>.hook_sae_recons     reconstruction                        [batch, pos, d_out]
    <site>.hook_sae_error      activation - reconstruction           [batch, pos, d_out]

A cross-layer transcoder replaces the MLP output of every layer it spans: layer j's output is rebuilt from the
features of layers 0..j, each encoded at its own layer's input earlier in the same forward pass; the cache
names are those above at each layer's output hook, acts being the features read at that layer. A pass resumed
at layer k > 0 (`start_at_layer=k` from a cached residual stream) is refused: it has no features of layers < k,
and those of an earlier pass are not its own. A pass split with `stop_at_layer=k` and resumed at k (same batch
and positions) is taken as one pass.

Splices are ordinary forward hooks, so they work with other hooks, `generate` and its KV cache.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

from ..errors import ArgumentError, UnknownNameError, did_you_mean
from ..model.activation_cache import ActivationCache
from ..model.hooks import HookedModule, HookPoint
from .cross_layer import CrossLayerTranscoder
from .dictionary import Dictionary

SAE_POINTS = ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons", "hook_sae_error")


AnyDictionary = Dictionary | CrossLayerTranscoder


def _sites(dictionary: AnyDictionary) -> tuple[list[str], list[str]]:
    """(the hooks a dictionary reads, the hooks it writes)."""
    if isinstance(dictionary, CrossLayerTranscoder):
        return dictionary.hooks_in, dictionary.hooks_out
    return [dictionary.hook_in], [dictionary.hook_out]


def splice_hooks(
    model: HookedModule,
    dictionaries: AnyDictionary | Iterable[AnyDictionary],
    *,
    use_error_term: bool = False,
    records: dict[str, torch.Tensor] | None = None,
) -> list[tuple[str, object]]:
    """Forward hooks (name, fn) that splice `dictionaries` in; pass them to `model.hooks(...)`.

    Args:
        use_error_term: add back what each dictionary misses, so the model's output is unchanged.
        records: where to put each dictionary's activations under SAELens' names (see the module docstring).
    """
    single = isinstance(dictionaries, (Dictionary, CrossLayerTranscoder))
    dictionaries = [dictionaries] if single else list(dictionaries)
    sites = [site for d in dictionaries for site in _sites(d)[1]]
    if len(set(sites)) != len(sites):
        raise ArgumentError(f"two dictionaries replace the same hook point: {sorted(sites)}")
    hooks: list[tuple[str, object]] = []
    for dictionary in dictionaries:
        hooks_in, hooks_out = _sites(dictionary)
        for name in dict.fromkeys(hooks_in + hooks_out):
            if name not in model.hook_dict:
                raise UnknownNameError(
                    f"{dictionary.path}: the model has no hook point {name!r}{did_you_mean(name, model.hook_dict)}"
                )
        if isinstance(dictionary, CrossLayerTranscoder):
            hooks.extend(_cross_layer_hooks(dictionary, use_error_term, records))
        else:
            hooks.extend(_dictionary_hooks(dictionary, use_error_term, records))
    return hooks


def _with_error_term(target: torch.Tensor, recons: torch.Tensor) -> torch.Tensor:
    """recons + (target - recons).detach() in value and gradient, but exactly `target` in value."""
    return target.detach().to(recons.device, recons.dtype) + (recons - recons.detach())


def _dictionary_hooks(dictionary: Dictionary, use_error_term: bool, records: dict | None):
    site = dictionary.hook_out
    inputs: list[torch.Tensor] = []  # a transcoder's input, from hook_in to hook_out of the same forward

    def replace(x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        # `x` is the activation replaced; `source` what the dictionary reads (x itself for an SAE).
        flat_in, pre = dictionary.encode_pre(source)
        acts = dictionary._activate(flat_in, pre)
        recons = dictionary.decode(acts, source)
        target = x.flatten(-2) if x.shape[-1] != recons.shape[-1] else x
        # The dictionary computes on its own device and dtype; what goes back to the model takes the model's.
        error = target.to(recons.device, recons.dtype) - recons
        if records is not None:
            values = (dictionary._flat(source, dictionary.d_in, "x"), pre, acts, recons, error)
            for point, value in zip(SAE_POINTS, values):
                records[f"{site}.{point}"] = value.detach()
        out = _with_error_term(target, recons) if use_error_term else recons
        return out.reshape(x.shape).to(x.device, x.dtype)

    if not dictionary.is_transcoder:
        return [(site, lambda x, *, hook: replace(x, x))]

    def save_input(x: torch.Tensor, *, hook: HookPoint) -> None:
        inputs[:] = [x]

    def write_output(y: torch.Tensor, *, hook: HookPoint) -> torch.Tensor:
        if not inputs:
            raise ArgumentError(f"{dictionary.path}: {site} ran before {dictionary.hook_in}, which it reads")
        return replace(y, inputs.pop())

    return [(dictionary.hook_in, save_input), (site, write_output)]


def _cross_layer_hooks(clt: CrossLayerTranscoder, use_error_term: bool, records: dict | None):
    # Per layer of the current forward pass: (input, pre-activations, activations, and the active features'
    # activations with their decoder rows to this and every later layer), filled at hooks_in[layer].
    state: dict[int, tuple] = {}
    last_read = [-1]  # the layer read last; a pass reads layers in order, so a read out of order starts a new one

    def read_input(layer: int):
        def hook(x: torch.Tensor, *, hook: HookPoint) -> None:
            previous = state.get(layer - 1)
            continues = layer == last_read[0] + 1 and (previous is None or previous[0].shape[:-1] == x.shape[:-1])
            if not continues:
                # A new forward pass (from layer 0, or resumed at a later layer from a residual stream): what the
                # CLT read before belongs to another pass, and layers this one skips have no features of it.
                state.clear()
            last_read[0] = layer
            pre = clt.encode_pre(x, layer)
            acts = clt.activate(pre, layer)
            state[layer] = (x, pre, acts, *clt.decoded_rows(acts, layer))

        return hook

    def write_output(layer: int):
        def hook(y: torch.Tensor, *, hook: HookPoint) -> torch.Tensor:
            missing = [i for i in range(layer + 1) if i not in state]
            if missing:
                raise ArgumentError(
                    f"{clt.path}: the CLT's output at {clt.hooks_out[layer]} is written by the features of layers "
                    f"0..{layer}, but this forward pass did not read layers {missing} ({clt.hooks_in[missing[0]]}); "
                    "a pass resumed at a later layer (start_at_layer=, a cached residual stream) has no features "
                    "of the layers below, and the CLT cannot recompute them from the residual stream: run the "
                    "spliced pass from layer 0 (patch with a hook inside it), or resume a pass split with "
                    "stop_at_layer= from the residual stream it returned"
                )
            recons = clt.param(layer, "b_dec")
            for source in range(layer + 1):
                values, rows = state[source][3], state[source][4]
                recons = recons + values @ rows[:, layer - source]
            recons = recons.expand(*y.shape[:-1], clt.d_out)
            error = y.to(recons.device, recons.dtype) - recons
            if records is not None:
                x, pre, acts = state[layer][:3]
                for point, value in zip(SAE_POINTS, (x, pre, acts, recons, error)):
                    records[f"{clt.hooks_out[layer]}.{point}"] = value.detach()
            out = _with_error_term(y, recons) if use_error_term else recons
            return out.to(y.device, y.dtype)

        return hook

    hooks = [(name, read_input(layer)) for layer, name in enumerate(clt.hooks_in)]
    return hooks + [(name, write_output(layer)) for layer, name in enumerate(clt.hooks_out)]


@contextmanager
def spliced(
    model: HookedModule, dictionaries: AnyDictionary | Iterable[AnyDictionary], *, use_error_term: bool = False
) -> Iterator[HookedModule]:
    """`with ll.spliced(model, dictionaries): model(tokens)` runs the model with the dictionaries in place."""
    with model.hooks(splice_hooks(model, dictionaries, use_error_term=use_error_term)):
        yield model


def run_with_dictionaries(
    model: HookedModule,
    *args,
    dictionaries: AnyDictionary | Iterable[AnyDictionary],
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
