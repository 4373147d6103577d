"""A run's prompts as records, their token counts, and the shard plan cut from them.

The plan depends only on the prompts and the parameters, so every executor and every rerun cuts the same shards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import ArgumentError
from .tasks import PromptRecord, Shard


def make_records(texts: list[str], target: Any = None, *, targets: list[Any] | None = None) -> list[PromptRecord]:
    """Prompt records; `target` is one target for every prompt or a list with one per prompt, `targets` the
    per-prompt values of a target column. Every prompt needs the same number of targets.

    Raises:
        ArgumentError (a ValueError): both kinds of target, a count that does not match, a target that is not a
            token's text or id.
    """
    if target is not None and targets is not None:
        raise ArgumentError("pass target= or target_column=, not both")
    if target is not None:
        if isinstance(target, (str, int)) and not isinstance(target, bool):
            targets = [target] * len(texts)
        else:
            targets = list(target)
            if len(targets) != len(texts):
                raise ArgumentError(
                    f"got {len(targets)} targets for {len(texts)} prompts: pass one target for all, or one per prompt"
                )
    if targets is None:
        return [PromptRecord(i, text) for i, text in enumerate(texts)]
    records = []
    for i, (text, value) in enumerate(zip(texts, targets)):
        items = (value,) if isinstance(value, (str, int)) else tuple(value) if value is not None else ()
        if not items or any(isinstance(t, bool) or not isinstance(t, (str, int)) for t in items):
            raise ArgumentError(f"prompt {i}: a target is a token's text or id (or a list of them), got {value!r}")
        if records and len(items) != len(records[0].target):
            raise ArgumentError(
                f"prompt {i} has {len(items)} targets, prompt 0 has {len(records[0].target)}: every prompt needs the "
                "same number"
            )
        records.append(PromptRecord(i, text, items))
    return records


def plan_shards(records: Sequence[PromptRecord], n_tokens: Sequence[int], *, shard_size: int) -> list[Shard]:
    """Shards of `shard_size` prompts, sorted by token count (ties by index): deterministic, so every executor and
    every rerun cuts the same shards."""
    order = sorted(range(len(records)), key=lambda i: (n_tokens[i], records[i].index))
    return [
        Shard(k, tuple(records[i] for i in order[start : start + shard_size]))
        for k, start in enumerate(range(0, len(order), shard_size))
    ]


def count_tokens(tokenizer: Any, records: Sequence[PromptRecord], *, d_vocab: int) -> list[int]:
    """Token counts (BOS included, as the lens tokenizes), after checking every prompt and target.

    Raises:
        ArgumentError (a ValueError): a prompt with no tokens, a target that is not one token or out of range.
    """
    counts = []
    for record in records:
        n = len(tokenizer.encode(record.text))
        if n == 0:
            raise ArgumentError(f"prompt {record.index} ({record.text!r}) has no tokens")
        counts.append(n)
    checked: set[Any] = set()
    for record in records:
        for t in record.target or ():
            if t in checked:
                continue
            try:
                token_id = tokenizer.id_of(t) if isinstance(t, str) else t
            except ValueError as err:
                raise ArgumentError(f"prompt {record.index}: target {err}") from None
            if not 0 <= token_id < d_vocab:
                raise ArgumentError(
                    f"prompt {record.index}: target id {token_id} is out of range [0, d_vocab={d_vocab})"
                )
            checked.add(t)
    return counts
