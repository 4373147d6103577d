"""Rows of an activation-store shard (a safetensors file), read with `os.pread` instead of a memory map.

A memory-mapped file that is cut short while mapped kills the process with SIGBUS on the first read past its new
end, and a page half past it reads as zeros. `pread` returns fewer bytes instead, which is checked: a shard cut or
damaged at any time gives an ArgumentError naming the file and the tensor, never a signal or silent zeros.

The safetensors layout: 8 bytes (little-endian u64) of header length, a JSON header {name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}}, then the tensors' bytes (offsets relative to the header's
end). Every size in the header is checked against the file before anything is read or allocated.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import torch

from ..errors import ArgumentError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


class ShardReader:
    """One shard file open for reading rows (the first dimension) of its tensors.

    Args:
        path: the safetensors file.
        size: its size as the store's index records it, or None; checked before anything is read.
    """

    def __init__(self, path: Path, *, size: int | None = None) -> None:
        self.path = path
        self._fd = -1
        self._fd = os.open(path, os.O_RDONLY)
        try:
            self.size = os.fstat(self._fd).st_size
            if size is not None and self.size != size:
                raise ArgumentError(
                    f"{path} is {self.size} bytes, but the store's index says {size}: the shard was cut short or "
                    "replaced after it was written; rerun the dataset run into its folder to recompute it"
                )
            self.tensors = self._header()
        except BaseException:
            self.close()
            raise

    def _read(self, offset: int, n: int, what: str) -> bytes:
        data = os.pread(self._fd, n, offset)
        if len(data) != n:
            raise ArgumentError(
                f"{self.path}: {what} ends past the file's end ({offset + n} > {offset + len(data)} bytes): the "
                "shard was cut short; rerun the dataset run into its folder to recompute it"
            )
        return data

    def _header(self) -> dict[str, tuple[torch.dtype, tuple[int, ...], int]]:
        """{name: (dtype, shape, absolute offset of its bytes)}, every entry checked against the file."""
        (length,) = struct.unpack("<Q", self._read(0, 8, "the header length"))
        if length > min(MAX_HEADER, self.size - 8):
            raise ArgumentError(f"{self.path}: header length {length} does not fit the file ({self.size} bytes)")
        try:
            header = json.loads(self._read(8, length, "the header"))
        except (UnicodeDecodeError, ValueError) as err:
            raise ArgumentError(f"{self.path}: the header is not JSON ({err})") from None
        if not isinstance(header, dict):
            raise ArgumentError(f"{self.path}: the header is {type(header).__name__}, not a JSON object")
        start, data_size = 8 + length, self.size - 8 - length
        tensors = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            tensors[name] = self._entry(name, entry, start, data_size)
        return tensors

    def _entry(self, name: str, entry: Any, start: int, data_size: int) -> tuple[torch.dtype, tuple[int, ...], int]:
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise ArgumentError(f"{where}: its header entry is {type(entry).__name__}, not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPES:
            raise ArgumentError(f"{where}: key 'dtype' is {dtype!r}, not one of {sorted(DTYPES)}")
        if not isinstance(shape, list) or not all(_count(d) for d in shape):
            raise ArgumentError(f"{where}: key 'shape' is {shape!r}, not a list of non-negative ints")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_count(o) for o in offsets):
            raise ArgumentError(f"{where}: key 'data_offsets' is {offsets!r}, not [begin, end]")
        begin, end = offsets
        itemsize = torch.empty((), dtype=DTYPES[dtype]).element_size()
        if not begin <= end <= data_size or end - begin != math.prod(shape) * itemsize:
            raise ArgumentError(
                f"{where}: data_offsets {offsets} do not hold shape {shape} of {dtype} inside the file's "
                f"{data_size} data bytes"
            )
        return DTYPES[dtype], tuple(shape), start + begin

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._tensor(name)[1]

    def dtype(self, name: str) -> torch.dtype:
        return self._tensor(name)[0]

    def dtype_name(self, name: str) -> str:
        """The dtype as safetensors names it ("F32", "BF16", ...)."""
        return {v: k for k, v in DTYPES.items()}[self.dtype(name)]

    def _tensor(self, name: str) -> tuple[torch.dtype, tuple[int, ...], int]:
        if name not in self.tensors:
            raise ArgumentError(f"{self.path} holds no tensor {name!r} (it holds {sorted(self.tensors)})")
        return self.tensors[name]

    def rows(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of tensor `name`, as a new tensor [stop - start, *shape[1:]]."""
        dtype, shape, offset = self._tensor(name)
        stop = shape[0] if stop is None else stop
        if not 0 <= start <= stop <= shape[0]:
            raise ArgumentError(f"{self.path}: rows [{start}, {stop}) of tensor {name!r} are outside its {shape[0]}")
        row_bytes = math.prod(shape[1:]) * torch.empty((), dtype=dtype).element_size()
        data = self._read(offset + start * row_bytes, (stop - start) * row_bytes, f"tensor {name!r}")
        if not data:
            return torch.empty((stop - start, *shape[1:]), dtype=dtype)
        return torch.frombuffer(bytearray(data), dtype=dtype).reshape(stop - start, *shape[1:])

    def close(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
