"""Meta `.pth` shards: their table of tensors read with `torch.load(weights_only=True)`, their data with plain reads.

`weights_only=True` means a shard holding anything but tensors is refused, never executed. The table is
unpickled onto the meta device: no tensor data is read, and each storage records its byte offset in the file
(`_checkpoint_offset`, the offset of its zip record; torch writes records uncompressed). A tensor is then read
with `os.preadv` (or seek + readinto where there is none) straight into the caller's tensor, never through a
memory map: a page of a mapped file that was truncated since is a SIGBUS that kills the process (a notebook
kernel, and the user's work with it), whereas a read that finds the file shorter is an exception naming it.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import pickle
import struct
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..config import LlamaConfig, read_json_object
from ..errors import CheckpointError
from ..files import warn_if_not_finite
from .index import RawIndex, StoredTensor
from .names import (
    META_IGNORED,
    META_PERMUTED,
    META_SPLIT_DIM,
    META_TO_CANONICAL,
    layer_template,
    permute_qk_to_rotate_half,
)
from .reader import CheckpointReader, Read, WeightFiles

READ_CHUNK_BYTES = 8 * 2**20  # stored bytes read at a time when a read casts, moves or scatters into a slice


def load_pth(path: Path) -> dict[str, torch.Tensor]:
    """A Meta consolidated.*.pth as a dict of tensors on the meta device (shapes, dtypes, no data).

    Read the data with `read_pth_tensor`.

    Raises:
        CheckpointError: for a file holding anything but a dict of tensors (never executed: weights_only),
            one torch cannot read, or one in torch's legacy (pre-zip) format.
    """
    try:
        state = torch.load(path, map_location="meta", weights_only=True)
    except pickle.UnpicklingError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: holds objects other than tensors, so it was not executed (weights_only=True refused it: "
            f"{first_line}). Only open .pth files from a source you trust, and convert them to a plain "
            "state dict of tensors."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot be read as a torch checkpoint ({err}); it may be truncated") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, expected a dict of tensors")
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{path}: entry {name!r} is a {type(value).__name__}, expected tensors only (a Meta state dict)"
            )
        if getattr(value.untyped_storage(), "_checkpoint_offset", None) is None:
            raise CheckpointError(
                f"{path}: saved in torch's legacy format (tensor {name!r} has no place in a zip record); "
                "save it again with a recent torch.save"
            )
    _check_stored_records(path, state)
    return state


def _check_stored_records(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Refuses a shard whose tensor data could not be read with plain reads at `_checkpoint_offset`.

    The data are read straight from the file, which assumes what torch.save writes: each storage an uncompressed
    (stored) zip record, starting at the offset torch reports. A zip re-packed by another tool (Python's zipfile
    with deflate, say) still loads with torch.load, but its compressed bytes read as weights would be garbage
    (NaN logits). Each storage must start a stored record's data and fit inside it.
    """
    records: dict[int, zipfile.ZipInfo] = {}
    try:
        with zipfile.ZipFile(path) as archive, open(path, "rb", buffering=0) as handle:
            for info in archive.infolist():
                local = os.pread(handle.fileno(), 30, info.header_offset)
                if len(local) < 30 or local[:4] != b"PK\x03\x04":
                    raise CheckpointError(
                        f"{path}: zip record {info.filename!r} has no local header at byte {info.header_offset}; "
                        "the file is corrupt"
                    )
                name_length, extra_length = struct.unpack_from("<HH", local, 26)
                records[info.header_offset + 30 + name_length + extra_length] = info
    except (OSError, zipfile.BadZipFile, ValueError) as err:
        raise CheckpointError(f"{path}: its zip directory cannot be read ({err}); the file may be damaged") from None
    for name, value in state.items():
        storage = value.untyped_storage()
        info = records.get(storage._checkpoint_offset)
        if info is None:
            raise CheckpointError(
                f"{path}: tensor {name!r} does not start a zip record (offset {storage._checkpoint_offset}); the "
                "file was re-packed or is corrupt; save it again with torch.save"
            )
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise CheckpointError(
                f"{path}: tensor {name!r} is in zip record {info.filename!r}, which is compressed; llama_lens "
                "reads the uncompressed records torch.save writes: load it with torch.load and save it again "
                "with torch.save"
            )
        if storage.nbytes() > info.file_size:
            raise CheckpointError(
                f"{path}: tensor {name!r} needs {storage.nbytes()} bytes, but its zip record {info.filename!r} "
                f"holds {info.file_size}; the file is corrupt"
            )


