"""Meta `.pth` shards: opened with `torch.load(mmap=True, weights_only=True)`, copied out page by page.

`weights_only=True` means a shard holding anything but tensors is refused, never executed. `mmap=True` means
opening a shard reads only its pickled table of tensors; the data stays on disk until a tensor is copied out.
Pages of a mapped file that were read count towards the process for as long as the file stays mapped (a
second copy of the checkpoint, by the end of a load), so each part copied out is dropped from the process
again with madvise(MADV_DONTNEED); the pages stay in the page cache.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .errors import CheckpointError
from .names import permute_qk_to_rotate_half

COPY_CHUNK_BYTES = 8 * 2**20  # stored bytes copied out of a mapped shard before their pages are dropped


def load_pth(path: Path) -> dict[str, torch.Tensor]:
    """A Meta consolidated.*.pth as a dict of memory-mapped tensors (tensor data is not read).

    Raises:
        CheckpointError: for a file holding anything but a dict of tensors (never executed: weights_only),
            or one torch cannot read.
    """
    try:
        state = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
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
    return state


@functools.cache
def _madvise() -> Callable[..., int] | None:
    if not hasattr(mmap, "MADV_DONTNEED"):  # Windows
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError, TypeError):
        return None
    madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return madvise


def release_mapped_pages(tensor: torch.Tensor) -> None:
    """Drops the pages lying wholly under `tensor` from the process; they stay in the page cache.

    Only for tensors memory-mapped from a file (`load_pth`) and never written: the next access reads the pages
    back from the file, whereas written pages of a private map, or anonymous memory, would be lost. Pages
    shared with a neighbouring tensor are kept, so a neighbour handed out elsewhere is never affected.
    """
    madvise = _madvise()
    if madvise is None or not tensor.is_contiguous():
        return
    page = mmap.PAGESIZE
    first = -(-tensor.data_ptr() // page) * page
    last = (tensor.data_ptr() + tensor.nbytes) // page * page
    if last > first:
        madvise(first, last - first, mmap.MADV_DONTNEED)  # advice only: a failure costs memory, not data


def can_release_mapped_pages() -> bool:
    """Whether `release_mapped_pages` works here (it needs madvise: Linux, macOS; not Windows)."""
    return _madvise() is not None


def copy_dropping_pages(source: torch.Tensor, destination: torch.Tensor) -> None:
    """`destination.copy_(source)` a few MiB of rows at a time, dropping the pages of each part of `source` (a
    mapped tensor, see `release_mapped_pages`) once it is copied: a large tensor (the embedding) then adds only
    a few MiB of its stored pages to the process at any time, not all of them."""
    if source.dim() == 0:
        destination.copy_(source)
        return
    rows = source.shape[0]
    step = max(1, COPY_CHUNK_BYTES * rows // max(source.nbytes, 1))
    for first in range(0, rows, step):
        part = source[first : first + step]
        # Moved first, then cast: a GPU casts faster, and only the stored bytes cross the bus (CPU: no-op).
        destination[first : first + step].copy_(part.to(destination.device))
        release_mapped_pages(part)


class MappedShards:
    """The .pth shards of a Meta checkpoint, memory-mapped and kept open for many reads.

    Opening a shard unpickles its whole table of tensors, which costs more than copying a small tensor out of
    it (a 70B release: 8 shards of 80 layers): a reader that goes through the layers one by one opens the
    shards once, not once per layer or tensor.

    Each model-parallel piece is copied (and cast) straight into its place in the caller's tensor, q/k rows
    permuted to the rotate-half layout on the way, so nothing else is allocated. The pages of each piece are
    then dropped from the process (see `release_mapped_pages`).

    Args:
        file_names: the shards, in model-parallel rank order.
        open_path: file name -> its path; called before a shard is mapped and before each copy out of it (the
            checkpoint checks there that the file did not change: reading a mapped page past the end of a
            file truncated since would kill the process with SIGBUS).
        lazy: map each shard when a copy first needs it (a replicated tensor needs only the first shard),
            instead of all of them now.
    """

    def __init__(self, file_names: Sequence[str], open_path: Callable[[str], Path], *, lazy: bool = False) -> None:
        self.file_names = list(file_names)
        self._open_path = open_path
        # file name -> stored name -> tensor mapped from the file. Never written and never handed out, which is
        # what lets a copy drop their pages.
        self._tensors: dict[str, dict[str, torch.Tensor]] = {}
        if not lazy:
            for file_name in self.file_names:
                self._mapped(file_name)

    def _mapped(self, file_name: str) -> dict[str, torch.Tensor]:
        if file_name not in self._tensors:
            self._tensors[file_name] = load_pth(self._open_path(file_name))
        return self._tensors[file_name]

    def close(self) -> None:
        """Unmaps the shards (a later copy maps them again)."""
        self._tensors.clear()

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
            CheckpointError: a shard changed on disk since it was indexed (checked before the copy).
        """
        file_names = self.file_names if split_dim is not None else self.file_names[:1]
        for file_name in file_names:
            self._open_path(file_name)
        mapped = [self._mapped(file_name)[name] for file_name in file_names]
        if qk_heads is not None:
            # Moved first, then cast: a GPU casts faster, and only the stored bytes cross the bus (CPU: no-op).
            pieces = [piece.to(target.device) for piece in mapped]
            # Joined first (a copy as stored, for model-parallel shards only): a split may fall inside a head,
            # e.g. one KV head shared by two ranks.
            source = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=split_dim)
            permute_qk_to_rotate_half(source, qk_heads, out=target)
            del pieces, source
        elif len(mapped) == 1:  # whole in one shard, or replicated
            copy_dropping_pages(mapped[0], target)
        else:  # each model-parallel piece into its slice of the target
            start = 0
            for piece in mapped:
                size = piece.shape[split_dim]
                copy_dropping_pages(piece, target.narrow(split_dim, start, size))
                start += size
        for piece in mapped:
            release_mapped_pages(piece)  # all of it, pages that straddled two parts included
        return sum(piece.nbytes for piece in mapped)

    def copy_rows_into(self, name: str, target: torch.Tensor, start: int, *, split_dim: int | None) -> int:
        """Copies rows start .. start + len(target) of one stored tensor, its model-parallel pieces joined, into
        `target`: only those rows' pages are read (the embedding rows of a prompt, a block of the unembedding).

        Args:
            name: the stored name ("tok_embeddings.weight"), a 2-d tensor whose rows are not permuted on read.
            target: contiguous tensor [rows, columns of the joined tensor], any float dtype, any device.
            start: the first row.
            split_dim: the axis the pieces join on (0: each piece holds a range of rows; 1: each holds every
                row's range of columns); None for a replicated tensor (the first shard's copy is read).

        Returns:
            bytes read, as stored.

        Raises:
            CheckpointError: a shard changed on disk since it was indexed (checked before the copy).
        """
        file_names = self.file_names if split_dim is not None else self.file_names[:1]
        for file_name in file_names:
            self._open_path(file_name)
        mapped = [self._mapped(file_name)[name] for file_name in file_names]
        stop, read_bytes = start + target.shape[0], 0
        piece_start = 0  # split_dim 0: the piece's first row in the joined tensor; 1: its first column
        for piece in mapped:
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
            copy_dropping_pages(part, destination)
            # The pages shared with the rows around are dropped too (copy_dropping_pages keeps them): these
            # tensors are never written or handed out, and a page dropped is read back from the file when needed.
            # Else the embedding rows of prompt after prompt would make the whole embedding resident by degrees.
            _release_touched_pages(part)
            read_bytes += part.nbytes
        return read_bytes


def _release_touched_pages(tensor: torch.Tensor) -> None:
    """Drops every page `tensor` (contiguous rows of a mapped shard) touches, shared ones included."""
    madvise = _madvise()
    if madvise is None or not tensor.is_contiguous() or not tensor.nbytes:
        return
    page = mmap.PAGESIZE
    first = tensor.data_ptr() // page * page
    last = -(-(tensor.data_ptr() + tensor.nbytes) // page) * page
    madvise(first, last - first, mmap.MADV_DONTNEED)
