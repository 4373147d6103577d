"""The tensor index: which file holds which bytes of each stored tensor, built from the file headers and cached.

Building the index reads headers only (safetensors' JSON header; the pickled table of a .pth shard, whose
tensor data stays on disk) and is the slow part of opening a large checkpoint: a Meta shard is unpickled
whole. So the index is kept on disk as JSON (`write_index_cache`) and used again while every weight file
keeps the size, modification time and header digest it had (`FileStamps`); any change, a cache that does not
have the form written here, or one whose entries were edited, and it is built afresh.

    raw index    stored name -> [{"file", "dtype", "shape", "offsets"}, ...]    one entry per file holding it
    StoredTensor the entries joined: one logical tensor, its pieces and the axis they join on
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..files import write_text_atomic
from .names import META_SPLIT_DIM, layer_template

INDEX_CACHE_VERSION = 2  # 2: file digests, and a digest of the tensors' entries

RawIndex = dict[str, list[dict[str, Any]]]


@dataclass(frozen=True)
class Piece:
    """One stored tensor in one file (a Meta model-parallel shard holds one piece of each weight)."""

    file: str
    shape: tuple[int, ...]
    offsets: tuple[int, int] | None  # safetensors or GGUF byte range; None for .pth


@dataclass(frozen=True)
class StoredTensor:
    """A logical stored tensor: its pieces and how they join."""

    name: str
    dtype: str  # a torch dtype name; for GGUF, the quantization type ("Q4_1", "F16", ...)
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]
    split_dim: int | None  # None: one piece, or replicated pieces (read the first)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes on disk: the byte ranges of its pieces (safetensors, GGUF), else numel times the item size."""
        if all(piece.offsets is not None for piece in self.pieces):
            pieces = self.pieces if self.split_dim is not None else self.pieces[:1]
            return sum(piece.offsets[1] - piece.offsets[0] for piece in pieces)
        return self.numel * getattr(torch, self.dtype).itemsize

    @property
    def files(self) -> list[str]:
        """The files a read needs: all of a split tensor's, the first of a replicated one's."""
        pieces = self.pieces[:1] if self.split_dim is None else self.pieces
        return [piece.file for piece in pieces]


# ------------------------------------------------------------------------------------------- file stamps
class FileStamps:
    """Size and modification time (ns) of each weight file when the checkpoint was opened, and a digest of the
    part of it the index is built from.

    Reads check the size and time (`check`) before and after they touch a file: a file replaced since would
    give other weights at the indexed offsets. The digests decide whether a cached index still describes the
    files: a header rewritten in place with its size and time kept (a copy with `cp -p`, a clock set back)
    changes them. Each is a sha256 of what is cheap to read and what the index depends on.

    Args:
        folder: the checkpoint folder.
        files: the files to stamp (weight files, and the shard index that names them).
        digest: path -> sha256 of what of it the index is built from, None where it cannot be read so (the
            format's reader knows which bytes: `CheckpointReader.content_digest`).
    """

    def __init__(self, folder: Path, files: list[Path], digest: Callable[[Path], str | None]) -> None:
        self.folder = folder
        self.stamps: dict[str, list[int]] = {}
        self.digests: dict[str, str | None] = {}
        for file in files:
            stat = file.stat()
            self.stamps[file.name] = [stat.st_size, stat.st_mtime_ns]
            self.digests[file.name] = digest(file)

    def check(self, file_name: str) -> Path:
        """The file's path, after checking that it is unchanged.

        Raises:
            CheckpointError: the file changed (or vanished) since the checkpoint was opened.
        """
        path = self.folder / file_name
        try:
            stat = os.stat(path)
        except OSError:
            stat = None
        if stat is None or [stat.st_size, stat.st_mtime_ns] != self.stamps.get(file_name):
            raise CheckpointError(f"{path} changed since the checkpoint was opened; open it again")
        return path

    def check_all(self, file_names: Iterable[str]) -> None:
        """`check` of each file.

        Raises:
            CheckpointError: a file changed (or vanished) since the checkpoint was opened.
        """
        for file_name in file_names:
            self.check(file_name)


# ------------------------------------------------------------------------------------------------ joining
def join_pieces(raw: RawIndex, d_model: int) -> dict[str, StoredTensor]:
    """The raw index as StoredTensors: Meta pieces joined along the axis their weight is split on.

    Args:
        raw: stored name -> its pieces (`CheckpointReader.raw_index`).
        d_model: from the config; tells which axis of the embedding a Meta release split.

    Raises:
        CheckpointError: pieces with different dtypes, or shapes that cannot be joined.
    """
    stored = {}
    for name, entries in raw.items():
        pieces = tuple(
            Piece(e["file"], tuple(e["shape"]), tuple(e["offsets"]) if e["offsets"] else None) for e in entries
        )
        dtypes = {e["dtype"] for e in entries}
        if len(dtypes) > 1:
            raise CheckpointError(f"tensor {name!r} has different dtypes {sorted(dtypes)} in different shards")
        split_dim = _split_dim(name, pieces, d_model)
        shape = list(pieces[0].shape)
        if split_dim is not None:
            shape[split_dim] = sum(piece.shape[split_dim] for piece in pieces)
        stored[name] = StoredTensor(name, dtypes.pop(), tuple(shape), pieces, split_dim)
    return stored


