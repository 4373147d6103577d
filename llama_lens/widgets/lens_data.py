"""The logit-lens explorer's computing side: one model run per prompt, the page's data, and the values of any
token (target, pins, colouring) read from the residual streams that run kept, without running the model again.

Shapes: R read-outs (rows, forward order), P positions, k top tokens.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ArgumentError
from ..lens.logit import LensResult, logit_lens
from ..model.protocols import LanguageModel

if TYPE_CHECKING:
    from ..lens.tuned import TunedLens

# Read-out label ("embed", "3_pre", ...) -> the hook point holding that residual stream.
SUFFIX_HOOK = {"pre": "hook_resid_pre", "mid": "hook_resid_mid", "post": "hook_resid_post"}
# Rows of read-outs whose full logits are computed at once when ranking a token (memory: rows x d_vocab).
RANK_CHUNK = 256


def hook_of(label: str) -> str:
    """The hook name of a read-out label: "embed" -> "hook_embed", "3_mid" -> "blocks.3.hook_resid_mid"."""
    if label == "embed":
        return "hook_embed"
    layer, suffix = label.split("_")
    return f"blocks.{layer}.{SUFFIX_HOOK[suffix]}"


def prompt_tokens(model: LanguageModel, prompt: str | Sequence[dict[str, str]]) -> torch.Tensor:
    """Token ids [1, pos] of a text, or of chat messages through the tokenizer's chat template.

    Raises:
        ArgumentError: for messages without "role"/"content", or a tokenizer without a chat template.
    """
    if isinstance(prompt, str):
        return model.to_tokens(prompt)
    messages = list(prompt)
    if not messages or not all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in messages):
        raise ArgumentError('prompt must be a text or a list of {"role": ..., "content": ...} chat messages')
    template = getattr(model.tokenizer, "apply_chat_template", None)
    if template is None:
        raise ArgumentError(
            "prompt is a list of chat messages but this model's tokenizer has no apply_chat_template; "
            "pass the formatted text instead"
        )
    text = template(messages, add_generation_prompt=True, tokenize=False)
    return model.to_tokens(text, prepend_bos=False)  # the template writes any BOS itself


@dataclass
class LensRun:
    """One prompt's lens and what it kept to read out further tokens.

    Attributes:
        result: the LensResult (top tokens, entropy, KL) of the run.
        resid: [R, P, d_model] the residual stream of every read-out at every position, as the lens reads it
            (with a tuned lens: already moved by its translator), so ln_final and unembed give the read-out.
        logsumexp: [R, P] the log normaliser of every read-out's distribution.
        seconds: how long the run took.
    """

    result: LensResult
    resid: torch.Tensor
    logsumexp: torch.Tensor
    seconds: float


def run_lens(
    model: LanguageModel,
    tokens: torch.Tensor,
    *,
    readout: str,
    top_k: int,
    check: Callable[[], None] = lambda: None,
    progress: Callable[[int, int], None] = lambda done, total: None,
    lens: TunedLens | None = None,
) -> LensRun:
    """The lens of one prompt (`ll.logit_lens`) and its residual streams, captured by hooks on the same run.

    `check()` is called after every layer (it raises to cancel the run); `progress(done, total)` likewise.
    `lens` is a tuned lens (None: the logit lens); the kept streams are then the translated ones.
    """
    started = time.perf_counter()
    captured: dict[str, torch.Tensor] = {}
    layers = list(model.layer_indices)
    names = ["hook_embed"] + [f"blocks.{i}.{hook}" for i in layers for hook in SUFFIX_HOOK.values()]

    def capture(tensor: torch.Tensor, *, hook: Any) -> None:
        captured[hook.name] = tensor[0].detach()
        if hook.name.endswith("hook_resid_post"):
            progress(layers.index(int(hook.name.split(".")[1])) + 1, len(layers))
            check()

    # Every read-out with the embedding as its first row ("resid_pre" starts with layer 0's input, the same vector).
    readouts = readout if readout == "resid_pre" else ("embed", readout)
    with model.hooks([(names, capture)]), torch.no_grad():
        result = logit_lens(model, tokens, readout=readouts, top_k=top_k, lens=lens)
        check()
        # Translated once here, so every later read-out (target, pins, ranks) is the tuned lens's as well.
        streams = [(captured[hook_of(label)][result.positions], hook_of(label)) for label in result.labels]
        resid = torch.stack([s if lens is None else lens.translate_hook(s, hook) for s, hook in streams])
    # The normaliser from the top token: log p = logit - logsumexp, so logsumexp = logit - log p.
    logsumexp = result.top_logits[0, :, :, 0].float() - result.top_probs[0, :, :, 0].float().log()
    return LensRun(result, resid, logsumexp, time.perf_counter() - started)


def token_values(
    model: LanguageModel, run: LensRun, *, token_id: int, positions: Sequence[int] | None = None, ranks: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The probability and rank of one token at every read-out, from the kept residual streams.

    Args:
        positions: column indices into the run's positions (default all).
        ranks: also count the tokens with a strictly higher logit (a sweep over the vocabulary).

    Returns:
        probs [R, P'] and ranks [R, P'] (int64; None without `ranks`).
    """
    columns = list(range(run.resid.shape[1])) if positions is None else list(positions)
    with torch.no_grad():
        normed = model.ln_final(run.resid[:, columns])  # [R, P', d_model]
        weight = model.unembed.weight
        bias = model.unembed.bias
        logit = normed @ weight[token_id] + (0 if bias is None else bias[token_id])  # [R, P']
        probs = (logit.float() - run.logsumexp[:, columns]).exp().clamp(max=1.0)
        if not ranks:
            return probs, None
        rows = normed.reshape(-1, normed.shape[-1])
        counts = []
        for start in range(0, rows.shape[0], RANK_CHUNK):
            logits = model.unembed(rows[start : start + RANK_CHUNK])  # [chunk, d_vocab]
            # The target's logit from the same product: one computed apart may differ in the last bit.
            counts.append((logits > logits[:, token_id : token_id + 1]).sum(dim=-1))
        return probs, torch.cat(counts).reshape(logit.shape)


