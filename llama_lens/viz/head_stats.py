"""One statistic per attention head over a cache (attention to BOS, to the previous token, to itself, the
pattern's entropy, induction), as a tensor, a table of the top heads, or a layer × head heatmap.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ArgumentError
from ..validate import check_choice, check_index, renamed_keywords
from .patterns import as_cache, attention_layers, attention_pattern, checked_mask
from .tokens import MAX_LABELS, position_tick_labels

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

# stat name -> what the summary's colour bar says
HEAD_STATS = {
    "bos": "mean attention to BOS",
    "prev": "mean attention to the previous token",
    "self": "mean attention to the current token",
    "entropy": "mean entropy of the pattern (nats)",
    "induction": "induction score",
}


@renamed_keywords(prompt="batch_index")
def head_statistics(
    cache_or_output: Any,
    stat: str | Callable[[torch.Tensor], torch.Tensor] = "bos",
    *,
    period: int | None = None,
    batch_index: int | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """One number per head: how much it attends to BOS, to the previous token, to itself, how spread out its
    pattern is, or how strongly it does induction.

    Each statistic is averaged over the queries that can make a choice: every query but the first (the
    first can only attend to itself), and for "induction" the queries of the second and later copies.

    Args:
        cache_or_output: a cache (or the pair `run_with_cache` returns) holding `hook_pattern` of the layers.
        stat: "bos" (weight on the first token), "prev" (on the previous token), "self" (on the query
            itself), "entropy" (of the pattern, in nats), "induction" (with `period`: weight from position i
            to i - period + 1, for prompts laid out as BOS followed by a block of `period` random tokens
            repeated), or a function pattern [batch, n_heads, q_pos, k_pos] -> [n_heads] or [batch, n_heads].
        period: the length of the repeated block, for "induction".
        batch_index: use this prompt of the batch only (default: the mean over the batch); formerly `prompt=`.
        attention_mask: [batch, pos], 1 for real tokens, 0 for left padding, so padded prompts count from
            their own first token and padding queries are skipped.

    Returns:
        [n_layers, n_heads] float32, one row per layer in `attention_layers(cache)` (the layers the model
        holds, by absolute index).

    Raises:
        UnknownNameError: the cache holds no attention pattern.
        ArgumentError: an unknown stat, a missing or too long `period`, a mask of the wrong shape.
    """
    cache = as_cache(cache_or_output)
    layers = attention_layers(cache)
    if not layers:
        attention_pattern(cache, 0)  # raises the KeyError that says how to cache patterns
    if not callable(stat):
        try:
            check_choice("stat", stat, sorted(HEAD_STATS))
        except ValueError as err:
            raise ArgumentError(f"{err}, or a function of the pattern") from None
    if stat == "induction" and (period is None or period < 1):
        raise ArgumentError("stat='induction' needs period=, the length of the repeated block of tokens")
    rows = []
    for layer in layers:
        pattern = attention_pattern(cache, layer).detach().float().cpu()  # [batch, n_heads, q_pos, k_pos]
        mask = None if attention_mask is None else checked_mask(attention_mask, pattern)
        if batch_index is not None:
            prompt = check_index("batch_index", batch_index, pattern.shape[0], "prompts in the batch")
            pattern = pattern[prompt : prompt + 1]
            mask = None if mask is None else mask[prompt : prompt + 1]
        rows.append(_layer_statistic(pattern, stat, period, mask))
    return torch.stack(rows)


def _layer_statistic(
    pattern: torch.Tensor, stat: str | Callable, period: int | None, mask: torch.Tensor | None
) -> torch.Tensor:
    """[n_heads] for pattern [batch, n_heads, pos, pos]."""
    batch, n_heads, q_pos, k_pos = pattern.shape
    if callable(stat):
        value = torch.as_tensor(stat(pattern), dtype=torch.float32)
        if value.shape == (batch, n_heads):
            value = value.mean(dim=0)
        if value.shape != (n_heads,):
            raise ArgumentError(
                f"the stat function returned shape {tuple(value.shape)}; return [n_heads={n_heads}] or "
                f"[batch={batch}, n_heads={n_heads}]"
            )
        return value
    if q_pos != k_pos:
        raise ArgumentError(
            f"head statistics need the pattern of a whole prompt (q_pos == k_pos), got q_pos {q_pos}, k_pos {k_pos}"
        )
    real = torch.ones(batch, q_pos, dtype=torch.bool) if mask is None else mask
    first = real.long().argmax(dim=-1)  # [batch] first real position, where BOS sits
    position = torch.arange(q_pos)
    valid = real & (position[None] > first[:, None])  # [batch, q_pos]
    if stat == "bos":
        key = first[:, None].expand(batch, q_pos)
    elif stat == "prev":
        key = (position - 1).clamp(min=0)[None].expand(batch, q_pos)
    elif stat == "self":
        key = position[None].expand(batch, q_pos)
    elif stat == "induction":
        # BOS at `first`, the block at first+1 .. first+period, its copy from first+period+1 on.
        valid = valid & (position[None] >= first[:, None] + period + 1)
        key = (position - period + 1).clamp(min=0)[None].expand(batch, q_pos)
    if not bool(valid.any()):
        need = "longer than BOS plus two copies of the block" if stat == "induction" else "at least 2 tokens long"
        raise ArgumentError(f"no query to average stat {stat!r} over; the prompt must be {need}")
    if stat == "entropy":
        per_query = -torch.special.xlogy(pattern, pattern).sum(dim=-1)  # [batch, n_heads, q_pos]
    else:
        index = key[:, None, :, None].expand(batch, n_heads, q_pos, 1)
        per_query = pattern.gather(-1, index)[..., 0]  # [batch, n_heads, q_pos]
    weights = valid[:, None, :].float()
    return (per_query * weights).sum(dim=(0, 2)) / weights.sum(dim=(0, 2))


@renamed_keywords(prompt="batch_index")
def top_heads(
    cache_or_output: Any,
    stat: str | Callable[[torch.Tensor], torch.Tensor] = "bos",
    k: int = 10,
    *,
    largest: bool = True,
    **kwargs: Any,
) -> pd.DataFrame:
    """The `k` heads with the largest (or smallest) `head_statistics`, as a table (layer, head, value)."""
    import pandas as pd

    values = head_statistics(cache_or_output, stat, **kwargs)
    layers = attention_layers(cache_or_output)
    n_heads = values.shape[1]
    order = values.flatten().argsort(descending=largest, stable=True)[:k]
    rows = [(layers[i // n_heads], i % n_heads, float(values.flatten()[i])) for i in order.tolist()]
    name = stat if isinstance(stat, str) else getattr(stat, "__name__", "value")
    return pd.DataFrame(rows, columns=["layer", "head", name])


@renamed_keywords(prompt="batch_index")
def attention_summary(
    cache_or_output: Any,
    stat: str | Callable[[torch.Tensor], torch.Tensor] = "bos",
    *,
    period: int | None = None,
    batch_index: int | None = None,
    attention_mask: torch.Tensor | None = None,
    annotate: bool | None = None,
    cmap: str = "viridis",
) -> Figure:
    """A layer × head heatmap of one statistic per head (see `head_statistics`), to find heads worth a look.

    Args:
        cache_or_output: a cache (or the pair `run_with_cache` returns) holding `hook_pattern` of the layers.
        stat, period, batch_index, attention_mask: as in `head_statistics` (`batch_index` formerly `prompt=`).
        annotate: write each value in its cell (default: when there are at most 400 cells).
        cmap: matplotlib colour map.

    Returns:
        The matplotlib Figure; its image is [n_layers, n_heads].
    """
    values = head_statistics(
        cache_or_output, stat, period=period, batch_index=batch_index, attention_mask=attention_mask
    )
    layers = attention_layers(cache_or_output)
    n_layers, n_heads = values.shape

    from matplotlib.figure import Figure

    if callable(stat):
        label = getattr(stat, "__name__", "statistic")
        bounds = {}
    else:
        label = HEAD_STATS[stat] + (f" (period {period})" if stat == "induction" else "")
        bounds = {} if stat == "entropy" else {"vmin": 0.0, "vmax": 1.0}
    width = min(14.0, 2.5 + 0.45 * n_heads)
    height = min(14.0, 1.5 + 0.32 * n_layers)
    fig = Figure(figsize=(max(width, 4.5), max(height, 3.0)), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(values.numpy(), cmap=cmap, aspect="auto", interpolation="nearest", **bounds)
    where, _ = position_tick_labels(list(range(n_layers)), None, MAX_LABELS)
    ax.set_yticks(where, [str(layers[i]) for i in where], fontsize=8)
    where, _ = position_tick_labels(list(range(n_heads)), None, MAX_LABELS)
    ax.set_xticks(where, [str(i) for i in where], fontsize=8)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(label)
    if annotate is None:
        annotate = n_layers * n_heads <= 400
    if annotate:
        low, high = image.get_clim()
        for layer_row in range(n_layers):
            for h in range(n_heads):
                value = float(values[layer_row, h])
                dark = (value - low) / max(high - low, 1e-12) < 0.5  # light text on the dark end of viridis
                ax.text(
                    h,
                    layer_row,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if dark else "black",
                )
    fig.colorbar(image, ax=ax, label=stat if isinstance(stat, str) else label)
    return fig
