"""Dequantizing reads of GGUF tensors: the quantization types the installed `gguf` package reads, and
`read_gguf_into`, which fills a caller's tensor a few rows at a time.

Each quantized tensor is rows of blocks (32 or 256 values each, with their scales), so rows dequantize
independently: a read takes a few rows at a time, dequantizes them with `gguf.quants.dequantize` and casts them
into the caller's tensor, never holding the whole tensor in float32 beside the result. Tensor data is read with
plain file reads, never a memory map (see `safetensors`).
"""

from __future__ import annotations

import collections
import functools
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from ..errors import CheckpointError
from .names import permute_qk_to_rotate_half
from .safetensors import read_exactly_into

# Output values dequantized at a time: 1 MiB of float32 (the gguf dequantizers make a few temporaries of that
# size), whatever the size of the tensor; small enough that a layer's matrices split into chunks for the threads.
CHUNK_VALUES = 2**18
# Threads dequantizing chunks at once (numpy lets go of the GIL inside them), at most torch's thread count.
MAX_THREADS = 8


@functools.cache
def can_dequantize(qtype: str) -> bool:
    """Whether the installed gguf package dequantizes this quantization type (tried once on one block)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    ggml_type = GGMLQuantizationType[qtype]
    try:
        dequantize(np.zeros((1, GGML_QUANT_SIZES[ggml_type][1]), dtype=np.uint8), ggml_type)
    except NotImplementedError:
        return False
    return True


def dequantized_dtype(qtype: str) -> torch.dtype:
    """The torch dtype that holds a type's values exactly: float16/bfloat16 for those, else float32."""
    return {"F16": torch.float16, "BF16": torch.bfloat16}.get(qtype, torch.float32)


def supported_qtypes() -> list[str]:
    """The quantization types this installation can read (F32, F16, BF16, Q8_0, Q4_K, ...)."""
    from gguf import GGMLQuantizationType

    return [t.name for t in GGMLQuantizationType if can_dequantize(t.name)]


def check_qtype(tensor_name: str, qtype: str, path: Path) -> None:
    """Raises CheckpointError naming the tensor, type and file when the type cannot be dequantized."""
    if not can_dequantize(qtype):
        raise CheckpointError(
            f"{path}: tensor {tensor_name!r} is stored as {qtype}, which the installed gguf package cannot "
            f"dequantize (it reads {', '.join(supported_qtypes())}); upgrade gguf, or use a file quantized "
            "to one of these"
        )


def gguf_row_bytes(qtype: str, n_columns: int) -> int:
    """Bytes one row of `n_columns` values takes when stored as `qtype` (rows are whole blocks)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block_size, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    return n_columns // block_size * block_bytes


def read_gguf_into(
    file: BinaryIO,
    start: int,
    qtype: str,
    target: torch.Tensor,
    *,
    qk_heads: int | None = None,
    what: str = "a tensor",
) -> int:
    """Fills `target` with the dequantized values of a tensor stored from byte `start` of a GGUF file.

    Reads CHUNK_VALUES values (whole rows) at a time, dequantizes them (`gguf.quants.dequantize`, float32) and
    casts them into `target` on its device; with `qk_heads`, rows are moved from llama.cpp's interleaved RoPE
    order to the rotate-half order on the way (chunks then hold whole heads). The file is read in order by the
    calling thread; chunks are dequantized by up to `torch.get_num_threads()` threads (MAX_THREADS at most),
    each holding one chunk.

    Args:
        file: the GGUF file, opened for reading in binary mode.
        start: the tensor's first byte (`GGUFTensor.start`).
        qtype: its quantization type ("Q4_K", ...).
        target: a contiguous tensor of the stored shape (torch order), any float dtype, any device.
        qk_heads: the heads of a q/k weight or bias to permute, else None.
        what: names the tensor in errors.

    Returns:
        bytes read.

    Raises:
        CheckpointError: the file ends early.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    ggml_type = GGMLQuantizationType[qtype]
    block_size, block_bytes = GGML_QUANT_SIZES[ggml_type]
    # A 1-D tensor (a norm, a bias) is one row; q/k biases are permuted whole.
    n_rows = target.shape[0] if target.dim() > 1 else 1
    n_cols = target.numel() // max(n_rows, 1)
    row_bytes = n_cols // block_size * block_bytes
    rows = target.view(n_rows, n_cols)
    heads_rows = 1 if qk_heads is None or target.dim() == 1 else n_rows // qk_heads  # rows of one head
    step = max(heads_rows, CHUNK_VALUES // max(n_cols, 1) // heads_rows * heads_rows)

    def convert(raw: torch.Tensor, first: int, count: int) -> None:
        values = torch.from_numpy(dequantize(raw.numpy().reshape(count, row_bytes), ggml_type))
        if qk_heads is None:
            rows[first : first + count].copy_(values)
        elif target.dim() == 1:
            permute_qk_to_rotate_half(values.view(-1), qk_heads, out=target)
        else:
            permute_qk_to_rotate_half(values, count // heads_rows, out=rows[first : first + count])

    file.seek(start)
    chunks = [(first, min(step, n_rows - first)) for first in range(0, n_rows, step)]
    threads = min(torch.get_num_threads(), MAX_THREADS, len(chunks))
    if threads <= 1:
        buffer = torch.empty(chunks[0][1] * row_bytes, dtype=torch.uint8)
        for first, count in chunks:
            raw = buffer[: count * row_bytes]
            read_exactly_into(file, raw, what)
            convert(raw, first, count)
        return n_rows * row_bytes
    with ThreadPoolExecutor(threads, thread_name_prefix="llama_lens-gguf") as pool:
        running: collections.deque[Future] = collections.deque()
        for first, count in chunks:
            raw = torch.empty(count * row_bytes, dtype=torch.uint8)
            read_exactly_into(file, raw, what)
            running.append(pool.submit(convert, raw, first, count))
            if len(running) >= threads:  # at most one chunk per thread in memory
                running.popleft().result()
        for done in running:
            done.result()
    return n_rows * row_bytes