def parse_target(model: LanguageModel, text: str) -> int | None:
    """The id a target box names: "" -> None, "#1712" -> id 1712, otherwise the token whose text it is.

    Raises:
        ArgumentError: for an id out of range or a text that is not one token (naming its pieces).
    """
    if text == "":
        return None
    if text.startswith("#") and text[1:].isdigit():
        token_id = int(text[1:])
        if not 0 <= token_id < model.cfg.d_vocab:
            raise ArgumentError(f"target {text}: ids run from 0 to {model.cfg.d_vocab - 1}")
        return token_id
    if model.tokenizer is None:
        raise ArgumentError(f"target {text!r} is text but the model has no tokenizer; give an id as #1712")
    return int(model.tokenizer.id_of(text))


def spaced_hint(model: LanguageModel, run: LensRun, *, text: str, token_id: int | None) -> dict[str, Any] | None:
    """A suggestion to use " text" when that token ranks better than `text` at the last read-out and position.

    Returns None when no suggestion applies, else {"text", "id", "rank", "rank_typed"} (rank_typed is None
    when the typed text is not one token).
    """
    if not text or text[0].isspace() or text.startswith("#") or model.tokenizer is None:
        return None
    try:
        spaced_id = int(model.tokenizer.id_of(" " + text))
    except ValueError:
        return None
    last = [run.resid.shape[1] - 1]
    row = _last_row(run)
    spaced_rank = int(token_values(model, row, token_id=spaced_id, positions=last)[1][0, 0])
    typed_rank = None if token_id is None else int(token_values(model, row, token_id=token_id, positions=last)[1][0, 0])
    if typed_rank is not None and typed_rank <= spaced_rank:
        return None
    return {"text": " " + text, "id": spaced_id, "rank": spaced_rank, "rank_typed": typed_rank}


def _last_row(run: LensRun) -> LensRun:
    return LensRun(run.result, run.resid[-1:], run.logsumexp[-1:], run.seconds)


