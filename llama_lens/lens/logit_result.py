"""`LensResult`: what a logit or tuned lens read out, as tensors, a tidy table (`to_frame`) and figures.

The figures are chosen here (which prompt, which metric, which cells and labels) and drawn by `viz`, which
knows no result type: `lens_heatmap` builds a `viz.heatmap.Grid`, `lens_trajectory` a `viz.lines.Trajectory`.

    lens = ll.logit_lens(model, "The Eiffel Tower is located in the city of", target=" Paris")
    ll.plot.lens_heatmap(lens, metric="prob")       # or lens.plot()
    ll.plot.lens_trajectory(lens)                   # or lens.plot_trajectory()
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ArgumentError
from ..validate import check_choice, renamed_keywords
from ..viz.heatmap import Grid, draw_grid
from ..viz.lines import Trajectory, draw_trajectory
from ..viz.tokens import visible_token
from .inputs import InputsView, LensInputs, index_grid, make_frame, repeat_rows

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

TABLE_KINDS = ("summary", "top_k")

# metric -> (what the colour bar says, default colour map)
LENS_METRICS = {
    "prob": ("probability of the top token", "Blues"),
    "target_prob": ("probability of {target}", "Blues"),
    "entropy": ("entropy (nats)", "viridis"),
    "kl": ("KL(final ‖ read-out) (nats)", "magma_r"),
    "rank": ("rank of {target} + 1", "Blues_r"),
}
_METRIC_ALIASES = {"target_rank": "rank", "kl_to_final": "kl", "top_prob": "prob"}


@dataclass(repr=False)
class LensResult(InputsView):
    """What every read-out predicts, at every asked-for position of every prompt.

    Shapes use `n_readouts` (rows of the lens, in forward order: "embed", then per layer "{i}_pre",
    "{i}_mid", "{i}_post" as asked), `n_pos` (the asked-for positions) and `n_targets`.

    Attributes:
        inputs: the prompts and what was asked of them (`LensInputs`); its fields read as the result's own:
            `tokens` [batch, pos], `attention_mask` [batch, pos], `str_tokens`, `positions` [n_pos],
            `target_ids` [batch, n_targets] or None, `target_strs`.
        labels: [n_readouts] e.g. "embed", "3_mid", "3_post".
        layers: [n_readouts] the layer each read-out belongs to ("embed" is layer 0's input).
        readouts: [n_readouts] "embed", "resid_pre", "resid_mid" or "resid_post".
        top_ids, top_probs, top_logits: [batch, n_readouts, n_pos, top_k], most likely first.
        top_strs: the text of `top_ids`, nested `[batch][n_readouts][n_pos][top_k]`.
        entropy: [batch, n_readouts, n_pos] entropy of the read-out's distribution, in nats.
        kl_to_final: [batch, n_readouts, n_pos] KL(final || read-out) in nats: sum_v p_final(v) *
            (log p_final(v) - log p_readout(v)). The final distribution is the model's own output, i.e. the
            read-out of the last loaded layer's resid_post (for a partial model, that of its last layer).
        target_probs, target_logits: [batch, n_readouts, n_pos, n_targets] or None.
        target_ranks: [batch, n_readouts, n_pos, n_targets] tokens with a strictly higher logit (0 = top); -1
            where the read-out's logits are not finite (NaN or inf, so there is no rank), NaN in `to_frame()`.
        logits: [batch, n_readouts, n_pos, d_vocab] when `keep_logits=True`, else None.
        lens_kind: which lens made it: "logit" (the residual streams read out as they are) or "tuned" (each
            first moved by its tuned-lens translator, see `ll.TunedLens`).
    """

    inputs: LensInputs
    labels: list[str]
    layers: list[int]
    readouts: list[str]
    top_ids: torch.Tensor
    top_probs: torch.Tensor
    top_logits: torch.Tensor
    top_strs: list[list[list[list[str]]]]
    entropy: torch.Tensor
    kl_to_final: torch.Tensor
    target_probs: torch.Tensor | None = None
    target_logits: torch.Tensor | None = None
    target_ranks: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    lens_kind: str = "logit"

    @property
    def n_readouts(self) -> int:
        return len(self.labels)

    @property
    def lens(self) -> str:
        """Deprecated: `lens_kind` ("logit" or "tuned"); `lens` names the TunedLens object (`logit_lens(lens=)`)."""
        warnings.warn(
            "LensResult.lens is deprecated and will be removed in the next release; use LensResult.lens_kind",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.lens_kind

    def __repr__(self) -> str:
        targets = "" if self.target_strs is None else f", targets={self.target_strs}"
        lens = "" if self.lens_kind == "logit" else f", lens_kind={self.lens_kind!r}"
        return (
            f"LensResult(batch={self.batch}, read-outs={self.labels[0]}..{self.labels[-1]} ({self.n_readouts}), "
            f"positions={len(self.positions)}, top_k={self.top_ids.shape[-1]}{targets}{lens})"
        )

    def to_frame(self, kind: str = "summary", *, drop_padding: bool = True) -> pd.DataFrame:
        """A tidy pandas DataFrame.

        Args:
            kind: "summary": one row per prompt × read-out × position (× target when there are several),
                columns batch_index, label, layer, readout, position, token, top_token, top_id,
                top_prob, entropy, kl_to_final, and with targets: target, target_id, target_prob, target_logit,
                target_rank (float with NaN where a read-out's logits are not finite, as pandas does for missing
                integers; else integers). "top_k": one row per prompt × read-out × position × k, columns batch_index,
                label, layer, readout, position, token, k, top_token, top_id, top_prob, top_logit.
            drop_padding: leave out rows at padding positions of a left-padded batch.

        Returns:
            The DataFrame; `label` is an ordered categorical (forward order), so sorting and pivoting keep the
            read-outs in order.
        """
        import pandas as pd

        check_choice("kind", kind, TABLE_KINDS, "table kind")
        batch, n_readouts, n_pos, top_k = self.top_ids.shape
        b, r, p = index_grid(batch, n_readouts, n_pos)
        columns = {
            "batch_index": b,
            "label": pd.Categorical([self.labels[i] for i in r.tolist()], categories=self.labels, ordered=True),
            "layer": torch.tensor(self.layers)[r],
            "readout": [self.readouts[i] for i in r.tolist()],
            **self.inputs.position_columns(b, p),
        }
        keep = self.inputs.is_real(b, p) if drop_padding else None

        if kind == "top_k":
            columns = {name: repeat_rows(values, top_k) for name, values in columns.items()}
            columns["k"] = torch.arange(top_k).repeat(len(b))
            columns["top_token"] = [s for row in _flatten3(self.top_strs) for s in row]
            columns["top_id"] = self.top_ids.reshape(-1)
            columns["top_prob"] = self.top_probs.reshape(-1)
            columns["top_logit"] = self.top_logits.reshape(-1)
            return make_frame(columns, None if keep is None else repeat_rows(keep, top_k))

        columns["top_token"] = [row[0] for row in _flatten3(self.top_strs)]
        columns["top_id"] = self.top_ids[..., 0].reshape(-1)
        columns["top_prob"] = self.top_probs[..., 0].reshape(-1)
        columns["entropy"] = self.entropy.reshape(-1)
        columns["kl_to_final"] = self.kl_to_final.reshape(-1)
        if self.target_ids is None:
            return make_frame(columns, keep)
        n_targets = self.n_targets
        # One row per target: repeat every row n_targets times, targets varying fastest.
        columns = {name: repeat_rows(values, n_targets) for name, values in columns.items()}
        columns |= self.inputs.target_columns(repeat_rows(b, n_targets), torch.arange(n_targets).repeat(len(b)))
        columns["target_prob"] = self.target_probs.reshape(-1)
        columns["target_logit"] = self.target_logits.reshape(-1)
        ranks = self.target_ranks.reshape(-1)
        if bool((ranks < 0).any()):
            ranks = ranks.double().masked_fill(ranks < 0, float("nan"))
        columns["target_rank"] = ranks
        return make_frame(columns, None if keep is None else repeat_rows(keep, n_targets))

    # Drawing is viz's job: the result picks what to show (a Grid, a Trajectory) and hands it down.
    def plot(self, metric: str = "prob", **kwargs: Any) -> Figure:
        """The layer × position heatmap with the top token in each cell; see `lens_heatmap` (`ll.plot.lens_heatmap`).

        Args:
            metric: colour by "prob" (of the top token), "entropy", "kl", "target_prob" or "rank" (the target's).
            kwargs: `batch_index=`, `target_index=` and the rest of `lens_heatmap`'s options.
        """
        return lens_heatmap(self, metric, **kwargs)

    def plot_trajectory(self, **kwargs: Any) -> Figure:
        """The target's probability and rank across read-outs; see `lens_trajectory` (`ll.plot.lens_trajectory`)."""
        return lens_trajectory(self, **kwargs)


def _flatten3(nested: list) -> list:
    return [row for prompt in nested for readout in prompt for row in readout]


# ----------------------------------------------------------------------------------------------- figures
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

    Raises:
        ArgumentError: an unknown metric, a batch or target index out of range, a target metric without a
            target, or a prompt with no real token at the positions read out.
    """
    grid = heatmap_grid(result, metric, batch_index=batch_index, target_index=target_index, cmap=cmap)
    return draw_grid(grid, annotate=annotate, max_chars=max_chars, figsize=figsize, max_figsize=max_figsize)


def heatmap_grid(
    result: LensResult, metric: str = "prob", *, batch_index: int = 0, target_index: int = 0, cmap: str | None = None
) -> Grid:
    """What `lens_heatmap` draws for one prompt: `metric` per read-out × real position, top tokens in the cells,
    in the colour map `cmap` (default per metric)."""
    metric = check_choice("metric", _METRIC_ALIASES.get(metric, metric), list(LENS_METRICS))
    prompt = result.inputs.check_batch_index(batch_index)
    columns = [j for j, p in enumerate(result.positions) if result.attention_mask[prompt, p]]
    if not columns:
        raise ArgumentError(f"prompt {prompt} has no real tokens at the positions read out")
    positions = [result.positions[j] for j in columns]
    target_text = ""
    if metric in ("target_prob", "rank"):
        if result.target_ids is None:
            raise ArgumentError(f"metric {metric!r} needs a target: run logit_lens(..., target=' Paris')")
        target = result.inputs.check_target_index(target_index)
        target_text = repr(result.target_strs[prompt][target])
    values = {
        "prob": lambda: result.top_probs[prompt, :, :, 0],
        "target_prob": lambda: result.target_probs[prompt, :, :, target],
        "entropy": lambda: result.entropy[prompt],
        "kl": lambda: result.kl_to_final[prompt],
        "rank": lambda: _ranks(result.target_ranks[prompt, :, :, target]),
    }[metric]()[:, columns]  # [n_readouts, n_shown]
    label, default_cmap = LENS_METRICS[metric]
    scale, vmin = "linear", 0.0
    if metric in ("prob", "target_prob"):
        vmax = 1.0
    elif metric == "rank":
        values = values + 1  # log scale: rank 0 is drawn as 1
        scale, vmin, vmax = "log", 1.0, max(10.0, float(values.max()))
        label += ", log scale"
    else:
        vmax = max(float(values.max()), 1e-6)
    str_tokens = result.str_tokens[prompt]
    return Grid(
        values=values,
        row_labels=result.labels,
        col_labels=[str_tokens[p] for p in positions],
        col_numbers=positions,
        # The true next token above each column: what a perfect read-out would put first.
        top_labels=[str_tokens[p + 1] if p + 1 < len(str_tokens) else "" for p in positions],
        cell_text=[[result.top_strs[prompt][r][j][0] for j in columns] for r in range(result.n_readouts)],
        scale=scale,
        vmin=vmin,
        vmax=vmax,
        colorbar_label=label.format(target=target_text),
        cmap=cmap or default_cmap,
        title_prefix="logit lens: ",
        xlabel="input token",
        ylabel="read-out (layer)",
        top_xlabel="next token",
    )


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

    Raises:
        ArgumentError: a result without a target, an unknown metric, or a batch index or position out of range.
    """
    if result.target_ids is None:
        raise ArgumentError("a trajectory needs a target: run logit_lens(..., target=' Paris')")
    check_choice("metric", metric, ["prob", "rank", "both"])
    prompt = result.inputs.check_batch_index(batch_index)
    column = result.inputs.column_of(position, prompt)
    p = result.positions[column]
    token = visible_token(result.str_tokens[prompt][p], 16)
    trajectory = Trajectory(
        x_labels=result.labels,
        line_labels=result.target_strs[prompt],
        probs=result.target_probs[prompt, :, column].T if metric in ("prob", "both") else None,
        ranks=_ranks(result.target_ranks[prompt, :, column]).T + 1 if metric in ("rank", "both") else None,
        title=f"target across layers at position {p} ({token})",
    )
    return draw_trajectory(trajectory, figsize=figsize)


def _ranks(ranks: torch.Tensor) -> torch.Tensor:
    """Ranks as floats, NaN (nothing drawn) where there is none (-1: the read-out's logits are not finite)."""
    return ranks.float().masked_fill(ranks < 0, float("nan"))
