"""Attention figures: one head's pattern, every head of a layer, and one statistic per head over the model.

Everything here reads `blocks.{i}.attn.hook_pattern` (or `hook_attn_scores`), [batch, n_heads, q_pos, k_pos],
from a cache, so keep those when caching:

    logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
    ll.plot.attention(cache, layer=3, tokens=model.to_str_tokens(tokens))
    ll.plot.attention_summary(cache, stat="prev")

Figures are built with `matplotlib.figure.Figure`, never pyplot, so nothing is drawn behind the caller's back
and figures do not pile up in pyplot's registry. matplotlib is imported inside the functions.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..validate import check_attention_mask, check_choice, check_count, check_index, renamed_keywords
from .heatmap import visible_token

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MAX_LABELS = 40  # tick labels per axis; more than this and 8-point labels overlap on a 10-inch axis
PATTERN_HOOK = "attn.hook_pattern"
SCORES_HOOK = "attn.hook_attn_scores"

# stat name -> what the summary's colour bar says
HEAD_STATS = {
    "bos": "mean attention to BOS",
    "prev": "mean attention to the previous token",
    "self": "mean attention to the current token",
    "entropy": "mean entropy of the pattern (nats)",
    "induction": "induction score",
}

_HOOK_KEY = re.compile(r"^blocks\.(\d+)\.(attn\.hook_pattern|attn\.hook_attn_scores)$")


# ----------------------------------------------------------------------------------------------- reading caches
def as_cache(cache_or_output: Any) -> Any:
    """The activations inside `cache_or_output`: an ActivationCache, a dict of tensors, or the (logits, cache)
    pair that `run_with_cache` returns."""
    if isinstance(cache_or_output, tuple) and len(cache_or_output) == 2:
        cache_or_output = cache_or_output[1]
    if not (hasattr(cache_or_output, "keys") and hasattr(cache_or_output, "__getitem__")):
        raise ValueError(
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
        KeyError: the cache does not hold it; the message says which layers it holds or how to cache them.
    """
    cache = as_cache(cache_or_output)
    hook = SCORES_HOOK if scores else PATTERN_HOOK
    name = f"blocks.{layer}.{hook}"
    if name in cache:
        return cache[name]
    held = attention_layers(cache, scores=scores)
    if held:
        raise KeyError(f"no {name!r} in this cache: it holds {hook} for layers {held} only")
    raise KeyError(
        f"no {name!r} in this cache; keep it with "
        f"model.run_with_cache(tokens, names_filter=lambda name: name.endswith({hook.split('.')[-1]!r}))"
    )


# ----------------------------------------------------------------------------------------------- labels
def token_label(token: str, width: int = 14) -> str:
    """A tick label for a token, as the lens plots write it: whitespace made visible ("·" for a space, "↵"
    for a newline; a token of spaces alone would be a blank label), at most `width` characters, no mathtext."""
    return visible_token(token, width)


def _tick_labels(positions: list[int], tokens: Sequence[str] | None, max_labels: int) -> tuple[list[int], list[str]]:
    """Which of the shown rows/columns get a label, and the labels: every one up to `max_labels`, else every
    step-th one, with the position added so a thinned or non-contiguous axis can still be read."""
    step = max(1, math.ceil(len(positions) / max_labels))
    contiguous = positions == list(range(positions[0], positions[0] + len(positions))) if positions else True
    with_position = step > 1 or not contiguous or tokens is None
    where = list(range(0, len(positions), step))
    labels = []
    for index in where:
        position = positions[index]
        if tokens is None:
            labels.append(str(position))
        elif with_position:
            labels.append(f"{position} {token_label(tokens[position])}")
        else:
            labels.append(token_label(tokens[position]))
    return where, labels


