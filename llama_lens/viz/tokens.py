"""Token text for figure labels: whitespace made visible, long tokens clipped, tick labels thinned.

Every figure labels tokens the same way ("·" for a space, "↵" for a newline, "⇥" for a tab, "…" where a token
is cut), so a token reads the same on the lens heatmap, the attention pattern and their axes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

MAX_LABELS = 40  # tick labels per axis of a pattern; more and 8-point labels overlap on a 10-inch axis
MAX_TICK_LABELS = 60  # per axis of the lens heatmap; past this, every n-th label is shown
_VISIBLE = {" ": "·", "\n": "↵", "\t": "⇥", "\r": "␍"}


def visible_token(token: str, max_chars: int = 8) -> str:
    """A token's text for a label: whitespace made visible, at most `max_chars` characters ("…" marks a cut),
    no matplotlib mathtext."""
    text = "".join(_VISIBLE.get(c, c if c.isprintable() else f"\\x{ord(c):02x}") for c in token)
    if len(text) > max_chars:
        text = text[: max(1, max_chars - 1)] + "…"
    return text.replace("$", r"\$")  # a pair of "$" would switch matplotlib into math mode


def token_label(token: str, width: int = 14) -> str:
    """A tick label for a token, as the lens plots write it: whitespace made visible ("·" for a space, "↵"
    for a newline; a token of spaces alone would be a blank label), at most `width` characters, no mathtext."""
    return visible_token(token, width)


def thinned(n: int, max_labels: int = MAX_TICK_LABELS) -> list[int]:
    """Which of `n` ticks get a label: all of them up to `max_labels`, else every step-th one."""
    step = max(1, math.ceil(n / max_labels))
    return list(range(0, n, step))


def position_tick_labels(
    positions: list[int], tokens: Sequence[str] | None, max_labels: int
) -> tuple[list[int], list[str]]:
    """Which of the shown rows/columns get a label, and the labels: every one up to `max_labels`, else every
    step-th one, with the position added so a thinned or non-contiguous axis can still be read."""
    where = thinned(len(positions), max_labels)
    contiguous = positions == list(range(positions[0], positions[0] + len(positions))) if positions else True
    with_position = len(where) < len(positions) or not contiguous or tokens is None
    labels = []
    for index in where:
        position = positions[index]
        if tokens is None:
            labels.append(str(position))
        elif with_position:
            labels.append(f"{position} {token_label(tokens[position])}")
        else:
            labels.append(token_label(tokens[position]))
    return where, labels