def payload(run: LensRun) -> dict[str, Any]:
    """The page's data for one run, whole: every cell's top-k and every metric (what a saved page carries, having
    no kernel to ask). A string table for the top tokens and the long arrays as base64 little-endian binary in the
    JSON (a 300-token lens of SmolLM2 is about 0.7 MB this way, 1.35 MB as JSON numbers). `unpack_panel` reads it
    back as lists, and lens.js as typed arrays.

    Keys: tokens [pos] (input text), positions [P], labels [R], layers [R], k, vocab (texts), vocab_ids; packed:
    top (indices into vocab, [R * P * k] row-major, uint16, uint32 past 65535 texts), probs ([R * P * k] uint16:
    divide by prob_scale), logit (the top token's raw logit), entropy and kl ([R * P] float32); `packed` names
    each one's dtype; seconds.
    """
    part = columns_part(run, 0, len(run.result.positions))
    packed = {"top": part["packed"]["top"], "probs": "u2"} | {name: "f4" for name in METRIC_NAMES}
    return {
        **_outline(run),
        "k": part["k"],
        "vocab": part["vocab"],
        "vocab_ids": part["vocab_ids"],
        "packed": packed,
        "top": part["top"],
        "probs": part["probs"],
        **{name: metric_part(run, name)["values"] for name in METRIC_NAMES},
    }


def frame(run: LensRun, *, run_id: int, metric: str) -> dict[str, Any]:
    """The page's data for one run as a live view first needs it: what grows with the prompt's length is the
    top-1 token of every cell (its text and colour), the top-k of the first FRAME_COLUMNS positions (the
    tooltips of what shows first) and the chosen metric's matrix when it is not a top-1 probability. The page asks
    for the rest (`answer`) as it scrolls, hovers or changes the colouring: a 300-token lens of SmolLM2 sends about
    0.12 MB here (0.16 MB with the view's script) instead of 0.7 MB.

    Keys: those of `payload` up to k, then run (the id a request names), parts: a top-1 part of every column
    and a top-k part of the first columns (`columns_part`), metrics: {name: metric_part} of those sent.
    """
    n_columns = len(run.result.positions)
    parts = [columns_part(run, 0, min(n_columns, FRAME_COLUMNS))]
    if n_columns > FRAME_COLUMNS:
        parts.insert(0, columns_part(run, 0, n_columns, k=1))
    metrics = {metric: metric_part(run, metric)} if metric in METRIC_NAMES else {}
    return {**_outline(run), "k": run.result.top_ids.shape[-1], "run": run_id, "parts": parts, "metrics": metrics}


def answer(runs: Sequence[LensRun], run_id: int, request: Any) -> dict[str, Any]:
    """The reply to a page's request for more of a panel's data (a message through the widget's channel).

    Requests: {"want": "columns", "run", "panel", "start", "stop"} (top-k of positions [start, stop), at most
    REQUEST_COLUMNS of them) or {"want": "metric", "run", "panel", "metric"} (one of METRIC_NAMES). The reply
    repeats want, run and panel and adds the part; a request about an older run gets {"stale": True} (the page
    drops it: its new frame is on the way), a malformed one {"error": why}.
    """
    if not isinstance(request, dict) or request.get("want") not in ("columns", "metric"):
        return {"error": f"unknown request {request!r}"}
    reply = {key: request.get(key) for key in ("want", "run", "panel")}
    if request.get("run") != run_id or not runs:
        return reply | {"stale": True}
    panel = request.get("panel")
    if type(panel) is not int or not 0 <= panel < len(runs):
        return reply | {"error": f"panel {panel!r} is not one of the {len(runs)} shown"}
    run = runs[panel]
    if request["want"] == "metric":
        if request.get("metric") not in METRIC_NAMES:
            return reply | {"error": f"metric {request.get('metric')!r} is not one of {list(METRIC_NAMES)}"}
        return reply | metric_part(run, request["metric"])
    start, stop, n_columns = request.get("start"), request.get("stop"), len(run.result.positions)
    if not all(type(v) is int for v in (start, stop)) or not 0 <= start < stop <= n_columns:
        return reply | {"error": f"columns [{start!r}, {stop!r}) are not within [0, {n_columns})"}
    return reply | columns_part(run, start, min(stop, start + REQUEST_COLUMNS))


