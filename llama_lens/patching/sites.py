"""What a patch is: the sites (hook points) a sweep can patch, the patches of one layer, the part of an activation
a patch replaces, and the corrupted run's activations a sweep reads."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ArgumentError
from ..model.activation_cache import ActivationCache
from ..model.llama import HookedLlama
from ..validate import check_loaded_layers

# site -> (hook name after "blocks.{layer}.", what the head axis counts or None)
SITES: dict[str, tuple[str, str | None]] = {
    "resid_pre": ("hook_resid_pre", None),
    "resid_mid": ("hook_resid_mid", None),
    "resid_post": ("hook_resid_post", None),
    "attn_out": ("hook_attn_out", None),
    "mlp_out": ("hook_mlp_out", None),
    "z": ("attn.hook_z", "n_heads"),
    "q": ("attn.hook_q", "n_heads"),
    "k": ("attn.hook_k", "n_kv_heads"),
    "v": ("attn.hook_v", "n_kv_heads"),
    "pattern": ("attn.hook_pattern", "n_heads"),
}


def check_site(site: str) -> tuple[str, str | None]:
    """The site's (hook name suffix, head axis); an ArgumentError naming the choices for an unknown site."""
    if site not in SITES:
        raise ArgumentError(f"unknown patching site {site!r}; choose from {', '.join(SITES)}")
    return SITES[site]


def site_indices(
    site: str, model: HookedLlama, pos: int, by_pos: bool | str
) -> tuple[list[tuple[int, ...]], tuple[str, ...]]:
    """Every patch of one layer as a tuple over the score axes after "layer", and those axes.

    `by_pos`: True patches one position (and head) at a time, False a head at every position, "dest_src" (pattern
    only) one (query, key) entry of a head's pattern, TransformerLens' [n_layers, n_heads, dest_pos, src_pos].
    """
    _, heads = check_site(site)
    if by_pos == "dest_src":
        if site != "pattern":
            raise ArgumentError(f"by_pos='dest_src' patches pattern entries; site {site!r} takes True or False")
        entries = [(h, dest, src) for h in range(model.cfg.n_heads) for dest in range(pos) for src in range(pos)]
        return entries, ("layer", "head", "dest_pos", "src_pos")
    if not isinstance(by_pos, bool):
        raise ArgumentError(f"by_pos must be True, False or 'dest_src' (pattern only), got {by_pos!r}")
    if heads is None:
        return [(p,) for p in range(pos)], ("layer", "pos")
    n_heads = getattr(model.cfg, heads)
    if by_pos:
        return [(p, h) for p in range(pos) for h in range(n_heads)], ("layer", "pos", "head")
    return [(h,) for h in range(n_heads)], ("layer", "head")


def first_changed_position(where: dict[str, int]) -> int:
    """The first position a patch can change: its (query) position, or 0 for a head patched at every position."""
    return where.get("pos", where.get("dest_pos", 0))


def site_region(act: torch.Tensor, site: str, where: dict[str, int], start: int = 0) -> torch.Tensor:
    """The view of `act` (one run's activation [batch, ...] holding positions start..) that a patch replaces.

    Args:
        act: [batch, pos, d_model] for the residual sites, [batch, pos, heads, d_head] for z/q/k/v,
            [batch, n_heads, q_pos, k_pos] for the pattern (its query positions start at `start`, its keys at 0).
        where: the patch, by axis name: "pos" or "dest_pos", "head", "src_pos" (a `site_indices` tuple named by
            its axes).
        start: the first position `act` holds.
    """
    pos, head = where.get("pos", where.get("dest_pos")), where.get("head")
    if site == "pattern":
        if pos is None:
            return act[:, head]
        return act[:, head, pos - start] if "src_pos" not in where else act[:, head, pos - start, where["src_pos"]]
    if SITES[site][1] is None:
        return act[:, pos - start]
    return act[:, :, head] if pos is None else act[:, pos - start, head]


def resolve_layers(model: HookedLlama, layers: Sequence[int] | None) -> list[int]:
    """The layers to patch, sorted, negative ones counted from cfg.n_layers; an error for a layer that is not
    an integer or not loaded."""
    if layers is None:
        return list(model.layer_indices)
    given = list(layers)  # an iterator is read once
    resolved = [
        layer + model.cfg.n_layers if isinstance(layer, int) and not isinstance(layer, bool) and layer < 0 else layer
        for layer in given
    ]
    return check_loaded_layers(resolved, model.layer_indices)


def reference_names(model: HookedLlama, site: str, layers: Sequence[int]) -> list[str]:
    """The corrupted run's activations a sweep reads: the site and resid_pre of each patched layer, the keys
    (after RoPE) and values of every layer from the first patched one, and the final residual stream."""
    suffix, _ = check_site(site)
    first = min(layers)
    names = {f"blocks.{layer}.{suffix}" for layer in layers} | {f"blocks.{layer}.hook_resid_pre" for layer in layers}
    for layer in model.layer_indices:
        if layer >= first:
            names |= {f"blocks.{layer}.attn.hook_rot_k", f"blocks.{layer}.attn.hook_v"}
    names.add(final_resid_name(model))
    return sorted(names)


def final_resid_name(model: HookedLlama) -> str:
    """The hook of the residual stream the logits are read from (after the last loaded layer)."""
    return f"blocks.{model.layer_indices[-1]}.hook_resid_post"


# Which hooks a layer has changes its arithmetic in the last bits: with its pattern hooked, attention is written out
# (scores, softmax, pattern) instead of fused; with hook_result hooked, the heads' outputs are summed one by one. A
# patch is skipped as a no-op only where the clean and corrupted activations are the same bits, so the corrupted run
# takes the path the clean run took, layer by layer.
_PATHS = {"attn.hook_pattern": "attn.hook_pattern", "attn.hook_attn_scores": "attn.hook_pattern"}
_PATHS["attn.hook_result"] = "attn.hook_result"


def corrupted_reference(
    model: HookedLlama,
    tokens: torch.Tensor,
    mask: torch.Tensor | None,
    names: Sequence[str],
    clean_cache: ActivationCache,
) -> ActivationCache:
    """The corrupted run's activations `names`, computed along the path (attention written out or fused, heads
    summed one by one or not) that the clean cache's hooks gave each layer."""
    follow = sorted(
        {
            f"{name.rsplit('.', 2)[0]}.{hook}"
            for name in clean_cache
            for suffix, hook in _PATHS.items()
            if name.endswith(suffix)
        }
    )
    with torch.no_grad():
        # stop_at_layer: the sweep reads the final residual stream; the logits it needs are computed where read.
        _, cache = model.run_with_cache(
            tokens,
            attention_mask=mask,
            names_filter=list(names),
            fwd_hooks=[(follow, _unchanged)] if follow else [],
            stop_at_layer=model.cfg.n_layers,
        )
    return cache


def _unchanged(act: torch.Tensor, *, hook) -> None:
    """A hook that changes nothing: its presence sets its layer's path."""
