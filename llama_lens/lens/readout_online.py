"""The online metrics of a read-out's vocabulary sweep (readout.py): each block of logits leaves its logsumexp,
mean logit, top-k and counts above the targets, merged across blocks as an online softmax does (Milakov &
Gimelshein 2018, arXiv:1805.02867); and the scratch buffers every block reuses."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

from .top_k import top_k_largest

if TYPE_CHECKING:
    from .readout_metrics import ReadoutMetrics

# exp(x) = 2 ** (x * LOG2_E), for blocks whose logits need a shift before their exponentials.
LOG2_E = 1.4426950408889634
LN_2 = 0.6931471805599453
# A block whose every row has its maximum logit within +-EXP_SAFE_MAX takes exp(logits) unshifted: each term is
# at most e^64 (1e28, a sum of 1e5 of them stays far below float32's 3e38) and the largest at least e^-64 (a
# normal float32), so the block's logsumexp keeps float32's precision. Other blocks (and NaN / inf) are shifted.
EXP_SAFE_MAX = 64.0


def target_blocks_of(targets: torch.Tensor | None, width: int) -> list[int]:
    """The vocabulary blocks of `width` ids that hold a target, ascending."""
    return [] if targets is None else sorted(set((targets // width).flatten().tolist()))


class Scratch:
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


class OnlineMetrics:
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
            self.target_blocks = target_blocks_of(targets, width)
            self.target_logits = torch.zeros(targets.shape, device=device)
            self.above = torch.zeros(targets.shape, device=device)  # tokens with a higher logit, so far

    def update(self, logits: torch.Tensor, v0: int, scratch: Scratch) -> torch.Tensor:
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

    def count_above(self, block: torch.Tensor, scratch: Scratch) -> None:
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
