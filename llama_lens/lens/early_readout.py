"""The logit lens's read-out of the layers already done, run while a streamed model waits for its next layer.

A streamed model (`ll.load(path, stream=True)`) reads each decoder layer while the one before it computes; when
the disk is the slower of the two, the forward pass waits with the CPU idle. The read-out of the residual
streams caught so far needs nothing from the later layers but for KL, which compares each read-out with the
final distribution. So `EarlyReadout` is handed to the model as idle work (llama_lens.model.idle): while the
model waits, it reads out the streams caught so far, one vocabulary block per step:

    layer 0 read ──> layer 0 runs, layer 1 read ───────────────> layer 1 runs ... last layer runs
                                  └ waiting: read-out steps of the streams caught so far (embed, 0_post, ...)
    after the pass: the rest of a sweep in progress; the model's logits; the streams not read out yet, in one
    sweep; then KL for the early ones, from the logits they kept

Each early sweep keeps its logits (in the weights' dtype, which holds them exactly) until the final
distribution exists; KL is then summed from them in the same blocks and order as the sweep would have, so the
metrics are the ones the read-out after the pass gives, to float rounding of the matmul. The logits kept are
bounded by `idle.IDLE_WORK_BYTES`: past it, the rest waits for the sweep after the pass. A sweep starts once
`MIN_EARLY_VECTORS` vectors are waiting (a product of few rows runs far below the CPU's GEMM rate, and every
sweep casts the whole unembedding to float32 once more), so few sweeps run.

The streams go through ln_final a sweep at a time, so hooks on ln_final fire once per sweep (each time on a
[rows, streams of the sweep, d_model] tensor) rather than once for all the streams.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import fields

import torch

from ..model.idle import IDLE_WORK_BYTES, MIN_EARLY_VECTORS
from .readout import kl_from_kept_logits, readout_steps
from .readout_metrics import ReadoutMetrics

__all__ = ["IDLE_WORK_BYTES", "MIN_EARLY_VECTORS", "EarlyReadout"]  # the two bounds: model/idle.py


class EarlyReadout:
    """Reads out residual streams as the forward pass catches them, in the pass's idle time (see the module
    docstring).

    Args:
        caught: hook name -> [n_rows, d_model] residual stream, filled by the lens's capture hook as the pass
            goes (hooks naming one tensor are read out once).
        norm: ln_final, or a tuned lens's translation then ln_final: [n_rows, n_streams, d_model] -> normed.
        weight: the unembedding [d_vocab, d_model] (a tensor, or a streamed model's on-disk weight).
        row_targets, top_k, keep_logits, chunk_size: as `readout.read_out`'s.
    """

    def __init__(
        self,
        caught: dict[str, torch.Tensor],
        norm: Callable[[list[torch.Tensor], list[str]], torch.Tensor],
        weight: torch.Tensor,
        row_targets: torch.Tensor | None,
        *,
        top_k: int,
        keep_logits: bool,
        chunk_size: int,
    ) -> None:
        self.caught, self.norm, self.weight, self.row_targets = caught, norm, weight, row_targets
        self.top_k, self.keep_logits, self.chunk_size = top_k, keep_logits, chunk_size
        self.taken: list[torch.Tensor] = []  # the streams read out early (or being), in the order caught
        self.groups: list[ReadoutMetrics] = []  # one per finished early sweep, [n_rows, its streams]
        self._sweep: Generator[None, None, ReadoutMetrics] | None = None
        self._kept_bytes = 0

    def step(self) -> bool:
        """One vocabulary block of the sweep in progress, or the start of a new sweep; False when there is
        nothing to do now (too few streams waiting, or the logits kept would pass the budget)."""
        if self._sweep is None and not self._start():
            return False
        try:
            next(self._sweep)
        except StopIteration as done:
            self._end(done.value)
        return True

    def finish(self) -> None:
        """Runs the sweep in progress to its end (after the forward pass)."""
        while self._sweep is not None:
            self.step()

    def close(self) -> None:
        """Drops a sweep left unfinished (the pass raised) and lets go of a streamed unembedding's blocks."""
        if self._sweep is not None:
            self._sweep.close()
            self._sweep = None
            self._release()

    def untaken(self) -> tuple[list[torch.Tensor], list[str]]:
        """The distinct streams caught but not read out early, in the order caught, with each one's first hook."""
        return self._waiting()

    def metrics(
        self, rest: ReadoutMetrics, final_rows: torch.Tensor, final: ReadoutMetrics
    ) -> tuple[list[torch.Tensor], ReadoutMetrics]:
        """The streams in read-out order (the early ones, then the rest) and their metrics [n_rows, n_streams],
        the early sweeps' KL added now that `final` exists; `rest` is the read-out of `untaken()`."""
        for group in self.groups:
            kl_from_kept_logits(group, final_rows, final, self.row_targets, self.keep_logits, self.chunk_size)
        parts = [*self.groups, rest]
        joined = ReadoutMetrics(**{
            f.name: None if getattr(rest, f.name) is None else torch.cat([getattr(p, f.name) for p in parts], 1)
            for f in fields(ReadoutMetrics)
        })  # fmt: skip
        return self.taken + self._waiting()[0], joined

    # ------------------------------------------------------------------------------------------ sweeps
    def _waiting(self) -> tuple[list[torch.Tensor], list[str]]:
        taken = {id(tensor) for tensor in self.taken}
        streams: dict[int, tuple[torch.Tensor, str]] = {}
        for hook, tensor in self.caught.items():  # dicts keep the order caught
            if id(tensor) not in taken:
                streams.setdefault(id(tensor), (tensor, hook))
        return [tensor for tensor, _ in streams.values()], [hook for _, hook in streams.values()]

    def _start(self) -> bool:
        tensors, hooks = self._waiting()
        if not tensors:
            return False
        n_rows = len(tensors[0])
        per_stream = n_rows * self.weight.shape[0] * self.weight.dtype.itemsize  # the logits it keeps
        n_streams = min(len(tensors), (IDLE_WORK_BYTES - self._kept_bytes) // max(per_stream, 1))
        if n_streams * n_rows < MIN_EARLY_VECTORS:
            return False
        tensors, hooks = tensors[:n_streams], hooks[:n_streams]
        self.taken += tensors
        self._kept_bytes += n_streams * per_stream
        normed = self.norm(tensors, hooks)  # [n_rows, n_streams, d_model]
        self._sweep = readout_steps(
            normed, self.weight, None, None, self.row_targets, self.top_k, self.keep_logits, self.chunk_size
        )
        return True

    def _end(self, metrics: ReadoutMetrics) -> None:
        self.groups.append(metrics)
        self._sweep = None
        self._release()

    def _release(self) -> None:
        release = getattr(self.weight, "release", None)  # a streamed unembedding's blocks and reading thread
        if release is not None:
            release()
