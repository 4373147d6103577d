"""Metrics for activation and attribution patching: the normalised logit difference and the target probability,
and the forms a sweep runs batched.

A metric maps one run's logits [batch, pos, d_vocab] to one number []. Three forms:

- any callable, e.g. TransformerLens' `lambda logits: logits[0, -1, mary] - logits[0, -1, john]`: a sweep calls it
  once per patched run, on logits that compute only the positions it indexes (lazy_logits.py);
- `BatchedMetric(fn)`: fn(logits [runs, batch, pos, d_vocab]) -> [runs], called once per group of runs;
- `PositionMetric` (the ready metrics): reads one position per prompt, so a sweep unembeds that position alone.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from ..errors import ArgumentError
from ..model.llama import HookedLlama
from .signature import keyword_only_after

Metric = Callable[[torch.Tensor], torch.Tensor]


def answer_ids(model: HookedLlama, answer: int | str | Sequence[int] | torch.Tensor) -> torch.Tensor:
    """A token (text or id) or one id per prompt, as ids on the model's device: [] or [batch].

    Raises:
        ArgumentError: not integers (3.7 would become id 3), more than one dimension, or an id outside [0, d_vocab).
    """
    if isinstance(answer, str):
        answer = model.to_single_token(answer)
    ids = torch.as_tensor(answer)
    d_vocab = model.cfg.d_vocab
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool or ids.dim() > 1:
        raise ArgumentError(f"an answer is a token (text or id) or one token id per prompt, got {answer!r}")
    if ids.numel() and bool(((ids < 0) | (ids >= d_vocab)).any()):
        raise ArgumentError(f"answer token ids must lie in [0, d_vocab={d_vocab}), got {ids.tolist()}")
    return ids.to(dtype=torch.long, device=model.device)


def per_prompt(ids: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    """`ids` ([] or [batch]) expanded to [batch]; an ArgumentError when one is given per prompt for another count."""
    if ids.dim() and len(ids) != batch:
        raise ArgumentError(f"{what} gives {len(ids)} values, one per prompt, but there are {batch} prompts")
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
            raise ArgumentError(f"the metric's position must be an integer or one per prompt, got {self.position!r}")
        if bool(((positions < -pos) | (positions >= pos)).any()):
            raise ArgumentError(f"the metric reads position {self.position}, outside the prompts' {pos} positions")
        return positions % pos

    def rows(self, logits: torch.Tensor) -> torch.Tensor:
        """[batch, pos, d_vocab] (or any [batch, pos, ...]) -> [batch, d_vocab] at `position`."""
        batch, pos = logits.shape[:2]
        return logits[torch.arange(batch, device=logits.device), self.positions(batch, pos, logits.device)]

    def at_position(self, logits_at_position: torch.Tensor) -> torch.Tensor:
        return self._score(logits_at_position)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return self._score(self.rows(logits))


class BatchedMetric:
    """A metric that scores many runs in one call: `fn(logits [runs, batch, pos, d_vocab]) -> [runs]`, e.g.
    `BatchedMetric(lambda logits: logits[:, 0, -1, mary] - logits[:, 0, -1, john])`. A sweep calls it once per
    group of runs that start at the same position; called on one run's logits [batch, pos, d_vocab], it is a
    metric as any other (attribution patching, a hand loop)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.fn = fn
        functools.update_wrapper(self, fn)

    def runs(self, logits: torch.Tensor) -> torch.Tensor:
        """[runs, batch, pos, d_vocab] -> [runs]"""
        scores = torch.as_tensor(self.fn(logits))
        if scores.shape != (logits.shape[0],):
            raise ArgumentError(
                f"a BatchedMetric returns one score per run, shape ({logits.shape[0]},), got {tuple(scores.shape)}"
            )
        return scores

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return self.runs(logits[None])[0]


@keyword_only_after(3, "answer", "wrong", "position")
def logit_diff_metric(
    model: HookedLlama,
    clean_logits: torch.Tensor,
    corrupted_logits: torch.Tensor,
    *,
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
        raise ArgumentError(f"the clean and corrupted logit differences are equal ({clean:.4g}): nothing to normalise")
    return PositionMetric(position, lambda rows: (diff(rows) - corrupted) / (clean - corrupted))


@keyword_only_after(2, "position")
def target_prob_metric(
    model: HookedLlama, answer: int | str | Sequence[int] | torch.Tensor, *, position: int | torch.Tensor = -1
) -> PositionMetric:
    """The probability of `answer` at `position`, averaged over prompts: metric(logits [batch, pos, d_vocab]) -> []."""
    answer_id = answer_ids(model, answer)

    def prob(rows: torch.Tensor) -> torch.Tensor:
        answers = per_prompt(answer_id, rows.shape[0], "answer")
        return rows.float().softmax(-1).gather(-1, answers[:, None]).mean()

    return PositionMetric(position, prob)
