"""What the dataset runner computes for each batch of prompts: rows (a pyarrow Table) made with the library's own
entry points. `LensTask` calls `logit_lens`, `AttributionTask` calls `direct_logit_attribution`, `ForwardTask` only
runs the model (for the activation store). `llama_lens.runs.shards.process_shard` runs a shard's batches through a
task.

A batch is left-padded (see `llama_lens.runs.prompts.batch_layout`): the lens is asked for the union of the batch's
wanted positions and each prompt keeps its own. Both row-writing tasks build their rows with one builder
(`_batch_rows`): every prompt's rows are unit major (a read-out or a component), then position, then target.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import UsageError
from ..lens.attribution import direct_logit_attribution
from ..lens.logit import logit_lens
from ..model.protocols import LanguageModel
from .prompts import PromptRecord, batch_layout

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa


def _fixed_lists(values: np.ndarray):
    """[rows, k] -> a pyarrow fixed-size-list column."""
    import pyarrow as pa

    rows, k = values.shape
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), k)


def _check_padding(result_mask: torch.Tensor, n_tokens: Sequence[int]) -> None:
    found = result_mask.sum(dim=1).tolist()
    if found != list(n_tokens):
        raise UsageError(
            f"the model tokenized a batch into {found} tokens per prompt, the runner counted {list(n_tokens)}; "
            "the runner and the model must use the same tokenizer"
        )


# --------------------------------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class LensTask:
    """`logit_lens` per batch: one row per prompt × read-out × position (× target)."""

    readout: tuple[str, ...]
    positions: str | tuple[int, ...] = "last"
    top_k: int = 5
    layers: tuple[int, ...] | None = None
    kind: str = field(default="lens", init=False)

    def params(self) -> dict[str, Any]:
        return {"readout": list(self.readout), "positions": self.positions, "top_k": self.top_k, "layers": self.layers}

    def run_batch(self, model: LanguageModel, records: Sequence[PromptRecord], *, n_tokens: Sequence[int]) -> pa.Table:
        padded, keep = batch_layout(n_tokens, self.positions)
        targets = None if records[0].target is None else [list(r.target) for r in records]
        result = logit_lens(
            model,
            [r.text for r in records],
            target=targets,
            readout=list(self.readout),
            positions=padded,
            top_k=self.top_k,
            layers=self.layers,
        )
        _check_padding(result.attention_mask, n_tokens)
        n_targets = result.n_targets

        def values(b: int, cols: list[int], grid: _Grid) -> dict[str, Any]:
            top_ids, top_probs = grid.per_cell(result.top_ids[b][:, cols]), grid.per_cell(result.top_probs[b][:, cols])
            top_strs = [
                result.top_strs[b][k][c] for k in range(grid.n_units) for c in cols for _ in range(grid.n_targets)
            ]
            columns = {
                "top_token": np.array([s[0] for s in top_strs], dtype=object),
                "top_id": top_ids[:, 0],
                "top_prob": top_probs[:, 0],
                "entropy": grid.per_cell(result.entropy[b][:, cols]),
                "kl_to_final": grid.per_cell(result.kl_to_final[b][:, cols]),
                "top_ids": top_ids,
                "top_probs": top_probs,
                "top_tokens": top_strs,
            }
            if n_targets:
                columns |= _target_columns(result, b, grid)
                for name in ("target_prob", "target_logit", "target_rank"):  # [n_readouts, n_pos, n_targets]
                    columns[name] = getattr(result, f"{name}s")[b][:, cols].reshape(-1).numpy()
            return columns

        columns = _batch_rows(result, records, n_tokens, keep, ("readout", result.readouts), n_targets, values)
        return _table(columns, list_columns=("top_ids", "top_probs"))

    def summarize(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Means over prompts (and positions) per read-out, in forward order."""
        metrics = {"entropy": "mean", "kl_to_final": "mean", "top_prob": "mean"}
        if "target_prob" in frame:
            frame = frame.assign(target_top1=(frame["target_rank"] == 0).astype(np.float64))
            metrics |= {"target_prob": "mean", "target_logit": "mean", "target_rank": "mean", "target_top1": "mean"}
        return _summary(frame, ["label", "layer", "readout"], metrics)

    # The columns `summarize` reads (those present).
    summary_columns = ("prompt", "label", "layer", "readout", "entropy", "kl_to_final", "top_prob", "target_prob",
                       "target_logit", "target_rank")  # fmt: skip


