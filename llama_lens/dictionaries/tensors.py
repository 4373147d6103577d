"""The tensors of a dictionary's safetensors files, read when asked: whole (the encoder, the biases) or by rows
(the decoder directions of the features that fired).

Opening reads the headers only, so opening a dictionary of gigabytes costs milliseconds; `bytes_read` counts
what the reads since then cost, so a test (or a user) can see that a feature lens read only the active rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch

from ..errors import CheckpointError, UnknownNameError, did_you_mean
from ..io.safetensors import read_exactly, read_safetensors_header, read_stored_into


class TensorFile:
    """One safetensors file: its header now, its tensors on demand.

    Args:
        path: the .safetensors file.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.header = read_safetensors_header(self.path)
        self.bytes_read = 0

    def __contains__(self, name: str) -> bool:
        return name in self.header

    def names(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._info(name)["shape"])

    def stored_dtype(self, name: str) -> torch.dtype:
        return getattr(torch, self._info(name)["dtype"])

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole tensor `name`, in `dtype` (default: as stored)."""
        info = self._info(name)
        stored = getattr(torch, info["dtype"])
        out = torch.empty(info["shape"], dtype=dtype or stored)
        with open(self.path, "rb", buffering=0) as file:
            file.seek(info["offsets"][0])
            read_stored_into(file, out.view(-1), stored, f"tensor {name!r}")
        self.bytes_read += info["offsets"][1] - info["offsets"][0]
        return out

    def read_rows(
        self, name: str, rows: Iterable[int] | torch.Tensor, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Rows `rows` (along the first dimension) of tensor `name`: [len(rows), *shape[1:]], reading only their
        bytes. A cross-layer decoder [d_sae, n_out_layers, d_model] gives each feature's directions at once.

        Runs of consecutive rows are read in one call each, so reading every row costs one read."""
        info = self._info(name)
        shape = info["shape"]
        if len(shape) < 2:
            raise CheckpointError(f"{self.path}: tensor {name!r} has shape {shape}; rows are read from 2-D or wider")
        stored = getattr(torch, info["dtype"])
        ids = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= shape[0]):
            raise CheckpointError(f"{self.path}: rows of {name!r} must lie in [0, {shape[0]}), got {ids.tolist()}")
        row_bytes = math.prod(shape[1:]) * stored.itemsize
        order = torch.argsort(ids)
        sorted_ids = ids[order].tolist()
        # Read in file order, as stored, into one tensor (no torch op per run: on a busy machine each costs
        # a thread-pool round trip); then one cast and one scatter back into the order asked for.
        raw = torch.empty(len(ids), *shape[1:], dtype=stored)
        raw_bytes = memoryview(raw.view(-1).view(torch.uint8).numpy()).cast("B")
        with open(self.path, "rb", buffering=0) as file:
            first = 0
            while first < len(sorted_ids):
                # The run of consecutive ids starting at `first` (duplicates are read again, harmlessly).
                last = first
                while last + 1 < len(sorted_ids) and sorted_ids[last + 1] == sorted_ids[last] + 1:
                    last += 1
                file.seek(info["offsets"][0] + sorted_ids[first] * row_bytes)
                read_exactly(file, raw_bytes[first * row_bytes : (last + 1) * row_bytes], f"rows of {name!r}")
                self.bytes_read += (last - first + 1) * row_bytes
                first = last + 1
        out = torch.empty(raw.shape, dtype=dtype or stored)
        out[order] = raw.to(out.dtype)
        return out

    def _info(self, name: str) -> dict:
        if name not in self.header:
            raise UnknownNameError(
                f"{self.path}: no tensor {name!r}{did_you_mean(name, self.header, hint=f'it holds {self.names()}')}"
            )
        return self.header[name]
