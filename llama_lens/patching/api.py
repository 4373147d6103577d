"""The one-call entry points: `activation_patching` and `attribution_patching` take clean and corrupted prompts
(texts or ids), run the clean pass once, and return a `PatchingResult`. Both share their head, `_prepare`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import ArgumentError
from ..model.activation_cache import ActivationCache
from ..model.llama import HookedLlama
from .attribution import attribution_sweep
from .metrics import Metric
from .result import PatchingResult
from .signature import keyword_only_after
from .sites import SITES, check_site, corrupted_reference, reference_names, resolve_layers, site_indices
from .sweep import patch_sweep

Prompts = str | Sequence[str] | torch.Tensor


@dataclass
class PatchingInputs:
    """What both entry points start from: the prompt pair as ids [batch, pos] with their masks, the sites and
    layers to patch, and the clean run's activations at those sites."""

    clean_tokens: torch.Tensor
    clean_mask: torch.Tensor | None
    corrupted_tokens: torch.Tensor
    corrupted_mask: torch.Tensor | None
    sites: list[str]
    layers: list[int]
    clean_cache: ActivationCache
    labels: list[str]  # the first clean prompt's tokens, for the result's positions


def _prepare(
    model: HookedLlama,
    clean: Prompts,
    corrupted: Prompts,
    sites: str | Sequence[str],
    layers: Sequence[int] | None,
    prepend_bos: bool | None,
) -> PatchingInputs:
    sites = [sites] if isinstance(sites, str) else list(sites)
    for site in sites:
        check_site(site)
    layer_list = resolve_layers(model, layers)
    clean_tokens, clean_mask = model.prepare_tokens(clean, prepend_bos=prepend_bos)
    corrupted_tokens, corrupted_mask = model.prepare_tokens(corrupted, prepend_bos=prepend_bos)
    if clean_tokens.shape != corrupted_tokens.shape:
        raise ArgumentError(
            f"clean and corrupted prompts must have the same shape [batch, pos] to patch position by position, got "
            f"{tuple(clean_tokens.shape)} and {tuple(corrupted_tokens.shape)}; choose prompts of equal token length"
        )
    suffixes = tuple(SITES[site][0] for site in sites)
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(
            clean_tokens,
            attention_mask=clean_mask,
            names_filter=lambda name: name.endswith(suffixes),
            stop_at_layer=model.cfg.n_layers,  # the activations only: no logits
        )
    first = clean_tokens[0]
    labels = [str(i) for i in first.tolist()] if model.tokenizer is None else model.to_str_tokens(first)
    return PatchingInputs(
        clean_tokens, clean_mask, corrupted_tokens, corrupted_mask, sites, layer_list, clean_cache, labels
    )


@keyword_only_after(4, "sites")
def activation_patching(
    model: HookedLlama,
    clean: Prompts,
    corrupted: Prompts,
    metric: Metric,
    *,
    sites: str | Sequence[str] = "resid_pre",
    by_pos: bool = True,
    layers: Sequence[int] | None = None,
    prepend_bos: bool | None = None,
    max_batch: int = 64,
    progress: bool = True,
) -> PatchingResult:
    """Patches each clean activation of `sites` into the corrupted run, one at a time, and scores the output.

    Args:
        clean, corrupted: texts or ids [batch, pos] of the same shape (prompt i of one pairs with prompt i of
            the other); texts are left-padded, so `position=-1` metrics read each prompt's last token.
        metric: metric(logits [batch, pos, d_vocab]) -> [], e.g. `logit_diff_metric(...)` or any callable (see
            `patch_sweep` for the forms that run batched).
        sites: names from SITES (see the package docstring).
        by_pos: patch per position; head sites with False patch a head at every position at once.
        layers: the layers to patch (default: all loaded).
        prepend_bos: for texts: add BOS (True), not (False), or the tokenizer's own default (None).
        max_batch: the most rows (prompts x patched runs) per forward pass.
        progress: show a tqdm progress bar.

    Returns:
        PatchingResult (`.scores`, `.to_frame()`, `.plot()`).
    """
    if not isinstance(by_pos, bool):
        raise ArgumentError(f"by_pos must be True or False here, got {by_pos!r} (patch_sweep takes 'dest_src')")
    inputs = _prepare(model, clean, corrupted, sites, layers, prepend_bos)
    # One corrupted pass holds what every site's sweep reads from it.
    reference = sorted({name for site in inputs.sites for name in reference_names(model, site, inputs.layers)})
    corrupted_cache = corrupted_reference(
        model, inputs.corrupted_tokens, inputs.corrupted_mask, reference, inputs.clean_cache
    )
    scores, axes = {}, {}
    for site in inputs.sites:
        scores[site], axes[site] = patch_sweep(
            model,
            inputs.corrupted_tokens,
            inputs.clean_cache,
            metric,
            site,
            by_pos=by_pos,
            layers=inputs.layers,
            attention_mask=inputs.corrupted_mask,
            corrupted_cache=corrupted_cache,
            max_batch=max_batch,
            progress=progress,
        )
    return PatchingResult(scores, axes, inputs.layers, inputs.labels)


@keyword_only_after(4, "sites")
def attribution_patching(
    model: HookedLlama,
    clean: Prompts,
    corrupted: Prompts,
    metric: Metric,
    *,
    sites: str | Sequence[str] = "resid_pre",
    by_pos: bool = True,
    layers: Sequence[int] | None = None,
    prepend_bos: bool | None = None,
) -> PatchingResult:
    """The linear estimate of `activation_patching` for every site at once: one clean forward pass, one
    corrupted forward + backward pass. Same arguments (the metric must be differentiable) and result layout."""
    inputs = _prepare(model, clean, corrupted, sites, layers, prepend_bos)
    scores = attribution_sweep(
        model,
        inputs.corrupted_tokens,
        inputs.clean_cache,
        metric,
        inputs.sites,
        by_pos=by_pos,
        layers=inputs.layers,
        attention_mask=inputs.corrupted_mask,
    )
    pos = inputs.clean_tokens.shape[1]
    axes = {site: site_indices(site, model, pos, by_pos)[1] for site in inputs.sites}
    return PatchingResult(scores, axes, inputs.layers, inputs.labels, method="attribution")