def _split_dim(name: str, pieces: tuple[Piece, ...], d_model: int) -> int | None:
    if len(pieces) == 1:
        return None
    template, _ = layer_template(name)
    shapes = {piece.shape for piece in pieces}
    if template == "tok_embeddings.weight":
        split_dim = 1 if pieces[0].shape[1] != d_model else 0
    else:
        split_dim = META_SPLIT_DIM.get(template)
    if split_dim is None:
        if len(shapes) > 1:
            raise CheckpointError(
                f"tensor {name!r} should be the same in every model-parallel shard but has shapes "
                f"{sorted(shapes)} in {[p.file for p in pieces]}"
            )
        return None
    for piece in pieces:
        if len(piece.shape) != 2 or piece.shape[1 - split_dim] != pieces[0].shape[1 - split_dim]:
            raise CheckpointError(
                f"tensor {name!r} cannot be joined along dim {split_dim}: shapes "
                f"{[p.shape for p in pieces]} in {[p.file for p in pieces]}"
            )
    return split_dim


# -------------------------------------------------------------------------------------------------- cache
def default_index_cache_dir() -> Path:
    """Where tensor indexes are cached: `$LLAMA_LENS_HOME/cache/index`, else the user cache dir."""
    home = os.environ.get("LLAMA_LENS_HOME")
    if home:
        return Path(home).expanduser() / "cache" / "index"  # a quoted "~/x" is no folder named "~"
    import platformdirs

    return Path(platformdirs.user_cache_dir("llama_lens")) / "index"


def index_cache_path(folder: Path, index_cache: str | os.PathLike | bool | None) -> Path | None:
    """The cache file for a checkpoint folder: `index_cache` itself if a path, None if False, else
    `default_index_cache_dir()/<sha1 of the folder's path>.json`."""
    if index_cache is False:
        return None
    if index_cache is not None and index_cache is not True:
        return Path(index_cache)
    digest = hashlib.sha1(str(folder).encode()).hexdigest()
    return default_index_cache_dir() / f"{digest}.json"


def read_index_cache(cache_path: Path | None, folder: Path, layout: str, stamps: FileStamps) -> RawIndex | None:
    """The cached raw index, or None when there is none, or it is damaged or stale (never trusted then)."""
    if cache_path is None or not cache_path.is_file():
        return None
    try:
        cached = json.loads(cache_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None  # a damaged cache is rebuilt, never trusted
    valid = (
        isinstance(cached, dict)
        and cached.get("version") == INDEX_CACHE_VERSION
        and cached.get("path") == str(folder)
        and cached.get("format") == layout
        and cached.get("files") == stamps.stamps
        and cached.get("digests") == stamps.digests
        and None not in stamps.digests.values()
        and isinstance(cached.get("tensors"), dict)
        and cached.get("tensors_sha256") == tensors_digest(cached["tensors"])
        and all(_valid_cached_pieces(pieces, layout, stamps) for pieces in cached["tensors"].values())
    )
    return cached["tensors"] if valid else None


def tensors_digest(raw: Any) -> str:
    """sha256 of a raw index as canonical JSON (keys sorted)."""
    return hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()


def _valid_cached_pieces(pieces: Any, layout: str, stamps: FileStamps) -> bool:
    """Whether a cache entry has the form a reader's `raw_index` gives (a damaged cache can still be valid JSON)."""
    if not isinstance(pieces, list) or not pieces:
        return False
    for piece in pieces:
        if not isinstance(piece, dict) or set(piece) != {"file", "dtype", "shape", "offsets"}:
            return False
        shape, offsets = piece["shape"], piece["offsets"]
        if not (
            piece["file"] in stamps.stamps
            and isinstance(piece["dtype"], str)
            and isinstance(getattr(torch, piece["dtype"], None), torch.dtype)
            and isinstance(shape, list)
            and all(type(n) is int and n >= 0 for n in shape)
        ):
            return False
        if layout == "meta":
            if offsets is not None:
                return False
        elif not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)):
            return False
    return True


def write_index_cache(cache_path: Path | None, folder: Path, layout: str, stamps: FileStamps, raw: RawIndex) -> None:
    """Writes the raw index with the stamps it is valid for (atomically; a failure only warns)."""
    if cache_path is None:
        return
    record = {
        "version": INDEX_CACHE_VERSION,
        "path": str(folder),
        "format": layout,
        "files": stamps.stamps,
        "digests": stamps.digests,
        # An edited cache that is still well-formed (other offsets, shapes that still fit the config) would
        # load other weights: the tensors' entries are checked against this digest.
        "tensors_sha256": tensors_digest(raw),
        "tensors": raw,
    }
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(cache_path, json.dumps(record))  # readers never see half a file
    except OSError as err:
        warnings.warn(f"could not write the shard index cache {cache_path}: {err}", stacklevel=3)
