"""A run's prompts as records, their token counts, the shard plan cut from them, and their positions.

The plan depends only on the prompts and the parameters, so every executor and every rerun cuts the same shards.

Positions are counted within each prompt's own tokens (0 = its first token, BOS included). A batch is
left-padded, so a prompt of n tokens in a batch padded to `pos` holds the last n positions: its own position
r is the batch's pos - n + r.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ArgumentError

Positions = str | int | Sequence[int]


@dataclass(frozen=True)
class PromptRecord:
    """One prompt: its index in the input, its text and its target(s) (None without targets)."""

    index: int
    text: str
    target: tuple[str | int, ...] | None = None


@dataclass(frozen=True)
class Shard:
    """A unit of work and of resume: prompts of similar length, written to one file (per output)."""

    index: int
    records: tuple[PromptRecord, ...]


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


def parse_positions(positions: Positions) -> str | tuple[int, ...]:
    """A run's `positions=` in one form: "last", "all", or a tuple of ints (negative counts from a prompt's end).

    Unlike `validate.check_positions`, nothing is resolved against a length here: each prompt of a run keeps
    those of its own positions that exist (`own_positions`).

    Raises:
        ArgumentError (a ValueError): anything else.
    """
    if positions in ("last", "all"):
        return positions
    items = [positions] if isinstance(positions, int) else positions
    if isinstance(items, str) or not all(isinstance(p, int) and not isinstance(p, bool) for p in items) or not items:
        raise ArgumentError(
            f"positions must be 'last', 'all', an int or a list of ints (negative counts from each prompt's end), "
            f"got {positions!r}"
        )
    return tuple(items)


def own_positions(positions: str | tuple[int, ...], n_tokens: int) -> list[int]:
    """A prompt's positions to keep, ascending; ints outside its n_tokens are left out."""
    if positions == "last":
        return [n_tokens - 1]
    if positions == "all":
        return list(range(n_tokens))
    return sorted({p % n_tokens for p in positions if -n_tokens <= p < n_tokens})


def drop_prompts_without_positions(
    records: Sequence[PromptRecord], n_tokens: Sequence[int], positions: str | tuple[int, ...] | None
) -> tuple[list[PromptRecord], list[int], list[int]]:
    """The prompts that have at least one of the asked positions (`positions=[k]` asks for more tokens than a
    short prompt has), their token counts, and the indices of those left out: a short prompt gives no rows (and
    no stored activations), it does not stop the run. The result counts them (`DatasetResult.prompts_without_
    positions`).

    Raises:
        ArgumentError (a ValueError): no prompt has any of the positions (the run would write nothing).
    """
    if positions is None:
        return list(records), list(n_tokens), []
    kept = [i for i, n in enumerate(n_tokens) if own_positions(positions, n)]
    if not kept:
        raise ArgumentError(
            f"no prompt has any of positions={list(positions)}: the longest has {max(n_tokens)} tokens (BOS included)"
        )
    without = sorted(set(range(len(records))) - set(kept))
    return [records[i] for i in kept], [n_tokens[i] for i in kept], [records[i].index for i in without]


def batch_layout(n_tokens: Sequence[int], positions: str | tuple[int, ...]):
    """(padded positions to ask for, and per prompt: [(own position, column in the padded list)])."""
    pos = max(n_tokens)
    own = [own_positions(positions, n) for n in n_tokens]
    padded = sorted({pos - n + r for n, rs in zip(n_tokens, own) for r in rs})
    column = {p: i for i, p in enumerate(padded)}
    return padded, [[(r, column[pos - n + r]) for r in rs] for n, rs in zip(n_tokens, own)]
