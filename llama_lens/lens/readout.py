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

import functools
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from ..errors import ArgumentError
from ..model.cpu_matmul import computes_in_float32
from ..validate import check_count
from .top_k import top_k_largest

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
# exp(x) = 2 ** (x * LOG2_E), for blocks whose logits need a shift before their exponentials.
LOG2_E = 1.4426950408889634
LN_2 = 0.6931471805599453
# A block whose every row has its maximum logit within +-EXP_SAFE_MAX takes exp(logits) unshifted: each term is
# at most e^64 (1e28, a sum of 1e5 of them stays far below float32's 3e38) and the largest at least e^-64 (a
# normal float32), so the block's logsumexp keeps float32's precision. Other blocks (and NaN / inf) are shifted.
EXP_SAFE_MAX = 64.0


@dataclass(repr=False)
class ReadoutMetrics:
    """Per-row metrics of read-outs, float32 whatever the logits' dtype. `[rows]` is [n_rows] for the final
    distribution and [n_rows, n_readouts] for the read-outs (see `read_out`).

    Attributes:
        top_ids, top_logits, top_probs: [rows, top_k], most likely first.
        lse: [rows] logsumexp of the logits.
        entropy: [rows] entropy of the distribution, in nats.
        kl: [rows] KL(final || read-out) in nats (0 for the final distribution itself).
        target_logits, target_probs: [rows, n_targets], or None without targets.
        target_ranks: [rows, n_targets] how many tokens have a strictly higher logit (0 = top), -1 where the
            row's logits are not finite (NaN / inf: no rank), or None.
        logits: [rows, d_vocab] in the logits' dtype with `keep_logits=True`, else None.
    """

    top_ids: torch.Tensor
    top_logits: torch.Tensor
    top_probs: torch.Tensor
    lse: torch.Tensor
    entropy: torch.Tensor
    kl: torch.Tensor
    target_logits: torch.Tensor | None = None
    target_probs: torch.Tensor | None = None
    target_ranks: torch.Tensor | None = None
    logits: torch.Tensor | None = None

    def __repr__(self) -> str:
        return f"ReadoutMetrics(rows={tuple(self.entropy.shape)}, top_k={self.top_ids.shape[-1]})"

    @classmethod
    def empty(
        cls, n_rows: int, top_k: int, n_targets: int, device: torch.device, *,
        logits: tuple[int, torch.dtype] | None = None,
    ) -> ReadoutMetrics:  # fmt: skip
        """Preallocated, to be filled a chunk at a time; `logits`: (d_vocab, dtype) to keep every logit."""

        def new(*shape, dtype=torch.float32):
            return torch.empty(n_rows, *shape, dtype=dtype, device=device)

        return cls(
            top_ids=new(top_k, dtype=torch.long),
            top_logits=new(top_k),
            top_probs=new(top_k),
            lse=new(),
            entropy=new(),
            kl=new(),
            target_logits=new(n_targets) if n_targets else None,
            target_probs=new(n_targets) if n_targets else None,
            target_ranks=new(n_targets, dtype=torch.long) if n_targets else None,
            logits=new(logits[0], dtype=logits[1]) if logits is not None else None,
        )

    def unflatten_rows(self, n_rows: int) -> ReadoutMetrics:
        """Position-major rows (row j, read-out k at j * n_readouts + k) as [n_rows, n_readouts, ...] views."""
        return ReadoutMetrics(**{
            f.name: None if (v := getattr(self, f.name)) is None else v.unflatten(0, (n_rows, -1)) for f in fields(self)
        })  # fmt: skip


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
    n_rows, d_vocab = final_rows.shape
    n_readouts, d_model = normed.shape[1:]
    device = final_rows.device
    n_targets = 0 if row_targets is None else row_targets.shape[1]
    vocab_block = VOCAB_BLOCK if device.type == "cpu" else ACCELERATOR_VOCAB_BLOCK
    scratch = _Scratch(min(chunk_size, n_rows * max(n_readouts, 1)) * min(vocab_block, d_vocab), device)

    # The final distribution first: every read-out's KL needs its logsumexp and entropy. Its blocks are views
    # of the final logits, with nothing to compute but the metrics, so they are as wide as the scratch allows
    # (whole rows for a short prompt): fewer, larger torch calls.
    final_chunk = max(min(chunk_size, n_rows), 1)
    width = max(vocab_block, scratch.size // final_chunk // vocab_block * vocab_block)
    blocks = _blocks(d_vocab, width)
    keep = (d_vocab, final_rows.dtype) if keep_logits else None
    final = ReadoutMetrics.empty(n_rows, top_k, n_targets, device, logits=keep)
    for start in range(0, n_rows, final_chunk):
        rows = slice(start, min(start + final_chunk, n_rows))
        logits = final_rows[rows]
        state = _Online(len(logits), top_k, None if row_targets is None else row_targets[rows], width, device)
        _sweep(state, blocks, lambda v0, v1, slot: logits[:, v0:v1], scratch)
        state.finish_into(final, rows)
        if final.logits is not None:
            final.logits[rows] = logits
    final.kl.zero_()  # KL(p || p): the same logits, not merely close ones

    # [n_rows * n_readouts, d_model], position-major (row j, read-out k at j * n_readouts + k), so that a chunk
    # of whole rows is one range.
    normed = normed.flatten(0, 1)
    blocks = _blocks(d_vocab, vocab_block)
    keep = (d_vocab, weight.dtype) if keep_logits else None
    metrics = ReadoutMetrics.empty(n_rows * n_readouts, top_k, n_targets, device, logits=keep)
    for j0, j1, k0, k1 in _chunks(n_readouts, n_rows, chunk_size) if n_rows and n_readouts else []:
        # Read-outs k0..k1 at rows j0..j1: rows j * n_readouts + k of `normed`, a contiguous range.
        rows = slice(j0 * n_readouts + k0, (j1 - 1) * n_readouts + k1)
        x = normed[rows]  # [chunk, d_model], a view
        n_j, n_k = j1 - j0, k1 - k0
        targets = None if row_targets is None else row_targets[j0:j1].repeat_interleave(n_k, 0)
        state = _Online(len(x), top_k, targets, vocab_block, device)
        cross = torch.zeros(n_j, n_k, device=device)  # sum_v p_final(v) logits(v)
        final_mass = torch.zeros(n_j, device=device)  # sum_v p_final(v): 1 but for rounding

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
    return final, metrics.unflatten_rows(n_rows)


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

    def get(
        self, name: str, rows: int, width: int, dtype: torch.dtype = torch.float32, size: int | None = None
    ) -> torch.Tensor:
        """A [rows, width] view of buffer `name`, made on first use with `size` elements (default `self.size`)."""
        buffer = self.buffers.get(name)
        if buffer is None or buffer.dtype != dtype:
            buffer = self.buffers[name] = torch.empty(size or self.size, dtype=dtype, device=self.device)
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
        weights = scratch.get("probs", rows, width)
        if _exp_is_safe(block_max):
            # Every row's maximum is within EXP_SAFE_MAX of 0: exp(logits) neither overflows nor loses the
            # largest terms, so the exponentials need no shift, one pass instead of two. As fast as the shifted
            # exp2 below with AVX2 kernels, and 3x faster under ATEN_CPU_CAPABILITY=default, where exp2 is not
            # vectorized.
            total = torch.exp(block, out=weights).sum(dim=1)
            self.block_lse.append(total.log())
        elif block.device.type == "cpu" and not _exp2_is_vectorized():
            # Shifted by the maximum (largest term 1, so the sum is >= 1), in exp: exp2 has no vectorized kernel
            # at this ATen CPU capability and costs 3x exp.
            torch.sub(block, block_max[:, None], out=weights).exp_()
            total = weights.sum(dim=1)
            self.block_lse.append(block_max + total.log())
        else:
            # exp(logits - max) = 2 ** (logits * log2(e) - shift), the shift being the maximum in log2 units: one
            # fused multiply-add pass makes the exponents and exp2_ takes them in place (largest 1, so the sum is
            # >= 1). No softmax, whose division by the sum would be one more pass over the block.
            shift = block_max * LOG2_E
            torch.add(-shift[:, None], block, alpha=LOG2_E, out=weights).exp2_()
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
            values, ids = top_k_largest(block, k, row_base=self.row_base)
            self._merge(values, ids + v0, None)
            return values[:, 0]
        # A block changes a row's top-k only where its maximum beats the row's k-th best so far. After the
        # first blocks that is rare, so only those rows are searched.
        block_max = block.amax(dim=1)
        hit = (block_max > self.top_values[:, -1]).nonzero()[:, 0]
        if len(hit) == rows:
            values, ids = top_k_largest(block, k, row_base=self.row_base)
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

    def finish_into(self, metrics: ReadoutMetrics, rows: slice) -> None:
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
            # Where the target's logit or the distribution is not finite there is no rank: comparisons with NaN
            # are all false, which would count as rank 0, the top token. -1 says so instead.
            defined = torch.isfinite(self.target_logits) & torch.isfinite(lse)[:, None]
            metrics.target_ranks[rows] = torch.where(defined, self.above.long(), -1)


@functools.cache
def _exp2_is_vectorized() -> bool:
    """Whether ATen's CPU kernels run vectorized (AVX2, AVX512, ...): not under ATEN_CPU_CAPABILITY=default."""
    return torch.backends.cpu.get_cpu_capability() != "DEFAULT"


def _exp_is_safe(block_max: torch.Tensor) -> bool:
    """Whether a block with these row maxima [rows] takes unshifted exponentials (see EXP_SAFE_MAX); False
    where a maximum is NaN."""
    return bool(block_max.abs().max() <= EXP_SAFE_MAX) if len(block_max) else True
