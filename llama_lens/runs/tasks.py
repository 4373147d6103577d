"""What the dataset runner computes for each batch of prompts, and how one shard of prompts is processed.

A task turns a batch of prompts into rows (a pyarrow Table) with the library's own entry points:
`LensTask` calls `logit_lens`, `AttributionTask` calls `direct_logit_attribution`, `ForwardTask` only runs the
model (for the activation store). `process_shard` runs a shard's batches through a task, with the activation
store's hooks when asked, and writes the shard's files atomically. Executors (local or Ray) call it; the
driver (`llama_lens.runs.runner`) plans the shards and merges the summaries.

Positions are counted within each prompt's own tokens (0 = its first token, BOS included). A batch is
left-padded, so a prompt of n tokens in a batch padded to `pos` holds the last n positions: its own position
r is the batch's pos - n + r. The lens is asked for the union of the batch's wanted positions and each prompt
keeps its own.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..data.store import STORE_FOLDER, ActivationCapture, temporary_name, write_shard

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

    from ..model.llama import HookedLlama

SHARD_FOLDER = "shards"
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


def shard_path(out: str | os.PathLike, index: int) -> Path:
    return Path(out) / SHARD_FOLDER / f"shard-{index:05d}.parquet"


def check_positions(positions: Positions) -> str | tuple[int, ...]:
    """ "last", "all", or a tuple of ints (negative counts from a prompt's end)."""
    if positions in ("last", "all"):
        return positions
    items = [positions] if isinstance(positions, int) else positions
    if isinstance(items, str) or not all(isinstance(p, int) and not isinstance(p, bool) for p in items) or not items:
        raise ValueError(
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


def batch_layout(n_tokens: Sequence[int], positions: str | tuple[int, ...]):
    """(padded positions to ask for, and per prompt: [(own position, column in the padded list)])."""
    pos = max(n_tokens)
    own = [own_positions(positions, n) for n in n_tokens]
    padded = sorted({pos - n + r for n, rs in zip(n_tokens, own) for r in rs})
    column = {p: i for i, p in enumerate(padded)}
    return padded, [[(r, column[pos - n + r]) for r in rs] for n, rs in zip(n_tokens, own)]


def _fixed_lists(values: np.ndarray):
    """[rows, k] -> a pyarrow fixed-size-list column."""
    import pyarrow as pa

    rows, k = values.shape
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), k)


