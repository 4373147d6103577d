"""The logit lens: what each layer would predict if the model stopped there.

A residual stream vector x is read out as the model reads out its last one (nostalgebraist 2020),

    logits = unembed(ln_final(x))                                   [d_vocab]

for the embedding and for every loaded layer's resid_pre / resid_mid / resid_post. The last loaded layer's
resid_post read-out is the model's own output, so it is taken from the forward pass itself and equals the
model's logits bit for bit. (transformers' `hidden_states[-1]` is already normed: reading it out through the
norm again is the classic logit-lens bug. Every other read-out here starts from a residual stream taken before
any norm, hook_embed or hook_resid_*, and goes through ln_final once.)

This module runs the model, catches the residual streams (only at the asked-for positions) and norms them;
`readout.read_out` turns the normed vectors into metrics a block of the vocabulary at a time, without ever
holding a [read-outs × pos × d_vocab] tensor, and `LensResult` holds what comes out. A translator applied to
the residual streams before the norm (a tuned lens, `lens=`) is applied just before `_normed_rows` norms them.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..validate import check_choice, check_count, check_loaded_layers
from .inputs import (
    InputsView,
    LensInputs,
    Prompt,
    Target,
    index_grid,
    make_frame,
    on_cpu,
    prepare_inputs,
    repeat_rows,
    token_texts,
)
from .readout import read_out

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from ..model.llama import HookedLlama
    from .tuned import TunedLens

READOUTS = ("embed", "resid_pre", "resid_mid", "resid_post")
DEFAULT_READOUT = ("embed", "resid_post")
TABLE_KINDS = ("summary", "top_k")


# ----------------------------------------------------------------------------------------------- result
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
        lens: which lens made it: "logit" (the residual streams read out as they are) or "tuned" (each first
            moved by its tuned-lens translator, see `ll.TunedLens`).
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
    lens: str = "logit"

    @property
    def n_readouts(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        targets = "" if self.target_strs is None else f", targets={self.target_strs}"
        lens = "" if self.lens == "logit" else f", lens={self.lens!r}"
        return (
            f"LensResult(batch={self.batch}, read-outs={self.labels[0]}..{self.labels[-1]} ({self.n_readouts}), "
            f"positions={len(self.positions)}, top_k={self.top_ids.shape[-1]}{targets}{lens})"
        )

    def to_frame(self, kind: str = "summary", *, drop_padding: bool = True) -> pd.DataFrame:
        """A tidy pandas DataFrame.

        Args:
            kind: "summary": one row per prompt × read-out × position (× target when there are several),
                columns prompt (the batch index), label, layer, readout, position, token, top_token, top_id,
                top_prob, entropy, kl_to_final, and with targets: target, target_id, target_prob, target_logit,
                target_rank (float with NaN where a read-out's logits are not finite, as pandas does for missing
                integers; else integers). "top_k": one row per prompt × read-out × position × k, columns prompt, label,
                layer, readout, position, token, k, top_token, top_id, top_prob, top_logit.
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
            "prompt": b,
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

    # Drawing is plot_lens's job; these two are conveniences (as tuned-lens' PredictionTrajectory has), so the
    # drawing module is imported when they are called. Nothing else in the lens imports upward.
    def plot(self, metric: str = "prob", **kwargs: Any) -> Figure:
        """The layer × position heatmap with the top token in each cell; see `llama_lens.plot.lens_heatmap`.

        Args:
            metric: colour by "prob" (of the top token), "entropy", "kl", "target_prob" or "rank" (the target's).
            kwargs: `batch_index=`, `target_index=` and the rest of `lens_heatmap`'s options.
        """
        from ..viz.heatmap import lens_heatmap

        return lens_heatmap(self, metric=metric, **kwargs)

    def plot_trajectory(self, **kwargs: Any) -> Figure:
        """The target's probability and rank across read-outs; see `llama_lens.plot.lens_trajectory`."""
        from ..viz.heatmap import lens_trajectory

        return lens_trajectory(self, **kwargs)


def _flatten3(nested: list) -> list:
    return [row for prompt in nested for readout in prompt for row in readout]