# ----------------------------------------------------------------------------------------------- attention()
@renamed_keywords(prompt="batch_index")
def attention(
    cache_or_output: Any,
    layer: int,
    head: int | None = None,
    *,
    tokens: Sequence[str] | None = None,
    batch_index: int = 0,
    attention_mask: torch.Tensor | None = None,
    scores: bool = False,
    max_positions: int | None = None,
    top_k: int | None = None,
    query: int | None = None,
    key: int | None = None,
    max_labels: int = MAX_LABELS,
    cmap: str | None = None,
    gamma: float = 0.5,
) -> Figure:
    """One head's attention pattern as a heatmap (queries down, keys across), or every head of the layer.

    Long prompts stay legible and fast: the matrix is drawn as one image (no text per cell), tick labels are
    thinned to about `max_labels` per axis, and `max_positions` / `top_k` crop what is shown.

    Args:
        cache_or_output: an ActivationCache, a dict of activations, or the (logits, cache) pair of
            `model.run_with_cache`, holding `blocks.{layer}.attn.hook_pattern` (`hook_attn_scores` with `scores`).
        layer: the layer (absolute index).
        head: the head; None draws a grid of all heads of the layer.
        tokens: the text of each position (`model.to_str_tokens(tokens)`) for the axis labels; positions
            are numbered when omitted.
        batch_index: which prompt of the batch to draw (negative counts from the end); formerly `prompt=`.
        attention_mask: [batch, pos] 1 for real tokens and 0 for padding (as `model.prepare_tokens` returns it
            for a batch of texts): the prompt's padding rows and columns are left out.
        scores: draw the pre-softmax scores instead of the pattern; masked cells are left blank.
        max_positions: draw only the last `max_positions` queries and, unless `top_k` picks the keys, the
            last `max_positions` keys (attention to earlier keys, such as BOS, is then not shown).
        top_k: draw only the `top_k` keys that the drawn queries attend to most (summed over the drawn
            queries and heads), in position order.
        query: highlight this query position (a row) with a red outline.
        key: with `query`, outline the (query, key) cell.
        max_labels: tick labels per axis before thinning.
        cmap: matplotlib colour map (default "Blues" for patterns, "viridis" for scores).
        gamma: colour scale exponent for patterns: the default 0.5 (square root) keeps the small, spread-out
            weights of long prompts visible next to a weight of 1; 1.0 is linear. Scores are always linear.

    Returns:
        The matplotlib Figure. Its axes hold one image each, [n_queries_shown, n_keys_shown].

    Raises:
        KeyError: the cache does not hold the layer's pattern.
        ValueError: a head, prompt, position or size out of range, or `tokens` of the wrong length.
    """
    values = attention_pattern(cache_or_output, layer, scores=scores)  # [batch, n_heads, q_pos, k_pos]
    batch, n_heads, q_pos, k_pos = values.shape
    prompt = check_index("batch_index", batch_index, batch, "prompts in the batch")
    if head is not None:
        head = check_index("head", head, n_heads, "heads")
    if tokens is not None:
        tokens = _checked_tokens(tokens, k_pos)
    if max_positions is not None:
        max_positions = check_count("max_positions", max_positions, 1)
    if top_k is not None:
        top_k = check_count("top_k", top_k, 1)

    real = None
    if attention_mask is not None:
        real = check_attention_mask(attention_mask, batch, k_pos)[prompt]  # [k_pos]
    values = values[prompt].detach().float().cpu()  # [n_heads, q_pos, k_pos]
    heads = None if head is None else [head]
    queries, keys = _shown_positions(values, scores, max_positions, top_k, heads, real)
    # With a KV cache, query i sits at key position i + past.
    past = k_pos - q_pos
    shown = values[:, queries][:, :, keys]  # [n_heads, n_queries, n_keys]
    row = col = None
    if query is not None:
        query = check_index("query", query, q_pos, "query positions")
        if real is not None and not real[query + past]:
            raise ValueError(f"query {query} is padding in prompt {prompt}")
        if query not in queries:
            raise ValueError(
                f"query {query} is not drawn (queries {queries[0]}..{queries[-1]} are); widen max_positions"
            )
        row = queries.index(query)
        if key is not None:
            key = check_index("key", key, k_pos, "key positions")
            col = keys.index(key) if key in keys else None

    import numpy as np
    from matplotlib.colors import Normalize, PowerNorm
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    kind = "scores (pre-softmax)" if scores else "pattern"
    data = torch.where(torch.isfinite(shown), shown, torch.nan).numpy()  # NaN draws as the colour map's "bad"
    cmap_obj = _colour_map(cmap or ("viridis" if scores else "Blues"))
    finite = data[np.isfinite(data)]
    vmin = float(finite.min()) if scores and finite.size else 0.0
    vmax = float(finite.max()) if finite.size else 1.0
    if vmax <= vmin:
        vmax = vmin + 1e-6
    norm = Normalize(vmin, vmax) if scores or gamma == 1.0 else PowerNorm(gamma, vmin, vmax)
    key_tokens = tokens
    query_tokens = None if tokens is None else [tokens[i + past] for i in range(q_pos)]
    prompt_note = f", prompt {prompt}" if batch > 1 else ""

    heads = list(range(n_heads)) if head is None else [head]
    if head is not None:
        width = min(11.0, 2.5 + 0.2 * len(keys))
        height = min(10.0, 2.0 + 0.2 * len(queries))
        fig = Figure(figsize=(max(width, 4.5), max(height, 3.5)), layout="constrained")
        axes = [fig.add_subplot()]
        ncols = 1
        label_budget = max_labels
    else:
        ncols = math.ceil(math.sqrt(n_heads))
        nrows = math.ceil(n_heads / ncols)
        panel = 2.6 if ncols <= 4 else 2.2
        fig = Figure(figsize=(panel * ncols + 1.2, panel * nrows + 0.6), layout="constrained")
        grid = fig.subplots(nrows, ncols, squeeze=False)
        axes = [grid[r][c] for r in range(nrows) for c in range(ncols)]
        for spare in axes[n_heads:]:
            spare.set_visible(False)
        axes = axes[:n_heads]
        label_budget = max(4, min(max_labels, 12))

    image = None
    for index, (ax, h) in enumerate(zip(axes, heads)):
        image = ax.imshow(data[h], cmap=cmap_obj, norm=norm, aspect="auto")
        single = head is not None
        outer_left = index % ncols == 0
        outer_bottom = single or index >= n_heads - ncols
        _label_axis(ax, "y", queries, query_tokens if outer_left else None, label_budget, show=outer_left)
        _label_axis(ax, "x", keys, key_tokens if outer_bottom else None, label_budget, show=outer_bottom)
        if row is not None:
            ax.add_patch(Rectangle((-0.5, row - 0.5), len(keys), 1, fill=False, edgecolor="red", linewidth=1.5))
            if col is not None:
                ax.add_patch(Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="orange", linewidth=2))
        if single:
            ax.set_title(f"layer {layer}, head {h}: attention {kind}{prompt_note}")
            ax.set_xlabel("key position (attended to)")
            ax.set_ylabel("query position (attending)")
        else:
            ax.set_title(f"head {h}", fontsize=9)
    if head is None:
        fig.suptitle(f"layer {layer}: attention {kind} of all heads{prompt_note}")
        fig.supxlabel("key position (attended to)", fontsize=9)
        fig.supylabel("query position (attending)", fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.8, label="score" if scores else "attention weight")
    return fig


