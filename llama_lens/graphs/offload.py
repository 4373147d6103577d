"""Long prompts: the attribution rows and the adjacency on disk instead of in memory.

While the graph is built, each row has a column for every active feature, error and token of the prompt:
[max_feature_nodes + n_logits, n_active + (n_layers + 1) * pos] values. At 512 tokens, 30 layers and ~32
features per token and layer that is ~500,000 columns, 4 GB in float32 at 2,048 rows, and ranking the features
by influence would copy it twice more. Offloaded (`ll.attribution_graph(..., offload=True)`), the rows go to an
unlinked file as they are computed (`DiskRows`) and are read back a chunk of rows at a time by the influence
ranking (`influence.partial_influences_by_chunks`) and by the last step, which keeps only the selected
features' columns. The square adjacency of the result is then a memory map of another unlinked file
(`mapped_zeros`): only its feature and logit rows are ever written, and pages are read in as they are used.

Files go to `folder` (default: the system's temporary folder, see `tempfile.gettempdir`); unlinked at once,
they are gone when the process lets go of them, even if it is killed.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import numpy as np
import torch

from ..errors import ArgumentError
from ..model.memory import exceeds_offload_share

# Rows are read back in chunks of about this many bytes.
CHUNK_BYTES = 128 * 2**20


def resolve_offload(offload: bool | str, rows_bytes: int) -> bool:
    """Whether to offload: True, False, or "auto" (when `rows_bytes` exceeds `model.memory.OFFLOAD_SHARE` of the
    memory available; never when that is unknown)."""
    if offload == "auto":
        return exceeds_offload_share(rows_bytes)
    if isinstance(offload, bool):
        return offload
    raise ArgumentError(f"offload must be True, False or 'auto', got {offload!r}")


def _check_folder(folder: str | os.PathLike | None) -> str | None:
    if folder is not None and not os.path.isdir(folder):
        raise ArgumentError(f"offload_dir must be an existing folder, got {str(folder)!r}")
    return None if folder is None else os.fspath(folder)


class DiskRows:
    """A [n_rows, n_columns] matrix in an unlinked file, written by ranges of rows and read back in chunks.

    Plain reads and writes, not a memory map: the file's pages stay in the page cache, out of this process's
    resident memory.

    Args:
        n_rows, n_columns: the matrix's shape (the file is sparse until rows are written).
        dtype: torch.float32 or torch.float64.
        folder: where the file goes (None: the system's temporary folder).
    """

    def __init__(self, n_rows: int, n_columns: int, dtype: torch.dtype, folder: str | os.PathLike | None) -> None:
        self.n_rows, self.n_columns, self.dtype = n_rows, n_columns, dtype
        self.row_bytes = n_columns * dtype.itemsize
        # Unlinked at once; closed by close(), or with this object.
        self.file = tempfile.TemporaryFile(dir=_check_folder(folder), prefix="llama_lens-graph-rows-")  # noqa: SIM115
        self.file.truncate(n_rows * self.row_bytes)

    def write(self, start: int, rows: torch.Tensor) -> None:
        """Writes `rows` [k, n_columns] at rows start .. start + k."""
        self.file.seek(start * self.row_bytes)
        self.file.write(memoryview(rows.contiguous().numpy()).cast("B"))

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Rows start .. stop as a new tensor [stop - start, n_columns]."""
        out = torch.empty(stop - start, self.n_columns, dtype=self.dtype)
        self.file.seek(start * self.row_bytes)
        view = memoryview(out.numpy()).cast("B")
        done = 0
        while done < len(view):
            got = self.file.readinto(view[done:])
            if not got:
                raise OSError(f"the graph's row file ended {len(view) - done} bytes early")
            done += got
        return out

    def chunks(self, stop: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, rows [c, n_columns]) over rows 0 .. stop, about CHUNK_BYTES at a time."""
        step = max(1, CHUNK_BYTES // max(self.row_bytes, 1))
        for start in range(0, stop, step):
            yield start, self.read(start, min(start + step, stop))

    def close(self) -> None:
        self.file.close()


def mapped_zeros(n_rows: int, n_columns: int, dtype: torch.dtype, folder: str | os.PathLike | None) -> torch.Tensor:
    """A zero tensor [n_rows, n_columns] over a memory map of an unlinked (sparse) file: its pages are read in
    when used, and can be dropped from memory again by the OS, as the pages of any file."""
    with tempfile.TemporaryFile(dir=_check_folder(folder), prefix="llama_lens-graph-adjacency-") as file:
        # The map holds the file open after `file` closes; numpy extends the file to the map's size.
        array = np.memmap(file, dtype=torch.empty(0, dtype=dtype).numpy().dtype, mode="w+", shape=(n_rows, n_columns))
    return torch.from_numpy(array)