# ------------------------------------------------------------------------------------------------ logit lens
def logit_lens(
    model: HookedLlama,
    prompt_or_tokens: Prompt,
    target: Target = None,
    *,
    readout: str | Sequence[str] = DEFAULT_READOUT,
    positions: int | Iterable[int] | None = None,
    top_k: int = 5,
    keep_logits: bool = False,
    chunk_size: int | None = None,
    layers: Iterable[int] | None = None,
    prepend_bos: bool | None = None,
    lens: TunedLens | None = None,
) -> LensResult:
    """Reads out the residual stream through the final norm and unembedding at every loaded layer.

    Args:
        model: a HookedLlama, whole or partial (`layers=range(0, k)`: only loaded layers are read out, and the
            final distribution is the model's own output, i.e. layer k - 1's resid_post read-out).
        prompt_or_tokens: a text, a list of texts (left-padded into a batch), or token ids [pos] / [batch, pos].
        target: the token to follow: its text (" Paris", one token with its leading space) or id; a list with
            one per prompt; or a list of lists, several per prompt (the same number for every prompt).
        readout: which residual streams to read out, one of "embed", "resid_pre", "resid_mid", "resid_post"
            or a list of them. "embed" is the token embedding (layer 0's resid_pre; left out when
            "resid_pre" is also asked for, as "0_pre" is the same vector).
        positions: token positions to read out, an int or an iterable of ints (indices into the pos axis;
            negative counts from the end); default None, all of them: the lens is a picture across positions.
            Only these positions of the residual streams and of the model's logits are kept.
        top_k: how many most likely tokens to keep per read-out.
        keep_logits: also keep every read-out's logits, [batch, n_readouts, n_pos, d_vocab] (large).
        chunk_size: residual vectors per chunk (default `readout.DEFAULT_CHUNK_SIZE`); each chunk sweeps the
            vocabulary in blocks of `readout.VOCAB_BLOCK` ids (`ACCELERATOR_VOCAB_BLOCK` on a GPU). Memory: the
            model's logits at the asked-for positions [batch * n_pos, d_vocab] and the read-out residual vectors
            [batch * n_pos * n_readouts, d_model] (with their normed copy), plus a few [chunk_size, VOCAB_BLOCK]
            blocks whatever the prompt length (one more for each further vocabulary block that holds a target).
        layers: which loaded layers to read out, any iterable of ints (default None: all loaded layers).
        prepend_bos: tokenizing texts, put BOS first (True) or not (False); None leaves it to
            `model.prepare_tokens`.
        lens: None for the logit lens; a `ll.TunedLens` trained for this model to move each residual stream by
            its translator before the read-out (the tuned lens). The last layer's read-out is the model's own
            output either way. A tuned lens needs the whole model (not `layers=range(0, k)`).

    Returns:
        A LensResult.

    Raises:
        ValueError: for an unknown read-out, a position out of range, a layer that is not loaded, or a target
            that is not a single token.
    """
    points = _readout_points(model, readout, layers)
    if lens is not None:
        _check_tuned_lens(lens, model, points)
    top_k = check_count("top_k", top_k, 1, model.cfg.d_vocab, f"the vocabulary has {model.cfg.d_vocab} ids")
    if chunk_size is not None:
        chunk_size = check_count("chunk_size", chunk_size, 1)
    inputs = prepare_inputs(model, prompt_or_tokens, target, positions, prepend_bos=prepend_bos, what="logit_lens")
    batch, n_tokens = inputs.tokens.shape
    pos_index = inputs.positions

    # The final read-out is the model's output itself; the hook point it would come from is not captured.
    final_hook = f"blocks.{model.layer_indices[-1]}.hook_resid_post" if model.layer_indices else "hook_embed"
    names = sorted({hook for _, _, _, hook in points if hook != final_hook})
    n_pos = len(pos_index)
    every_position = pos_index == list(range(n_tokens))
    resid: dict[str, torch.Tensor] = {}  # hook name -> [batch * n_pos, d_model]
    previous: list[torch.Tensor] = []  # the last tensor captured, and what was kept of it

    def capture(tensor: torch.Tensor, *, hook) -> None:
        # Only the asked-for positions are kept, as the forward goes. Layer i's resid_post is layer i + 1's
        # resid_pre (and hook_embed is 0_pre): the same tensor object under two names, so it is kept once and
        # read out once.
        if not previous or tensor is not previous[0]:
            kept = tensor if every_position else tensor[:, pos_index]
            previous[:] = [tensor, kept.flatten(0, 1)]
        resid[hook.name] = previous[1]

    with torch.inference_mode():
        final_logits = model.run_with_hooks(
            inputs.tokens, attention_mask=inputs.attention_mask, fwd_hooks=[(names, capture)] if names else []
        )
        previous.clear()
        # [batch * n_pos, d_vocab]: a view when every position is asked for, else a copy, and the model's full
        # logits are let go.
        final_rows = final_logits.flatten(0, 1) if every_position else final_logits[:, pos_index].flatten(0, 1)
        del final_logits
        targets = inputs.target_ids
        row_targets = None if targets is None else targets.to(final_rows.device).repeat_interleave(n_pos, 0)
        # Hooks that name the same tensor object are read out once: `column` maps each to its read-out.
        first_with: dict[int, int] = {}
        column = {hook: first_with.setdefault(id(tensor), len(first_with)) for hook, tensor in resid.items()}
        unique = list({id(tensor): tensor for tensor in resid.values()}.values())
        if lens is not None:
            # Each distinct tensor once, by the first hook that names it (embed and 0_pre, and i_post and
            # (i+1)_pre, name one stream and have one translator).
            first_hook = {id(tensor): hook for hook, tensor in reversed(list(resid.items()))}
            unique = [lens.translate_hook(tensor, first_hook[id(tensor)]) for tensor in unique]
        normed = _normed_rows(model, unique, final_rows)
        final, readouts = read_out(
            normed, model.unembed.weight, final_rows, row_targets, top_k=top_k, keep_logits=keep_logits,
            chunk_size=chunk_size,
        )  # fmt: skip

    def stacked(field: str) -> torch.Tensor | None:
        # n_readouts x [batch * n_pos, ...] -> [batch, n_readouts, n_pos, ...]; made outside inference_mode,
        # so these are ordinary tensors that users may change in place.
        if getattr(final, field) is None:
            return None
        parts = [
            getattr(final, field) if hook == final_hook else getattr(readouts, field)[:, column[hook]]
            for _, _, _, hook in points
        ]
        value = torch.stack(parts, dim=1)  # [batch * n_pos, n_readouts, ...]
        return value.unflatten(0, (batch, n_pos)).transpose(1, 2).cpu()

    _warn_non_finite(stacked("lse"), points)
    top_ids = stacked("top_ids")
    texts = token_texts(model, top_ids.unique().tolist())
    return LensResult(
        inputs=on_cpu(inputs),
        labels=[label for label, _, _, _ in points],
        layers=[layer for _, layer, _, _ in points],
        readouts=[kind for _, _, kind, _ in points],
        top_ids=top_ids,
        top_probs=stacked("top_probs"),
        top_logits=stacked("top_logits"),
        top_strs=[[[[texts[i] for i in ks] for ks in row] for row in prompt] for prompt in top_ids.tolist()],
        entropy=stacked("entropy"),
        kl_to_final=stacked("kl"),
        target_probs=stacked("target_probs"),
        target_logits=stacked("target_logits"),
        target_ranks=stacked("target_ranks"),
        logits=stacked("logits"),
        lens="logit" if lens is None else "tuned",
    )


