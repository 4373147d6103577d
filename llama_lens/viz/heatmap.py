"""Logit-lens figures: the layer × position heatmap, a target's trajectory across layers, and direct logit
attribution bars.

    lens = ll.logit_lens(model, "The Eiffel Tower is located in the city of", target=" Paris")
    ll.plot.lens_heatmap(lens, metric="prob")       # or lens.plot()
    ll.plot.lens_trajectory(lens)                   # or lens.plot_trajectory()

Figures are built with `matplotlib.figure.Figure`, never pyplot, so none pile up in pyplot's registry and
nothing is drawn behind the caller's back; matplotlib is imported inside the functions. Token text is shown
with its whitespace made visible ("·" for a space, "↵" for a newline, "⇥" for a tab) and clipped with "…".
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..validate import check_choice, renamed_keywords

if TYPE_CHECKING:
    import torch
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from ..lens.attribution import AttributionResult
    from ..lens.logit import LensResult

# metric -> (what the colour bar says, default colour map)
LENS_METRICS = {
    "prob": ("probability of the top token", "Blues"),
    "target_prob": ("probability of {target}", "Blues"),
    "entropy": ("entropy (nats)", "viridis"),
    "kl": ("KL(final ‖ read-out) (nats)", "magma_r"),
    "rank": ("rank of {target} + 1", "Blues_r"),
}
_METRIC_ALIASES = {"target_rank": "rank", "kl_to_final": "kl", "top_prob": "prob"}
MAX_TICK_LABELS = 60  # per axis; past this, every n-th label is shown
_VISIBLE = {" ": "·", "\n": "↵", "\t": "⇥", "\r": "␍"}


# ----------------------------------------------------------------------------------------------- token text
def visible_token(token: str, max_chars: int = 8) -> str:
    """A token's text for a label: whitespace made visible, at most `max_chars` characters ("…" marks a cut),
    no matplotlib mathtext."""
    text = "".join(_VISIBLE.get(c, c if c.isprintable() else f"\\x{ord(c):02x}") for c in token)
    if len(text) > max_chars:
        text = text[: max(1, max_chars - 1)] + "…"
    return text.replace("$", r"\$")  # a pair of "$" would switch matplotlib into math mode


def _thinned(n: int, max_labels: int = MAX_TICK_LABELS) -> list[int]:
    step = max(1, math.ceil(n / max_labels))
    return list(range(0, n, step))


# ----------------------------------------------------------------------------------------------- heatmap
@renamed_keywords(prompt="batch_index", target="target_index")
def lens_heatmap(
    result: LensResult,
    metric: str = "prob",
    *,
    batch_index: int = 0,
    target_index: int = 0,
    annotate: bool = True,
    max_chars: int = 7,
    cmap: str | None = None,
    figsize: tuple[float, float] | None = None,
    max_figsize: tuple[float, float] = (40.0, 30.0),
) -> Figure:
    """The classic logit-lens picture: read-outs (rows, embedding at the bottom) × positions (columns), each
    cell showing the read-out's top token and coloured by `metric`.

    The bottom axis names the input token at each position, the top axis the token that actually comes next
    (what the final layer is trained to predict there). Padding positions of a batch are left out.

    Args:
        result: a LensResult.
        metric: "prob" (the top token's), "target_prob", "entropy", "kl" (to the final distribution) or "rank"
            (the target's, on a log scale).
        batch_index: which prompt of the batch (negative counts from the end); formerly `prompt=`.
        target_index: which of the prompt's targets, for "target_prob" and "rank"; formerly `target=`.
        annotate: write the top token in each cell.
        max_chars: clip token text to this many characters.
        cmap: a matplotlib colour map name (default per metric).
        figsize: (width, height) in inches; by default it grows with the number of positions and read-outs
            up to `max_figsize`, and font sizes follow the cell size either way.

    Returns:
        The Figure; its first axes holds the image (`axes[0].images[0]`, data [n_readouts, n_pos]).
    """
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.figure import Figure

    metric = check_choice("metric", _METRIC_ALIASES.get(metric, metric), list(LENS_METRICS))
    prompt = result.inputs.check_batch_index(batch_index)
    columns = [j for j, p in enumerate(result.positions) if result.attention_mask[prompt, p]]
    if not columns:
        raise ValueError(f"prompt {prompt} has no real tokens at the positions read out")
    positions = [result.positions[j] for j in columns]
    target_text = ""
    if metric in ("target_prob", "rank"):
        if result.target_ids is None:
            raise ValueError(f"metric {metric!r} needs a target: run logit_lens(..., target=' Paris')")
        target = result.inputs.check_target_index(target_index)
        target_text = repr(result.target_strs[prompt][target])
    values = {
        "prob": lambda: result.top_probs[prompt, :, :, 0],
        "target_prob": lambda: result.target_probs[prompt, :, :, target],
        "entropy": lambda: result.entropy[prompt],
        "kl": lambda: result.kl_to_final[prompt],
        "rank": lambda: _ranks(result.target_ranks[prompt, :, :, target]),
    }[metric]()[:, columns]  # [n_readouts, n_shown]
    n_rows, n_cols = values.shape
    label, default_cmap = LENS_METRICS[metric]
    if metric in ("prob", "target_prob"):
        norm = Normalize(0.0, 1.0)
    elif metric == "rank":
        values = values + 1  # log scale: rank 0 is drawn as 1
        norm = LogNorm(1.0, max(10.0, float(values.max())))
        label += ", log scale"
    else:
        norm = Normalize(0.0, max(float(values.max()), 1e-6))

    str_tokens = result.str_tokens[prompt]
    shown_cols = _thinned(n_cols)
    input_labels = [visible_token(str_tokens[positions[c]], max_chars + 3) for c in shown_cols]
    if len(shown_cols) < n_cols:  # thinned: the position too, so the unlabelled columns can be counted
        input_labels = [f"{positions[c]} {label}" for c, label in zip(shown_cols, input_labels)]
    next_tokens = [str_tokens[p + 1] if p + 1 < len(str_tokens) else "" for p in positions]
    next_labels = [visible_token(next_tokens[c], max_chars + 3) for c in shown_cols]
    if figsize is None:
        # The cells, plus the rotated token labels below and above them (about 0.6 em per character at the
        # largest tick font, 9 pt), the title and the two axis labels: with a few read-outs only, a height
        # from the rows alone left the cells no room.
        labels_height = 0.6 * 9 / 72 * (max(map(len, input_labels)) + max(map(len, next_labels), default=0))
        width, height = 2.5 + 0.62 * n_cols, 1.2 + labels_height + max(0.27 * n_rows, 1.0)
        figsize = (min(width, max_figsize[0]), min(height, max_figsize[1]))
    fig = Figure(figsize=figsize, layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(values.numpy(), aspect="auto", origin="lower", cmap=cmap or default_cmap, norm=norm,
                      interpolation="nearest")  # fmt: skip
    # A colour bar 4% of the width, as long as the cells are high: matplotlib's default length (20 times its
    # width) is a stub beside a narrow, tall heatmap.
    fig.colorbar(image, ax=ax, label=label.format(target=target_text), fraction=0.04, pad=0.01,
                 aspect=max(20.0, 40.0 * figsize[1] / figsize[0]))  # fmt: skip

    # Font size from the cell size: about 80% of the plot area is cells.
    cell_w_pt = 0.8 * figsize[0] * 72 / n_cols
    cell_h_pt = 0.8 * figsize[1] * 72 / n_rows
    cell_font = min(9.0, 0.6 * cell_h_pt, cell_w_pt / (0.62 * max_chars))
    tick_font = max(5.0, min(9.0, cell_w_pt / 1.2, cell_h_pt * 0.8))
    if annotate and cell_font >= 3.5:
        _annotate_cells(ax, result, prompt, columns, values, norm, image.cmap, cell_font, max_chars)

    ax.set_xticks(shown_cols, input_labels, rotation=90, fontsize=tick_font)
    shown_rows = _thinned(n_rows)
    ax.set_yticks(shown_rows, [result.labels[r] for r in shown_rows], fontsize=tick_font)
    ax.set_xlabel("input token")
    ax.set_ylabel("read-out (layer)")
    # The true next token above each column: what a perfect read-out would put first.
    top = ax.secondary_xaxis("top")
    top.set_xticks(shown_cols, next_labels, rotation=90, fontsize=tick_font)
    top.set_xlabel("next token", fontsize=tick_font + 1)
    title = "logit lens: " + label.format(target=target_text)
    ax.set_title(title, fontsize=10)
    return fig


def _annotate_cells(ax: Axes, result, prompt, columns, values, norm, cmap, fontsize, max_chars) -> None:
    colours = cmap(norm(values.numpy()))  # [n_rows, n_cols, 4]
    for r in range(values.shape[0]):
        for c, j in enumerate(columns):
            red, green, blue, _ = colours[r, c]
            # Light text on dark cells (perceived luminance, ITU-R BT.601 weights).
            dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
            ax.text(c, r, visible_token(result.top_strs[prompt][r][j][0], max_chars), ha="center", va="center",
                    fontsize=fontsize, color="white" if dark else "black", clip_on=True)  # fmt: skip


# ----------------------------------------------------------------------------------------------- trajectory
@renamed_keywords(prompt="batch_index")
def lens_trajectory(
    result: LensResult,
    *,
    batch_index: int = 0,
    position: int | None = None,
    metric: str = "both",
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """Each target's probability and rank across read-outs at one position, one line per target.

    Args:
        result: a LensResult computed with a target.
        batch_index: which prompt of the batch (negative counts from the end); formerly `prompt=`.
        position: the token position, among those read out (negative counts from the end; default the last
            read out: the prompt's last token, where the next token is predicted, unless `positions=` left it
            out); not a padding position.
        metric: "prob", "rank" (log scale, top at the top) or "both" (two panels sharing the x axis).
        figsize: (width, height) in inches.

    Returns:
        The Figure, one axes per panel.
    """
    from matplotlib.figure import Figure

    if result.target_ids is None:
        raise ValueError("a trajectory needs a target: run logit_lens(..., target=' Paris')")
    check_choice("metric", metric, ["prob", "rank", "both"])
    prompt = result.inputs.check_batch_index(batch_index)
    column = result.inputs.column_of(position, prompt)
    panels = ["prob", "rank"] if metric == "both" else [metric]
    n = result.n_readouts
    if figsize is None:
        figsize = (min(3.0 + 0.22 * n, 20.0), 2.6 * len(panels) + 0.8)
    fig = Figure(figsize=figsize, layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    x = list(range(n))
    for ax, panel in zip(axes, panels):
        for t, text in enumerate(result.target_strs[prompt]):
            label = visible_token(text, 16)
            if panel == "prob":
                ax.plot(x, result.target_probs[prompt, :, column, t].tolist(), marker="o", markersize=3, label=label)
            else:
                ranks = (_ranks(result.target_ranks[prompt, :, column, t]) + 1).tolist()
                ax.plot(x, ranks, marker="o", markersize=3, label=label)
        if panel == "prob":
            ax.set_ylim(-0.02, 1.02)
            ax.set_ylabel("probability")
        else:
            ax.set_yscale("log")
            ax.invert_yaxis()  # better ranks higher up, like the probability panel
            ax.set_ylabel("rank + 1 (log)")
        ax.grid(True, alpha=0.3)
    axes[0].legend(title="target", fontsize=8, title_fontsize=8)
    shown = _thinned(n, 40)
    axes[-1].set_xticks(shown, [result.labels[i] for i in shown], rotation=90, fontsize=8)
    axes[-1].set_xlabel("read-out (layer)")
    p = result.positions[column]
    token = visible_token(result.str_tokens[prompt][p], 16)
    axes[0].set_title(f"target across layers at position {p} ({token})", fontsize=10)
    return fig


# ----------------------------------------------------------------------------------------------- attribution
@renamed_keywords(prompt="batch_index", target="target_index")
def logit_attribution(
    result: AttributionResult,
    *,
    batch_index: int = 0,
    position: int | None = None,
    target_index: int = 0,
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """Direct logit attribution at one position: bars for the embedding and each layer's attention and MLP
    output, and (when the result has them) a layer × head heatmap, all in logits of the target.

    Args:
        result: an AttributionResult from `direct_logit_attribution`.
        batch_index: which prompt of the batch (negative counts from the end); formerly `prompt=`.
        position: the token position (must be among those attributed; default the last of them).
        target_index: which of the prompt's targets; formerly `target=`.
        figsize: (width, height) in inches.

    Returns:
        The Figure: axes 0 the bars, axes 1 the head heatmap (if any), plus its colour bar.
    """
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    prompt = result.inputs.check_batch_index(batch_index)
    target = result.inputs.check_target_index(target_index)
    column = result.inputs.column_of(position, prompt)
    values = result.components[prompt, :, column, target]  # [n_components]
    has_heads = result.heads is not None and len(result.head_layers) > 0
    n_layers = len(result.head_layers) if has_heads else sum(k == "attn" for k in result.kinds)
    if figsize is None:
        figsize = (min(4.0 + 0.3 * n_layers, 20.0) * (2 if has_heads else 1) * 0.75, 4.5)
    fig = Figure(figsize=figsize, layout="constrained")
    axes = fig.subplots(1, 2 if has_heads else 1, squeeze=False)[0]

    bars = axes[0]
    layer_list = sorted({layer for layer, k in zip(result.layers, result.kinds) if k != "embed"})
    x_of = {layer: i for i, layer in enumerate(layer_list)}
    width = 0.4
    for kind, offset, colour in (("attn", -width / 2, "tab:blue"), ("mlp", width / 2, "tab:orange")):
        xs = [x_of[layer] + offset for layer, k in zip(result.layers, result.kinds) if k == kind]
        ys = [float(v) for v, k in zip(values, result.kinds) if k == kind]
        bars.bar(xs, ys, width=width, color=colour, label=kind)
    if "embed" in result.kinds:
        bars.bar([-1], [float(values[result.kinds.index("embed")])], width=width, color="tab:gray", label="embed")
    bars.axhline(0, color="black", linewidth=0.6)
    ticks = [-1] + list(range(len(layer_list))) if "embed" in result.kinds else list(range(len(layer_list)))
    tick_labels = (["embed"] if "embed" in result.kinds else []) + [str(layer) for layer in layer_list]
    shown = _thinned(len(ticks), 40)
    bars.set_xticks([ticks[i] for i in shown], [tick_labels[i] for i in shown], fontsize=8)
    bars.set_xlabel("layer")
    bars.set_ylabel("direct contribution to the logit")
    bars.legend(fontsize=8)
    p = result.positions[column]
    target_text = visible_token(result.target_strs[prompt][target], 16)
    total = float(result.final_logits[prompt, column, target])
    bars.set_title(
        f"logit of {target_text} at position {p} ({visible_token(result.str_tokens[prompt][p], 16)}): {total:.2f}",
        fontsize=10,
    )

    if has_heads:
        heads = result.heads[prompt, :, :, column, target]  # [n_layers, n_heads]
        limit = max(float(heads.abs().max()), 1e-6)
        image = axes[1].imshow(heads.numpy(), aspect="auto", origin="lower", cmap="RdBu",
                               norm=Normalize(-limit, limit), interpolation="nearest")  # fmt: skip
        rows = _thinned(heads.shape[0], 40)
        axes[1].set_yticks(rows, [str(result.head_layers[r]) for r in rows], fontsize=8)
        axes[1].set_xticks(range(heads.shape[1]), [str(h) for h in range(heads.shape[1])], fontsize=8)
        axes[1].set_xlabel("head")
        axes[1].set_ylabel("layer")
        axes[1].set_title("per head", fontsize=10)
        fig.colorbar(image, ax=axes[1], label="direct contribution to the logit")
    return fig


def _ranks(ranks: torch.Tensor) -> torch.Tensor:
    """Ranks as floats, NaN (nothing drawn) where there is none (-1: the read-out's logits are not finite)."""
    return ranks.float().masked_fill(ranks < 0, float("nan"))
