"""The checks of the logit-lens explorer's place controls (pins, pinned positions, the selected cell): each one
against the positions and read-outs of the explorer's current runs.
"""

from __future__ import annotations

from typing import Any

from ..errors import ArgumentError

MAX_PINS = 24


def check_pins(explorer: Any, value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, (list, tuple)) or len(value) > MAX_PINS:
        raise ArgumentError(f"pins must be a list of at most {MAX_PINS} groups")
    checked = []
    for group in value:
        if not isinstance(group, dict) or not isinstance(group.get("ids"), (list, tuple)) or not group["ids"]:
            raise ArgumentError(f'a pin is {{"position": p, "ids": [token ids], "panel": 0}}, got {group!r}')
        panel = group.get("panel", 0)
        if panel not in range(len(explorer.runs)):
            raise ArgumentError(f"pin panel {panel!r}: there are {len(explorer.runs)} panel(s)")
        positions = explorer.runs[panel].result.positions
        position = group.get("position", positions[-1])
        if position not in positions:
            raise ArgumentError(f"pin position {position!r} is not read out (0..{positions[-1]})")
        ids = [int(i) for i in group["ids"]]
        if not all(0 <= i < explorer.model.cfg.d_vocab for i in ids):
            raise ArgumentError(f"pin ids {ids} must lie in 0..{explorer.model.cfg.d_vocab - 1}")
        checked.append({"panel": panel, "position": position, "ids": ids})
    return checked


def check_positions(explorer: Any, value: Any) -> list[int]:
    n = len(explorer.runs[0].result.str_tokens[0]) if explorer.runs else 0
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, int) and 0 <= p < n for p in value):
        raise ArgumentError(f"pinned_positions must be a list of positions in 0..{n - 1}, got {value!r}")
    return sorted(set(value))


def check_selection(explorer: Any, value: Any) -> dict[str, int]:
    if value in (None, {}):
        return {}
    if not isinstance(value, dict) or set(value) - {"panel", "row", "position"}:
        raise ArgumentError(f'selection is {{"panel", "row", "position"}} or {{}}, got {value!r}')
    panel = value.get("panel", 0)
    if panel not in range(len(explorer.runs)):
        raise ArgumentError(f"selection panel {panel!r}: there are {len(explorer.runs)} panel(s)")
    result = explorer.runs[panel].result
    if value.get("row") not in range(result.n_readouts) or value.get("position") not in result.positions:
        raise ArgumentError(f"selection {value} is outside the lens ({result.n_readouts} read-outs x positions)")
    return {"panel": panel, "row": value["row"], "position": value["position"]}
