"""The read-out engine: residual vectors, already normed, through the unembedding to per-row metrics.

It needs no model, only tensors: `read_out(normed, unembed_weight, final_logits, targets, top_k=)` gives each
row's top-k tokens (ids, logits, probabilities), the entropy of its distribution, its KL divergence from the
final distribution, and its targets' logits, probabilities and ranks. The logit lens (lens.py) feeds it the
model's residual streams through ln_final; a translator (a tuned lens) applied before the norm changes its
input, not the engine.

The read-outs are never kept as one [rows × d_vocab] tensor unless asked (`keep_logits=True`). Rows are taken a
chunk at a time, and each chunk sweeps the vocabulary in blocks: one matmul makes a block of logits, and every
metric reads it before the next block replaces it — top-k, the target's logit and rank, and the block's
logsumexp and mean logit, merged across blocks as an online softmax does (Milakov & Gimelshein 2018,
arXiv:1805.02867). No metric needs a second sweep, so the work beyond the matmul is about a fifth more on
CPU, the metrics' passes over each block (docs/logit_lens.md, scripts/bench_lens.py).

KL to the final distribution p comes from the same blocks: p's metrics come first, from the final logits, and
each read-out q adds up sum_v p(v) logits_q(v) block by block, with p(v) = exp(logits_p(v) - logsumexp(logits_p))
made for the block at hand only, so that

    KL(p || q) = sum_v p log p - sum_v p(v) logits_q(v) + logsumexp(logits_q).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from dataclasses import fields

import torch

from ..errors import ArgumentError
from ..model.cpu_matmul import computes_in_float32
from ..validate import check_count
from .readout_metrics import ReadoutMetrics
from .readout_online import (  # noqa: F401  (LOG2_E: scripts/bench_lens.py)
    EXP_SAFE_MAX,
    LN_2,
    LOG2_E,
    OnlineMetrics,
    Scratch,
    target_blocks_of,
)

__all__ = ["ReadoutMetrics", "read_out"]

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


def read_out(
    normed: torch.Tensor,
    unembed_weight: torch.Tensor,
    *,
    final_logits: torch.Tensor,
    targets: torch.Tensor | None = None,
    top_k: int = 5,
    keep_logits: bool = False,
    chunk_size: int | None = None,
) -> tuple[ReadoutMetrics, ReadoutMetrics]:
    """Metrics of every read-out `normed @ unembed_weight.T`, and of the final distribution they are compared to.

    Args:
        normed: [n_rows, n_readouts, d_model] residual vectors already through the final norm (or [n_rows,
            d_model], one read-out per row); row j's read-outs are compared with row j of `final_logits`.
        unembed_weight: [d_vocab, d_model] the unembedding W_U; the read-outs' logits have its dtype. A tensor, or
            a streamed model's `stream_vocab.OnDiskWeight`, whose blocks `weight[v0:v1]` come from disk.
        final_logits: [n_rows, d_vocab] the final distribution's logits (the model's own output), for KL.
        targets: [n_rows, n_targets] token ids to follow, or None.
        top_k: how many most likely tokens to keep per row.
        keep_logits: also return every logit (large: [n_rows, n_readouts, d_vocab]).
        chunk_size: read-out vectors per chunk (default `DEFAULT_CHUNK_SIZE`); each chunk sweeps the vocabulary
            in blocks of `VOCAB_BLOCK` ids on CPU, `ACCELERATOR_VOCAB_BLOCK` elsewhere. Beside the inputs, memory
            is a few [chunk_size, block] float32 buffers (one more per further block that holds a target), and
            where half precision is multiplied in float32 (cpu_matmul.py) a [block, d_model] one and the chunk's
            rows [chunk_size, d_model] in float32.

    Returns:
        (final, readouts): the final distribution's metrics, rows [n_rows] (its `kl` is 0), and the read-outs',
        rows [n_rows, n_readouts] ([n_rows] for 2-d `normed`). Ordinary tensors (not inference tensors), on
        the inputs' device.

    Raises:
        ArgumentError: for shapes that do not fit together, a target id out of range, or a bad top_k / chunk_size.
    """
    flat = normed.dim() == 2
    if flat:
        normed = normed[:, None]
    if normed.dim() != 3 or unembed_weight.dim() != 2 or final_logits.dim() != 2:
        raise ArgumentError(
            f"read_out takes normed [n_rows, n_readouts, d_model], unembed_weight [d_vocab, d_model] and "
            f"final_logits [n_rows, d_vocab]; got {tuple(normed.shape)}, {tuple(unembed_weight.shape)}, "
            f"{tuple(final_logits.shape)}"
        )
    n_rows, n_readouts, d_model = normed.shape
    d_vocab = unembed_weight.shape[0]
    if unembed_weight.shape[1] != d_model or tuple(final_logits.shape) != (n_rows, d_vocab):
        raise ArgumentError(
            f"shapes do not fit: normed {tuple(normed.shape)} [n_rows, n_readouts, d_model], unembed_weight "
            f"{tuple(unembed_weight.shape)} [d_vocab, d_model], final_logits {tuple(final_logits.shape)} "
            f"[n_rows, d_vocab]"
        )
    if targets is not None:
        if targets.dim() != 2 or targets.shape[0] != n_rows or targets.dtype.is_floating_point:
            raise ArgumentError(f"targets must be integer ids [n_rows={n_rows}, n_targets], got {tuple(targets.shape)}")
        if len(targets) and not bool(((targets >= 0) & (targets < d_vocab)).all()):
            raise ArgumentError(f"targets={targets.tolist()} is out of range: the vocabulary has {d_vocab} ids "
                             f"(0..{d_vocab - 1})")  # fmt: skip
    top_k = check_count("top_k", top_k, 1, d_vocab, f"the vocabulary has {d_vocab} ids")
    chunk_size = DEFAULT_CHUNK_SIZE if chunk_size is None else check_count("chunk_size", chunk_size, 1)
    # no_grad: the sweep writes into reused buffers (out=), which autograd refuses, and nothing here needs a
    # gradient. Not inference_mode, so that the metrics are ordinary tensors users may change in place.
    with torch.no_grad():
        targets = None if targets is None else targets.to(final_logits.device)
        final, readouts = _read_out(normed, unembed_weight, final_logits, targets, top_k, keep_logits, chunk_size)
    if flat:
        readouts = ReadoutMetrics(**{f.name: None if (v := getattr(readouts, f.name)) is None else v[:, 0]
                                     for f in fields(readouts)})  # fmt: skip
    return final, readouts


def _read_out(
    normed: torch.Tensor,
    weight: torch.Tensor,
    final_rows: torch.Tensor,
    row_targets: torch.Tensor | None,
    top_k: int,
    keep_logits: bool,
    chunk_size: int,
) -> tuple[ReadoutMetrics, ReadoutMetrics]:
    """The fused pass, on checked arguments (see `read_out`)."""
    final = final_metrics(final_rows, row_targets, top_k, keep_logits, chunk_size, n_readouts=normed.shape[1])
    steps = readout_steps(normed, weight, final_rows, final, row_targets, top_k, keep_logits, chunk_size)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return final, done.value


def scratch_for(n_vectors: int, chunk_size: int, d_vocab: int, device: torch.device) -> Scratch:
    """The reused buffers of a read-out of `n_vectors` residual vectors (at least one)."""
    vocab_block = VOCAB_BLOCK if device.type == "cpu" else ACCELERATOR_VOCAB_BLOCK
    return Scratch(min(chunk_size, max(n_vectors, 1)) * min(vocab_block, d_vocab), device)


def final_metrics(
    final_rows: torch.Tensor,
    row_targets: torch.Tensor | None,
    top_k: int,
    keep_logits: bool,
    chunk_size: int,
    *,
    n_readouts: int,
) -> ReadoutMetrics:
    """The final distribution's metrics [n_rows] (its KL 0), which every read-out's KL needs (its logsumexp and
    entropy); `n_readouts` sizes the scratch as the read-out's."""
    n_rows, d_vocab = final_rows.shape
    device = final_rows.device
    n_targets = 0 if row_targets is None else row_targets.shape[1]
    vocab_block = VOCAB_BLOCK if device.type == "cpu" else ACCELERATOR_VOCAB_BLOCK
    scratch = scratch_for(n_rows * max(n_readouts, 1), chunk_size, d_vocab, device)
    # Its blocks are views of the final logits, with nothing to compute but the metrics, so they are as wide as
    # the scratch allows (whole rows for a short prompt): fewer, larger torch calls.
    final_chunk = max(min(chunk_size, n_rows), 1)
    width = max(vocab_block, scratch.size // final_chunk // vocab_block * vocab_block)
    blocks = _blocks(d_vocab, width)
    keep = (d_vocab, final_rows.dtype) if keep_logits else None
    final = ReadoutMetrics.empty(n_rows, top_k, n_targets, device, logits=keep)
    for start in range(0, n_rows, final_chunk):
        rows = slice(start, min(start + final_chunk, n_rows))
        logits = final_rows[rows]
        state = OnlineMetrics(len(logits), top_k, None if row_targets is None else row_targets[rows], width, device)
        for _ in _sweep(state, blocks, lambda v0, v1, slot: logits[:, v0:v1], scratch):
            pass
        state.finish_into(final, rows)
        if final.logits is not None:
            final.logits[rows] = logits
    final.kl.zero_()  # KL(p || p): the same logits, not merely close ones
    return final


def readout_steps(
    normed: torch.Tensor,
    weight: torch.Tensor,
    final_rows: torch.Tensor | None,
    final: ReadoutMetrics | None,
    row_targets: torch.Tensor | None,
    top_k: int,
    keep_logits: bool,
    chunk_size: int,
) -> Generator[None, None, ReadoutMetrics]:
    """The read-outs' metrics, computed as this generator is run: it yields after each vocabulary block (a small
    step, for work run while a streamed model waits, model/idle.py) and returns the metrics, [n_rows,
    n_readouts] rows.

    Without the final distribution yet (`final` None), KL is left out and every logit is kept instead
    (`.logits`, in the weights' dtype, which holds them exactly): `kl_from_kept_logits` adds KL once `final`
    exists, with the same sums in the same order as here.
    """
    n_rows, n_readouts, d_model = normed.shape
    d_vocab = weight.shape[0]
    device = normed.device
    n_targets = 0 if row_targets is None else row_targets.shape[1]
    vocab_block = VOCAB_BLOCK if device.type == "cpu" else ACCELERATOR_VOCAB_BLOCK
    scratch = scratch_for(n_rows * n_readouts, chunk_size, d_vocab, device)
    # [n_rows * n_readouts, d_model], position-major (row j, read-out k at j * n_readouts + k), so that a chunk
    # of whole rows is one range.
    normed = normed.flatten(0, 1)
    blocks = _blocks(d_vocab, vocab_block)
    keep = (d_vocab, weight.dtype) if keep_logits or final is None else None
    metrics = ReadoutMetrics.empty(n_rows * n_readouts, top_k, n_targets, device, logits=keep)
    for j0, j1, k0, k1 in _chunks(n_readouts, n_rows, chunk_size) if n_rows and n_readouts else []:
        # Read-outs k0..k1 at rows j0..j1: rows j * n_readouts + k of `normed`, a contiguous range.
        rows = slice(j0 * n_readouts + k0, (j1 - 1) * n_readouts + k1)
        x = normed[rows]  # [chunk, d_model], a view
        targets = None if row_targets is None else row_targets[j0:j1].repeat_interleave(k1 - k0, 0)
        state = OnlineMetrics(len(x), top_k, targets, vocab_block, device)
        cross = None if final is None else _CrossTerm(final_rows, final, j0, j1, k1 - k0, scratch)

        # On a CPU without half-precision units, a bfloat16 chunk is multiplied in float32 (cpu_matmul.py): its
        # rows cast once here, each vocabulary block once (for every read-out of the chunk), and the logits
        # rounded to the weights' dtype as the native product rounds them, so that ranks and ties mean the same.
        x_float = x.float() if computes_in_float32(x) else None

        def unembed(v0: int, v1: int, slot: int) -> torch.Tensor:
            logits = scratch.get(f"logits{slot}", len(x), v1 - v0, weight.dtype)
            if x_float is None:
                return torch.mm(x, weight[v0:v1].t(), out=logits)
            block = scratch.get("float_weight", v1 - v0, d_model, size=vocab_block * d_model).copy_(weight[v0:v1])
            return logits.copy_(torch.mm(x_float, block.t(), out=scratch.get("float_product", len(x), v1 - v0)))

        def take(logits: torch.Tensor, block: torch.Tensor, v0: int, v1: int) -> None:
            if cross is not None:
                cross.add(block, v0, v1)
            if metrics.logits is not None:
                metrics.logits[rows, v0:v1] = logits

        yield from _sweep(state, blocks, unembed, scratch, take)
        state.finish_into(metrics, rows)
        if cross is not None:
            metrics.kl[rows] = cross.kl(metrics.lse[rows])
    return metrics.unflatten_rows(n_rows)


def kl_from_kept_logits(
    metrics: ReadoutMetrics,
    final_rows: torch.Tensor,
    final: ReadoutMetrics,
    row_targets: torch.Tensor | None,
    keep_logits: bool,
    chunk_size: int,
) -> None:
    """Fills `metrics.kl` ([n_rows, n_readouts] rows from `readout_steps` without the final distribution) from
    the logits it kept, as `readout_steps` would have: the same chunks, blocks and order. Lets go of the kept
    logits unless `keep_logits`."""
    n_rows, n_readouts, d_vocab = metrics.logits.shape
    device = metrics.logits.device
    vocab_block = VOCAB_BLOCK if device.type == "cpu" else ACCELERATOR_VOCAB_BLOCK
    scratch = scratch_for(n_rows * n_readouts, chunk_size, d_vocab, device)
    blocks = _blocks(d_vocab, vocab_block)
    logits, kl, lse = (getattr(metrics, name).flatten(0, 1) for name in ("logits", "kl", "lse"))
    for j0, j1, k0, k1 in _chunks(n_readouts, n_rows, chunk_size) if n_rows and n_readouts else []:
        rows = slice(j0 * n_readouts + k0, (j1 - 1) * n_readouts + k1)
        targets = None if row_targets is None else row_targets[j0:j1].repeat_interleave(k1 - k0, 0)
        cross = _CrossTerm(final_rows, final, j0, j1, k1 - k0, scratch)
        for b in _sweep_order(target_blocks_of(targets, vocab_block), len(blocks)):
            v0, v1 = blocks[b]
            kept = logits[rows, v0:v1]
            block = kept if kept.dtype == torch.float32 else scratch.get("float_logits", *kept.shape).copy_(kept)
            cross.add(block, v0, v1)
        kl[rows] = cross.kl(lse[rows])
    if not keep_logits:
        metrics.logits = None


class _CrossTerm:
    """sum_v p_final(v) logits(v) of a chunk's read-outs (rows j0..j1 × n_k read-outs), a block at a time, and
    KL(final || read-out) from it.

    p_final for each block comes from the final logits and their logsumexp: one [n_j, width] block, shared by
    the chunk's read-outs, instead of a [n_rows, d_vocab] array of probabilities kept throughout."""

    def __init__(
        self, final_rows: torch.Tensor, final: ReadoutMetrics, j0: int, j1: int, n_k: int, scratch: Scratch
    ) -> None:
        self.final_rows, self.final, self.j0, self.j1, self.n_k, self.scratch = final_rows, final, j0, j1, n_k, scratch
        device = final_rows.device
        self.cross = torch.zeros(j1 - j0, n_k, device=device)  # sum_v p_final(v) logits(v)
        self.final_mass = torch.zeros(j1 - j0, device=device)  # sum_v p_final(v): 1 but for rounding

    def add(self, block: torch.Tensor, v0: int, v1: int) -> None:
        """Takes in the float32 logits [n_j * n_k, v1 - v0] of ids v0..v1."""
        j0, j1, n_j = self.j0, self.j1, self.j1 - self.j0
        final_probs = self.scratch.get("final_probs", n_j, v1 - v0)
        torch.sub(self.final_rows[j0:j1, v0:v1], self.final.lse[j0:j1, None], out=final_probs).exp_()
        self.final_mass.add_(final_probs.sum(dim=1))
        spent = self.scratch.get("probs", len(block), v1 - v0).view(n_j, self.n_k, v1 - v0)
        torch.mul(block.view(n_j, self.n_k, v1 - v0), final_probs[:, None], out=spent)
        self.cross.add_(spent.sum(dim=-1))

    def kl(self, lse: torch.Tensor) -> torch.Tensor:
        """KL [n_j * n_k] from the read-outs' logsumexp [n_j * n_k]."""
        # KL(final || read-out) = sum_v p log p - sum_v p(v) logits(v) + logsumexp(read-out logits). p sums to
        # 1 but for the rounding of its logsumexp, which, times logits of 200, would be 3e-3 of KL's nats.
        cross = self.cross / self.final_mass[:, None]
        kl = lse.view(self.j1 - self.j0, self.n_k) - cross - self.final.entropy[self.j0 : self.j1, None]
        return kl.clamp_(min=0).flatten()


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
    state: OnlineMetrics,
    blocks: list[tuple[int, int]],
    logits_of: Callable[[int, int, int], torch.Tensor],
    scratch: Scratch,
    take: Callable[[torch.Tensor, torch.Tensor, int, int], None] | None = None,
) -> Iterator[None]:
    """Feeds `state` the logits of every vocabulary block, `logits_of(v0, v1, slot)`, yielding after each;
    `take(logits, float32 logits, v0, v1)` sees each block too.

    A rank counts the tokens whose logit is strictly above the target's, and the target's logit must be the
    one its own block computes (a float32 dot product differs from a bfloat16 block's rounded logit, and ties
    are common in bfloat16). So the blocks that hold a target come first; all but the last of them stay in
    their own slots (1, 2, ...) until every target's logit is in, then they are counted, and so is every
    block after them as it comes (slot 0).
    """
    first = state.target_blocks
    n_held = max(len(first) - 1, 0)
    held = []
    for i, b in enumerate(_sweep_order(first, len(blocks))):
        v0, v1 = blocks[b]
        logits = logits_of(v0, v1, i + 1 if i < n_held else 0)
        block = state.update(logits, v0, scratch)
        if take is not None:
            take(logits, block, v0, v1)
        if i < n_held:
            held.append(logits)
        else:
            for earlier in held:
                state.count_above(earlier, scratch)
            held.clear()
            state.count_above(block, scratch)
        yield


def _sweep_order(target_blocks: list[int], n_blocks: int) -> list[int]:
    """The order a sweep takes the vocabulary blocks in: those that hold a target first (see `_sweep`)."""
    return target_blocks + [b for b in range(n_blocks) if b not in set(target_blocks)]
