"""Host memory for weights read from disk a part at a time: each read in an anonymous memory map of its own.

Streaming reads a decoder layer (stream.py) or a block of the vocabulary (stream_vocab.py) into fresh memory,
uses it, and lets it go, again and again. `empty_cpu_tensors` gives such memory back to the OS as soon as it is
let go, where torch.empty would leave it in the allocator's heaps (see its docstring), and `release_free_heap`
gives back what other allocations left there.
"""

from __future__ import annotations

import ctypes
import functools
import math
import mmap
from collections.abc import Callable

import torch


def empty_cpu_tensors(specs: list[tuple[torch.Size, torch.dtype]]) -> list[torch.Tensor]:
    """Uninitialized tensors carved from one anonymous memory map, unmapped when the last of them is freed.

    Why not torch.empty: glibc serves blocks under its (adaptive, up to 32 MB) mmap threshold from heaps it
    rarely returns to the OS, so allocating and freeing one layer after another grows the process by tens
    of MB per layer. A map of its own per layer goes back to the OS as soon as the block lets go of it.
    """
    align = 64
    sizes = [math.prod(shape) * dtype.itemsize for shape, dtype in specs]
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + -(-size // align) * align)
    if hasattr(mmap, "MAP_ANONYMOUS"):
        # Private: the default shared anonymous map would be shmem, which takes no transparent huge pages.
        buffer = mmap.mmap(-1, max(offsets[-1], 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    else:  # Windows
        buffer = mmap.mmap(-1, max(offsets[-1], 1))
    if hasattr(mmap, "MADV_HUGEPAGE"):
        buffer.madvise(mmap.MADV_HUGEPAGE)  # fewer page faults while the layer is copied in
    # frombuffer keeps `buffer` alive for as long as any tensor viewing it.
    slab = torch.frombuffer(buffer, dtype=torch.uint8)
    return [
        slab[start : start + size].view(dtype).view(shape) for (shape, dtype), start, size in zip(specs, offsets, sizes)
    ]


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim = ctypes.CDLL(None).malloc_trim  # glibc only
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_heap() -> None:
    """Gives the allocator's free memory back to the OS: glibc's malloc_trim(0); nothing where there is none.

    Why: buffers under glibc's adaptive mmap threshold (up to 32 MB: the joined q/k pieces of model-parallel
    shards, the matmuls' scratch) come from heaps whose freed space the process keeps. Measured on a 3B model
    streamed from Meta shards: about 20 MB more per layer, 0.5 GB over 28 layers. Trimmed after each layer, the
    process stays at the two layers in flight.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
