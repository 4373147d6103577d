"""Safetensors files: the header (which bytes hold which tensor), checked against the file, and reads; and the
reader of Hugging Face checkpoints made of them (`SafetensorsReader`).

A safetensors file is 8 bytes (little-endian header length), a JSON header naming each tensor's dtype, shape
and [start, end) byte range after the header, then the raw tensor data. Reads go through plain `readinto`
calls, never a memory map: pages read through a map count towards the process until it is unmapped, so a
bfloat16 -> float32 load would briefly hold both copies.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ..config import LlamaConfig
from ..errors import CheckpointError
from ..files import require_regular_file, warn_if_not_finite
from .index import RawIndex, StoredTensor
from .names import HF_IGNORED, HF_INDEX_FILE, HF_TO_CANONICAL
from .reader import CheckpointReader, Read, WeightFiles

# safetensors dtype codes: torch dtype name and bytes per element. Only float dtypes hold Llama weights;
# the others are listed so that a file holding them still gets its offsets checked and a clear error.
SAFETENSORS_DTYPES = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "U64": ("uint64", 8),
    "I32": ("int32", 4),
    "U32": ("uint32", 4),
    "I16": ("int16", 2),
    "U16": ("uint16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}

# The safetensors library refuses longer headers: a length field of the whole file's size would read a
# shard of gigabytes as its header before failing.
MAX_HEADER_BYTES = 100_000_000
READ_CHUNK_BYTES = 8 * 2**20  # stored bytes read and converted at a time when a read casts or moves


def read_header_bytes(path: Path) -> bytes:
    """The first bytes of a safetensors file: its 8-byte header length and the JSON header, bounds checked.

    Raises:
        CheckpointError: naming the file, for one too short or with a header length past its end or over
            the 100 MB safetensors allows.
    """
    size = require_regular_file(path).st_size  # a FIFO would block open() forever
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: truncated ({size} bytes), not a safetensors file; re-download it")
        (header_len,) = struct.unpack("<Q", prefix)
        if 8 + header_len > size:
            raise CheckpointError(
                f"{path}: header length {header_len} runs past the end of the file ({size} bytes); "
                "the file is truncated or not a safetensors file; re-download it"
            )
        if header_len > MAX_HEADER_BYTES:
            raise CheckpointError(
                f"{path}: header length {header_len} is over the {MAX_HEADER_BYTES} bytes safetensors allows; "
                "the file is corrupt or not a safetensors file; re-download it"
            )
        return prefix + file.read(header_len)


def read_safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """Tensor name -> {"dtype", "shape", "offsets"} from a safetensors header, checked against the file size.

    `dtype` is the torch dtype name; `offsets` the [start, end) byte range from the start of the file.

    Raises:
        CheckpointError: naming the file (and tensor) for a truncated or corrupt file.
    """
    raw = read_header_bytes(path)[8:]
    size = path.stat().st_size
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: corrupt safetensors header (not valid JSON: {err}); re-download it") from None
    except RecursionError:
        raise CheckpointError(f"{path}: corrupt safetensors header (JSON nested too deeply); re-download it") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object); re-download it")
    data_start = 8 + len(raw)
    index = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            code, shape, (start, end) = info["dtype"], [int(n) for n in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}: {info!r}") from None
        if code not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {code!r}, which llama_lens cannot read")
        dtype, itemsize = SAFETENSORS_DTYPES[code]
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end):
            raise CheckpointError(f"{path}: tensor {name!r} has bad data offsets {[start, end]}")
        if data_start + end > size:
            raise CheckpointError(
                f"{path}: tensor {name!r} ends at byte {data_start + end}, past the end of the file "
                f"({size} bytes); the file is truncated; re-download it"
            )
        if end - start != math.prod(shape) * itemsize:
            raise CheckpointError(
                f"{path}: tensor {name!r} holds {end - start} bytes but its shape {shape} and dtype {dtype} "
                f"need {math.prod(shape) * itemsize}; the file is corrupt"
            )
        index[name] = {"dtype": dtype, "shape": shape, "offsets": [data_start + start, data_start + end]}
    # Two tensors sharing bytes would load one's weights as the other's; the safetensors library refuses that.
    by_start = sorted(index.items(), key=lambda item: item[1]["offsets"])
    for (before, first), (after, second) in zip(by_start, by_start[1:]):
        if second["offsets"][0] < first["offsets"][1]:
            raise CheckpointError(
                f"{path}: tensors {before!r} and {after!r} overlap in the file (bytes {first['offsets']} and "
                f"{second['offsets']}); the file is corrupt; re-download it"
            )
    return index


def read_stored_into(file: BinaryIO, flat: torch.Tensor, stored: torch.dtype, what: str = "a tensor") -> None:
    """Fills `flat` (a contiguous tensor [numel]) from the next bytes of `file`, which hold `stored` values:
    straight in when the dtype agrees and `flat` is in host memory, else through one buffer of at most
    READ_CHUNK_BYTES, cast (and moved) into `flat` as they arrive."""
    if flat.dtype == stored and flat.device.type == "cpu":
        read_exactly_into(file, flat, what)
        return
    chunk = max(1, READ_CHUNK_BYTES // stored.itemsize)
    buffer = torch.empty(min(chunk, flat.numel()), dtype=stored)
    for first in range(0, flat.numel(), chunk):
        part = buffer[: min(chunk, flat.numel() - first)]
        read_exactly_into(file, part, what)
        flat[first : first + len(part)].copy_(part)


def read_exactly_into(file: BinaryIO, tensor: torch.Tensor, what: str) -> None:
    """Fills a contiguous CPU tensor with the next bytes of `file` (readinto releases the GIL)."""
    read_exactly(file, memoryview(tensor.view(torch.uint8).numpy()).cast("B"), what)


def read_exactly(file: BinaryIO, view: memoryview, what: str) -> None:
    """Fills the byte view `view` with the next bytes of `file`; a short file is a CheckpointError."""
    done = 0
    while done < len(view):
        count = file.readinto(view[done:])
        if not count:
            raise CheckpointError(f"{file.name}: ended early while reading {what}; the file is truncated")
        done += count


class SafetensorsFiles:
    """Safetensors files of one folder, each opened on first use and closed by `close` (or the `with` block).

    A handle's seek and read are two calls: open one `SafetensorsFiles` per read (opening is cheap), not one
    shared by threads.

    Args:
        open_path: file name -> the path to open; called once per file (the checkpoint checks there that the
            file did not change since it was indexed).
    """

    def __init__(self, open_path: Callable[[str], Path]) -> None:
        self._open_path = open_path
        self._handles: dict[str, BinaryIO] = {}

    def read_into(self, file_name: str, start: int, stored_dtype: torch.dtype, target: torch.Tensor, what: str) -> int:
        """Fills `target` (contiguous, any dtype, any device) with the values stored from byte `start` of a file.

        Returns:
            bytes read.

        Raises:
            CheckpointError: the file ends before `target` is full (naming the file and `what`).
        """
        handle = self._handles.get(file_name)
        if handle is None:
            # Closed by close(): the handle outlives this call, to serve the next tensors of the same file.
            handle = open(self._open_path(file_name), "rb", buffering=0)  # noqa: SIM115
            self._handles[file_name] = handle
        handle.seek(start)
        read_stored_into(handle, target.view(-1), stored_dtype, what)
        return target.numel() * stored_dtype.itemsize

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def __enter__(self) -> SafetensorsFiles:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class SafetensorsReader(CheckpointReader):
    """A Hugging Face checkpoint: `model.safetensors`, or the shards `model.safetensors.index.json` names, and
    config.json. Each read opens the files it needs (an open is cheap), so threads never share a position."""

    format = "hf"
    config_name = "config.json"
    n_layers_key = "num_hidden_layers"
    to_canonical = HF_TO_CANONICAL
    ignored = HF_IGNORED

    def content_digest(self, path: Path) -> str | None:
        """Of a safetensors file its header (length field and JSON); of the shard index all of it."""
        try:
            data = read_header_bytes(path) if path.suffix == ".safetensors" else path.read_bytes()
        except (OSError, ValueError):  # CheckpointError is a ValueError: building the index names the problem
            return None
        return hashlib.sha256(data).hexdigest()

    def raw_index(self) -> RawIndex:
        """Each file's header, checked against the shard index's weight_map when there is one."""
        raw: RawIndex = {}
        for file in self.files:
            for name, info in read_safetensors_header(file).items():
                if name in raw:
                    raise CheckpointError(
                        f"tensor {name!r} is stored twice: in {raw[name][0]['file']} and in {file.name}"
                    )
                raw[name] = [{"file": file.name} | info]
        for name, file_name in (self.weight_map or {}).items():
            if name not in raw or raw[name][0]["file"] != file_name:
                raise CheckpointError(
                    f"{self.folder / HF_INDEX_FILE} says tensor {name!r} is in {file_name}, but it is not there"
                )
        return raw

    def read_config(self, raw: RawIndex) -> LlamaConfig:
        return LlamaConfig.from_file(self.required_file("config.json", "Hugging Face"))

    def missing_hint(self, canonical: str) -> str:
        if canonical == "unembed.weight":
            return f" ({self.config_name} sets tie_word_embeddings=false, so lm_head.weight must be stored)"
        return ""

    def read(self, reads: list[Read], files: WeightFiles | None) -> int:
        read_bytes = 0
        with SafetensorsFiles(self.folder.joinpath) as handles:  # the caller checked the stamps
            for stored, target, _ in reads:  # q/k rows are stored as they are used
                piece = stored.pieces[0]
                stored_dtype = getattr(torch, stored.dtype)
                read_bytes += handles.read_into(piece.file, piece.offsets[0], stored_dtype, target, repr(stored.name))
                warn_if_not_finite(target, f"tensor {stored.name!r} in {self.folder / piece.file}")
        return read_bytes

    def read_rows(self, stored: StoredTensor, start: int, target: torch.Tensor, files: WeightFiles | None) -> int:
        piece = stored.pieces[0]
        stored_dtype = getattr(torch, stored.dtype)
        first_byte = piece.offsets[0] + start * target.shape[1] * stored_dtype.itemsize
        with SafetensorsFiles(self.folder.joinpath) as handles:
            return handles.read_into(piece.file, first_byte, stored_dtype, target, repr(stored.name))