def saved_name(path: Path) -> str | None:
    """The name a .pth file was saved under: `torch.save(obj, "consolidated.01.pth")` puts every record of the
    zip in a folder named after the file ("consolidated.01/data.pkl"), and renaming the file later keeps it.
    None when it cannot be told (saved to an open file: "archive/"; not a zip: the load names the problem)."""
    try:
        with zipfile.ZipFile(path) as archive:
            first = archive.namelist()[:1]
    except (OSError, zipfile.BadZipFile, ValueError):
        return None
    folder = first[0].split("/", 1)[0] if first and "/" in first[0] else None
    return None if folder in (None, "archive") else folder


def read_at(fd: int, tensor: torch.Tensor, offset: int, path: Path, what: str) -> None:
    """Fills a contiguous CPU tensor with the bytes of file `fd` from `offset` (no shared file position).

    Raises:
        CheckpointError: the file ends first (truncated since it was indexed).
    """
    view = memoryview(tensor.view(-1).view(torch.uint8).numpy()).cast("B") if tensor.numel() else memoryview(b"")
    done = 0
    while done < len(view):
        if hasattr(os, "preadv"):
            count = os.preadv(fd, [view[done:]], offset + done)
        else:  # Windows: a handle of our own per read, so threads never share its position
            with open(fd, "rb", buffering=0, closefd=False) as handle:
                handle.seek(offset + done)
                count = handle.readinto(view[done:])
        if not count:
            raise CheckpointError(
                f"{path}: ended at byte {offset + done} while reading {what}; the file was truncated since the "
                "checkpoint was opened; download it again and open the checkpoint again"
            )
        done += count