def _shown_positions(
    values: torch.Tensor,
    scores: bool,
    max_positions: int | None,
    top_k: int | None,
    heads: list[int] | None,
    real: torch.Tensor | None = None,
) -> tuple[list[int], list[int]]:
    """Query and key positions to draw for values [n_heads, q_pos, k_pos]; `real` [k_pos] (bool) leaves out
    padding."""
    _, q_pos, k_pos = values.shape
    past = k_pos - q_pos  # query i sits at key position i + past
    queries = [q for q in range(q_pos) if real is None or real[q + past]]
    keys = [k for k in range(k_pos) if real is None or real[k]]
    if not queries:
        raise ValueError("this prompt is all padding: attention_mask has no real token for it")
    if max_positions is not None:
        queries = queries[-max_positions:]
        if top_k is None:  # else top_k picks among all the keys
            keys = keys[-max_positions:]
    if top_k is not None:
        picked = values[heads] if heads is not None else values
        picked = picked[:, queries]
        # Scores rank keys by the pattern they produce (softmax of the masked scores is the pattern itself).
        weights = picked.softmax(dim=-1) if scores else picked
        mass = weights.nan_to_num(0.0).sum(dim=(0, 1))[keys]  # [n_keys]
        keys = sorted(keys[i] for i in mass.topk(min(top_k, len(keys))).indices.tolist())
    return queries, keys