def _outline(run: LensRun) -> dict[str, Any]:
    result = run.result
    return {
        "tokens": result.str_tokens[0],
        "positions": result.positions,
        "labels": result.labels,
        "layers": result.layers,
        "prob_scale": PROB_SCALE,
        "seconds": round(run.seconds, 3),
    }


PROB_SCALE = 65535
# Positions whose top-k the first frame carries: a screen of cells at the default zoom (36 px) in a notebook's
# output, one block of the page's requests (lens_parts.js BLOCK); the page asks for the next block as it draws.
# Every explorer's frame is also what a notebook saved with its widget state stores, so it is kept to a screen.
FRAME_COLUMNS = 32
# The metrics that are a matrix of their own ([R * P] float32); the others come from the top-k or a token's data.
METRIC_NAMES = ("logit", "entropy", "kl")
# The most positions one request gets (the page asks in blocks of 32).
REQUEST_COLUMNS = 256


def columns_part(run: LensRun, start: int, stop: int, *, k: int | None = None) -> dict[str, Any]:
    """The top-k tokens and probabilities of positions [start, stop) at every read-out, packed.

    Keys: start, stop, k; vocab (texts) and vocab_ids of the tokens the part names; packed; top (indices into the
    part's vocab, [R * (stop - start) * k] row-major) and probs (uint16, in 1/PROB_SCALE).
    """
    result = run.result
    k = result.top_ids.shape[-1] if k is None else k
    top_ids = result.top_ids[0, :, start:stop, :k]  # [R, columns, k]
    unique, inverse = torch.unique(top_ids.reshape(-1), return_inverse=True)
    texts: dict[int, str] = {}
    flat_strs = [s for row in result.top_strs[0] for column in row[start:stop] for s in column[:k]]
    for index, vocab_index in enumerate(inverse.tolist()):
        texts.setdefault(vocab_index, flat_strs[index])
    top_dtype = "u2" if len(unique) <= 2**16 else "u4"
    # Probabilities in units of 1/65535: finer than the page shows them, at two bytes each.
    probs = result.top_probs[0, :, start:stop, :k].reshape(-1).float().nan_to_num(0.0).clamp(0, 1) * PROB_SCALE
    return {
        "start": start,
        "stop": stop,
        "k": k,
        "vocab": [texts[i] for i in range(len(unique))],
        "vocab_ids": unique.tolist(),
        "packed": {"top": top_dtype, "probs": "u2"},
        "top": _pack(inverse.reshape(-1).numpy(), top_dtype),
        "probs": _pack(probs.round().numpy(), "u2"),
    }


def metric_part(run: LensRun, metric: str) -> dict[str, Any]:
    """One metric of every cell, [R * P] float32 packed: "logit" (the top token's raw logit), "entropy", "kl"."""
    result = run.result
    values = {
        "logit": lambda: result.top_logits[0, :, :, 0],
        "entropy": lambda: result.entropy[0],
        "kl": lambda: result.kl_to_final[0],
    }[metric]()
    return {"metric": metric, "values": _pack(values.reshape(-1).float().numpy(), "f4")}


def _pack(values: Any, dtype: str) -> str:
    return base64.b64encode(values.astype("<" + dtype).tobytes()).decode("ascii")


def unpack_panel(panel: dict[str, Any]) -> dict[str, Any]:
    """A panel of `payload` with its packed arrays as lists (top and probs ints, entropy and kl floats)."""
    import numpy as np

    out = dict(panel)
    for key, dtype in panel.get("packed", {}).items():
        out[key] = np.frombuffer(base64.b64decode(panel[key]), dtype="<" + dtype).tolist()
    out.pop("packed", None)
    return out
