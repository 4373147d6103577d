"""Parameter counts per module of a loaded model, like torchinfo's summary."""

from __future__ import annotations

from torch import nn

from ..errors import ArgumentError
from .hooks import HookPoint


def module_summary(model: nn.Module, *, depth: int = 2):
    """One row per module down to `depth` (1: embed, blocks.i, ln_final, unembed; 2: ln1/attn/ln2/mlp in place
    of blocks.i; 3: the projections in place of attn and mlp). A module with no submodules stays in at any
    depth below its own (ln1 at depth 3), so the rows always add up to the whole model.

    Tied weights are counted once, at the first module that holds them.

    Returns:
        pandas DataFrame with columns module, parameters, bytes, share (of the total parameters).
    """
    import pandas as pd

    if depth < 1:
        raise ArgumentError(f"depth must be at least 1, got {depth}")
    seen: set[int] = set()
    rows = []
    for name, module in model.named_modules():
        parts = name.split(".")
        # blocks.3 is level 1 and blocks.3.attn level 2; embed, ln_final and unembed are shown at any depth.
        in_blocks = parts[0] == "blocks"
        if not name or isinstance(module, HookPoint) or name == "blocks":
            continue
        level = len(parts) - 1 if in_blocks else 1
        is_leaf = not any(not isinstance(child, HookPoint) for child in module.children())
        if level > depth or (level < depth and not is_leaf) or (not in_blocks and len(parts) != 1):
            continue
        params = [p for p in module.parameters() if id(p) not in seen]
        seen.update(id(p) for p in params)
        rows.append(
            {
                "module": name,
                "parameters": sum(p.numel() for p in params),
                "bytes": sum(p.numel() * p.element_size() for p in params),
            }
        )
    frame = pd.DataFrame(rows, columns=["module", "parameters", "bytes"])
    total = frame["parameters"].sum()
    frame["share"] = frame["parameters"] / total if total else 0.0
    return frame
