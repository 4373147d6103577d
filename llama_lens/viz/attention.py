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
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ArgumentError
from ..validate import check_attention_mask, check_count, check_index, renamed_keywords

# The cache readers and per-head statistics live beside this module; `ll.plot` and the attention explorer
# read them here too.
from .head_stats import HEAD_STATS, attention_summary, head_statistics, top_heads  # noqa: F401
from .patterns import as_cache, attention_layers, attention_pattern, checked_mask  # noqa: F401
from .tokens import MAX_LABELS, position_tick_labels, token_label  # noqa: F401

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


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
        UnknownNameError: the cache does not hold the layer's pattern.
        ArgumentError: a head, prompt, position or size out of range, or `tokens` of the wrong length.
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
            raise ArgumentError(f"query {query} is padding in prompt {prompt}")
        if query not in queries:
            raise ArgumentError(
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
        raise ArgumentError("this prompt is all padding: attention_mask has no real token for it")
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
    where, labels = position_tick_labels(positions, tokens, max_labels)
    size = 8 if len(where) <= 24 else 7
    if axis == "x":
        ax.set_xticks(where, labels, rotation=90, fontsize=size)
    else:
        ax.set_yticks(where, labels, fontsize=size)


# ----------------------------------------------------------------------------------------------- helpers
def _checked_tokens(tokens: Sequence[str], k_pos: int) -> list[str]:
    if isinstance(tokens, (str, torch.Tensor)):
        raise ArgumentError(
            f"tokens= takes the text of each position, e.g. model.to_str_tokens(tokens), not a {type(tokens).__name__}"
        )
    tokens = [str(token) for token in tokens]
    if len(tokens) != k_pos:
        raise ArgumentError(f"tokens= has {len(tokens)} entries but the pattern covers {k_pos} key positions")
    return tokens


def _colour_map(name: str):
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad="white")  # masked (pre-softmax -inf) cells stay blank