def _label_axis(ax: Axes, axis: str, positions: list[int], tokens, max_labels: int, *, show: bool) -> None:
    if not show:
        getattr(ax, f"set_{axis}ticks")([])
        return
    where, labels = _tick_labels(positions, tokens, max_labels)
    size = 8 if len(where) <= 24 else 7
    if axis == "x":
        ax.set_xticks(where, labels, rotation=90, fontsize=size)
    else:
        ax.set_yticks(where, labels, fontsize=size)


# ----------------------------------------------------------------------------------------------- per-head stats
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
        KeyError: the cache holds no attention pattern.
        ValueError: an unknown stat, a missing or too long `period`, a mask of the wrong shape.
    """
    cache = as_cache(cache_or_output)
    layers = attention_layers(cache)
    if not layers:
        attention_pattern(cache, 0)  # raises the KeyError that says how to cache patterns
    if not callable(stat):
        try:
            check_choice("stat", stat, sorted(HEAD_STATS))
        except ValueError as err:
            raise ValueError(f"{err}, or a function of the pattern") from None
    if stat == "induction" and (period is None or period < 1):
        raise ValueError("stat='induction' needs period=, the length of the repeated block of tokens")
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
            raise ValueError(
                f"the stat function returned shape {tuple(value.shape)}; return [n_heads={n_heads}] or "
                f"[batch={batch}, n_heads={n_heads}]"
            )
        return value
    if q_pos != k_pos:
        raise ValueError(
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
        raise ValueError(f"no query to average stat {stat!r} over; the prompt must be {need}")
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
    where, _ = _tick_labels(list(range(n_layers)), None, MAX_LABELS)
    ax.set_yticks(where, [str(layers[i]) for i in where], fontsize=8)
    where, _ = _tick_labels(list(range(n_heads)), None, MAX_LABELS)
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


# ----------------------------------------------------------------------------------------------- helpers
def _checked_tokens(tokens: Sequence[str], k_pos: int) -> list[str]:
    if isinstance(tokens, (str, torch.Tensor)):
        raise ValueError(
            f"tokens= takes the text of each position, e.g. model.to_str_tokens(tokens), not a {type(tokens).__name__}"
        )
    tokens = [str(token) for token in tokens]
    if len(tokens) != k_pos:
        raise ValueError(f"tokens= has {len(tokens)} entries but the pattern covers {k_pos} key positions")
    return tokens


def checked_mask(attention_mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """`attention_mask` [batch, pos] checked against a pattern [batch, n_heads, q_pos, k_pos], as a CPU bool
    tensor (`validate.check_attention_mask`)."""
    batch, _, _, k_pos = pattern.shape
    return check_attention_mask(attention_mask, batch, k_pos)


# The name widgets.py reads; it moves to `checked_mask` with the widgets' next change.
_checked_mask = checked_mask


def _colour_map(name: str):
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad="white")  # masked (pre-softmax -inf) cells stay blank
