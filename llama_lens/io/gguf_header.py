"""GGUF headers: the metadata key/values and tensor records of a llama.cpp `.gguf` file, checked against its size.

A GGUF file is a little-endian header (magic "GGUF", version, tensor and key counts), metadata key/values
(`general.*`, `llama.*` or `qwen2.*`, `tokenizer.ggml.*`), one record per tensor (name, dims, quantization type,
offset), then the tensor data, aligned. The header is parsed here rather than by `gguf.GGUFReader`, which makes a
numpy view of every vocabulary entry and takes seconds on a 50k-token vocabulary.

The header is read with `os.pread` into memory, a growing window at a time, never through a memory map: a page of a
mapped file that was truncated since is a SIGBUS that kills the process, where a short read is an error naming the
file. Every count and size the header gives is checked against the bytes left in the file before anything is
allocated for it, and every tensor's offset against the alignment and the other tensors.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)  # version 1 (2023) used 32-bit counts; llama.cpp itself no longer reads it
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types (gguf.GGUFValueType): struct format of the scalars; 8 is a string, 9 an array.
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
MAX_ARRAY_DEPTH = 64  # arrays of arrays: llama.cpp writes none; far more than any writer would
MAX_DIMS = 4  # GGML_MAX_DIMS: ggml tensors have at most 4 axes
MAX_ALIGNMENT = 2**20  # llama.cpp writes 32; a larger power of two is legal but a megabyte is already absurd
FIRST_WINDOW = 2**20  # bytes read first; the window doubles as the header needs
# The fewest bytes one item can take, so that a count is checked against the bytes left before a list is built.
_MIN_KEY_BYTES = 8 + 4 + 1  # key length, value type, a one-byte value
_MIN_RECORD_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset
_MIN_ITEM_BYTES = {_STRING: 8, _ARRAY: 12}
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor record of a GGUF header.

    Attributes:
        name: as stored ("blk.3.attn_q.weight").
        qtype: the quantization type's name ("Q4_1", "F32", ...), as gguf.GGMLQuantizationType names it.
        shape: in torch order (the last axis is the one stored contiguously, in blocks).
        start, end: the byte range of its data in the file.
    """

    name: str
    qtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class GGUFHeader:
    """What a GGUF file says before its tensor data: version, metadata and tensor records."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]


class _Cursor:
    """Sequential little-endian reads of a file's header, each past-the-end read naming the file as truncated.

    `buffer` holds the file's first bytes, read with `os.pread`; `need` reads more (doubling) when a read goes past
    it, so a header is read once whatever its size, and a file shorter than it claims is an error, not a SIGBUS.
    """

    def __init__(self, fd: int, size: int, path: Path) -> None:
        self.fd, self.size, self.path, self.pos = fd, size, path, 0
        self.buffer = b""
        self.need(min(size, FIRST_WINDOW))

    def need(self, end: int) -> None:
        """Makes sure `buffer` holds the bytes up to `end`, or raises: the file is truncated."""
        if end <= len(self.buffer):
            return
        if end > self.size:
            raise self.truncated()
        target = min(self.size, max(end, 2 * len(self.buffer)))
        more = os.pread(self.fd, target - len(self.buffer), len(self.buffer))
        self.buffer += more
        if len(self.buffer) < end:  # shorter than its stat said: truncated while being read
            self.size = len(self.buffer)
            raise self.truncated()

    def check_count(self, count: int, min_bytes: int, what: str) -> None:
        """Refuses a count of items that could not fit in the rest of the file, before any list is built."""
        if count * min_bytes > self.size - self.pos:
            raise CheckpointError(
                f"{self.path}: the GGUF header ends early (at byte {self.size}): {what} claims {count} items, more "
                f"than the {self.size - self.pos} bytes left could hold; the file is truncated or corrupt"
            )

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(self.pos + size)
        (value,) = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        length = self.unpack("<Q")
        self.need(self.pos + length)
        raw = self.buffer[self.pos : self.pos + length]
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(
                f"{self.path}: a string in the GGUF header is not UTF-8; the file is corrupt"
            ) from None

    def strings(self, count: int, key: str) -> list[str]:
        """`count` strings in a row: a vocabulary's tokens or merges, so the loop is kept tight."""
        self.check_count(count, 8, f"metadata key {key!r}")
        strings = []
        buffer, pos, unpack = self.buffer, self.pos, _U64.unpack_from
        try:
            for _ in range(count):
                if pos + 8 > len(buffer):
                    self.pos = pos
                    self.need(pos + 8)
                    buffer = self.buffer
                (length,) = unpack(buffer, pos)
                if pos + 8 + length > len(buffer):
                    self.pos = pos
                    self.need(pos + 8 + length)
                    buffer = self.buffer
                strings.append(buffer[pos + 8 : pos + 8 + length].decode("utf-8"))
                pos += 8 + length
        except UnicodeDecodeError:
            raise CheckpointError(
                f"{self.path}: a string in the GGUF header is not UTF-8; the file is corrupt"
            ) from None
        self.pos = pos
        return strings

    def value(self, value_type: int, key: str, depth: int = 0) -> Any:
        if depth > MAX_ARRAY_DEPTH:
            # 12 bytes per level: a few MB of nested arrays would otherwise end in a RecursionError.
            raise CheckpointError(
                f"{self.path}: metadata key {key!r} nests arrays more than {MAX_ARRAY_DEPTH} deep; the file is corrupt"
            )
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            item_type, count = self.unpack("<I"), self.unpack("<Q")
            if item_type == _STRING:
                return self.strings(count, key)
            if item_type in _SCALAR_FORMATS:
                # Numeric arrays (token types, scores) in one step rather than one value at a time.
                fmt = _SCALAR_FORMATS[item_type]
                size = struct.calcsize(fmt) * count
                self.need(self.pos + size)
                values = np.frombuffer(self.buffer, dtype=np.dtype(fmt), count=count, offset=self.pos).tolist()
                self.pos += size
                return values
            self.check_count(count, _MIN_ITEM_BYTES.get(item_type, 1), f"metadata key {key!r}")
            return [self.value(item_type, key, depth + 1) for _ in range(count)]
        if value_type not in _SCALAR_FORMATS:
            raise CheckpointError(
                f"{self.path}: metadata key {key!r} has unknown value type {value_type}; corrupt file"
            )
        return self.unpack(_SCALAR_FORMATS[value_type])

    def truncated(self) -> CheckpointError:
        return CheckpointError(
            f"{self.path}: the GGUF header ends early (at byte {self.size}); the file is truncated or not a "
            "GGUF file; download it again"
        )


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """Parses a GGUF file's metadata and tensor records, checked against the file's size.

    Args:
        path: the .gguf file.

    Returns:
        GGUFHeader; `metadata` maps each key (except the format's own `GGUF.*`) to an int, float, bool, str or
        list, as `gguf.ReaderField.contents()` gives it.

    Raises:
        CheckpointError: naming the file (and tensor), for a file that is truncated, corrupt, big-endian, of an
            unknown version, or holds a tensor of a type the gguf package does not know.
    """
    path = Path(path)
    size = path.stat().st_size
    if size < 24:
        raise CheckpointError(f"{path}: {size} bytes, too short for a GGUF file; the file is truncated")
    with open(path, "rb", buffering=0) as file:
        cursor = _Cursor(file.fileno(), size, path)
        if cursor.buffer[:4] != GGUF_MAGIC:
            raise CheckpointError(f"{path}: not a GGUF file (it does not start with b'GGUF')")
        cursor.pos = 4
        version = cursor.unpack("<I")
        if version not in GGUF_VERSIONS:
            swapped = struct.unpack(">I", struct.pack("<I", version))[0]
            why = "a big-endian GGUF, which" if swapped in GGUF_VERSIONS else f"GGUF version {version}, which"
            raise CheckpointError(f"{path}: {why} llama_lens cannot read (it reads little-endian versions 2 and 3)")
        n_tensors, n_keys = cursor.unpack("<Q"), cursor.unpack("<Q")
        cursor.check_count(n_keys, _MIN_KEY_BYTES, "the metadata key count")
        cursor.check_count(n_tensors, _MIN_RECORD_BYTES, "the tensor count")
        metadata = _read_metadata(cursor, n_keys)
        records = _read_tensor_records(cursor, n_tensors)
        header_end = cursor.pos
    alignment = _alignment(metadata, path)
    data_start = -(-header_end // alignment) * alignment
    tensors = _check_tensors(records, path, size, alignment, data_start)
    return GGUFHeader(path, version, metadata, tensors)


def _read_metadata(cursor: _Cursor, n_keys: int) -> dict[str, Any]:
    metadata: dict[str, Any] = {}
    for _ in range(n_keys):
        key = cursor.string()
        if key in metadata:
            # llama.cpp's reader refuses it too; taking either value silently could give another model.
            raise CheckpointError(f"{cursor.path}: metadata key {key!r} is stored twice; the file is corrupt")
        metadata[key] = cursor.value(cursor.unpack("<I"), key)
    return metadata


def _read_tensor_records(cursor: _Cursor, n_tensors: int) -> list[tuple[str, list[int], int, int]]:
    records = []
    for _ in range(n_tensors):
        name = cursor.string()
        n_dims = cursor.unpack("<I")
        if n_dims > MAX_DIMS:
            raise CheckpointError(
                f"{cursor.path}: tensor {name!r} claims {n_dims} dimensions, more than ggml's {MAX_DIMS}; the file is "
                "corrupt"
            )
        dims = [cursor.unpack("<Q") for _ in range(n_dims)]
        type_id, offset = cursor.unpack("<I"), cursor.unpack("<Q")
        records.append((name, dims, type_id, offset))
    return records


def _alignment(metadata: dict[str, Any], path: Path) -> int:
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if (
        isinstance(alignment, bool)
        or not isinstance(alignment, int)
        or not 0 < alignment <= MAX_ALIGNMENT
        or alignment & (alignment - 1)
    ):
        raise CheckpointError(
            f"{path}: metadata key 'general.alignment' must be a power of two up to {MAX_ALIGNMENT}, got "
            f"{alignment!r}; the file is corrupt"
        )
    return alignment


def _check_tensors(
    records: list[tuple[str, list[int], int, int]], path: Path, size: int, alignment: int, data_start: int
) -> dict[str, GGUFTensor]:
    """The tensor records, each checked: known type, whole blocks, aligned, inside the file, overlapping no other."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    tensors = {}
    for name, dims, type_id, offset in records:
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            raise CheckpointError(
                f"{path}: tensor {name!r} has quantization type id {type_id}, which the installed gguf package "
                "does not know; upgrade it (pip install -U gguf)"
            ) from None
        block_size, block_bytes = GGML_QUANT_SIZES[qtype]
        if dims and dims[0] % block_size:
            raise CheckpointError(
                f"{path}: tensor {name!r} has rows of {dims[0]} values, not a multiple of the {qtype.name} block size "
                f"{block_size}; the file is corrupt"
            )
        if offset % alignment:
            raise CheckpointError(
                f"{path}: tensor {name!r} starts at data offset {offset}, not a multiple of general.alignment "
                f"{alignment}; the file is corrupt"
            )
        start = data_start + offset
        end = start + math.prod(dims) // block_size * block_bytes
        if end > size:
            raise CheckpointError(
                f"{path}: tensor {name!r} ends at byte {end}, past the end of the file ({size} bytes); the file is "
                "truncated; download it again"
            )
        if name in tensors:
            raise CheckpointError(f"{path}: tensor {name!r} is stored twice; the file is corrupt")
        tensors[name] = GGUFTensor(name, qtype.name, tuple(reversed(dims)), start, end)
    # Two tensors sharing bytes would each load the other's data as its own weights.
    ordered = sorted(tensors.values(), key=lambda t: (t.start, t.end))
    for before, after in zip(ordered, ordered[1:]):
        if after.start < before.end and after.end > after.start:
            raise CheckpointError(
                f"{path}: tensors {before.name!r} (bytes {before.start}-{before.end}) and {after.name!r} (bytes "
                f"{after.start}-{after.end}) overlap; the file is corrupt"
            )
    return tensors
