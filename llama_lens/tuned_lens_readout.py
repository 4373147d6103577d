"""The tuned lens's read-out of a prompt as a LensResult, the same object the logit lens returns.

Each residual stream is translated by the lens (`TunedLens.translate`), then read out as the logit lens reads
it, unembed(ln_final(x)), through the model's own modules. The last layer's resid_post read-out is the
model's output itself, as in the logit lens. Every read-out's logits are made whole ([batch * n_pos, d_vocab]
one read-out at a time): this is for prompts, not corpora.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from .tuned_lens import DEFAULT_READOUT, TRANSLATED_READOUTS, TunedLens

if TYPE_CHECKING:
    from .lens import LensResult
    from .model import HookedLlama


def readout_points(model: HookedLlama, readout: str | Sequence[str]) -> list[tuple[str, int, str, str]]:
    """(label, layer, kind, hook name) for each read-out over the loaded layers, in forward order."""
    kinds = [readout] if isinstance(readout, str) else list(readout)
    unknown = [k for k in kinds if k not in TRANSLATED_READOUTS]
    if unknown or not kinds:
        raise ValueError(f"unknown read-out {unknown or kinds!r}; choose from {list(TRANSLATED_READOUTS)}")
    points = []
    loaded = model.layer_indices
    if "embed" in kinds and not ("resid_pre" in kinds and 0 in loaded):
        points.append(("embed", 0, "embed", "hook_embed"))
    for i in loaded:
        for kind, suffix in (("resid_pre", "pre"), ("resid_mid", "mid"), ("resid_post", "post")):
            if kind in kinds:
                points.append((f"{i}_{suffix}", i, kind, f"blocks.{i}.hook_{kind}"))
    return points


def _index(value: Any, what: str) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an int, got {value!r}") from None


def _positions(positions: int | Sequence[int] | None, n_tokens: int) -> list[int]:
    if positions is None:
        return list(range(n_tokens))
    items = positions.flatten().tolist() if isinstance(positions, torch.Tensor) else positions
    items = [items] if not isinstance(items, (list, tuple)) else list(items)
    if not items:
        raise ValueError("positions is empty; pass None for all positions")
    out = []
    for item in items:
        p = _index(item, "a position")
        if not -n_tokens <= p < n_tokens:
            raise ValueError(f"position {p} is out of range for a prompt of {n_tokens} tokens")
        out.append(p % n_tokens)
    return out


def _target_ids(model: HookedLlama, target: Any, batch: int) -> torch.Tensor | None:
    """[batch, 1] target ids: one target shared by every prompt, or one per prompt."""
    if target is None:
        return None
    items = [target] * batch if isinstance(target, (str, int)) or torch.is_tensor(target) else list(target)
    if len(items) != batch:
        raise ValueError(f"got {len(items)} targets for {batch} prompt(s): pass one target, or one per prompt")
    ids = []
    for item in items:
        if isinstance(item, str):
            if model.tokenizer is None:
                raise ValueError(f"target {item!r} is text but this model has no tokenizer; pass a token id")
            ids.append(int(model.tokenizer.id_of(item)))
        else:
            token_id = _index(item, "a target")
            if not 0 <= token_id < model.cfg.d_vocab:
                raise ValueError(f"target id {token_id} is out of range [0, d_vocab={model.cfg.d_vocab})")
            ids.append(token_id)
    return torch.tensor(ids, dtype=torch.long)[:, None]


def _texts(model: HookedLlama, ids: list[int]) -> dict[int, str]:
    ids = sorted(set(ids))
    tokenizer = model.tokenizer
    known = [i for i in ids if tokenizer is not None and i < getattr(tokenizer, "vocab_size", 0)]
    texts = dict(zip(known, tokenizer.token_strs(known))) if known else {}
    return {i: texts.get(i, f"<{i}>") for i in ids}


def tuned_lens_readout(
    model: HookedLlama,
    prompt_or_tokens: str | Sequence[str] | torch.Tensor | Sequence[int],
    target: Any = None,
    *,
    lens: TunedLens,
    readout: str | Sequence[str] = DEFAULT_READOUT,
    positions: int | Sequence[int] | None = None,
    top_k: int = 5,
) -> LensResult:
    """Reads out the translated residual stream at every loaded layer: the tuned lens's LensResult.

    Args:
        model: the HookedLlama the lens was trained for (whole, streamed or `layers=range(0, k)`).
        prompt_or_tokens: a text, a list of texts (left-padded into a batch), or token ids [pos] / [batch, pos].
        target: a token's text (" Paris") or id shared by every prompt, or a list with one per prompt.
        lens: the TunedLens; it must have a translator for every read-out asked for.
        readout: "embed", "resid_pre", "resid_mid", "resid_post" or a list of them.
        positions: token positions to read out (negative counts from the end); default all.
        top_k: how many most likely tokens to keep per read-out.

    Returns:
        A LensResult whose metrics are the tuned read-outs' (kl_to_final against the model's own output).

    Raises:
        ValueError: a lens made for another model, a read-out the lens has no translator for, a bad position,
            target or top_k.
    """
    from .lens import LensResult

    lens.check_model(model)
    tokens, mask = model.prepare_tokens(prompt_or_tokens)
    mask = torch.ones_like(tokens) if mask is None else mask.long()
    batch, n_tokens = tokens.shape
    points = readout_points(model, readout)
    for _, layer, kind, _ in points:
        lens.translator(layer, kind)  # raises, naming the read-out, where the lens has no translator
    pos_index = _positions(positions, n_tokens)
    n_pos = len(pos_index)
    k = _index(top_k, "top_k")
    if not 1 <= k <= model.cfg.d_vocab:
        raise ValueError(f"top_k must be an integer between 1 and d_vocab ({model.cfg.d_vocab}), got {top_k!r}")
    target_ids = _target_ids(model, target, batch)

    resid: dict[str, torch.Tensor] = {}

    def capture(tensor: torch.Tensor, *, hook) -> None:
        resid[hook.name] = tensor[:, pos_index].flatten(0, 1)  # [batch * n_pos, d_model]

    names = sorted({hook for _, _, _, hook in points})
    with torch.inference_mode():
        final_logits = model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[(names, capture)])
        final = final_logits[:, pos_index].flatten(0, 1).float()  # [batch * n_pos, d_vocab]
        final_logprobs = final.log_softmax(dim=-1)
        row_targets = None if target_ids is None else target_ids.to(final.device).repeat_interleave(n_pos, 0)
        metrics = []
        for _, layer, kind, hook in points:
            is_final = lens.translator(layer, kind) is None
            if is_final:
                logits = final  # the last layer's resid_post: the model's own output, bit for bit
            else:
                translated = lens.translate(resid[hook], layer, kind)
                logits = model.unembed(model.ln_final(translated)).float()
            metrics.append(_metrics(logits, final_logprobs, row_targets, k, is_final))

    def stacked(i: int) -> torch.Tensor | None:
        # n_readouts x [batch * n_pos, ...] -> [batch, n_readouts, n_pos, ...]
        parts = [m[i] for m in metrics]
        if parts[0] is None:
            return None
        return torch.stack(parts, dim=1).unflatten(0, (batch, n_pos)).transpose(1, 2).cpu()

    top_ids = stacked(0)
    ids = top_ids.unique().tolist() + tokens.unique().tolist()
    texts = _texts(model, ids + ([] if target_ids is None else target_ids.flatten().tolist()))
    return LensResult(
        tokens=tokens.cpu(),
        attention_mask=mask.cpu(),
        str_tokens=[[texts[i] for i in row] for row in tokens.tolist()],
        positions=pos_index,
        labels=[label for label, _, _, _ in points],
        layers=[layer for _, layer, _, _ in points],
        readouts=[kind for _, _, kind, _ in points],
        top_ids=top_ids,
        top_probs=stacked(1),
        top_logits=stacked(2),
        top_strs=[[[[texts[i] for i in ks] for ks in row] for row in prompt] for prompt in top_ids.tolist()],
        entropy=stacked(3),
        kl_to_final=stacked(4),
        target_ids=None if target_ids is None else target_ids.cpu(),
        target_strs=None if target_ids is None else [[texts[i] for i in row] for row in target_ids.tolist()],
        target_probs=stacked(5),
        target_logits=stacked(6),
        target_ranks=stacked(7),
    )


def _metrics(
    logits: torch.Tensor, final_logprobs: torch.Tensor, row_targets: torch.Tensor | None, top_k: int, is_final: bool
) -> tuple[torch.Tensor | None, ...]:
    """(top ids, top probs, top logits, entropy, KL(final || read-out), target probs, logits, ranks) of
    [n_rows, d_vocab] float32 logits."""
    logprobs = logits.log_softmax(dim=-1)
    top_logits, top_ids = logits.topk(top_k, dim=-1)
    top_probs = logprobs.gather(-1, top_ids).exp()
    probs = logprobs.exp()
    entropy = -(probs * logprobs).sum(-1)
    kl = (final_logprobs.exp() * (final_logprobs - logprobs)).sum(-1).clamp(min=0)
    if is_final:
        kl.zero_()  # the final read-out against itself: 0, not rounding
    if row_targets is None:
        return top_ids, top_probs, top_logits, entropy, kl, None, None, None
    target_logits = logits.gather(-1, row_targets)  # [n_rows, n_targets]
    target_probs = logprobs.gather(-1, row_targets).exp()
    target_ranks = (logits[:, None, :] > target_logits[:, :, None]).sum(-1)
    return top_ids, top_probs, top_logits, entropy, kl, target_probs, target_logits, target_ranks
