"""How one shard of prompts is processed: its batches run through a task (with the activation store's hooks when
asked), and its files written atomically. Executors (local or Ray) call `process_shard`; the driver
(`llama_lens.runs.runner`) plans the shards and merges the summaries.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.safe_files import inside, matches_record, write_atomic
from ..data.store import STORE_FOLDER, ActivationCapture, shard_file, write_shard
from ..errors import ArgumentError
from ..model.protocols import LanguageModel
from ..validate import resolve_dtype
from .prompts import Shard, own_positions
from .tasks import ForwardTask

SHARD_FOLDER = "shards"


def shard_path(out: str | os.PathLike, index: int) -> Path:
    return Path(out) / SHARD_FOLDER / f"shard-{index:05d}.parquet"


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
        """The shard's output files; it is finished when each is there and matches its digest record (written
        with it: a file cut, changed or replaced since is recomputed, not trusted)."""
        paths = []
        if self.activations:
            paths.append(Path(self.out) / STORE_FOLDER / shard_file(shard))
        if self.writes_rows:
            paths.append(shard_path(self.out, shard))
        return paths

    def is_done(self, shard: int) -> bool:
        for path in self.files(shard):  # a symlink out of the run's folder is refused, not read as this run's
            inside(Path(self.out), str(path.relative_to(self.out)), source=path.parent, key=path.name)
        return all(matches_record(path) for path in self.files(shard))


def process_shard(
    model: LanguageModel, job: ShardJob, *, shard: Shard, on_batch: Callable[[int, int], None] | None = None
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

    start = time.perf_counter()
    if model.tokenizer is None:
        raise ArgumentError("the dataset runner needs a model with a tokenizer; pass tokenizer= (a path or object)")
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
            capture.start_batch([r.index for r in batch], counts, positions=keep)
            context = model.hooks(capture.fwd_hooks())
        with context:
            table = job.task.run_batch(model, batch, n_tokens=counts)
        if table is not None:
            tables.append(table)
        if on_batch is not None:
            on_batch(len(batch), sum(counts))
    if capture is not None:
        write_shard(Path(job.out) / STORE_FOLDER, shard.index, tensors=capture.tensors())
    if job.writes_rows:
        import pyarrow as pa

        rows = pa.concat_tables(tables)
        # A file under its final name is whole, and its digest record says so: resume trusts it while they match.
        write_atomic(shard_path(job.out, shard.index), lambda temporary: pq.write_table(rows, temporary), record=True)
    return {
        "shard": shard.index,
        "n_prompts": len(records),
        "n_tokens": sum(n_tokens),
        "seconds": time.perf_counter() - start,
    }
