"""Metrics for activation and attribution patching: the normalised logit difference and the target probability.

A metric maps logits [batch, pos, d_vocab] to one number []. The ready metrics are `PositionMetric`s: they read one
position per prompt, so the patching sweeps hand them the logits of that position only and compute the final norm
and unembedding (49,152 x d_model per position for SmolLM2) there alone. Any other callable gets full logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..model.llama import HookedLlama

Metric = Callable[[torch.Tensor], torch.Tensor]


def answer_ids(model: HookedLlama, answer: int | str | Sequence[int] | torch.Tensor) -> torch.Tensor:
    """A token (text or id) or one id per prompt, as ids on the model's device: [] or [batch].

    Raises:
        ValueError: not integers (3.7 would become id 3), more than one dimension, or an id outside [0, d_vocab).
    """
    if isinstance(answer, str):
        answer = model.to_single_token(answer)
    ids = torch.as_tensor(answer)
    d_vocab = model.cfg.d_vocab
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool or ids.dim() > 1:
        raise ValueError(f"an answer is a token (text or id) or one token id per prompt, got {answer!r}")
    if ids.numel() and bool(((ids < 0) | (ids >= d_vocab)).any()):
        raise ValueError(f"answer token ids must lie in [0, d_vocab={d_vocab}), got {ids.tolist()}")
    return ids.to(dtype=torch.long, device=model.device)


def per_prompt(ids: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    """`ids` ([] or [batch]) expanded to [batch]; a ValueError when one is given per prompt for another count."""
    if ids.dim() and len(ids) != batch:
        raise ValueError(f"{what} gives {len(ids)} values, one per prompt, but there are {batch} prompts")
    return ids.expand(batch)


class PositionMetric:
    """A metric that reads the logits at one position per prompt only. Called on full logits [batch, pos, d_vocab]
    as any metric; the sweeps call `at_position` with just those rows [batch, d_vocab], so they compute the
    unembedding at that position alone."""

    def __init__(self, position: int | torch.Tensor, score: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.position, self._score = position, score

    def positions(self, batch: int, pos: int, device: torch.device) -> torch.Tensor:
        """The position read in each prompt, counted from the start: [batch] in [0, pos)."""
        positions = per_prompt(torch.as_tensor(self.position, device=device), batch, "the metric's position")
        if positions.is_floating_point() or positions.dtype == torch.bool:
            raise ValueError(f"the metric's position must be an integer or one per prompt, got {self.position!r}")
        if bool(((positions < -pos) | (positions >= pos)).any()):
            raise ValueError(f"the metric reads position {self.position}, outside the prompts' {pos} positions")
        return positions % pos

    def rows(self, logits: torch.Tensor) -> torch.Tensor:
        """[batch, pos, d_vocab] (or any [batch, pos, ...]) -> [batch, d_vocab] at `position`."""
        batch, pos = logits.shape[:2]
        return logits[torch.arange(batch, device=logits.device), self.positions(batch, pos, logits.device)]

    def at_position(self, logits_at_position: torch.Tensor) -> torch.Tensor:
        return self._score(logits_at_position)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return self._score(self.rows(logits))


def logit_diff_metric(
    model: HookedLlama,
    clean_logits: torch.Tensor,
    corrupted_logits: torch.Tensor,
    answer: int | str | Sequence[int] | torch.Tensor,
    wrong: int | str | Sequence[int] | torch.Tensor,
    position: int | torch.Tensor = -1,
) -> PositionMetric:
    """The logit difference answer - wrong, averaged over prompts and normalised: 1 for the clean run's value,
    0 for the corrupted run's.

    Args:
        clean_logits, corrupted_logits: [batch, pos, d_vocab] of the unpatched runs.
        answer, wrong: a token (text or id) or one id per prompt [batch].
        position: where the next token is predicted: an int (-1 with left padding) or one per prompt [batch].

    Returns:
        metric(logits [batch, pos, d_vocab]) -> [] (differentiable, for attribution patching too).
    """
    answer_id, wrong_id = answer_ids(model, answer), answer_ids(model, wrong)

    def diff(rows: torch.Tensor) -> torch.Tensor:  # [batch, d_vocab] -> []
        batch = rows.shape[0]
        answers, wrongs = per_prompt(answer_id, batch, "answer"), per_prompt(wrong_id, batch, "wrong")
        picked = rows.gather(-1, torch.stack([answers, wrongs], dim=-1))
        return (picked[:, 0] - picked[:, 1]).float().mean()

    raw = PositionMetric(position, diff)
    clean, corrupted = float(raw(clean_logits)), float(raw(corrupted_logits))
    if clean == corrupted:
        raise ValueError(f"the clean and corrupted logit differences are equal ({clean:.4g}): nothing to normalise")
    return PositionMetric(position, lambda rows: (diff(rows) - corrupted) / (clean - corrupted))


def target_prob_metric(
    model: HookedLlama, answer: int | str | Sequence[int] | torch.Tensor, position: int | torch.Tensor = -1
) -> PositionMetric:
    """The probability of `answer` at `position`, averaged over prompts: metric(logits [batch, pos, d_vocab]) -> []."""
    answer_id = answer_ids(model, answer)

    def prob(rows: torch.Tensor) -> torch.Tensor:
        answers = per_prompt(answer_id, rows.shape[0], "answer")
        return rows.float().softmax(-1).gather(-1, answers[:, None]).mean()

    return PositionMetric(position, prob)


def metric_forward_kwargs(model: HookedLlama, metric: Metric) -> dict[str, int]:
    """Forward arguments for a metric: a PositionMetric takes the final residual stream, any other the logits."""
    return {"stop_at_layer": model.cfg.n_layers} if isinstance(metric, PositionMetric) else {}


def apply_metric(model: HookedLlama, metric: Metric, output: torch.Tensor) -> torch.Tensor:
    """metric of one run's forward output (logits, or the final residual stream for a PositionMetric)."""
    if not isinstance(metric, PositionMetric):
        return metric(output)
    rows = metric.rows(output)  # [batch, d_model]
    return metric.at_position(model.unembed(model.ln_final(rows)))
