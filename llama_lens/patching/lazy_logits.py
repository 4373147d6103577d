"""Logits that a sweep computes where a metric reads them: the final norm and unembedding (d_model x d_vocab per
position, 49,152 x 576 for SmolLM2: about eight layers' work) at the positions a metric indexes, not at every one.

A metric written as TransformerLens' are, `lambda logits: logits[0, -1, mary] - logits[0, -1, john]`, is called
once per patched run on that run's logits [batch, pos, d_vocab]. Here those logits are a `LazyLogits`: a tensor
(`isinstance(logits, torch.Tensor)`, with its shape and dtype) that holds no values. Indexing its position axis
with an integer, a slice or an integer tensor computes only those positions, for every run of the group at once
(one matrix product), and keeps them for the group's other runs; any other operation computes the run's whole
logits first, so every metric gets the values a full forward pass would give.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_map

from ..validate import as_index


class LogitSource:
    """The logits of a group of runs: `final` [runs, batch, pos - start, d_model] is their final residual stream
    from position `start` on; the positions before `start` are `prefix`'s (the corrupted run's), the same in every
    run. Each position is unembedded once, for all runs together, on its first read."""

    def __init__(
        self,
        unembed: Callable[[torch.Tensor], torch.Tensor],
        final: torch.Tensor,
        start: int = 0,
        prefix: LogitSource | None = None,
    ) -> None:
        self.unembed, self.final, self.start, self.prefix = unembed, final, start, prefix
        self.runs, self.batch = final.shape[:2]
        self.pos = start + final.shape[2]
        self._rows: dict[int, torch.Tensor] = {}  # position -> [runs, batch, d_vocab]
        self._whole: dict[int, torch.Tensor] = {}  # run -> [batch, pos, d_vocab], kept for the prefix only
        if prefix is not None:
            self.d_vocab, self.dtype, self.device = prefix.d_vocab, prefix.dtype, prefix.device
        else:
            example = self.rows([self.pos - 1])
            self.d_vocab, self.dtype, self.device = example.shape[-1], example.dtype, example.device

    def rows(self, positions: list[int]) -> torch.Tensor:
        """The logits at `positions` (each in [0, pos)) of every run: [runs, batch, len(positions), d_vocab]."""
        for p in set(positions) - set(self._rows):
            if p < self.start:
                self._rows[p] = self.prefix.rows([p])[:, :, 0].expand(self.runs, -1, -1)
            else:
                self._rows[p] = self.unembed(self.final[:, :, p - self.start])
        return torch.stack([self._rows[p] for p in positions], dim=2)

    def whole(self, run: int) -> torch.Tensor:
        """One run's logits at every position: [batch, pos, d_vocab]."""
        if run in self._whole:
            return self._whole[run]
        after = self.unembed(self.final[run])  # [batch, pos - start, d_vocab]
        if self.start > 0:
            after = torch.cat([self.prefix.whole(0)[:, : self.start], after], dim=1)
        if self.runs == 1:  # the corrupted run, the prefix of every group
            self._whole[run] = after
        return after

    def logits(self, run: int | None) -> LazyLogits:
        """One run's logits [batch, pos, d_vocab], or (run None) every run's [runs, batch, pos, d_vocab]."""
        return LazyLogits(self, run)


# Tensor facts that need no values: answered by the wrapper itself.
_METADATA = {
    torch.Tensor.shape.__get__,
    torch.Tensor.dtype.__get__,
    torch.Tensor.device.__get__,
    torch.Tensor.ndim.__get__,
    torch.Tensor.layout.__get__,
    torch.Tensor.requires_grad.__get__,
    torch.Tensor.is_cuda.__get__,
    torch.Tensor.size,
    torch.Tensor.dim,
    torch.Tensor.numel,
    torch.Tensor.__len__,
    torch.Tensor.is_floating_point,
}


class LazyLogits(torch.Tensor):
    """Logits [batch, pos, d_vocab] (or [runs, batch, pos, d_vocab]) computed where they are read: see the module
    docstring."""

    _source: LogitSource
    _run: int | None
    _whole: torch.Tensor | None

    @staticmethod
    def __new__(cls, source: LogitSource, run: int | None) -> LazyLogits:
        shape = (source.batch, source.pos, source.d_vocab)
        if run is None:
            shape = (source.runs, *shape)
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=source.dtype, device=source.device)

    def __init__(self, source: LogitSource, run: int | None) -> None:
        self._source, self._run, self._whole = source, run, None

    def materialize(self) -> torch.Tensor:
        """The values, every position computed (kept: later reads, and writes, see the same tensor)."""
        if self._whole is None:
            source = self._source
            if self._run is None:
                self._whole = torch.stack([source.whole(run) for run in range(source.runs)])
            else:
                self._whole = source.whole(self._run)
        return self._whole

    def _getitem(self, index: Any) -> torch.Tensor | None:
        """`self[index]` from the positions `index` reads alone, or None when it is not a plain position index."""
        if self._whole is not None:
            return None
        pos_axis = 1 if self._run is not None else 2
        picked = _picked_positions(index, pos_axis, self._source.pos)
        if picked is None:
            return None
        positions, index = picked
        rows = self._source.rows(positions)  # [runs, batch, len(positions), d_vocab]
        return (rows if self._run is None else rows[self._run])[index]

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.__getitem__ and type(args[0]) is cls:
            got = args[0]._getitem(args[1])
            if got is not None:
                return got
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        args, kwargs = tree_map(_materialized, (args, kwargs))
        return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # Reached only by an operation that bypassed __torch_function__: it gets the values as well.
        args, kwargs = tree_map(_materialized, (args, kwargs or {}))
        return func(*args, **kwargs)


def _materialized(value: Any) -> Any:
    return value.materialize() if isinstance(value, LazyLogits) else value


def _picked_positions(index: Any, pos_axis: int, pos: int) -> tuple[list[int], tuple] | None:
    """For an index that picks positions with an integer, a slice or an integer tensor on the position axis (and
    plain integers, slices or tensors elsewhere): the positions it reads and the same index into a tensor that
    holds just those positions, in that order. None for anything else (the caller computes every position)."""
    index = index if isinstance(index, tuple) else (index,)
    if len(index) <= pos_axis:
        return None
    for key in index:
        plain = isinstance(key, slice) or as_index(key) is not None  # numpy integers too
        integer_tensor = isinstance(key, torch.Tensor) and not key.is_floating_point() and key.dtype != torch.bool
        if not (plain or integer_tensor):
            return None  # None, Ellipsis, lists, masks: leave them to a whole tensor
    key = index[pos_axis]
    if isinstance(key, slice):
        positions = list(range(pos))[key]
        if not positions:
            return None
        new_key: Any = slice(None)
    elif as_index(key) is not None:
        if not -pos <= as_index(key) < pos:
            return None  # out of range: the whole tensor raises the IndexError
        positions, new_key = [as_index(key) % pos], 0
    else:
        if key.numel() == 0 or bool(((key < -pos) | (key >= pos)).any()):
            return None
        wrapped = key % pos
        positions = sorted(set(wrapped.flatten().tolist()))
        slot = torch.full((pos,), -1, dtype=torch.long, device=key.device)
        slot[positions] = torch.arange(len(positions), device=key.device)
        new_key = slot[wrapped]
    return positions, (*index[:pos_axis], new_key, *index[pos_axis + 1 :])
