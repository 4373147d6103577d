"""Attribution patching: every patch's score estimated at once, (clean - corrupted) activation x the metric's
gradient on the corrupted run, from one forward + backward pass (Syed et al. 2023, arXiv:2310.10348)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ArgumentError
from ..model.activation_cache import ActivationCache
from ..model.llama import HookedLlama
from .metrics import Metric
from .scoring import score_final
from .signature import corrupted_tokens_first
from .sites import SITES, check_site, resolve_layers


@corrupted_tokens_first
def attribution_sweep(
    model: HookedLlama,
    corrupted_tokens: torch.Tensor,
    clean_cache: ActivationCache,
    metric: Metric,
    sites: Sequence[str],
    *,
    by_pos: bool = True,
    layers: Sequence[int] | None = None,
    attention_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Attribution patching: (clean - corrupted) activation x d(metric)/d(activation) on the corrupted run, summed
    over the site's feature dimension, from one forward + backward pass. Arguments in TransformerLens' order, as
    `patch_sweep`'s (the old order, clean_cache before corrupted_tokens, still works for one release).

    Returns:
        site -> scores shaped as `patch_sweep`'s.
    """
    for site in sites:
        check_site(site)
    layers = resolve_layers(model, layers)
    names = {f"blocks.{layer}.{SITES[site][0]}" for site in sites for layer in layers}
    for name in sorted(names):
        if name not in clean_cache:
            raise ArgumentError(f"the clean cache has no {name!r}; run run_with_cache on the clean tokens with it")
    tokens, inferred = model.prepare_tokens(corrupted_tokens)
    mask = inferred if attention_mask is None else attention_mask.to(model.device)
    acts: dict[str, torch.Tensor] = {}

    def keep(tensor: torch.Tensor, *, hook) -> None:
        acts[hook.name] = tensor

    with torch.enable_grad(), model.hooks([(list(names), keep)]):
        # To the final residual stream only: the logits are computed where the metric reads them, and the backward
        # pass flows through those alone.
        final = model(tokens, attention_mask=mask, stop_at_layer=model.cfg.n_layers)  # [batch, pos, d_model]
        value = score_final(model, metric, final)
        ordered = sorted(names)
        grads = torch.autograd.grad(value, [acts[n] for n in ordered], allow_unused=True)
    grad_of = dict(zip(ordered, grads))
    results = {}
    for site in sites:
        per_layer = []
        for layer in layers:
            name = f"blocks.{layer}.{SITES[site][0]}"
            corrupted = acts[name].detach()
            grad = grad_of[name] if grad_of[name] is not None else torch.zeros_like(corrupted)
            product = ((clean_cache[name].to(corrupted) - corrupted) * grad).float()
            if site == "pattern":  # [batch, n_heads, q_pos, k_pos] -> [q_pos, n_heads] or [n_heads]
                score = product.sum(dim=(0, 3)).T if by_pos else product.sum(dim=(0, 2, 3))
            elif SITES[site][1] is None:  # [batch, pos, d_model] -> [pos]
                score = product.sum(dim=(0, 2))
            else:  # [batch, pos, heads, d_head] -> [pos, heads] or [heads]
                score = product.sum(dim=(0, 3)) if by_pos else product.sum(dim=(0, 1, 3))
            per_layer.append(score)
        results[site] = torch.stack(per_layer).cpu()
    return results
