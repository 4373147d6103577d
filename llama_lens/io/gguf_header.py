"""GGUF headers: the metadata key/values and tensor records of a llama.cpp `.gguf` file, checked against its size.

A GGUF file is a little-endian header (magic "GGUF", version, tensor and key counts), metadata key/values
(`general.*`, `llama.*` or `qwen2.*`, `tokenizer.ggml.*`), one record per tensor (name, dims, quantization type,
offset), then the tensor data, aligned. The header is parsed here rather than by `gguf.GGUFReader`, which makes a
numpy view of every vocabulary entry and takes seconds on a 50k-token vocabulary.
"""

from __future__ import annotations

import math
import mmap
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
    """Sequential little-endian reads from a buffer, each past-the-end read naming the file as truncated."""

    def __init__(self, buffer: Any, path: Path) -> None:
        self.buffer, self.path, self.pos = buffer, path, 0

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buffer):
            raise self.truncated()
        (value,) = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        length = self.unpack("<Q")
        if self.pos + length > len(self.buffer):
            raise self.truncated()
        raw = self.buffer[self.pos : self.pos + length]
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(
                f"{self.path}: a string in the GGUF header is not UTF-8; the file is corrupt"
            ) from None

    def strings(self, count: int) -> list[str]:
        """`count` strings in a row: a vocabulary's tokens or merges, so the loop is kept tight."""
        buffer, pos, unpack = self.buffer, self.pos, _U64.unpack_from
        strings = []
        try:
            for _ in range(count):
                (length,) = unpack(buffer, pos)
                strings.append(buffer[pos + 8 : pos + 8 + length].decode("utf-8"))
                pos += 8 + length
        except struct.error:
            raise self.truncated() from None
        except UnicodeDecodeError:
            raise CheckpointError(
                f"{self.path}: a string in the GGUF header is not UTF-8; the file is corrupt"
            ) from None
        if pos > len(buffer):  # the last string's slice stopped at the end of the file
            raise self.truncated()
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
                return self.strings(count)
            if item_type in _SCALAR_FORMATS:
                # Numeric arrays (token types, scores) in one step rather than one value at a time.
                fmt = _SCALAR_FORMATS[item_type]
                size = struct.calcsize(fmt) * count
                if self.pos + size > len(self.buffer):
                    raise self.truncated()
                values = np.frombuffer(self.buffer, dtype=np.dtype(fmt), count=count, offset=self.pos).tolist()
                self.pos += size
                return values
            return [self.value(item_type, key, depth + 1) for _ in range(count)]
        if value_type not in _SCALAR_FORMATS:
            raise CheckpointError(
                f"{self.path}: metadata key {key!r} has unknown value type {value_type}; corrupt file"
            )
        return self.unpack(_SCALAR_FORMATS[value_type])

    def truncated(self) -> CheckpointError:
        return CheckpointError(
            f"{self.path}: the GGUF header ends early (at byte {len(self.buffer)}); the file is truncated or not a "
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
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    size = path.stat().st_size
    if size < 24:
        raise CheckpointError(f"{path}: {size} bytes, too short for a GGUF file; the file is truncated")
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        cursor = _Cursor(mapped, path)
        if mapped[:4] != GGUF_MAGIC:
            raise CheckpointError(f"{path}: not a GGUF file (it does not start with b'GGUF')")
        cursor.pos = 4
        version = cursor.unpack("<I")
        if version not in GGUF_VERSIONS:
            swapped = struct.unpack(">I", struct.pack("<I", version))[0]
            why = "a big-endian GGUF, which" if swapped in GGUF_VERSIONS else f"GGUF version {version}, which"
            raise CheckpointError(f"{path}: {why} llama_lens cannot read (it reads little-endian versions 2 and 3)")
        n_tensors, n_keys = cursor.unpack("<Q"), cursor.unpack("<Q")
        metadata: dict[str, Any] = {}
        for _ in range(n_keys):
            key = cursor.string()
            metadata[key] = cursor.value(cursor.unpack("<I"), key)
        records = []
        for _ in range(n_tensors):
            name = cursor.string()
            n_dims = cursor.unpack("<I")
            dims = [cursor.unpack("<Q") for _ in range(n_dims)]
            type_id, offset = cursor.unpack("<I"), cursor.unpack("<Q")
            records.append((name, dims, type_id, offset))
        header_end = cursor.pos
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0:
        raise CheckpointError(f"{path}: general.alignment must be a positive integer, got {alignment!r}")
    data_start = -(-header_end // alignment) * alignment
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
    return GGUFHeader(path, version, metadata, tensors)
