"""Attention patterns out of a cache: `blocks.{i}.attn.hook_pattern` (or `hook_attn_scores`),
[batch, n_heads, q_pos, k_pos], from an ActivationCache, a dict of tensors or `run_with_cache`'s pair.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ..errors import ArgumentError, UnknownNameError
from ..validate import check_attention_mask

PATTERN_HOOK = "attn.hook_pattern"
SCORES_HOOK = "attn.hook_attn_scores"

_HOOK_KEY = re.compile(r"^blocks\.(\d+)\.(attn\.hook_pattern|attn\.hook_attn_scores)$")


def as_cache(cache_or_output: Any) -> Any:
    """The activations inside `cache_or_output`: an ActivationCache, a dict of tensors, or the (logits, cache)
    pair that `run_with_cache` returns."""
    if isinstance(cache_or_output, tuple) and len(cache_or_output) == 2:
        cache_or_output = cache_or_output[1]
    if not (hasattr(cache_or_output, "keys") and hasattr(cache_or_output, "__getitem__")):
        raise ArgumentError(
            f"expected an ActivationCache, a dict of activations or the (logits, cache) pair of "
            f"model.run_with_cache, got {type(cache_or_output).__name__}"
        )
    return cache_or_output


def attention_layers(cache_or_output: Any, *, scores: bool = False) -> list[int]:
    """The layers whose attention pattern (or pre-softmax scores) the cache holds, in increasing order."""
    hook = SCORES_HOOK if scores else PATTERN_HOOK
    found = (_HOOK_KEY.match(name) for name in as_cache(cache_or_output))
    return sorted(int(match.group(1)) for match in found if match and match.group(2) == hook)


def attention_pattern(cache_or_output: Any, layer: int, *, scores: bool = False) -> torch.Tensor:
    """The cached attention pattern of `layer`, or its pre-softmax scores (-inf where masked).

    Returns:
        [batch, n_heads, q_pos, k_pos]

    Raises:
        UnknownNameError: the cache does not hold it; the message says which layers it holds or how to cache them.
    """
    cache = as_cache(cache_or_output)
    hook = SCORES_HOOK if scores else PATTERN_HOOK
    name = f"blocks.{layer}.{hook}"
    if name in cache:
        return cache[name]
    held = attention_layers(cache, scores=scores)
    if held:
        raise UnknownNameError(f"no {name!r} in this cache: it holds {hook} for layers {held} only")
    raise UnknownNameError(
        f"no {name!r} in this cache; keep it with "
        f"model.run_with_cache(tokens, names_filter=lambda name: name.endswith({hook.split('.')[-1]!r}))"
    )


def checked_mask(attention_mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """`attention_mask` [batch, pos] checked against a pattern [batch, n_heads, q_pos, k_pos], as a CPU bool
    tensor (`validate.check_attention_mask`)."""
    batch, _, _, k_pos = pattern.shape
    return check_attention_mask(attention_mask, batch, k_pos)