def _check_padding(result_mask: torch.Tensor, n_tokens: Sequence[int]) -> None:
    found = result_mask.sum(dim=1).tolist()
    if found != list(n_tokens):
        raise RuntimeError(
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

    def run_batch(self, model: HookedLlama, records: Sequence[PromptRecord], n_tokens: Sequence[int]) -> pa.Table:
        from ..lens.logit import logit_lens

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
        n_readouts, n_targets = result.n_readouts, result.n_targets
        pos = result.tokens.shape[1]
        columns: dict[str, list] = {}

        def add(name: str, values) -> None:
            columns.setdefault(name, []).append(values)

        for b, record in enumerate(records):
            own = [r for r, _ in keep[b]]
            cols = [c for _, c in keep[b]]
            n_rows = n_readouts * len(own)  # read-out major, then position
            times = max(n_targets, 1)  # one row per target, targets varying fastest

            def rows(tensor: torch.Tensor) -> np.ndarray:  # [n_readouts, n_pos, ...] -> [n_rows * times, ...]
                values = tensor[:, cols].reshape(n_rows, *tensor.shape[2:]).numpy()
                return np.repeat(values, times, axis=0)

            add("prompt", np.full(n_rows * times, record.index, dtype=np.int64))
            add("label", np.repeat(np.repeat(np.array(result.labels), len(own)), times))
            add("layer", np.repeat(np.repeat(np.array(result.layers, dtype=np.int32), len(own)), times))
            add("readout", np.repeat(np.repeat(np.array(result.readouts), len(own)), times))
            add("position", np.repeat(np.tile(np.array(own, dtype=np.int32), n_readouts), times))
            tokens = [result.str_tokens[b][pos - n_tokens[b] + r] for r in own]
            add("token", np.repeat(np.tile(np.array(tokens, dtype=object), n_readouts), times))
            top_ids, top_probs = rows(result.top_ids[b]), rows(result.top_probs[b].float())
            top_strs = [result.top_strs[b][k][c] for k in range(n_readouts) for c in cols]
            add("top_token", np.array([s[0] for s in top_strs for _ in range(times)], dtype=object))
            add("top_id", top_ids[:, 0])
            add("top_prob", top_probs[:, 0])
            add("entropy", rows(result.entropy[b].float()))
            add("kl_to_final", rows(result.kl_to_final[b].float()))
            add("top_ids", top_ids)
            add("top_probs", top_probs)
            add("top_tokens", [s for s in top_strs for _ in range(times)])
            if n_targets:
                add("target", np.tile(np.array(result.target_strs[b], dtype=object), n_rows))
                add("target_id", np.tile(result.target_ids[b].numpy(), n_rows))
                for name in ("target_prob", "target_logit", "target_rank"):
                    values = getattr(result, f"{name}s")[b][:, cols]  # [n_readouts, n_pos, n_targets]
                    add(name, values.reshape(-1).numpy())
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

    def run_batch(self, model: HookedLlama, records: Sequence[PromptRecord], n_tokens: Sequence[int]) -> pa.Table:
        from ..lens.attribution import direct_logit_attribution

        padded, keep = batch_layout(n_tokens, self.positions)
        result = direct_logit_attribution(
            model,
            [r.text for r in records],
            target=[list(r.target) for r in records],
            positions=padded,
            heads=self.heads,
        )
        _check_padding(result.attention_mask, n_tokens)
        n_components, n_targets = len(result.labels), result.target_ids.shape[1]
        pos = result.tokens.shape[1]
        columns: dict[str, list] = {}

        def add(name: str, values) -> None:
            columns.setdefault(name, []).append(values)

        for b, record in enumerate(records):
            own = [r for r, _ in keep[b]]
            cols = [c for _, c in keep[b]]
            n_rows = n_components * len(own) * n_targets  # component major, then position, then target
            per_component = len(own) * n_targets
            add("prompt", np.full(n_rows, record.index, dtype=np.int64))
            add("label", np.repeat(np.array(result.labels), per_component))
            add("layer", np.repeat(np.array(result.layers, dtype=np.int32), per_component))
            add("component", np.repeat(np.array(result.kinds), per_component))
            add("position", np.tile(np.repeat(np.array(own, dtype=np.int32), n_targets), n_components))
            tokens = [result.str_tokens[b][pos - n_tokens[b] + r] for r in own]
            add("token", np.tile(np.repeat(np.array(tokens, dtype=object), n_targets), n_components))
            add("target", np.tile(np.array(result.target_strs[b], dtype=object), n_components * len(own)))
            add("target_id", np.tile(result.target_ids[b].numpy(), n_components * len(own)))
            add("contribution", result.components[b][:, cols].reshape(-1).numpy())
            add("final_logit", np.tile(result.final_logits[b][cols].reshape(-1).numpy(), n_components))
            if self.heads:
                # Each attention component's row carries its heads' shares [n_heads]; other rows none.
                heads = result.heads[b][:, :, cols]  # [n_layers, n_heads, n_pos, n_targets]
                layer_row = {layer: i for i, layer in enumerate(result.head_layers)}
                cells = []
                for layer, kind in zip(result.layers, result.kinds):
                    for p in range(len(own)):
                        for t in range(n_targets):
                            cells.append(heads[layer_row[layer], :, p, t].tolist() if kind == "attn" else None)
                add("head_contributions", cells)
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

    def run_batch(self, model: HookedLlama, records: Sequence[PromptRecord], n_tokens: Sequence[int]) -> None:
        tokens, mask = model.prepare_tokens([r.text for r in records])
        if mask is not None:
            _check_padding(mask, n_tokens)
        with torch.inference_mode():
            model(tokens, attention_mask=mask, stop_at_layer=self.stop_at_layer)
        return None


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


# --------------------------------------------------------------------------------------------------- shards
@dataclass(frozen=True)
class ShardJob:
    """Everything a worker needs to process shards, besides the model (plain data: it travels to Ray actors).

    Attributes:
        out: the run's folder (on a filesystem every worker sees).
        task: LensTask, AttributionTask or ForwardTask.
        batch_size: prompts per forward pass.
        activations: hook names to store, or None.
        activation_positions: "all", "last" or ints, as for the task's positions.
        activation_dtype: the stored dtype's name, or None for the model's.
    """

    out: str
    task: Any
    batch_size: int
    activations: tuple[str, ...] | None = None
    activation_positions: str | tuple[int, ...] = "all"
    activation_dtype: str | None = None

    @property
    def writes_rows(self) -> bool:
        return not isinstance(self.task, ForwardTask)

    def files(self, shard: int) -> list[Path]:
        """The shard's output files; it is finished when all exist (each is renamed into place when whole)."""
        from ..data.store import shard_file

        paths = []
        if self.activations:
            paths.append(Path(self.out) / STORE_FOLDER / shard_file(shard))
        if self.writes_rows:
            paths.append(shard_path(self.out, shard))
        return paths

    def is_done(self, shard: int) -> bool:
        return all(path.exists() for path in self.files(shard))


def process_shard(
    model: HookedLlama, job: ShardJob, shard: Shard, on_batch: Callable[[int, int], None] | None = None
) -> dict[str, Any]:
    """Runs a shard's prompts in batches and writes its files (activations first, rows last, each atomically).

    Args:
        model: the model, with its tokenizer.
        job: what to compute and where to write it.
        shard: the prompts, sorted by token count (so batches need little padding).
        on_batch: called with (prompts, tokens) after each batch (a progress bar).

    Returns:
        {"shard", "n_prompts", "n_tokens", "seconds"}.
    """
    import pyarrow.parquet as pq

    from ..validate import resolve_dtype

    start = time.perf_counter()
    if model.tokenizer is None:
        raise ValueError("the dataset runner needs a model with a tokenizer; pass tokenizer= (a path or object)")
    records = list(shard.records)
    n_tokens = [len(model.tokenizer.encode(r.text)) for r in records]
    capture = None
    if job.activations:
        capture = ActivationCapture(job.activations, resolve_dtype(job.activation_dtype))
    tables = []
    for b0 in range(0, len(records), job.batch_size):
        batch, counts = records[b0 : b0 + job.batch_size], n_tokens[b0 : b0 + job.batch_size]
        context = nullcontext()
        if capture is not None:
            keep = [own_positions(job.activation_positions, n) for n in counts]
            capture.start_batch([r.index for r in batch], counts, keep)
            context = model.hooks(capture.fwd_hooks())
        with context:
            table = job.task.run_batch(model, batch, counts)
        if table is not None:
            tables.append(table)
        if on_batch is not None:
            on_batch(len(batch), sum(counts))
    if capture is not None:
        write_shard(Path(job.out) / STORE_FOLDER, shard.index, capture.tensors())
    if job.writes_rows:
        import pyarrow as pa

        path = shard_path(job.out, shard.index)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = temporary_name(path)
        pq.write_table(pa.concat_tables(tables), temporary)
        os.replace(temporary, path)  # a file under its final name is whole: resume trusts it
    return {
        "shard": shard.index,
        "n_prompts": len(records),
        "n_tokens": sum(n_tokens),
        "seconds": time.perf_counter() - start,
    }