def _warn_non_finite(lse: torch.Tensor, points: list[tuple[str, int, str, str]]) -> None:
    """One warning per lens call when some read-out's logits hold NaN or inf ([batch, n_readouts, n_pos] `lse`),
    naming the first read-out, in forward order, where they appear."""
    bad = ~torch.isfinite(lse).flatten(2).all(dim=2).all(dim=0)  # [n_readouts]
    if not bool(bad.any()):
        return
    first = int(bad.nonzero()[0, 0])
    label, layer, _, hook = points[first]
    warnings.warn(
        f"the logit lens met non-finite values (NaN or inf): they first appear at read-out {label!r} ({hook}, "
        f"layer {layer}), and {int(bad.sum())} of {len(points)} read-outs have them. Probabilities there are NaN "
        "and target ranks -1 (NaN in to_frame()): they are not predictions. NaN/inf in the weights (a damaged "
        "checkpoint) or from a hook are the usual causes; `model.run_with_cache` shows where activations turn "
        "non-finite.",
        RuntimeWarning,
        stacklevel=3,
    )


def _check_tuned_lens(lens: TunedLens, model: HookedLlama, points: list[tuple[str, int, str, str]]) -> None:
    """Before the model runs: the lens fits the model, is for a whole model, and has every read-out's translator."""
    lens.check_model(model)
    if model.layer_indices != list(range(model.cfg.n_layers)):
        raise ValueError(
            f"lens= needs the whole model, and this one holds layers {model.layer_indices} only: the tuned lens's "
            "read-outs are trained towards the last layer's output; load every layer (stream=True keeps memory low)"
        )
    for _, layer, kind, _ in points:
        lens.translator(layer, kind)  # raises, naming the read-out, where the lens has no translator


def _normed_rows(model: HookedLlama, resid: list[torch.Tensor], final_rows: torch.Tensor) -> torch.Tensor:
    """[n_rows, n_readouts, d_model]: the captured residual streams (each [n_rows, d_model]) through the model's
    own ln_final, as the final read-out was; hooks on ln_final fire here too, once. A tuned lens has already
    moved each stream by its translator (in `logit_lens`)."""
    if not resid:
        return final_rows.new_empty(final_rows.shape[0], 0, model.cfg.d_model, dtype=model.unembed.weight.dtype)
    return model.ln_final(torch.stack(resid, dim=1))


def _readout_points(
    model: HookedLlama, readout: str | Sequence[str], layers: Iterable[int] | None
) -> list[tuple[str, int, str, str]]:
    """(label, layer, kind, hook name) for each read-out, in forward order."""
    kinds = [readout] if isinstance(readout, str) else list(readout)
    if not kinds:
        raise ValueError(f"readout= is empty: choose from {list(READOUTS)} (or a list of them)")
    for kind in kinds:
        check_choice("readout", kind, READOUTS, "read-out")
    layers = check_loaded_layers(layers, model.layer_indices)
    points = []
    if "embed" in kinds and not ("resid_pre" in kinds and 0 in layers):
        points.append(("embed", 0, "embed", "hook_embed"))
    for i in layers:
        for kind, suffix in (("resid_pre", "pre"), ("resid_mid", "mid"), ("resid_post", "post")):
            if kind in kinds:
                points.append((f"{i}_{suffix}", i, kind, f"blocks.{i}.hook_{kind}"))
    if not points:
        raise ValueError(f"nothing to read out: read-outs {kinds} over layers {list(layers)}")
    return points
