"""Activation and attribution patching: the entry points, their result, and TransformerLens' `get_act_patch_*` names.

See the package docstring (`llama_lens.patching`) for the sites and how a sweep runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..model.activation_cache import ActivationCache
from ..model.llama import HookedLlama
from .metrics import (
    Metric,
    apply_metric,
    metric_forward_kwargs,
)
from .sweep import SITES, check_site, patch_sweep, reference_names, resolve_layers, site_indices

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure


# ----------------------------------------------------------------------------------------- results
@dataclass
class PatchingResult:
    """Scores per site. `scores[site]` is [n_layers, pos] or [n_layers, pos, heads] / [n_layers, heads]; `axes[site]`
    names its dimensions; `tokens` labels the positions (the first clean prompt's tokens)."""

    scores: dict[str, torch.Tensor]
    axes: dict[str, tuple[str, ...]]
    layers: list[int]
    tokens: list[str] = field(default_factory=list)
    method: str = "activation"

    def __post_init__(self) -> None:
        for site, score in self.scores.items():
            if score.dim() != len(self.axes[site]) or score.shape[0] != len(self.layers):
                raise ValueError(f"scores of {site!r} are {tuple(score.shape)}, expected axes {self.axes[site]}")

    def to_frame(self) -> pd.DataFrame:
        """One row per patched site: method, site, layer, pos, token, head (-1 where not per head), score."""
        import pandas as pd

        rows = []
        for site, score in self.scores.items():
            axes = self.axes[site]
            for index in torch.cartesian_prod(*[torch.arange(n) for n in score.shape]).view(-1, score.dim()).tolist():
                named = dict(zip(axes, index))
                pos = named.get("pos", -1)
                rows.append(
                    {
                        "method": self.method,
                        "site": site,
                        "layer": self.layers[named["layer"]],
                        "pos": pos,
                        "token": self.tokens[pos] if 0 <= pos < len(self.tokens) else "",
                        "head": named.get("head", -1),
                        "score": float(score[tuple(index)]),
                    }
                )
        return pd.DataFrame(rows)

    def plot(self, sites: Sequence[str] | None = None, *, figsize: tuple[float, float] | None = None) -> Figure:
        """A heatmap per site (layers down; positions or heads across; per-position heads as one panel per
        head axis flattened to position x head). Returns the matplotlib Figure."""
        from matplotlib.figure import Figure

        sites = list(self.scores) if sites is None else list(sites)
        for site in sites:
            if site not in self.scores:
                raise ValueError(f"no scores for site {site!r}; this result holds {list(self.scores)}")
        fig = Figure(figsize=figsize or (4.5 * len(sites), 0.25 * len(self.layers) + 2.5), layout="constrained")
        axes = fig.subplots(1, len(sites), squeeze=False)[0]
        for ax, site in zip(axes, sites):
            score = self.scores[site].float()
            names = self.axes[site]
            if score.dim() == 3:  # [layer, pos, head] -> [layer, pos * head]
                score = score.flatten(1)
                xlabel = "position x head"
            else:
                xlabel = names[1]
            limit = float(score.abs().max()) or 1.0
            image = ax.imshow(score.numpy(), cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
            ax.set_title(f"{self.method} patching: {site}")
            ax.set_ylabel("layer")
            ax.set_xlabel(xlabel)
            ax.set_yticks(range(len(self.layers)), [str(i) for i in self.layers])
            if names[1] == "pos" and score.shape[1] == len(self.tokens):
                ax.set_xticks(range(len(self.tokens)), [f"{t!r}"[1:-1] for t in self.tokens], rotation=90)
            fig.colorbar(image, ax=ax)
        return fig


# ----------------------------------------------------------------------------------------- attribution
def attribution_sweep(
    model: HookedLlama,
    clean_cache: ActivationCache,
    corrupted_tokens: torch.Tensor,
    metric: Metric,
    sites: Sequence[str],
    *,
    by_pos: bool = True,
    layers: Sequence[int] | None = None,
    attention_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Attribution patching: (clean - corrupted) activation x d(metric)/d(activation) on the corrupted run, summed
    over the site's feature dimension, from one forward + backward pass.

    Returns:
        site -> scores shaped as `patch_sweep`'s.
    """
    for site in sites:
        check_site(site)
    layers = resolve_layers(model, layers)
    names = {f"blocks.{layer}.{SITES[site][0]}" for site in sites for layer in layers}
    tokens, inferred = model.prepare_tokens(corrupted_tokens)
    mask = inferred if attention_mask is None else attention_mask.to(model.device)
    acts: dict[str, torch.Tensor] = {}

    def keep(tensor: torch.Tensor, *, hook) -> None:
        acts[hook.name] = tensor

    with torch.enable_grad(), model.hooks([(list(names), keep)]):
        value = apply_metric(model, metric, model(tokens, attention_mask=mask, **metric_forward_kwargs(model, metric)))
        ordered = sorted(names)
        grads = torch.autograd.grad(value, [acts[n] for n in ordered], allow_unused=True)
    grad_of = dict(zip(ordered, grads))
    results = {}
    for site in sites:
        per_layer = []
        for layer in layers:
            name = f"blocks.{layer}.{SITES[site][0]}"
            if name not in clean_cache:
                raise ValueError(f"the clean cache has no {name!r}; run run_with_cache on the clean tokens with it")
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


# ----------------------------------------------------------------------------------------- one call
def _prepare_pair(model: HookedLlama, clean: Any, corrupted: Any, prepend_bos: bool | None):
    clean_tokens, clean_mask = model.prepare_tokens(clean, prepend_bos=prepend_bos)
    corrupted_tokens, corrupted_mask = model.prepare_tokens(corrupted, prepend_bos=prepend_bos)
    if clean_tokens.shape != corrupted_tokens.shape:
        raise ValueError(
            f"clean and corrupted prompts must have the same shape [batch, pos] to patch position by position, got "
            f"{tuple(clean_tokens.shape)} and {tuple(corrupted_tokens.shape)}; choose prompts of equal token length"
        )
    return clean_tokens, clean_mask, corrupted_tokens, corrupted_mask


def _sites_list(sites: str | Sequence[str]) -> list[str]:
    sites = [sites] if isinstance(sites, str) else list(sites)
    for site in sites:
        check_site(site)
    return sites


def activation_patching(
    model: HookedLlama,
    clean: str | Sequence[str] | torch.Tensor,
    corrupted: str | Sequence[str] | torch.Tensor,
    metric: Metric,
    sites: str | Sequence[str] = "resid_pre",
    *,
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
        metric: metric(logits [batch, pos, d_vocab]) -> [], e.g. `logit_diff_metric(...)`.
        sites: names from SITES (see the module docstring).
        by_pos: patch per position; head sites with False patch a head at every position at once.
        layers: the layers to patch (default: all loaded).
        prepend_bos: for texts: add BOS (True), not (False), or the tokenizer's own default (None).
        max_batch: the most rows (prompts x patched runs) per forward pass.
        progress: show a tqdm progress bar.

    Returns:
        PatchingResult (`.scores`, `.to_frame()`, `.plot()`).
    """
    sites = _sites_list(sites)
    if not isinstance(by_pos, bool):
        raise ValueError(f"by_pos must be True or False here, got {by_pos!r} (patch_sweep takes 'dest_src')")
    clean_tokens, clean_mask, corrupted_tokens, corrupted_mask = _prepare_pair(model, clean, corrupted, prepend_bos)
    suffixes = tuple(SITES[site][0] for site in sites)
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(
            clean_tokens, attention_mask=clean_mask, names_filter=lambda n: n.endswith(suffixes)
        )
        # One corrupted pass holds what every site's sweep reads from it.
        layer_list = resolve_layers(model, layers)
        reference = sorted({name for site in sites for name in reference_names(model, site, layer_list)})
        _, corrupted_cache = model.run_with_cache(
            corrupted_tokens, attention_mask=corrupted_mask, names_filter=reference
        )
    scores, axes = {}, {}
    for site in sites:
        scores[site], axes[site] = patch_sweep(
            model,
            corrupted_tokens,
            clean_cache,
            metric,
            site,
            by_pos=by_pos,
            layers=layer_list,
            attention_mask=corrupted_mask,
            corrupted_cache=corrupted_cache,
            max_batch=max_batch,
            progress=progress,
        )
    return PatchingResult(scores, axes, layer_list, _labels(model, clean_tokens))


def attribution_patching(
    model: HookedLlama,
    clean: str | Sequence[str] | torch.Tensor,
    corrupted: str | Sequence[str] | torch.Tensor,
    metric: Metric,
    sites: str | Sequence[str] = "resid_pre",
    *,
    by_pos: bool = True,
    layers: Sequence[int] | None = None,
    prepend_bos: bool | None = None,
) -> PatchingResult:
    """The linear estimate of `activation_patching` for every site at once: one clean forward pass, one
    corrupted forward + backward pass. Same arguments (the metric must be differentiable) and result layout."""
    sites = _sites_list(sites)
    clean_tokens, clean_mask, corrupted_tokens, corrupted_mask = _prepare_pair(model, clean, corrupted, prepend_bos)
    suffixes = tuple(SITES[site][0] for site in sites)
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(
            clean_tokens, attention_mask=clean_mask, names_filter=lambda n: n.endswith(suffixes)
        )
    scores = attribution_sweep(
        model, clean_cache, corrupted_tokens, metric, sites, by_pos=by_pos, layers=layers, attention_mask=corrupted_mask
    )
    pos = clean_tokens.shape[1]
    axes = {site: site_indices(site, model, pos, by_pos)[1] for site in sites}
    layer_list = resolve_layers(model, layers)
    return PatchingResult(scores, axes, layer_list, _labels(model, clean_tokens), method="attribution")


def _labels(model: HookedLlama, tokens: torch.Tensor) -> list[str]:
    if model.tokenizer is None:
        return [str(i) for i in tokens[0].tolist()]
    return model.to_str_tokens(tokens[0])


# ----------------------------------------------------------------------------------------- TransformerLens' names
def _tl(site: str, by_pos: bool | str, doc: str, head_first: bool = False):
    def patch(
        model: HookedLlama,
        corrupted_tokens: torch.Tensor,
        clean_cache: ActivationCache,
        patching_metric: Metric,
        *,
        progress: bool = True,
        max_batch: int = 64,
    ) -> torch.Tensor:
        scores = patch_sweep(
            model,
            corrupted_tokens,
            clean_cache,
            patching_metric,
            site,
            by_pos=by_pos,
            max_batch=max_batch,
            progress=progress,
        )[0]
        # TransformerLens orders a pattern's scores by head, then destination position.
        return scores.permute(0, 2, 1) if head_first else scores

    patch.__doc__ = (
        f"TransformerLens' name: patches clean `{SITES[site][0]}` into the corrupted run {doc}.\n\n"
        "Args: model, corrupted_tokens [batch, pos], clean_cache (run_with_cache of the clean tokens), "
        "patching_metric(logits) -> []; progress (a tqdm bar), max_batch (rows per forward pass).\n"
    )
    return patch


get_act_patch_resid_pre = _tl("resid_pre", True, "per (layer, position): [n_layers, pos]")
get_act_patch_resid_mid = _tl("resid_mid", True, "per (layer, position): [n_layers, pos]")
get_act_patch_resid_post = _tl("resid_post", True, "per (layer, position): [n_layers, pos]")
get_act_patch_attn_out = _tl("attn_out", True, "per (layer, position): [n_layers, pos]")
get_act_patch_mlp_out = _tl("mlp_out", True, "per (layer, position): [n_layers, pos]")
get_act_patch_attn_head_out_all_pos = _tl("z", False, "per (layer, head), all positions: [n_layers, n_heads]")
get_act_patch_attn_head_out_by_pos = _tl("z", True, "per (layer, position, head): [n_layers, pos, n_heads]")
get_act_patch_attn_head_q_all_pos = _tl("q", False, "per (layer, head), all positions: [n_layers, n_heads]")
get_act_patch_attn_head_q_by_pos = _tl("q", True, "per (layer, position, head): [n_layers, pos, n_heads]")
get_act_patch_attn_head_k_all_pos = _tl("k", False, "per (layer, KV head): [n_layers, n_kv_heads]")
get_act_patch_attn_head_k_by_pos = _tl("k", True, "per (layer, position, KV head): [n_layers, pos, n_kv_heads]")
get_act_patch_attn_head_v_all_pos = _tl("v", False, "per (layer, KV head): [n_layers, n_kv_heads]")
get_act_patch_attn_head_v_by_pos = _tl("v", True, "per (layer, position, KV head): [n_layers, pos, n_kv_heads]")
get_act_patch_attn_head_pattern_all_pos = _tl("pattern", False, "per (layer, head): [n_layers, n_heads]")
get_act_patch_attn_head_pattern_by_pos = _tl(
    "pattern", True, "per (layer, head, query position): [n_layers, n_heads, dest_pos]", head_first=True
)
get_act_patch_attn_head_pattern_dest_src_pos = _tl(
    "pattern", "dest_src", "per (layer, head, query, key) entry: [n_layers, n_heads, dest_pos, src_pos]"
)
_K_V_FUNCTIONS = (
    get_act_patch_attn_head_k_all_pos,
    get_act_patch_attn_head_k_by_pos,
    get_act_patch_attn_head_v_all_pos,
    get_act_patch_attn_head_v_by_pos,
)


def _every(functions, model, corrupted_tokens, clean_cache, metric, progress, max_batch) -> torch.Tensor:
    results = []
    for function in functions:
        scores = function(model, corrupted_tokens, clean_cache, metric, progress=progress, max_batch=max_batch)
        if function in _K_V_FUNCTIONS:
            # As TransformerLens: one entry per key/value head, zero-padded to n_heads (grouped-query attention).
            scores = torch.nn.functional.pad(scores, (0, model.cfg.n_heads - scores.shape[-1]))
        results.append(scores)
    return torch.stack(results)


def get_act_patch_attn_head_all_pos_every(
    model: HookedLlama,
    corrupted_tokens: torch.Tensor,
    clean_cache: ActivationCache,
    metric: Metric,
    *,
    progress: bool = True,
    max_batch: int = 64,
) -> torch.Tensor:
    """TransformerLens' name: each head patched at every position, for its output (z), query, key, value and
    pattern: [5, n_layers, n_heads]. With grouped-query attention, the key and value rows hold one score per
    key/value head in their first n_kv_heads columns and zeros after, as TransformerLens' do."""
    functions = [
        get_act_patch_attn_head_out_all_pos,
        get_act_patch_attn_head_q_all_pos,
        get_act_patch_attn_head_k_all_pos,
        get_act_patch_attn_head_v_all_pos,
        get_act_patch_attn_head_pattern_all_pos,
    ]
    return _every(functions, model, corrupted_tokens, clean_cache, metric, progress, max_batch)


def get_act_patch_attn_head_by_pos_every(
    model: HookedLlama,
    corrupted_tokens: torch.Tensor,
    clean_cache: ActivationCache,
    metric: Metric,
    *,
    progress: bool = True,
    max_batch: int = 64,
) -> torch.Tensor:
    """TransformerLens' name: each head patched at each position, for its output (z), query, key, value and
    pattern (query position): [5, n_layers, pos, n_heads]; key and value rows zero-padded from n_kv_heads to
    n_heads as in `get_act_patch_attn_head_all_pos_every`."""
    functions = [
        get_act_patch_attn_head_out_by_pos,
        get_act_patch_attn_head_q_by_pos,
        get_act_patch_attn_head_k_by_pos,
        get_act_patch_attn_head_v_by_pos,
        _tl("pattern", True, "per (layer, query position, head)"),
    ]
    return _every(functions, model, corrupted_tokens, clean_cache, metric, progress, max_batch)


def get_act_patch_block_every(
    model: HookedLlama,
    corrupted_tokens: torch.Tensor,
    clean_cache: ActivationCache,
    metric: Metric,
    *,
    progress: bool = True,
    max_batch: int = 64,
) -> torch.Tensor:
    """TransformerLens' name: resid_pre, attn_out and mlp_out patched per (layer, position): [3, n_layers, pos]."""
    functions = [get_act_patch_resid_pre, get_act_patch_attn_out, get_act_patch_mlp_out]
    return _every(functions, model, corrupted_tokens, clean_cache, metric, progress, max_batch)
