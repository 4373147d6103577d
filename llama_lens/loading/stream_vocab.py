"""The embedding and the unembedding of a streamed model, read from the checkpoint by rows instead of held.

`ll.load(path, stream=True)` keeps the decoder layers on disk (stream.py). The embedding and the unembedding
are then the largest tensors left, d_vocab x d_model each (0.79 GB for Llama 3's 128,256 ids at d_model 3072 in
bfloat16), and a forward pass needs little of them at a time:

- the embedding only the rows of the prompt's token ids: `StreamedEmbedding` reads those rows, and nothing else,
  from the checkpoint at each forward pass (a few KB for a prompt; from every model-parallel shard that holds a
  part of them: a Meta embedding split over d_model gives a slice of each row from each shard);
- the unembedding all of it, but a block of the vocabulary at a time: `StreamedUnembed` makes the logits block
  by block as it reads them (the next block read in a background thread meanwhile), and the logit lens
  (readout.py) sweeps the vocabulary in blocks anyway, so it takes its blocks from the same reader. A Meta
  unembedding is split over the vocabulary, so each block comes from the shard that holds it. This costs one
  read of the unembedding per pass (from the page cache while it stays there), which is why
  `ll.load(..., unembed="auto")` streams it only when memory is short (see `ll.plan`).

Both hold an `OnDiskWeight` as their `.weight`: it has a tensor's `shape`, `dtype`, `device` and `dim()`, and
indexing it by a range of rows or by a tensor of ids reads those rows (`weight[v0:v1]`, `weight[ids]`).
Whatever needs the whole matrix at once (`.T`, `model.W_U`) raises and says how to get it (`weight.read()`).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import ArgumentError, ArgumentTypeError, OutOfRangeError, WeightOnDiskError
from ..io.names import param_shapes
from ..model.cpu_matmul import linear
from ..model.weights import EmbedViews, UnembedViews
from .host_memory import empty_cpu_tensors, release_free_heap

if TYPE_CHECKING:
    from ..io.checkpoint import Checkpoint, WeightFiles

# Vocabulary rows per block read from disk: a multiple of the lens's vocabulary blocks (readout.VOCAB_BLOCK on
# CPU, ACCELERATOR_VOCAB_BLOCK elsewhere), so that each of its blocks lies in one of these. 25 MB for d_model
# 3072 in bfloat16; two are in memory at a time (the one in use, the next being read).
UNEMBED_BLOCK_ROWS = 4096


class OnDiskWeight:
    """A [d_vocab, d_model] parameter that stays in the checkpoint and is read by rows when indexed.

    `weight[v0:v1]` reads rows v0..v1 (a view into the block of `block_rows` rows that holds them, the next
    block being read meanwhile when the reads go forward); `weight[ids]` reads the rows of token ids [...]
    (each distinct id once) and gives [..., d_model], as `embedding_weight[ids]` would.

    Args:
        ckpt: the open Checkpoint.
        name: the canonical parameter name ("embed.weight" or "unembed.weight").
        dtype: dtype of the rows read (cast on the way in).
        device: where they go.
        files: the weight files kept open (the streamed model's, see `Checkpoint.open_files`).
        block_rows: rows per block (default `UNEMBED_BLOCK_ROWS`).

    Attributes:
        shape, dtype, device: as a tensor's.
        read_bytes: bytes read from disk so far, as stored.
    """

    def __init__(
        self,
        ckpt: Checkpoint,
        name: str,
        dtype: torch.dtype,
        device: torch.device,
        files: WeightFiles | None = None,
        *,
        block_rows: int | None = None,
    ) -> None:
        self.ckpt, self.name, self.files = ckpt, name, files
        self.shape = torch.Size(param_shapes(ckpt.config)[name])
        self.dtype, self.device = dtype, torch.device(device)
        self.block_rows = block_rows or UNEMBED_BLOCK_ROWS
        self.read_bytes = 0
        self._block: tuple[int, torch.Tensor] | None = None  # (block index, its rows)
        self._next: tuple[int, Future] | None = None  # the block being read ahead
        self._pool: ThreadPoolExecutor | None = None

    # ---------------------------------------------------------------- what a tensor would say
    @property
    def ndim(self) -> int:
        return 2

    def dim(self) -> int:
        return 2

    def size(self, dim: int | None = None) -> torch.Size | int:
        return self.shape if dim is None else self.shape[dim]

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return f"OnDiskWeight({self.name!r}, shape={list(self.shape)}, dtype={dtype}, read by rows from the checkpoint)"

    def __getattr__(self, name: str) -> Any:
        # Only reached for what this class does not define: the tensor methods that need the whole matrix. Private
        # names stay AttributeErrors, so that probes (copy, pickle, hasattr of internals) behave as usual.
        if name.startswith("_"):
            raise AttributeError(name)
        raise WeightOnDiskError(
            f"{self.name} of this streamed model stays on disk and is read by rows (weight[v0:v1], weight[ids]), so "
            f"it has no .{name}; take weight.read() for the whole [{self.shape[0]}, {self.shape[1]}] matrix, or "
            "load with ll.load(..., stream=True, unembed='memory') to hold the unembedding (and a tied embedding)"
        )

    # ---------------------------------------------------------------- reads
    def __getitem__(self, index: slice | int | torch.Tensor) -> torch.Tensor:
        if isinstance(index, slice):
            start, stop, step = index.indices(self.shape[0])
            if step != 1:
                raise ArgumentError(f"{self.name}: rows are read in ranges; got the step {step}")
            return self.rows(start, max(start, stop))
        if isinstance(index, int):
            row = index + self.shape[0] if index < 0 else index
            if not 0 <= row < self.shape[0]:
                raise OutOfRangeError(f"row {index} of {self.name} is out of range (d_vocab={self.shape[0]})")
            return self.rows(row, row + 1)[0]
        if isinstance(index, torch.Tensor) and not index.is_floating_point():
            return self.gather(index)
        raise ArgumentTypeError(f"{self.name} is indexed by a range of rows or a tensor of token ids, not {index!r}")

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        """The rows of token ids [...] as [..., d_model]: each distinct id read once, nothing else read."""
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.shape[0]):
            raise ArgumentError(
                f"token ids must lie in [0, d_vocab={self.shape[0]}), got {int(ids.min())}..{int(ids.max())}"
            )
        unique, where = ids.flatten().cpu().unique(return_inverse=True)  # sorted
        rows = torch.empty(len(unique), self.shape[1], dtype=self.dtype)
        # Runs of consecutive ids are one read each.
        breaks = (torch.nonzero(unique.diff() != 1).flatten() + 1).tolist()
        for first, last in zip([0, *breaks], [*breaks, len(unique)]):
            self.read_bytes += self.ckpt.read_rows(self.name, int(unique[first]), rows[first:last], files=self.files)
        return rows.to(self.device)[where.to(self.device)].view(*ids.shape, self.shape[1])

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop [stop - start, d_model]: a view of the block that holds them (a copy across blocks)."""
        if stop <= start:
            return torch.empty(0, self.shape[1], dtype=self.dtype, device=self.device)
        first, last = start // self.block_rows, max(start, stop - 1) // self.block_rows
        parts = []
        for k in range(first, last + 1):
            block = self._take_block(k)
            offset = k * self.block_rows
            parts.append(block[max(start - offset, 0) : min(stop - offset, len(block))])
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def read(self) -> torch.Tensor:
        """The whole matrix [d_vocab, d_model], read now (a copy the caller holds)."""
        matrix, read_bytes = self._read_block(0, self.shape[0])
        self.read_bytes += read_bytes
        return matrix

    def release(self) -> None:
        """Lets go of the blocks held (the last one used, the one read ahead) and of the reading thread."""
        if self._next is not None:
            self._next[1].cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._block = self._next = self._pool = None
        release_free_heap()

    def _take_block(self, k: int) -> torch.Tensor:
        if self._block is not None and self._block[0] == k:
            return self._block[1]
        self._block = None  # let go of the previous block before the next one arrives
        if self._next is not None and self._next[0] == k:
            (block, read_bytes), self._next = self._next[1].result(), None
        else:
            if self._next is not None:
                self._next[1].cancel()
                self._next = None
            block, read_bytes = self._read_block(k * self.block_rows, min((k + 1) * self.block_rows, self.shape[0]))
        self.read_bytes += read_bytes  # counted here, in the caller's thread
        self._block = (k, block)
        if (k + 1) * self.block_rows < self.shape[0]:  # reads that go forward: the next block, meanwhile
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama_lens-vocab")
            start = (k + 1) * self.block_rows
            self._next = (k + 1, self._pool.submit(self._read_block, start, min(start + self.block_rows, len(self))))
        elif self._pool is not None:  # the sweep is at its end: no thread left waiting after it
            self._pool.shutdown(wait=True)  # idle by now: the block it read was just taken
            self._pool = None
        return block

    def _read_block(self, start: int, stop: int) -> tuple[torch.Tensor, int]:
        """Rows start..stop, read now, and the bytes read as stored (also called in the read-ahead thread)."""
        # In memory of its own, returned to the OS when the block is let go (see empty_cpu_tensors).
        (block,) = empty_cpu_tensors([(torch.Size([stop - start, self.shape[1]]), self.dtype)])
        read_bytes = self.ckpt.read_rows(self.name, start, block, files=self.files)
        return block.to(self.device), read_bytes


class StreamedEmbedding(EmbedViews, nn.Module):
    """The token embedding read by rows: `forward(ids)` reads the rows of `ids` only (see `OnDiskWeight`).

    Args:
        weight: the embedding, on disk.
    """

    def __init__(self, weight: OnDiskWeight) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [batch, pos] -> [batch, pos, d_model], as nn.Embedding gives."""
        return self.weight.gather(ids)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, {self.weight.shape[1]}, read by rows from the checkpoint"


class StreamedUnembed(UnembedViews, nn.Module):
    """The unembedding streamed in vocabulary blocks: `forward(x)` makes the logits a block at a time.

    Args:
        weight: the unembedding [d_vocab, d_model], on disk.
    """

    def __init__(self, weight: OnDiskWeight) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_model] -> logits [..., d_vocab], as nn.Linear without bias gives (to float rounding)."""
        d_vocab, d_model = self.weight.shape
        logits = x.new_empty(*x.shape[:-1], d_vocab)
        rows, flat_logits = x.reshape(-1, d_model), logits.view(-1, d_vocab)
        try:
            for start in range(0, d_vocab, self.weight.block_rows):
                block = self.weight[start : start + self.weight.block_rows]  # [block_rows, d_model]
                # In float32 on a CPU without half-precision units, rounded back to x's dtype (cpu_matmul.py).
                flat_logits[:, start : start + len(block)] = linear(rows, block)
        finally:
            self.weight.release()  # the lens's sweep starts from the first block again
        return logits

    def extra_repr(self) -> str:
        return f"d_model={self.weight.shape[1]}, d_vocab={self.weight.shape[0]}, streamed in vocabulary blocks"