@dataclass(frozen=True)
class AttributionTask:
    """`direct_logit_attribution` per batch: one row per prompt × component × position × target."""

    positions: str | tuple[int, ...] = "last"
    heads: bool = False
    kind: str = field(default="attribution", init=False)

    def params(self) -> dict[str, Any]:
        return {"positions": self.positions, "heads": self.heads}

    def run_batch(self, model: LanguageModel, records: Sequence[PromptRecord], *, n_tokens: Sequence[int]) -> pa.Table:
        padded, keep = batch_layout(n_tokens, self.positions)
        result = direct_logit_attribution(
            model,
            [r.text for r in records],
            target=[list(r.target) for r in records],
            positions=padded,
            heads=self.heads,
        )
        _check_padding(result.attention_mask, n_tokens)

        def values(b: int, cols: list[int], grid: _Grid) -> dict[str, Any]:
            columns = _target_columns(result, b, grid) | {
                "contribution": result.components[b][:, cols].reshape(-1).numpy(),  # [n_components, n_pos, n_targets]
                "final_logit": np.tile(result.final_logits[b][cols].reshape(-1).numpy(), grid.n_units),
            }
            if self.heads:
                # Each attention component's row carries its heads' shares [n_heads]; other rows none.
                heads = result.heads[b][:, :, cols]  # [n_layers, n_heads, n_pos, n_targets]
                layer_row = {layer: i for i, layer in enumerate(result.head_layers)}
                columns["head_contributions"] = [
                    heads[layer_row[layer], :, p, t].tolist() if kind == "attn" else None
                    for layer, kind in zip(result.layers, result.kinds)
                    for p in range(len(cols))
                    for t in range(grid.n_targets)
                ]
            return columns

        n_targets = result.target_ids.shape[1]
        columns = _batch_rows(result, records, n_tokens, keep, ("component", result.kinds), n_targets, values)
        return _table(columns, list_columns=())

    def summarize(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Mean contribution (and mean absolute contribution) per component over prompts, in forward order."""
        frame = frame.assign(abs_contribution=frame["contribution"].abs())
        return _summary(frame, ["label", "layer", "component"], {"contribution": "mean", "abs_contribution": "mean"})

    summary_columns = ("prompt", "label", "layer", "component", "contribution")


@dataclass(frozen=True)
class ForwardTask:
    """Only the forward pass (for the activation store), stopped after the last layer a stored hook needs."""

    stop_at_layer: int | None = None
    kind: str = field(default="activations", init=False)
    summary_columns = ()

    def params(self) -> dict[str, Any]:
        return {}

    def run_batch(self, model: LanguageModel, records: Sequence[PromptRecord], *, n_tokens: Sequence[int]) -> None:
        tokens, mask = model.prepare_tokens([r.text for r in records])
        if mask is not None:
            _check_padding(mask, n_tokens)
        with torch.inference_mode():
            model(tokens, attention_mask=mask, stop_at_layer=self.stop_at_layer)
        return None


# ---------------------------------------------------------------------------------------------------- rows
@dataclass(frozen=True)
class _Grid:
    """One prompt's rows: n_units (read-outs or components) × n_pos (its kept positions) × n_targets (1 without
    targets), the unit varying slowest and the target fastest."""

    n_units: int
    n_pos: int
    n_targets: int

    @property
    def n_rows(self) -> int:
        return self.n_units * self.n_pos * self.n_targets

    def per_unit(self, values: np.ndarray) -> np.ndarray:  # [n_units] -> [n_rows]
        return np.repeat(values, self.n_pos * self.n_targets)

    def per_position(self, values: np.ndarray) -> np.ndarray:  # [n_pos] -> [n_rows]
        return np.tile(np.repeat(values, self.n_targets), self.n_units)

    def per_target(self, values: np.ndarray) -> np.ndarray:  # [n_targets] -> [n_rows]
        return np.tile(values, self.n_units * self.n_pos)

    def per_cell(self, values: torch.Tensor) -> np.ndarray:  # [n_units, n_pos, ...] -> [n_rows, ...]
        if values.is_floating_point():
            values = values.float()
        cells = values.reshape(self.n_units * self.n_pos, *values.shape[2:]).numpy()
        return np.repeat(cells, self.n_targets, axis=0)


def _batch_rows(
    result: Any,
    records: Sequence[PromptRecord],
    n_tokens: Sequence[int],
    keep: list[list[tuple[int, int]]],
    unit: tuple[str, Sequence[str]],
    n_targets: int,
    values: Callable[[int, list[int], _Grid], dict[str, Any]],
) -> dict[str, list]:
    """A batch's columns, prompt by prompt: those every task writes (prompt, label, layer, the unit's column,
    position, token), then the task's own, `values(b, cols, grid)` for prompt b at padded columns `cols`.

    Args:
        result: a LensResult or AttributionResult of the padded batch (labels, layers, tokens, str_tokens).
        keep: per prompt, [(own position, column in the result's positions)] (`batch_layout`).
        unit: the name of the column telling the units apart and its value per unit ("readout", "component").
    """
    unit_column, unit_values = unit
    pos = result.tokens.shape[1]
    columns: dict[str, list] = {}
    for b, record in enumerate(records):
        own, cols = [r for r, _ in keep[b]], [c for _, c in keep[b]]
        grid = _Grid(len(result.labels), len(own), max(n_targets, 1))
        tokens = [result.str_tokens[b][pos - n_tokens[b] + r] for r in own]
        shared = {
            "prompt": np.full(grid.n_rows, record.index, dtype=np.int64),
            "label": grid.per_unit(np.array(result.labels)),
            "layer": grid.per_unit(np.array(result.layers, dtype=np.int32)),
            unit_column: grid.per_unit(np.array(unit_values)),
            "position": grid.per_position(np.array(own, dtype=np.int32)),
            "token": grid.per_position(np.array(tokens, dtype=object)),
        }
        for name, value in (shared | values(b, cols, grid)).items():
            columns.setdefault(name, []).append(value)
    return columns


def _target_columns(result: Any, b: int, grid: _Grid) -> dict[str, np.ndarray]:
    """Prompt b's target and target_id columns (its targets are `result.target_strs[b]`, `.target_ids[b]`)."""
    return {
        "target": grid.per_target(np.array(result.target_strs[b], dtype=object)),
        "target_id": grid.per_target(result.target_ids[b].numpy()),
    }


def _table(columns: dict[str, list], list_columns: Sequence[str]) -> pa.Table:
    import pyarrow as pa

    arrays = {}
    for name, parts in columns.items():
        if name in list_columns:
            arrays[name] = _fixed_lists(np.concatenate(parts))
        elif isinstance(parts[0], list):  # cells that are lists of text, or of floats (stored as float32) or None
            cells = [cell for part in parts for cell in part]
            strings = any(isinstance(c, list) and c and isinstance(c[0], str) for c in cells)
            arrays[name] = pa.array(cells, type=pa.list_(pa.string() if strings else pa.float32()))
        else:
            arrays[name] = pa.array(np.concatenate(parts))
    return pa.table(arrays)


def _summary(frame: pd.DataFrame, keys: list[str], metrics: dict[str, str]) -> pd.DataFrame:
    import pandas as pd

    # Labels in forward order: the order rows first show them (each prompt's rows are in forward order).
    order = list(dict.fromkeys(frame["label"]))
    frame = frame.assign(label=pd.Categorical(frame["label"], categories=order, ordered=True))
    grouped = frame.groupby(keys, sort=True, observed=True)
    summary = grouped.agg(metrics)
    summary.insert(0, "n_rows", grouped.size())
    summary.insert(0, "n_prompts", grouped["prompt"].nunique())
    summary = summary.reset_index()
    summary["label"] = summary["label"].astype(str)
    return summary
