"""Scores of patched runs from their final residual stream: the metric of each run's logits, with the corrupted
run's logits at the positions a run did not recompute. How much is unembedded depends on the metric's form
(metrics.py): one position for a `PositionMetric`, the positions a metric indexes for any other (lazy_logits.py)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..model.llama import HookedLlama
from .lazy_logits import LogitSource
from .metrics import BatchedMetric, Metric, PositionMetric


def unembed_with(model: HookedLlama) -> Callable[[torch.Tensor], torch.Tensor]:
    """resid [..., d_model] -> logits [..., d_vocab]: the final norm and the unembedding."""
    return lambda resid: model.unembed(model.ln_final(resid))


def score_final(model: HookedLlama, metric: Metric, final: torch.Tensor) -> torch.Tensor:
    """The metric of one run from its final residual stream [batch, pos, d_model] (differentiable): the logits
    computed where the metric reads them."""
    unembed = unembed_with(model)
    if isinstance(metric, PositionMetric):
        return metric.at_position(unembed(metric.rows(final)))
    source = LogitSource(unembed, final[None])
    if isinstance(metric, BatchedMetric):
        return metric.runs(source.logits(None))[0]
    return metric(source.logits(0))


class PatchScorer:
    """Scores patched runs from their final residual stream at positions start.., with the corrupted run's
    filling the positions before `start`."""

    def __init__(self, model: HookedLlama, metric: Metric, corrupted_final: torch.Tensor) -> None:
        self.model, self.metric = model, metric
        self.final = corrupted_final  # [batch, pos, d_model]
        batch, pos, _ = corrupted_final.shape
        if isinstance(metric, PositionMetric):
            self.where = metric.positions(batch, pos, corrupted_final.device)  # [batch]
        else:
            self.corrupted = LogitSource(self.unembed, corrupted_final[None])  # one run, from position 0

    def unembed(self, resid: torch.Tensor) -> torch.Tensor:
        return unembed_with(self.model)(resid)

    def corrupted_score(self) -> float:
        if isinstance(self.metric, PositionMetric):
            return self.scores(self.final[:, :0], start=self.final.shape[1])[0]
        return self._metric_scores(self.corrupted)[0]

    def scores(self, final: torch.Tensor, start: int) -> list[float]:
        """One score per run: `final` is [runs * batch, pos - start, d_model], run-major."""
        batch = self.final.shape[0]
        runs = max(1, final.shape[0] // batch)
        if not isinstance(self.metric, PositionMetric):
            finals = final.view(runs, batch, final.shape[1], final.shape[2])
            return self._metric_scores(LogitSource(self.unembed, finals, start, self.corrupted))
        # Each prompt's row at the metric's position: from the patched run where it was recomputed.
        prompts = torch.arange(batch, device=final.device)
        rows = self.final[prompts, self.where].expand(runs, batch, -1)  # [runs, batch, d_model]
        if final.shape[1] > 0:
            new = final.view(runs, batch, final.shape[1], -1)[:, prompts, (self.where - start).clamp(min=0)]
            rows = torch.where((self.where >= start)[None, :, None], new, rows)
        logits = self.unembed(rows.reshape(runs * batch, -1))  # [runs * batch, d_vocab]
        return [float(self.metric.at_position(logits[r * batch : (r + 1) * batch])) for r in range(runs)]

    def _metric_scores(self, source: LogitSource) -> list[float]:
        if isinstance(self.metric, BatchedMetric):
            return [float(score) for score in self.metric.runs(source.logits(None))]
        return [float(self.metric(source.logits(run))) for run in range(source.runs)]
