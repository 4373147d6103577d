"""What a dataset run wrote (`DatasetResult`), and the per-read-out summary written at its end."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data.safe_files import write_atomic
from ..data.store import ActivationDataset
from .shards import shard_path

if TYPE_CHECKING:
    import pandas as pd

SUMMARY_FILE = "summary.parquet"


@dataclasses.dataclass
class DatasetResult:
    """What a dataset run wrote, and ways to read it.

    Attributes:
        out: the run's folder.
        manifest: the run's parameters (out/manifest.json).
        n_shards: shards in the plan.
        n_skipped: shards already finished by an earlier run, not recomputed.
        stats: per shard computed by this call: shard, n_prompts, n_tokens, seconds (and worker, with Ray).
        seconds: wall time of this call's processing (after the plan, before the summary).
    """

    out: Path
    manifest: dict[str, Any]
    n_shards: int
    n_skipped: int
    stats: list[dict[str, Any]]
    seconds: float

    @property
    def prompts_without_positions(self) -> list[int]:
        """Indices of the prompts left out because they have none of the asked positions (too short for
        `positions=[k]`): they have no rows."""
        return list(self.manifest["prompts"].get("without_positions", []))

    @property
    def prompts_per_second(self) -> float:
        return sum(s["n_prompts"] for s in self.stats) / self.seconds if self.seconds else 0.0

    def to_frame(self, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """Every shard's rows as one DataFrame, ordered by prompt (each prompt's rows in forward order)."""
        import pandas as pd
        import pyarrow.parquet as pq

        tables = [pq.read_table(shard_path(self.out, k), columns=columns) for k in range(self.n_shards)]
        frame = pd.concat([t.to_pandas() for t in tables], ignore_index=True)
        if "prompt" in frame:
            frame = frame.sort_values("prompt", kind="stable").reset_index(drop=True)
        return frame

    def frame(self, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """Deprecated spelling of `to_frame`, the name every result of llama_lens uses; kept for one release."""
        warnings.warn("DatasetResult.frame() is deprecated; use .to_frame()", DeprecationWarning, stacklevel=2)
        return self.to_frame(columns)

    def summary(self) -> pd.DataFrame:
        """out/summary.parquet: per read-out (or component) means over prompts."""
        import pandas as pd

        return pd.read_parquet(self.out / SUMMARY_FILE)

    def activations(self, hook_names: Sequence[str] | None = None, *, unit: str = "token") -> ActivationDataset:
        """The activation store as a torch Dataset (see `ActivationDataset`)."""
        return ActivationDataset(self.out, hook_names, unit=unit)

    def __repr__(self) -> str:
        return (
            f"DatasetResult(out={str(self.out)!r}, task={self.manifest['task']!r}, shards={self.n_shards}, "
            f"skipped={self.n_skipped}, prompts/s={self.prompts_per_second:.1f})"
        )


def write_summary(out: Path, task: Any, *, n_shards: int) -> None:
    """Reads the shards' metric columns and writes out/summary.parquet (atomically)."""
    import pandas as pd
    import pyarrow.parquet as pq

    present = set(pq.read_schema(shard_path(out, 0)).names)
    columns = [c for c in task.summary_columns if c in present]
    frame = pd.concat(
        [pq.read_table(shard_path(out, k), columns=columns).to_pandas() for k in range(n_shards)], ignore_index=True
    )
    summary = task.summarize(frame)
    write_atomic(out / SUMMARY_FILE, lambda temporary: summary.to_parquet(temporary, index=False))