def read_pth_tensor(fd: int, meta: torch.Tensor, destination: torch.Tensor, path: Path, what: str) -> None:
    """Copies the stored values of `meta` (a tensor from `load_pth`) from file `fd` into `destination`.

    `destination` has `meta`'s shape, any float dtype, any device, and may be a non-contiguous slice (a
    model-parallel piece's place in the joined tensor). A contiguous stored tensor is read a few MiB of rows
    at a time (straight into `destination` when it is contiguous CPU memory of the stored dtype); any other is
    read whole, as laid out in its storage, then copied.
    """
    itemsize = meta.element_size()
    start = meta.untyped_storage()._checkpoint_offset + meta.storage_offset() * itemsize
    if not meta.is_contiguous():
        extent = 1 + sum((size - 1) * stride for size, stride in zip(meta.shape, meta.stride())) if meta.numel() else 0
        stored = torch.empty(extent, dtype=meta.dtype)
        read_at(fd, stored, start, path, what)
        destination.copy_(stored.as_strided(meta.shape, meta.stride()).to(destination.device))
        return
    if destination.is_contiguous() and destination.dtype == meta.dtype and destination.device.type == "cpu":
        read_at(fd, destination, start, path, what)
        return
    if meta.dim() == 0:
        stored = torch.empty((), dtype=meta.dtype)
        read_at(fd, stored, start, path, what)
        destination.copy_(stored)
        return
    rows = meta.shape[0]
    row_bytes = math.prod(meta.shape[1:]) * itemsize
    step = max(1, READ_CHUNK_BYTES // max(row_bytes, 1))
    buffer = torch.empty((min(step, rows), *meta.shape[1:]), dtype=meta.dtype)
    for first in range(0, rows, step):
        part = buffer[: min(step, rows - first)]
        read_at(fd, part, start + first * row_bytes, path, what)
        # Moved first, then cast: a GPU casts faster, and only the stored bytes cross the bus (CPU: no-op).
        destination[first : first + len(part)].copy_(part.to(destination.device))


class PthShards:
    """The .pth shards of a Meta checkpoint: tables unpickled once, files kept open for many reads.

    Opening a shard unpickles its whole table of tensors, which costs more than reading a small tensor out of
    it (a 70B release: 8 shards of 80 layers): a reader that goes through the layers one by one opens the
    shards once, not once per layer or tensor.

    Each model-parallel piece is read (and cast) straight into its place in the caller's tensor, q/k rows
    permuted to the rotate-half layout on the way. Reads are positioned (`os.preadv`), so threads may share
    one `PthShards`.

    Args:
        file_names: the shards, in model-parallel rank order.
        open_path: file name -> its path; called before a shard is opened and before each read from it (the
            checkpoint checks there that the file did not change since it was indexed).
        lazy: open each shard when a read first needs it (a replicated tensor needs only the first shard),
            instead of all of them now.
    """

    def __init__(self, file_names: Sequence[str], open_path: Callable[[str], Path], *, lazy: bool = False) -> None:
        self.file_names = list(file_names)
        self._open_path = open_path
        # file name -> (open descriptor, stored name -> tensor on the meta device)
        self._opened: dict[str, tuple[int, dict[str, torch.Tensor]]] = {}
        if not lazy:
            for file_name in self.file_names:
                self._opened_shard(file_name)

    def _opened_shard(self, file_name: str) -> tuple[int, dict[str, torch.Tensor]]:
        if file_name not in self._opened:
            path = self._open_path(file_name)
            table = load_pth(path)
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            self._opened[file_name] = (fd, table)
        return self._opened[file_name]

    def close(self) -> None:
        """Closes the shards (a later read opens them again)."""
        for fd, _ in self._opened.values():
            os.close(fd)
        self._opened.clear()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit `os` may already be gone
            self.close()

    def copy_into(self, name: str, target: torch.Tensor, *, split_dim: int | None, qk_heads: int | None = None) -> int:
        """Copies one stored tensor, its model-parallel pieces joined, into `target`.

        Args:
            name: the stored name ("layers.3.attention.wq.weight"), held by every shard.
            target: contiguous tensor of the joined shape, any float dtype, any device (pieces are moved there
                as stored, then cast).
            split_dim: the axis the pieces join on; None for a tensor replicated in every shard (the first
                shard's copy is read).
            qk_heads: for a q/k weight, its number of heads: the rows are permuted from Meta's interleaved
                layout to the rotate-half one on the way. None keeps the stored layout.

        Returns:
            bytes read, as stored.

        Raises:
            CheckpointError: a shard changed on disk since it was indexed (checked before the read), or is
                shorter than its table says (truncated while being read).
        """
        file_names = self.file_names if split_dim is not None else self.file_names[:1]
        pieces = []  # (descriptor, path, tensor on the meta device)
        for file_name in file_names:
            path = self._open_path(file_name)
            fd, table = self._opened_shard(file_name)
            pieces.append((fd, path, table[name]))
        what = repr(name)
        if qk_heads is not None:
            # Joined first, as stored (a split may fall inside a head, e.g. one KV head shared by two ranks),
            # then permuted into the target.
            stored = [torch.empty(meta.shape, dtype=meta.dtype) for _, _, meta in pieces]
            for (fd, path, meta), piece in zip(pieces, stored):
                read_pth_tensor(fd, meta, piece, path, what)
            source = stored[0] if len(stored) == 1 else torch.cat(stored, dim=split_dim)
            del stored
            permute_qk_to_rotate_half(source.to(target.device), qk_heads, out=target)
        elif len(pieces) == 1:  # whole in one shard, or replicated
            fd, path, meta = pieces[0]
            read_pth_tensor(fd, meta, target, path, what)
        else:  # each model-parallel piece into its slice of the target
            start = 0
            for fd, path, meta in pieces:
                size = meta.shape[split_dim]
                read_pth_tensor(fd, meta, target.narrow(split_dim, start, size), path, what)
                start += size
        return sum(meta.nbytes for _, _, meta in pieces)

    def copy_rows_into(self, name: str, target: torch.Tensor, start: int, *, split_dim: int | None) -> int:
        """Reads rows start .. start + len(target) of one stored tensor, its model-parallel pieces joined, into
        `target`: only those rows' bytes are read (the embedding rows of a prompt, a block of the unembedding).

        Args:
            name: the stored name ("tok_embeddings.weight"), a 2-d tensor whose rows are not permuted on read.
            target: contiguous tensor [rows, columns of the joined tensor], any float dtype, any device.
            start: the first row.
            split_dim: the axis the pieces join on (0: each piece holds a range of rows; 1: each holds every
                row's range of columns); None for a replicated tensor (the first shard's copy is read).

        Returns:
            bytes read, as stored.

        Raises:
            CheckpointError: a shard changed on disk since it was indexed (checked before the read), or is
                shorter than its table says.
        """
        file_names = self.file_names if split_dim is not None else self.file_names[:1]
        stop, read_bytes = start + target.shape[0], 0
        piece_start = 0  # split_dim 0: the piece's first row in the joined tensor; 1: its first column
        for file_name in file_names:
            path = self._open_path(file_name)
            fd, table = self._opened_shard(file_name)
            piece = table[name]
            if split_dim == 0:  # the piece's rows that fall in [start, stop), into their place in the target
                first, last = max(start, piece_start), min(stop, piece_start + piece.shape[0])
                part = piece[first - piece_start : last - piece_start]
                destination = target[first - start : last - start]
                piece_start += piece.shape[0]
                if first >= last:
                    continue
            else:  # every row of [start, stop), this piece's columns
                part, destination = piece[start:stop], target
                if split_dim == 1:
                    destination = target.narrow(1, piece_start, piece.shape[1])
                    piece_start += piece.shape[1]
            read_pth_tensor(fd, part, destination, path, repr(name))
            read_bytes += part.nbytes
        return read_bytes


class PthReader(CheckpointReader):
    """A Meta release: `consolidated.00.pth` (`.01`, ... one per model-parallel rank, joined on read along the
    axis each weight was split on) and params.json. The shards stay open across reads (`open_files`): opening
    one unpickles its whole table of tensors, which costs more than reading a layer out of it."""

    format = "meta"
    config_name = "params.json"
    n_layers_key = "n_layers"
    to_canonical = META_TO_CANONICAL
    ignored = META_IGNORED

    def content_digest(self, path: Path) -> str | None:
        """The zip archive's central directory: each record's name, size, offset and CRC-32, which covers the
        pickled table of tensors and, through the CRCs torch writes, their data too."""
        digest = hashlib.sha256()
        try:
            with zipfile.ZipFile(path) as archive:
                for info in archive.infolist():
                    digest.update(f"{info.filename}\0{info.file_size}\0{info.header_offset}\0{info.CRC}\n".encode())
        except (OSError, zipfile.BadZipFile, ValueError):
            return None
        return digest.hexdigest()

    def raw_index(self) -> RawIndex:
        """Each shard's table: one piece per shard of every tensor (each shard must hold every tensor)."""
        raw: RawIndex = {}
        for file in self.files:
            for name, tensor in load_pth(file).items():
                dtype = str(tensor.dtype).removeprefix("torch.")
                raw.setdefault(name, []).append(
                    {"file": file.name, "dtype": dtype, "shape": list(tensor.shape), "offsets": None}
                )
        for name, pieces in raw.items():
            if len(pieces) != len(self.files):
                where = [piece["file"] for piece in pieces]
                raise CheckpointError(
                    f"tensor {name!r} is in {where} but not in every model-parallel shard "
                    f"{[f.name for f in self.files]}; a shard is damaged or from another model"
                )
        return raw

    def read_config(self, raw: RawIndex) -> LlamaConfig:
        params_file = self.required_file("params.json", "Meta")
        params = read_json_object(params_file)
        if "tok_embeddings.weight" not in raw:
            raise CheckpointError(f"missing tensor 'tok_embeddings.weight' in {self.files_text()}")
        # The embedding gives the vocabulary when params.json says -1 (Llama 2): its vocab rows are the ones
        # not split across shards (Llama 2 splits d_model), or the sum of them (Llama 3 splits the vocab).
        pieces = raw["tok_embeddings.weight"]
        d_model = params.get("dim")  # checked by from_meta below
        if len(pieces) > 1 and pieces[0]["shape"][1] != d_model:
            d_vocab = pieces[0]["shape"][0]
        else:
            d_vocab = sum(piece["shape"][0] for piece in pieces)
        cfg = LlamaConfig.from_meta(params, d_vocab=d_vocab, source=str(params_file))
        # params.json cannot say the embeddings are tied; a release without `output.weight` ties them.
        tied = "output.weight" not in raw
        return cfg.replace(tie_embeddings=tied, checkpoint_dtype=pieces[0]["dtype"])

    def tokenizer_path(self) -> Path | None:
        """Beside the weights, else a tokenizer.model one folder up, where Llama 2 releases keep it (only that:
        a tokenizer.json one folder up belongs to whatever else lives there, not to this checkpoint)."""
        found = super().tokenizer_path()
        if found is None and (self.folder.parent / "tokenizer.model").is_file():
            return self.folder.parent / "tokenizer.model"
        return found

    def qk_heads(self, stored_name: str, cfg: LlamaConfig) -> int | None:
        heads_attr = META_PERMUTED.get(layer_template(stored_name)[0])
        return None if heads_attr is None else getattr(cfg, heads_attr)

    def split_fraction(self, name: str, shape: torch.Size, expected: torch.Size) -> int | None:
        """k when a weight holds 1/k of its split axis and all of the other (k > 1): shards are missing."""
        template = layer_template(name)[0]
        if len(shape) != 2:
            return None
        # The embedding's axis depends on the Llama generation (see META_SPLIT_DIM): either may be split.
        axes = (0, 1) if template == "tok_embeddings.weight" else (META_SPLIT_DIM.get(template),)
        for split_dim in axes:
            if split_dim is not None and shape[1 - split_dim] == expected[1 - split_dim]:
                parts, rest = divmod(expected[split_dim], shape[split_dim])
                if parts > 1 and not rest:
                    return parts
        return None

    def open_files(self, *, lazy: bool = True) -> WeightFiles:
        return WeightFiles(PthShards([file.name for file in self.files], self.stamps.check, lazy=lazy))

    def read(self, reads: list[Read], files: WeightFiles | None) -> int:
        with contextlib.ExitStack() as stack:
            if files is None:
                files = stack.enter_context(self.open_files())
            read_bytes = 0
            for stored, target, qk_heads in reads:
                read_bytes += files.shards.copy_into(stored.name, target, split_dim=stored.split_dim, qk_heads=qk_heads)
                warn_if_not_finite(target, f"tensor {stored.name!r} in {self.folder} ({self.where(stored)})")
        return read_bytes

    def read_rows(self, stored: StoredTensor, start: int, target: torch.Tensor, files: WeightFiles | None) -> int:
        with contextlib.ExitStack() as stack:
            if files is None:
                files = stack.enter_context(self.open_files())
            return files.shards.copy_rows_into(stored.name, target, start, split_dim=stored.split_dim)
