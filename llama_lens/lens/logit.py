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

import contextlib
import functools
import warnings
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ArgumentError
from ..model.idle import idle_work, waits_for_reads
from ..model.limits import check_context_length, check_fits, forward_nbytes
from ..validate import check_count, check_loaded_layers
from .early_readout import EarlyReadout
from .inputs import Prompt, Target, on_cpu, prepare_inputs, token_texts
from .logit_result import LensResult
from .readout import DEFAULT_CHUNK_SIZE, read_out
from .readouts import DEFAULT_READOUT, READOUTS, readout_hook, readout_kinds, readout_label

if TYPE_CHECKING:
    from ..model.llama import HookedLlama
    from .tuned import TunedLens

__all__ = ["DEFAULT_READOUT", "READOUTS", "LensResult", "logit_lens", "tuned_lens_readout"]


# ------------------------------------------------------------------------------------------------ logit lens
def logit_lens(
    model: HookedLlama,
    prompt_or_tokens: Prompt,
    *,
    target: Target = None,
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
        ArgumentError: for an unknown read-out, a position out of range, a layer that is not loaded, a target
            that is not a single token, or a tuned lens made for another model or lacking a read-out's translator.
    """
    points = _readout_points(model, readout, layers)
    if lens is not None:
        _check_tuned_lens(lens, model, points)
    top_k = check_count("top_k", top_k, 1, model.cfg.d_vocab, f"the vocabulary has {model.cfg.d_vocab} ids")
    if chunk_size is not None:
        chunk_size = check_count("chunk_size", chunk_size, 1)
    inputs = prepare_inputs(
        model, prompt_or_tokens, target=target, positions=positions, prepend_bos=prepend_bos, what="logit_lens"
    )
    batch, n_tokens = inputs.tokens.shape
    pos_index = inputs.positions
    _check_lens_fits(model, batch, n_tokens, len(pos_index), len(points), keep_logits)

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

    targets = inputs.target_ids
    weight = model.unembed.weight
    row_targets = None if targets is None else targets.to(weight.device).repeat_interleave(n_pos, 0)
    # A streamed model waits for its layers' reads: the streams caught so far are read out meanwhile.
    early = None
    if names and waits_for_reads(model):
        norm = functools.partial(_normed_streams, model, lens)
        early = EarlyReadout(
            resid, norm, weight, row_targets, top_k=top_k, keep_logits=keep_logits,
            chunk_size=chunk_size or DEFAULT_CHUNK_SIZE,
        )  # fmt: skip

    with torch.inference_mode(), idle_work(model, early.step) if early else contextlib.nullcontext():
        # The forward stops at the final residual stream, and the model's logits are made at the asked-for
        # positions only: [batch, pos, d_vocab] at every position is 8.7 GB for a 44k-token prompt when one
        # position was asked for.
        stop = model.layer_indices[-1] + 1 if model.layer_indices else 0
        try:
            final_resid = model.run_with_hooks(
                inputs.tokens,
                attention_mask=inputs.attention_mask,
                stop_at_layer=stop,
                fwd_hooks=[(names, capture)] if names else [],
            )
        except BaseException:
            if early is not None:
                early.close()
            raise
        previous.clear()
        if early is not None:
            early.finish()
    with torch.inference_mode():
        # ln_final runs over every position, as in the model's forward (its hooks see what they always saw; it
        # is d_model wide); only the unembedding, d_vocab wide, is limited to the asked-for positions.
        normed_final = model.ln_final(final_resid.to(model.ln_final.weight.device))
        del final_resid
        kept = normed_final if every_position else normed_final[:, pos_index]
        # hook_logits fires as in the forward, on the logits at the asked-for positions [batch, n_pos, d_vocab]
        # (every position when none were picked); what a hook returns is the final read-out.
        final_rows = model.hook_logits(model.unembed(kept)).flatten(0, 1)  # [batch * n_pos, d_vocab]
        del normed_final, kept
        # Each distinct tensor once (hooks that name the same tensor object are read out once), by the first
        # hook that names it (embed and 0_pre, and i_post and (i+1)_pre, name one stream and have one
        # translator); read out early (a streamed model) or now.
        unique, first_hooks = early.untaken() if early else _distinct_streams(resid)
        normed = _normed_streams(model, lens, unique, first_hooks, final_rows=final_rows)
        final, readouts = read_out(
            normed, weight, final_logits=final_rows, targets=row_targets, top_k=top_k,
            keep_logits=keep_logits, chunk_size=chunk_size,
        )  # fmt: skip
        if early is not None:
            unique, readouts = early.metrics(readouts, final_rows, final)
        # `column` maps each hook to its read-out.
        where = {id(tensor): k for k, tensor in enumerate(unique)}
        column = {hook: where[id(tensor)] for hook, tensor in resid.items()}

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
        lens_kind="logit" if lens is None else "tuned",
    )


def _check_lens_fits(model: HookedLlama, batch: int, n_tokens: int, n_pos: int, n_points: int, keep: bool) -> None:
    """Before the model runs: its forward pass (up to the final residual stream) plus what the lens keeps, the
    read-out residual vectors with their normed copies and the logits at the asked-for positions, fit in memory."""
    check_context_length(
        model, n_tokens, what="logit_lens", advice=f"keep the prompt within {model.cfg.max_position_embeddings} tokens"
    )
    weight = model.unembed.weight  # a streamed model's may stay on disk: its dtype and device are known
    cfg, itemsize = model.cfg, weight.dtype.itemsize
    rows = batch * n_pos
    kept = 3 * n_points * rows * cfg.d_model * itemsize + rows * cfg.d_vocab * 4
    if keep:
        kept += n_points * rows * cfg.d_vocab * 4
    need = kept + forward_nbytes(cfg, batch=batch, pos=n_tokens, itemsize=itemsize, written_out=False, logits_pos=0)
    check_fits(
        need,
        weight.device,
        what=f"logit_lens over {batch} x {n_tokens} positions ({n_pos} read out at {n_points} read-outs)",
        advice="read out fewer positions (positions=[-1]) or layers (layers=), "
        + ("leave keep_logits off, " if keep else "")
        + "or run fewer or shorter prompts",
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
        raise ArgumentError(
            f"lens= needs the whole model, and this one holds layers {model.layer_indices} only: the tuned lens's "
            "read-outs are trained towards the last layer's output; load every layer (stream=True keeps memory low)"
        )
    for _, layer, kind, _ in points:
        lens.translator(layer, kind)  # raises, naming the read-out, where the lens has no translator


def _distinct_streams(resid: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], list[str]]:
    """The distinct tensors of `resid` (hook name -> stream), in the order caught, with each one's first hook."""
    streams: dict[int, tuple[torch.Tensor, str]] = {}
    for hook, tensor in resid.items():
        streams.setdefault(id(tensor), (tensor, hook))
    return [tensor for tensor, _ in streams.values()], [hook for _, hook in streams.values()]


def _normed_streams(
    model: HookedLlama,
    lens: TunedLens | None,
    resid: list[torch.Tensor],
    hooks: list[str],
    *,
    final_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """[n_rows, n_streams, d_model]: residual streams (each [n_rows, d_model], caught at `hooks`) moved by a
    tuned lens's translators (`lens`), then through the model's own ln_final, as the final read-out was; hooks
    on ln_final fire here, once per call."""
    if not resid:
        return final_rows.new_empty(final_rows.shape[0], 0, model.cfg.d_model, dtype=model.unembed.weight.dtype)
    if lens is not None:
        resid = [lens.translate_hook(tensor, hook) for tensor, hook in zip(resid, hooks)]
    return model.ln_final(torch.stack(resid, dim=1))


def _readout_points(
    model: HookedLlama, readout: str | Sequence[str], layers: Iterable[int] | None
) -> list[tuple[str, int, str, str]]:
    """(label, layer, kind, hook name) for each read-out, in forward order."""
    kinds = readout_kinds(readout)
    layers = check_loaded_layers(layers, model.layer_indices)
    points = []
    if "embed" in kinds and not ("resid_pre" in kinds and 0 in layers):
        points.append(("embed", 0, "embed", "hook_embed"))
    for i in layers:
        for kind in READOUTS[1:]:
            if kind in kinds:
                points.append((readout_label(i, kind), i, kind, readout_hook(i, kind)))
    if not points:
        raise ArgumentError(f"nothing to read out: read-outs {kinds} over layers {list(layers)}")
    return points


def tuned_lens_readout(
    model: HookedLlama,
    prompt_or_tokens: Prompt,
    *,
    lens: TunedLens,
    target: Target = None,
    **kwargs: Any,
) -> LensResult:
    """Deprecated: `ll.logit_lens(model, prompt_or_tokens, lens=lens, ...)`, which it calls.

    Raises:
        ArgumentError: as `logit_lens`.
    """
    warnings.warn(
        "tuned_lens_readout is deprecated and will be removed in the next release; use "
        "ll.logit_lens(model, prompt, lens=tuned_lens, ...)",
        DeprecationWarning,
        stacklevel=2,
    )
    return logit_lens(model, prompt_or_tokens, target=target, lens=lens, **kwargs)
