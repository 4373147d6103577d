"""The logit lens and direct logit attribution: what each layer would predict if the model stopped there.

Logit lens (nostalgebraist 2020): a residual stream vector x is read out as the model reads out its last one,

    logits = unembed(ln_final(x))                                   [d_vocab]

for the embedding and for every loaded layer's resid_pre / resid_mid / resid_post. The last loaded layer's
resid_post read-out is the model's own output, so it is taken from the forward pass itself and equals the
model's logits bit for bit. (transformers' `hidden_states[-1]` is already normed: reading it out through the
norm again is the classic logit-lens bug. Every other read-out here starts from a residual stream taken before
any norm, hook_embed or hook_resid_*, and goes through ln_final once.)

The read-outs are never kept as one [read-outs × pos × d_vocab] tensor unless asked (`keep_logits=True`).
Rows (one residual vector each) are taken a chunk at a time, and each chunk sweeps the vocabulary in blocks:
one matmul makes a block of logits, and every metric reads it before the next block replaces it — top-k, the
target's logit and rank, and the block's logsumexp and mean logit, merged across blocks as an online softmax
does (Milakov & Gimelshein 2018, arXiv:1805.02867). No metric needs a second sweep, so the work beyond the
forward pass is the unembedding matmul and about a fifth more on CPU, the metrics' passes over each block
(docs/logit_lens.md, scripts/bench_lens.py).
KL to the final distribution p comes from the same blocks: p's metrics come first, from the model's own logits,
and each read-out q adds up sum_v p(v) logits_q(v) block by block, with p(v) = exp(logits_p(v) - logsumexp(logits_p))
made for the block at hand only, so that

    KL(p || q) = sum_v p log p - sum_v p(v) logits_q(v) + logsumexp(logits_q).

Direct logit attribution: with the final norm's scale s frozen at its value on the full residual stream
(RMSNorm has no mean-centering, so it is linear in x once s is fixed), the target's logit splits exactly
into one term per component that wrote into the residual stream:

    logit(t) = sum_c  c · (W_U[t] * ln_final.weight) / s            c in embed, attn_out_i, mlp_out_i

and each attention output splits further into its heads (`hook_result`).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from .model import HookedLlama

READOUTS = ("embed", "resid_pre", "resid_mid", "resid_post")
DEFAULT_READOUT = ("embed", "resid_post")
# Rows (residual vectors) per chunk. Each chunk sweeps the vocabulary in blocks of VOCAB_BLOCK ids, so a
# chunk holds [DEFAULT_CHUNK_SIZE, VOCAB_BLOCK] logits (4 MB in float32) and the matmul packs each block of
# W_U once per 1024 rows. Measured with scripts/bench_lens.py.
DEFAULT_CHUNK_SIZE = 1024
# Vocabulary ids per block of the sweep on CPU. Each metric is a pass over the block (the exponentials, sums,
# comparisons); in scripts/bench_lens.py on SmolLM2 at 512 tokens (2 CPU threads), (lens - forward) / matmul
# was 1.19 with 1024 ids, 1.26 with 2048 and 1.31 with 4096, the more per-block torch calls notwithstanding.
# Those passes run at about memory speed right after the matmul (docs/logit_lens.md, "Memory and speed").
VOCAB_BLOCK = 1024
# On a GPU each per-block call is a kernel launch, and a block this size is far from filling the device: wider
# blocks there (not tuned).
ACCELERATOR_VOCAB_BLOCK = 4096
# Ids per block in top_k_largest's first cut, which keeps one maximum per block.
TOP_K_BLOCK = 64
# exp(x) = 2 ** (x * LOG2_E): exp2 costs about half of exp on CPU.
LOG2_E = 1.4426950408889634
LN_2 = 0.6931471805599453

Prompt = str | Sequence[str] | torch.Tensor | Sequence[int]
Target = str | int | Sequence[str | int] | Sequence[Sequence[str | int]] | None


# ----------------------------------------------------------------------------------------------- results
@dataclass(repr=False)
class LensResult:
    """What every read-out predicts, at every asked-for position of every prompt.

    Shapes use `n_readouts` (rows of the lens, in forward order: "embed", then per layer "{i}_pre",
    "{i}_mid", "{i}_post" as asked), `n_pos` (the asked-for positions) and `n_targets`.

    Attributes:
        tokens: [batch, pos] input ids (left-padded for a batch of texts).
        attention_mask: [batch, pos] 1 for real tokens, 0 for padding.
        str_tokens: the text of each input token, per prompt.
        positions: [n_pos] indices into the pos axis of `tokens`.
        labels: [n_readouts] e.g. "embed", "3_mid", "3_post".
        layers: [n_readouts] the layer each read-out belongs to ("embed" is layer 0's input).
        readouts: [n_readouts] "embed", "resid_pre", "resid_mid" or "resid_post".
        top_ids, top_probs, top_logits: [batch, n_readouts, n_pos, top_k], most likely first.
        top_strs: the text of `top_ids`, nested [batch][n_readouts][n_pos][top_k].
        entropy: [batch, n_readouts, n_pos] entropy of the read-out's distribution, in nats.
        kl_to_final: [batch, n_readouts, n_pos] KL(final || read-out) in nats: sum_v p_final(v) *
            (log p_final(v) - log p_readout(v)). The final distribution is the model's own output, i.e. the
            read-out of the last loaded layer's resid_post (for a partial model, that of its last layer).
        target_ids: [batch, n_targets] or None.
        target_strs: the text of `target_ids` per prompt, or None.
        target_probs, target_logits: [batch, n_readouts, n_pos, n_targets] or None.
        target_ranks: [batch, n_readouts, n_pos, n_targets] tokens with a strictly higher logit (0 = top).
        logits: [batch, n_readouts, n_pos, d_vocab] when `keep_logits=True`, else None.
    """

    tokens: torch.Tensor
    attention_mask: torch.Tensor
    str_tokens: list[list[str]]
    positions: list[int]
    labels: list[str]
    layers: list[int]
    readouts: list[str]
    top_ids: torch.Tensor
    top_probs: torch.Tensor
    top_logits: torch.Tensor
    top_strs: list[list[list[list[str]]]]
    entropy: torch.Tensor
    kl_to_final: torch.Tensor
    target_ids: torch.Tensor | None = None
    target_strs: list[list[str]] | None = None
    target_probs: torch.Tensor | None = None
    target_logits: torch.Tensor | None = None
    target_ranks: torch.Tensor | None = None
    logits: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    @property
    def n_readouts(self) -> int:
        return len(self.labels)

    @property
    def n_targets(self) -> int:
        return 0 if self.target_ids is None else self.target_ids.shape[1]

    def __repr__(self) -> str:
        targets = "" if self.target_strs is None else f", targets={self.target_strs}"
        return (
            f"LensResult(batch={self.batch}, read-outs={self.labels[0]}..{self.labels[-1]} ({self.n_readouts}), "
            f"positions={len(self.positions)}, top_k={self.top_ids.shape[-1]}{targets})"
        )

    def to_frame(self, kind: str = "summary", *, drop_padding: bool = True) -> pd.DataFrame:
        """A tidy pandas DataFrame.

        Args:
            kind: "summary": one row per prompt × read-out × position (× target when there are several),
                columns prompt, label, layer, readout, position, token, top_token, top_id, top_prob, entropy,
                kl_to_final, and with targets: target, target_id, target_prob, target_logit, target_rank.
                "top_k": one row per prompt × read-out × position × k, columns prompt, label, layer, readout,
                position, token, k, top_token, top_id, top_prob, top_logit.
            drop_padding: leave out rows at padding positions of a left-padded batch.

        Returns:
            The DataFrame; `label` is an ordered categorical (forward order), so sorting and pivoting keep the
            read-outs in order.
        """
        import pandas as pd

        if kind not in ("summary", "top_k"):
            raise ValueError(f"kind must be 'summary' or 'top_k', got {kind!r}")
        batch, n_readouts, n_pos, top_k = self.top_ids.shape
        # Index grids over [batch, n_readouts, n_pos], flattened in that order.
        b, r, p = (g.reshape(-1) for g in torch.meshgrid(
            torch.arange(batch), torch.arange(n_readouts), torch.arange(n_pos), indexing="ij"))  # fmt: skip
        pos = torch.tensor(self.positions, dtype=torch.long)[p]
        base = {
            "prompt": b,
            "label": pd.Categorical([self.labels[i] for i in r.tolist()], categories=self.labels, ordered=True),
            "layer": torch.tensor(self.layers)[r],
            "readout": [self.readouts[i] for i in r.tolist()],
            "position": pos,
            "token": [self.str_tokens[i][j] for i, j in zip(b.tolist(), pos.tolist())],
        }
        keep = self.attention_mask[b, pos].bool() if drop_padding else torch.ones(len(b), dtype=torch.bool)

        if kind == "top_k":
            columns = {name: _repeat(values, top_k) for name, values in base.items()}
            columns["k"] = torch.arange(top_k).repeat(len(b))
            columns["top_token"] = [s for row in _flatten3(self.top_strs) for s in row]
            columns["top_id"] = self.top_ids.reshape(-1)
            columns["top_prob"] = self.top_probs.reshape(-1)
            columns["top_logit"] = self.top_logits.reshape(-1)
            return _frame(columns, _repeat(keep, top_k))

        columns = dict(base)
        columns["top_token"] = [row[0] for row in _flatten3(self.top_strs)]
        columns["top_id"] = self.top_ids[..., 0].reshape(-1)
        columns["top_prob"] = self.top_probs[..., 0].reshape(-1)
        columns["entropy"] = self.entropy.reshape(-1)
        columns["kl_to_final"] = self.kl_to_final.reshape(-1)
        if self.target_ids is None:
            return _frame(columns, keep)
        n_targets = self.n_targets
        # One row per target: repeat every row n_targets times, targets varying fastest.
        columns = {name: _repeat(values, n_targets) for name, values in columns.items()}
        ids = self.target_ids[b].reshape(-1)  # [rows * n_targets]
        columns["target"] = [self.target_strs[i][t] for i in b.tolist() for t in range(n_targets)]
        columns["target_id"] = ids
        columns["target_prob"] = self.target_probs.reshape(-1)
        columns["target_logit"] = self.target_logits.reshape(-1)
        columns["target_rank"] = self.target_ranks.reshape(-1)
        return _frame(columns, _repeat(keep, n_targets))

    def plot(self, metric: str = "prob", **kwargs: Any) -> Figure:
        """The layer × position heatmap with the top token in each cell; see `llama_lens.plot.lens_heatmap`.

        Args:
            metric: colour by "prob" (of the top token), "entropy", "kl", "target_prob" or "rank" (the target's).
        """
        from .plot_lens import lens_heatmap

        return lens_heatmap(self, metric=metric, **kwargs)

    def plot_trajectory(self, **kwargs: Any) -> Figure:
        """The target's probability and rank across read-outs; see `llama_lens.plot.lens_trajectory`."""
        from .plot_lens import lens_trajectory

        return lens_trajectory(self, **kwargs)


@dataclass(repr=False)
class AttributionResult:
    """Each component's direct contribution to the target's logit, under the frozen final-norm scale.

    Attributes:
        tokens, attention_mask, str_tokens, positions, target_ids, target_strs: as in `LensResult`.
        labels: [n_components] "embed", then "{i}_attn" and "{i}_mlp" for each loaded layer.
        layers: [n_components] the layer of each component ("embed" is layer 0's input).
        kinds: [n_components] "embed", "attn" or "mlp".
        components: [batch, n_components, n_pos, n_targets]; they sum to `final_logits`.
        heads: [batch, n_layers, n_heads, n_pos, n_targets] each head's share of its layer's "attn" component
            (the heads sum to it, plus the o_proj bias term for models with `attention_bias`), or None.
        head_layers: [n_layers] the layers of `heads`.
        final_logits: [batch, n_pos, n_targets] the model's logits for the targets, from the run the components
            come from. With `heads=True` attention sums its heads' outputs one by one, which in bfloat16 can
            round a logit one step away from a plain forward's.
        scale: [batch, n_pos] the final norm's scale sqrt(mean(x²) + eps) of the full residual stream, which
            every component is divided by.
    """

    tokens: torch.Tensor
    attention_mask: torch.Tensor
    str_tokens: list[list[str]]
    positions: list[int]
    target_ids: torch.Tensor
    target_strs: list[list[str]]
    labels: list[str]
    layers: list[int]
    kinds: list[str]
    components: torch.Tensor
    heads: torch.Tensor | None
    head_layers: list[int]
    final_logits: torch.Tensor
    scale: torch.Tensor

    def __repr__(self) -> str:
        return (
            f"AttributionResult(batch={self.tokens.shape[0]}, components={len(self.labels)}, "
            f"positions={self.positions}, targets={self.target_strs})"
        )

    def to_frame(self, kind: str = "components") -> pd.DataFrame:
        """A tidy pandas DataFrame.

        Args:
            kind: "components": one row per prompt × component × position × target, columns prompt, label,
                layer, component ("embed" / "attn" / "mlp"), position, token, target, target_id,
                contribution, final_logit. "heads": one row per prompt × layer × head × position × target,
                columns prompt, layer, head, position, token, target, target_id, contribution, final_logit.
        """
        import pandas as pd

        if kind == "components":
            values, names = self.components, ["prompt", "component_index", "pos_index", "target_index"]
        elif kind == "heads":
            if self.heads is None:
                raise ValueError("this result has no per-head contributions; run with heads=True")
            values, names = self.heads, ["prompt", "layer_index", "head", "pos_index", "target_index"]
        else:
            raise ValueError(f"kind must be 'components' or 'heads', got {kind!r}")
        grids = torch.meshgrid(*(torch.arange(n) for n in values.shape), indexing="ij")
        index = dict(zip(names, (g.reshape(-1) for g in grids)))
        b, p, t = index["prompt"], index["pos_index"], index["target_index"]
        pos = torch.tensor(self.positions, dtype=torch.long)[p]
        columns: dict[str, Any] = {"prompt": b}
        if kind == "components":
            c = index["component_index"].tolist()
            columns["label"] = pd.Categorical([self.labels[i] for i in c], categories=self.labels, ordered=True)
            columns["layer"] = [self.layers[i] for i in c]
            columns["component"] = [self.kinds[i] for i in c]
        else:
            columns["layer"] = torch.tensor(self.head_layers)[index["layer_index"]]
            columns["head"] = index["head"]
        columns["position"] = pos
        columns["token"] = [self.str_tokens[i][j] for i, j in zip(b.tolist(), pos.tolist())]
        columns["target"] = [self.target_strs[i][j] for i, j in zip(b.tolist(), t.tolist())]
        columns["target_id"] = self.target_ids[b, t]
        columns["contribution"] = values.reshape(-1)
        columns["final_logit"] = self.final_logits[b, p, t]
        return _frame(columns, None)

    def plot(self, **kwargs: Any) -> Figure:
        """Bars per layer (attention, MLP) and a layer × head heatmap; see `llama_lens.plot.logit_attribution`."""
        from .plot_lens import logit_attribution

        return logit_attribution(self, **kwargs)


# ------------------------------------------------------------------------------------------------ logit lens
def logit_lens(
    model: HookedLlama,
    prompt_or_tokens: Prompt,
    target: Target = None,
    *,
    readout: str | Sequence[str] = DEFAULT_READOUT,
    positions: int | Sequence[int] | None = None,
    top_k: int = 5,
    keep_logits: bool = False,
    chunk_size: int | None = None,
    layers: Sequence[int] | None = None,
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
        positions: token positions to read out (indices into the pos axis; negative counts from the end);
            default all. Only these positions of the residual streams and of the model's logits are kept.
        top_k: how many most likely tokens to keep per read-out.
        keep_logits: also keep every read-out's logits, [batch, n_readouts, n_pos, d_vocab] (large).
        chunk_size: residual vectors per chunk (default `DEFAULT_CHUNK_SIZE`); each chunk sweeps the
            vocabulary in blocks of `VOCAB_BLOCK` ids (`ACCELERATOR_VOCAB_BLOCK` on a GPU). Memory: the model's
            logits at the asked-for positions [batch * n_pos, d_vocab] and the read-out residual vectors
            [batch * n_pos * n_readouts, d_model] (with their normed copy), plus a few [chunk_size, VOCAB_BLOCK]
            blocks whatever the prompt length (one more for each further vocabulary block that holds a target).
        layers: which loaded layers to read out (default all loaded layers).

    Returns:
        A LensResult.

    Raises:
        ValueError: for an unknown read-out, a position out of range, a layer that is not loaded, or a target
            that is not a single token.
    """
    _check_runs_from_tokens(model, "logit_lens")
    tokens, attention_mask = _tokenize(model, prompt_or_tokens)
    batch, n_tokens = tokens.shape
    points = _readout_points(model, readout, layers)
    pos_index = _positions(positions, n_tokens)
    target_ids = _targets(model, target, batch)
    k = _integer(top_k)
    if k is None or not 1 <= k <= model.cfg.d_vocab:
        raise ValueError(f"top_k must be an integer between 1 and d_vocab ({model.cfg.d_vocab}), got {top_k!r}")
    top_k = k
    chunk_size = DEFAULT_CHUNK_SIZE if chunk_size is None else int(chunk_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")

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
        # `_read_out` reads it out once.
        if not previous or tensor is not previous[0]:
            kept = tensor if every_position else tensor[:, pos_index]
            previous[:] = [tensor, kept.flatten(0, 1)]
        resid[hook.name] = previous[1]

    with torch.inference_mode():
        final_logits = model.run_with_hooks(
            tokens, attention_mask=attention_mask, fwd_hooks=[(names, capture)] if names else []
        )
        previous.clear()
        # [batch * n_pos, d_vocab]: a view when every position is asked for, else a copy, and the model's full
        # logits are let go.
        final_rows = final_logits.flatten(0, 1) if every_position else final_logits[:, pos_index].flatten(0, 1)
        del final_logits
        row_targets = None if target_ids is None else target_ids.to(final_rows.device).repeat_interleave(n_pos, 0)
        metrics = _read_out(model, final_rows, resid, final_hook, row_targets, top_k, keep_logits, chunk_size)

    order = [metrics[hook] for _, _, _, hook in points]

    def stacked(field: str) -> torch.Tensor | None:
        # n_readouts x [batch * n_pos, ...] -> [batch, n_readouts, n_pos, ...]; made outside inference_mode,
        # so these are ordinary tensors that users may change in place.
        parts = [getattr(m, field) for m in order]
        if parts[0] is None:
            return None
        value = torch.stack(parts, dim=1)  # [batch * n_pos, n_readouts, ...]
        return value.unflatten(0, (batch, n_pos)).transpose(1, 2).cpu()

    top_ids = stacked("top_ids")
    texts = _token_texts(model, top_ids.unique().tolist() + tokens.unique().tolist())
    target_strs = None
    if target_ids is not None:
        texts |= _token_texts(model, target_ids.unique().tolist())
        target_strs = [[texts[i] for i in row] for row in target_ids.tolist()]
    return LensResult(
        tokens=tokens.cpu(),
        attention_mask=attention_mask.cpu(),
        str_tokens=[[texts[i] for i in row] for row in tokens.tolist()],
        positions=pos_index,
        labels=[label for label, _, _, _ in points],
        layers=[layer for _, layer, _, _ in points],
        readouts=[kind for _, _, kind, _ in points],
        top_ids=top_ids,
        top_probs=stacked("top_probs"),
        top_logits=stacked("top_logits"),
        top_strs=[[[[texts[i] for i in ks] for ks in row] for row in prompt] for prompt in top_ids.tolist()],
        entropy=stacked("entropy"),
        kl_to_final=stacked("kl"),
        target_ids=None if target_ids is None else target_ids.cpu(),
        target_strs=target_strs,
        target_probs=stacked("target_probs"),
        target_logits=stacked("target_logits"),
        target_ranks=stacked("target_ranks"),
        logits=stacked("logits"),
    )


def _read_out(
    model: HookedLlama,
    final_rows: torch.Tensor,
    resid: dict[str, torch.Tensor],
    final_hook: str,
    row_targets: torch.Tensor | None,
    top_k: int,
    keep_logits: bool,
    chunk_size: int,
) -> dict[str, _Metrics]:
    """The fused pass: hook name -> metrics of its read-out, one row per (prompt, position).

    Args:
        final_rows: [n_rows, d_vocab] the model's own logits at the asked-for positions.
        resid: hook name -> [n_rows, d_model] residual stream (the final hook's excluded; hooks that name the
            same tensor object are read out once).
        final_hook: the hook whose read-out `final_rows` is.
        row_targets: [n_rows, n_targets] or None.
        chunk_size: residual vectors per chunk (each chunk sweeps the vocabulary in blocks of `VOCAB_BLOCK`
            ids on CPU, `ACCELERATOR_VOCAB_BLOCK` elsewhere).
    """
    n_rows, d_vocab = final_rows.shape
    device = final_rows.device
    weight = model.unembed.weight  # [d_vocab, d_model]
    n_targets = 0 if row_targets is None else row_targets.shape[1]
    same_as: dict[str, str] = {}
    first_with: dict[int, str] = {}
    for hook, tensor in resid.items():
        same_as[hook] = first_with.setdefault(id(tensor), hook)
    computed = list(first_with.values())
    n_readouts = len(computed)
    vocab_block = VOCAB_BLOCK if device.type == "cpu" else ACCELERATOR_VOCAB_BLOCK
    scratch = _Scratch(min(chunk_size, n_rows * max(n_readouts, 1)) * min(vocab_block, d_vocab), device)

    # The final distribution first: every read-out's KL needs its logsumexp and entropy. Its blocks are views
    # of the model's logits, with nothing to compute but the metrics, so they are as wide as the scratch
    # allows (whole rows for a short prompt): fewer, larger torch calls.
    final_chunk = min(chunk_size, n_rows)
    width = max(vocab_block, scratch.size // final_chunk // vocab_block * vocab_block)
    blocks = _blocks(d_vocab, width)
    keep = (d_vocab, final_rows.dtype) if keep_logits else None
    final = _Metrics.empty(n_rows, top_k, n_targets, device, logits=keep)
    for start in range(0, n_rows, final_chunk):
        rows = slice(start, min(start + final_chunk, n_rows))
        logits = final_rows[rows]
        state = _Online(len(logits), top_k, None if row_targets is None else row_targets[rows], width, device)
        _sweep(state, blocks, lambda v0, v1, slot: logits[:, v0:v1], scratch)
        state.finish_into(final, rows)
        if final.logits is not None:
            final.logits[rows] = logits
    final.kl.zero_()  # KL(p || p): the same logits, not merely close ones
    results = {final_hook: final}
    if not computed:
        return results

    # [n_rows * n_readouts, d_model], position-major (row j, read-out k at j * n_readouts + k), so that a chunk
    # of whole positions is one range. Normed through the model's own ln_final, as the final read-out was: hooks
    # on ln_final fire here too, once, on [n_rows, n_readouts, d_model].
    normed = model.ln_final(torch.stack([resid[hook] for hook in computed], dim=1)).flatten(0, 1)
    blocks = _blocks(d_vocab, vocab_block)
    keep = (d_vocab, weight.dtype) if keep_logits else None
    metrics = _Metrics.empty(n_rows * n_readouts, top_k, n_targets, device, logits=keep)
    for j0, j1, k0, k1 in _chunks(n_readouts, n_rows, chunk_size):
        # Read-outs k0..k1 at rows j0..j1: rows j * n_readouts + k of `normed`, a contiguous range.
        rows = slice(j0 * n_readouts + k0, (j1 - 1) * n_readouts + k1)
        x = normed[rows]  # [chunk, d_model], a view
        n_j, n_k = j1 - j0, k1 - k0
        targets = None if row_targets is None else row_targets[j0:j1].repeat_interleave(n_k, 0)
        state = _Online(len(x), top_k, targets, vocab_block, device)
        cross = torch.zeros(n_j, n_k, device=device)  # sum_v p_final(v) logits(v)
        final_mass = torch.zeros(n_j, device=device)  # sum_v p_final(v): 1 but for rounding

        def unembed(v0: int, v1: int, slot: int) -> torch.Tensor:
            return torch.mm(x, weight[v0:v1].t(), out=scratch.get(f"logits{slot}", len(x), v1 - v0, weight.dtype))

        def take(logits: torch.Tensor, block: torch.Tensor, v0: int, v1: int) -> None:
            # p_final for this block from the final logits and their logsumexp: one [n_j, width] block, shared
            # by the chunk's read-outs, instead of a [n_rows, d_vocab] array of probabilities kept throughout.
            final_probs = scratch.get("final_probs", n_j, v1 - v0)
            torch.sub(final_rows[j0:j1, v0:v1], final.lse[j0:j1, None], out=final_probs).exp_()
            final_mass.add_(final_probs.sum(dim=1))
            spent = scratch.get("probs", len(block), v1 - v0).view(n_j, n_k, v1 - v0)
            torch.mul(block.view(n_j, n_k, v1 - v0), final_probs[:, None], out=spent)
            cross.add_(spent.sum(dim=-1))
            if metrics.logits is not None:
                metrics.logits[rows, v0:v1] = logits

        _sweep(state, blocks, unembed, scratch, take)
        state.finish_into(metrics, rows)
        # KL(final || read-out) = sum_v p log p - sum_v p(v) logits(v) + logsumexp(read-out logits). p sums to
        # 1 but for the rounding of its logsumexp, which, times logits of 200, would be 3e-3 of KL's nats.
        cross /= final_mass[:, None]
        kl = metrics.lse[rows].view(n_j, n_k) - cross - final.entropy[j0:j1, None]
        metrics.kl[rows] = kl.clamp_(min=0).flatten()
    for k, hook in enumerate(computed):
        results[hook] = metrics.column(k, n_readouts)
    for hook, canonical in same_as.items():
        results[hook] = results[canonical]
    return results


def _blocks(d_vocab: int, width: int) -> list[tuple[int, int]]:
    return [(v0, min(v0 + width, d_vocab)) for v0 in range(0, d_vocab, width)]


def _chunks(n_readouts: int, n_rows: int, chunk_size: int) -> list[tuple[int, int, int, int]]:
    """(j0, j1, k0, k1): rows j0..j1 × read-outs k0..k1, about `chunk_size` vectors each. Every read-out of
    whole rows when they fit (so each block of the final distribution serves all the read-outs, and a short
    prompt's chunk mixes read-outs, as one read-out of 29 rows makes a poor matmul), else slices of one row's
    read-outs; either way one contiguous range of position-major vectors."""
    if n_readouts <= chunk_size:
        n_chunks = -(-n_rows // (chunk_size // n_readouts))
        per_chunk = -(-n_rows // n_chunks)  # evened out: no small last chunk making a poor matmul
        return [(j, min(j + per_chunk, n_rows), 0, n_readouts) for j in range(0, n_rows, per_chunk)]
    return [
        (j, j + 1, k, min(k + chunk_size, n_readouts)) for j in range(n_rows) for k in range(0, n_readouts, chunk_size)
    ]


def _sweep(
    state: _Online,
    blocks: list[tuple[int, int]],
    logits_of: Callable[[int, int, int], torch.Tensor],
    scratch: _Scratch,
    take: Callable[[torch.Tensor, torch.Tensor, int, int], None] | None = None,
) -> None:
    """Feeds `state` the logits of every vocabulary block, `logits_of(v0, v1, slot)`; `take(logits, float32
    logits, v0, v1)` sees each block too.

    A rank counts the tokens whose logit is strictly above the target's, and the target's logit must be the
    one its own block computes (a float32 dot product differs from a bfloat16 block's rounded logit, and ties
    are common in bfloat16). So the blocks that hold a target come first; all but the last of them stay in
    their own slots (1, 2, ...) until every target's logit is in, then they are counted, and so is every
    block after them as it comes (slot 0).
    """
    first = state.target_blocks
    n_held = max(len(first) - 1, 0)
    order = first + [b for b in range(len(blocks)) if b not in set(first)]
    held = []
    for i, b in enumerate(order):
        v0, v1 = blocks[b]
        logits = logits_of(v0, v1, i + 1 if i < n_held else 0)
        block = state.update(logits, v0, scratch)
        if take is not None:
            take(logits, block, v0, v1)
        if i < n_held:
            held.append(logits)
            continue
        for earlier in held:
            state.count_above(earlier, scratch)
        held.clear()
        state.count_above(block, scratch)


class _Scratch:
    """Buffers every block reuses, by name: fresh [chunk, block] tensors would be fresh pages to fault in each
    time. Each holds `size` elements; only what is used is ever touched."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.size, self.device = size, device
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, rows: int, width: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        buffer = self.buffers.get(name)
        if buffer is None or buffer.dtype != dtype:
            buffer = self.buffers[name] = torch.empty(self.size, dtype=dtype, device=self.device)
        return buffer[: rows * width].view(rows, width)


class _Online:
    """Metrics of a chunk of rows over the vocabulary, a block at a time: each block leaves its own logsumexp
    and mean logit and its count of tokens above each target, and updates the running top-k; `finish_into`
    merges the blocks as an online softmax would (Milakov & Gimelshein 2018). Per-block work is kept to few
    torch calls, as each call's fixed cost adds up over rows × blocks."""

    def __init__(
        self, n_rows: int, top_k: int, targets: torch.Tensor | None, width: int, device: torch.device
    ) -> None:  # fmt: skip
        """`width`: ids per block (the last block may be shorter)."""
        self.top_k = top_k
        self.row_base = torch.arange(n_rows, device=device)[:, None]  # for top_k_largest
        self.top_values: torch.Tensor | None = None  # [rows, <= top_k], largest first
        self.top_ids: torch.Tensor | None = None
        self.block_lse: list[torch.Tensor] = []  # [rows] per block
        self.block_expected: list[torch.Tensor] = []  # [rows] per block: sum_v p_block(v) logits(v)
        self.targets, self.width = targets, width
        self.target_blocks: list[int] = []  # the vocabulary blocks that hold a target, ascending
        if targets is not None:
            self.target_block = targets // width  # which block holds each target, and where
            self.target_offset = targets % width
            self.target_blocks = sorted(set(self.target_block.flatten().tolist()))
            self.target_logits = torch.zeros(targets.shape, device=device)
            self.above = torch.zeros(targets.shape, device=device)  # tokens with a higher logit, so far

    def update(self, logits: torch.Tensor, v0: int, scratch: _Scratch) -> torch.Tensor:
        """Takes in logits [rows, width] of ids v0 .. v0 + width (blocks come in any order); returns them in
        float32. Ranks are counted apart, by `count_above`."""
        rows, width = logits.shape
        # Metrics in float32 whatever the model's dtype (into a reused buffer: a fresh one would be fresh pages).
        block = logits if logits.dtype == torch.float32 else scratch.get("float_logits", rows, width).copy_(logits)
        block_max = self._update_top_k(block, v0)
        # exp(logits - max) = 2 ** (logits * log2(e) - shift), the shift being the maximum in log2 units: one
        # fused multiply-add pass makes the exponents and exp2_ takes them in place. No softmax, whose division
        # by the sum would be one more pass over the block.
        shift = block_max * LOG2_E
        weights = scratch.get("probs", rows, width)
        torch.add(-shift[:, None], block, alpha=LOG2_E, out=weights).exp2_()  # largest 1, so the sum is >= 1
        total = weights.sum(dim=1)
        self.block_lse.append((shift + total.log2()) * LN_2)
        self.block_expected.append(torch.mul(weights, block, out=weights).sum(dim=1) / total)  # spent now
        if v0 // self.width in self.target_blocks:
            found = block.gather(1, self.target_offset.clamp(max=width - 1))
            self.target_logits = torch.where(self.target_block == v0 // self.width, found, self.target_logits)
        return block

    def count_above(self, block: torch.Tensor, scratch: _Scratch) -> None:
        """Counts the tokens of a block [rows, width] (any float dtype) whose logit is strictly above each
        target's; every target's logit must be in by then (see `_sweep`)."""
        if self.targets is None:
            return
        # Comparisons written as 0.0 / 1.0 into the spent scratch: several times faster to write and to sum
        # than bools, and float32 counts exactly up to 2**24.
        spent = scratch.get("probs", *block.shape)
        for t in range(self.targets.shape[1]):
            self.above[:, t] += torch.gt(block, self.target_logits[:, t : t + 1], out=spent).sum(dim=1)

    def _update_top_k(self, block: torch.Tensor, v0: int) -> torch.Tensor:
        """Merges the block into the running top-k; returns the block's maximum [rows]."""
        rows, width = block.shape
        k = min(self.top_k, width)
        # Until top_k tokens have come by (the first block may be a short last one), every row merges.
        if self.top_values is None or self.top_values.shape[1] < self.top_k:
            values, ids = top_k_largest(block, k, self.row_base)
            self._merge(values, ids + v0, None)
            return values[:, 0]
        # A block changes a row's top-k only where its maximum beats the row's k-th best so far. After the
        # first blocks that is rare, so only those rows are searched.
        block_max = block.amax(dim=1)
        hit = (block_max > self.top_values[:, -1]).nonzero()[:, 0]
        if len(hit) == rows:
            values, ids = top_k_largest(block, k, self.row_base)
            self._merge(values, ids + v0, None)
        elif len(hit):
            values, ids = top_k_largest(block.index_select(0, hit), k)
            self._merge(values, ids + v0, hit)
        return block_max

    def _merge(self, values: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor | None) -> None:
        if self.top_values is None:
            self.top_values, self.top_ids = values, ids
            return
        old_values = self.top_values if rows is None else self.top_values[rows]
        old_ids = self.top_ids if rows is None else self.top_ids[rows]
        both = torch.cat([old_values, values], dim=1)
        merged, best = both.topk(min(self.top_k, both.shape[1]), dim=1)
        merged_ids = torch.cat([old_ids, ids], dim=1).gather(1, best)
        if rows is None:
            self.top_values, self.top_ids = merged, merged_ids
        else:
            self.top_values[rows], self.top_ids[rows] = merged, merged_ids

    def finish_into(self, metrics: _Metrics, rows: slice) -> None:
        """Writes the chunk's metrics."""
        block_lse = torch.stack(self.block_lse, dim=1)  # [rows, n_blocks]
        lse = block_lse.logsumexp(dim=1)
        shares = (block_lse - lse[:, None]).exp()
        # sum_v p(v) logits(v). Divided by the shares' sum, which is 1 but for lse's rounding: at logits of 200
        # that rounding (1.5e-5) times the logits would be 3e-3 of the entropy's nats.
        expected = (shares * torch.stack(self.block_expected, dim=1)).sum(dim=1) / shares.sum(dim=1)
        metrics.lse[rows] = lse
        metrics.top_ids[rows] = self.top_ids
        metrics.top_logits[rows] = self.top_values
        metrics.top_probs[rows] = (self.top_values - lse[:, None]).exp()
        metrics.entropy[rows] = (lse - expected).clamp(min=0)
        if self.targets is not None:
            metrics.target_logits[rows] = self.target_logits
            metrics.target_probs[rows] = (self.target_logits - lse[:, None]).exp()
            metrics.target_ranks[rows] = self.above.long()


class _Metrics:
    """Per-row outputs, preallocated and filled a chunk at a time."""

    def __init__(self, **fields: torch.Tensor | None) -> None:
        self.__dict__.update(fields)

    @classmethod
    def empty(
        cls, n_rows: int, top_k: int, n_targets: int, device: torch.device, *,
        logits: tuple[int, torch.dtype] | None = None,
    ) -> _Metrics:  # fmt: skip
        """`logits`: (d_vocab, dtype) to keep every logit."""

        def new(*shape, dtype=torch.float32):
            return torch.empty(n_rows, *shape, dtype=dtype, device=device)

        return cls(
            top_ids=new(top_k, dtype=torch.long),
            top_probs=new(top_k),
            top_logits=new(top_k),
            lse=new(),
            entropy=new(),
            kl=new(),
            target_probs=new(n_targets) if n_targets else None,
            target_logits=new(n_targets) if n_targets else None,
            target_ranks=new(n_targets, dtype=torch.long) if n_targets else None,
            logits=new(logits[0], dtype=logits[1]) if logits is not None else None,
        )

    def column(self, k: int, n_readouts: int) -> _Metrics:
        """Read-out k's rows of position-major metrics (row j at j * n_readouts + k), as strided views."""
        return _Metrics(**{
            name: None if v is None else v.unflatten(0, (-1, n_readouts))[:, k] for name, v in self.__dict__.items()
        })  # fmt: skip


def top_k_largest(
    logits: torch.Tensor, k: int, row_base: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.topk(logits, k, dim=-1)` for logits [rows, d_vocab], a few times faster when k is small.

    The k largest values lie in the k blocks (of `TOP_K_BLOCK` ids) with the largest maxima: a block outside
    them has k blocks whose maxima all beat its own. So one cheap max per block narrows the search to k
    blocks. Values equal those of torch.topk; among tied values the ids may differ.

    Args:
        logits: [rows, d_vocab].
        k: how many.
        row_base: `arange(rows)[:, None]`, if the caller has it at hand.

    Returns:
        values [rows, k] (largest first) and their ids [rows, k].
    """
    rows, d_vocab = logits.shape
    n_blocks = d_vocab // TOP_K_BLOCK
    if n_blocks < 4 * k:
        return logits.topk(k, dim=-1)
    body = logits[:, : n_blocks * TOP_K_BLOCK].view(rows, n_blocks, TOP_K_BLOCK)
    best_blocks = body.amax(dim=-1).topk(k, dim=-1).indices  # [rows, k]
    if row_base is None:
        row_base = torch.arange(rows, device=logits.device)[:, None]
    # Row r's block b is row r * n_blocks + b of the [rows * n_blocks, TOP_K_BLOCK] view (a copy only when
    # `logits` is a strided view, as for the model's own logits).
    flat = (row_base * n_blocks + best_blocks).flatten()
    candidates = body.reshape(rows * n_blocks, TOP_K_BLOCK).index_select(0, flat).view(rows, k * TOP_K_BLOCK)
    tail = d_vocab - n_blocks * TOP_K_BLOCK
    if tail:  # the ids past the last whole block are candidates too
        candidates = torch.cat([candidates, logits[:, n_blocks * TOP_K_BLOCK :]], dim=1)
    values, picked = candidates.topk(k, dim=-1)
    if tail:
        in_tail = picked >= k * TOP_K_BLOCK
        block = best_blocks.gather(1, (picked // TOP_K_BLOCK).clamp(max=k - 1))
        in_blocks = block * TOP_K_BLOCK + picked % TOP_K_BLOCK
        ids = torch.where(in_tail, picked - k * TOP_K_BLOCK + n_blocks * TOP_K_BLOCK, in_blocks)
    else:
        ids = best_blocks.gather(1, picked // TOP_K_BLOCK) * TOP_K_BLOCK + picked % TOP_K_BLOCK
    return values, ids


# ------------------------------------------------------------------------------------ direct logit attribution
def direct_logit_attribution(
    model: HookedLlama,
    prompt_or_tokens: Prompt,
    target: Target,
    *,
    positions: int | Sequence[int] | None = -1,
    heads: bool = True,
) -> AttributionResult:
    """Splits the target's logit into the direct contributions of the embedding, each layer's attention and MLP
    output, and each attention head.

    The final norm's scale s = sqrt(mean(x²) + eps) is taken from the real forward pass
    (`ln_final.hook_scale` on the full residual stream) and held fixed; every component c then contributes
    c · (W_U[target] * ln_final.weight) / s, and these sum to the model's logit for the target (up to float
    rounding). A component's term is what it adds to the logit directly, not through later layers.

    Args:
        model: a HookedLlama (a partial model attributes over its loaded layers; its output is the sum).
        prompt_or_tokens: as in `logit_lens`.
        target: as in `logit_lens`; required.
        positions: where to attribute (default the last position, where the next token is predicted);
            None for all.
        heads: also split attention outputs per head (computes `hook_result`, [batch, pos, n_heads, d_model]
            per layer, and keeps only its projection).

    Returns:
        An AttributionResult.
    """
    _check_runs_from_tokens(model, "direct_logit_attribution")
    tokens, attention_mask = _tokenize(model, prompt_or_tokens)
    batch, n_tokens = tokens.shape
    pos_index = _positions(positions, n_tokens)
    target_ids = _targets(model, target, batch)
    if target_ids is None:
        raise ValueError("direct_logit_attribution needs a target, e.g. target=' Paris'")
    layers = model.layer_indices
    device = model.unembed.weight.device
    index = torch.tensor(pos_index, dtype=torch.long, device=device)
    # no_grad rather than inference_mode: the results are handed to users, who may scale or patch them in
    # place, which inference tensors refuse outside inference_mode.
    with torch.no_grad():
        # [batch, n_targets, d_model]: the target's unembedding row times the final norm's weight, multiplied in
        # float32 (a bfloat16 product would round every element to 8 bits before the sum).
        directions = model.unembed.weight[target_ids.to(device)].float() * model.ln_final.weight.float()
    projected: dict[str, torch.Tensor] = {}

    def project(tensor: torch.Tensor, *, hook) -> None:
        picked = tensor[:, index].float()  # [batch, n_pos, d_model] or [batch, n_pos, n_heads, d_model]
        if picked.dim() == 4:
            projected[hook.name] = torch.einsum("bphd,btd->bhpt", picked, directions)
        else:
            projected[hook.name] = torch.einsum("bpd,btd->bpt", picked, directions)

    def keep_scale(tensor: torch.Tensor, *, hook) -> None:
        projected[hook.name] = tensor[:, index, 0].float()  # [batch, n_pos]

    names = ["hook_embed"] + [f"blocks.{i}.hook_{part}_out" for i in layers for part in ("attn", "mlp")]
    if heads:
        names += [f"blocks.{i}.attn.hook_result" for i in layers]
    with torch.no_grad():
        logits = model.run_with_hooks(
            tokens,
            attention_mask=attention_mask,
            fwd_hooks=[(names, project), ("ln_final.hook_scale", keep_scale)],
        )
        scale = projected["ln_final.hook_scale"]  # [batch, n_pos]
        divide = scale[:, :, None]
        labels, comp_layers, kinds = ["embed"], [0], ["embed"]
        parts = [projected["hook_embed"] / divide]
        for i in layers:
            for part in ("attn", "mlp"):
                labels.append(f"{i}_{part}")
                comp_layers.append(i)
                kinds.append(part)
                parts.append(projected[f"blocks.{i}.hook_{part}_out"] / divide)
        components = torch.stack(parts, dim=1)  # [batch, n_components, n_pos, n_targets]
        head_values = None
        if heads and layers:
            # [batch, n_layers, n_heads, n_pos, n_targets]
            head_values = torch.stack([projected[f"blocks.{i}.attn.hook_result"] for i in layers], dim=1)
            head_values = head_values / scale[:, None, None, :, None]
        target_index = target_ids.to(device)[:, None, :].expand(-1, len(pos_index), -1)  # [batch, n_pos, n_targets]
        final_logits = logits[:, index].float().gather(-1, target_index)

    texts = _token_texts(model, tokens.unique().tolist() + target_ids.unique().tolist())
    return AttributionResult(
        tokens=tokens.cpu(),
        attention_mask=attention_mask.cpu(),
        str_tokens=[[texts[i] for i in row] for row in tokens.tolist()],
        positions=pos_index,
        target_ids=target_ids.cpu(),
        target_strs=[[texts[i] for i in row] for row in target_ids.tolist()],
        labels=labels,
        layers=comp_layers,
        kinds=kinds,
        components=components.cpu(),
        heads=None if head_values is None else head_values.cpu(),
        head_layers=list(layers) if heads else [],
        final_logits=final_logits.cpu(),
        scale=scale.cpu(),
    )


# --------------------------------------------------------------------------------------------- arguments
def _check_runs_from_tokens(model: HookedLlama, what: str) -> None:
    # A model loaded from a later layer on runs only from a residual stream (forward's resid=), which the
    # lens does not take: say so here rather than in forward's advice about arguments the lens has not got.
    loaded = model.layer_indices
    if loaded and loaded[0] != 0:
        raise ValueError(
            f"this model holds layers {loaded[0]}..{loaded[-1]} only; {what} runs the model from the tokens, which "
            f"needs every layer from 0: load it with layers=range(0, {loaded[-1] + 1})"
        )


def _tokenize(model: HookedLlama, prompt_or_tokens: Prompt) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [batch, pos] on the model's device and attention_mask [batch, pos] (1 = real token)."""
    tokens, mask = model.prepare_tokens(prompt_or_tokens)
    return tokens, (torch.ones_like(tokens) if mask is None else mask.long())


def _readout_points(
    model: HookedLlama, readout: str | Sequence[str], layers: Sequence[int] | None
) -> list[tuple[str, int, str, str]]:
    """(label, layer, kind, hook name) for each read-out, in forward order."""
    kinds = [readout] if isinstance(readout, str) else list(readout)
    unknown = [k for k in kinds if k not in READOUTS]
    if unknown or not kinds:
        raise ValueError(f"unknown read-out {unknown or kinds!r}; choose from {list(READOUTS)} (or a list of them)")
    loaded = model.layer_indices
    if layers is None:
        layers = loaded
    else:
        layers = sorted(set(int(i) for i in layers))
        missing = [i for i in layers if i not in loaded]
        if missing:
            raise ValueError(f"layers {missing} are not loaded; this model holds layers {loaded}")
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


def _integer(value: Any) -> int | None:
    """`value` as an int when it is one: a Python int, a numpy integer, a 0-d integer tensor (not a bool)."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _positions(positions: int | Sequence[int] | None, n_tokens: int) -> list[int]:
    """Non-negative indices into the pos axis."""
    if positions is None:
        return list(range(n_tokens))
    if _integer(positions) is not None:
        items = [positions]
    elif isinstance(positions, torch.Tensor):
        items = positions.flatten().tolist()
    else:
        items = list(positions)
    if not items:
        raise ValueError("positions is empty; pass None for all positions")
    out = []
    for item in items:
        p = _integer(item)
        if p is None:
            raise ValueError(f"positions must be ints, got {item!r}")
        if not -n_tokens <= p < n_tokens:
            raise ValueError(f"position {p} is out of range for a prompt of {n_tokens} tokens")
        out.append(p % n_tokens)
    return out


def _targets(model: HookedLlama, target: Target, batch: int) -> torch.Tensor | None:
    """target ids [batch, n_targets] (a shared target repeated for every prompt), or None."""
    if target is None:
        return None
    if _single(target):  # one target shared by every prompt
        rows = [[target]] * batch
    else:
        items = target.tolist() if isinstance(target, torch.Tensor) else list(target)
        if len(items) != batch:
            raise ValueError(
                f"got {len(items)} targets for {batch} prompt(s): pass one target shared by all prompts, one per "
                f"prompt, or one list of targets per prompt (e.g. [[' Paris', ' London']])"
            )
        rows = [[item] if _single(item) else list(item) for item in items]
        if len({len(row) for row in rows}) != 1 or not rows[0]:
            raise ValueError("every prompt needs the same (non-zero) number of targets")
    return torch.tensor([[_target_id(model, t) for t in row] for row in rows], dtype=torch.long)


def _single(target: Any) -> bool:
    """One target, not a list of them: text, a number (refused later unless an id) or a 0-d tensor."""
    return isinstance(target, str) or not hasattr(target, "__len__") or (torch.is_tensor(target) and target.dim() == 0)


def _target_id(model: HookedLlama, target: Any) -> int:
    if isinstance(target, str):
        if model.tokenizer is None:
            raise ValueError(f"target {target!r} is text but this model has no tokenizer; pass a token id")
        return int(model.tokenizer.id_of(target))
    token_id = _integer(target)
    if token_id is not None:
        if not 0 <= token_id < model.cfg.d_vocab:
            raise ValueError(f"target id {token_id} is out of range [0, d_vocab={model.cfg.d_vocab})")
        return token_id
    raise ValueError(f"a target is a token's text or id, got {type(target).__name__} {target!r}")


def _token_texts(model: HookedLlama, ids: Sequence[int]) -> dict[int, str]:
    """id -> the text of that token; "<id>" where there is no tokenizer or the id is past its vocabulary."""
    ids = sorted(set(int(i) for i in ids))
    tokenizer = model.tokenizer
    known = [i for i in ids if tokenizer is not None and i < getattr(tokenizer, "vocab_size", 0)]
    texts = dict(zip(known, tokenizer.token_strs(known))) if known else {}
    return {i: texts.get(i, f"<{i}>") for i in ids}


# ----------------------------------------------------------------------------------------------- frames
def _repeat(values: Any, times: int) -> Any:
    """Each value `times` times in a row (values: tensor, list or pandas Categorical)."""
    if times == 1:
        return values
    if isinstance(values, torch.Tensor):
        return values.repeat_interleave(times)
    if hasattr(values, "categories"):
        import pandas as pd

        codes = values.codes.repeat(times)  # numpy's repeat: each code `times` times in a row
        return pd.Categorical.from_codes(codes, categories=values.categories, ordered=values.ordered)
    return [v for v in values for _ in range(times)]


def _flatten3(nested: list) -> list:
    return [row for prompt in nested for readout in prompt for row in readout]


def _frame(columns: dict[str, Any], keep: torch.Tensor | None) -> pd.DataFrame:
    import pandas as pd

    frame = pd.DataFrame({k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in columns.items()})
    if keep is not None and not bool(keep.all()):
        frame = frame[keep.tolist()].reset_index(drop=True)
    return frame
