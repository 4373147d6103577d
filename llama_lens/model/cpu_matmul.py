"""Half-precision matmuls on CPUs without half-precision units, computed in float32.

On a CPU without AVX512_BF16 or AMX (most laptops, AVX2 servers), PyTorch's bfloat16 GEMM runs at a fraction of
its float32 speed: 5.6 GFLOPS against 29 for the same [896, 3072] x [3072, 4096] product here, an AVX2 machine
(scripts/bench_cpu_matmul.py). So `linear` and `matmul` below cast their bfloat16 / float16 inputs to float32,
multiply, and round the result back to the inputs' dtype. This changes nothing but summation order:

- every bfloat16 and float16 value is exact in float32, so the float32 product sees the very same numbers;
- PyTorch's CPU half-precision GEMM itself accumulates in float32 and rounds the output once, as we do;

so both paths give the float32-accumulated product rounded once, and differ only where a different order of
the float32 additions crosses a rounding boundary (one unit in the last place of the output, now and then).

The weight is cast a block of rows at a time (`WEIGHT_BLOCK_ELEMENTS`, 6 MB in float32) into one buffer that
each thread reuses, and each block is multiplied while it is still in the CPU's cache: a whole-matrix float32 copy
(100 MB for a [8192, 3072] matrix) would be fresh pages to fault in and a trip through main memory on every call.
On this AVX2 machine (2 cores, quiet) a [rows, 3072] x [3072, 8192] product ran at 38 GFLOP/s this way against
14 for a whole-matrix cast and 16 for the native kernel at 32 rows, and at 134 against 103 and 17 at 928 rows.
The cast still costs more than it saves for a few rows, so the float32 path is taken from `MIN_ROWS` rows of
input on (the product's work grows with the rows, the cast's does not). Hook values, parameters and outputs
all stay in the model's dtype.

The fused attention kernel (`F.scaled_dot_product_attention`) is left as it is: it already computes in float32
inside, and was faster in bfloat16 than on float32 copies (71 ms against 101 ms at 512 positions, 24 heads).

The choice, made once per process from the environment variable `LLAMA_LENS_CPU_MATMUL`:
- "auto" (default): float32 on CPUs without native support for the dtype (bfloat16: AVX512_BF16 or AMX;
  float16: AMX-FP16), for inputs of at least `MIN_ROWS` rows;
- "float32": always float32 for CPU half-precision inputs, whatever the CPU and row count;
- "native": never (PyTorch's own half-precision kernels).
"""

from __future__ import annotations

import functools
import os
import threading

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ArgumentError

ENV_VAR = "LLAMA_LENS_CPU_MATMUL"
MODES = ("auto", "native", "float32")
HALF_DTYPES = (torch.bfloat16, torch.float16)
# Rows of input from which "auto" computes in float32. Both the native product and the float32 one grow with the
# rows, the weight's cast does not. With whole-matrix casts (scripts/bench_cpu_matmul.py, AVX2, 2 busy CPUs),
# native / float32 time for a [8192, 3072] bfloat16 weight was 0.4-0.7 at 32 rows and 0.9-1.2 at 64; with the
# cache-sized blocks below it was 2.3 at 32 rows (quiet machine), so a streamed lens's 32-token forward pass
# runs in float32 too.
MIN_ROWS = 32
# Weight elements cast to float32 at a time by `linear` (6 MB): small enough that the block is still in the
# cache (1 MB L2 per core, 32 MB L3 here) when the product reads it, large enough that the product of a few
# dozen rows is not all call overhead. Every weight, an unembedding included, goes through in such blocks.
WEIGHT_BLOCK_ELEMENTS = 512 * 3072


@functools.cache
def mode() -> str:
    """The `LLAMA_LENS_CPU_MATMUL` setting ("auto", "native" or "float32"), read once per process."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ArgumentError(f"{ENV_VAR}={value!r} is not a choice: use one of {', '.join(MODES)} (default auto)")
    return value


@functools.cache
def has_native_support(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies `dtype` matrices in hardware (bfloat16: AVX512_BF16 or AMX; float16: AMX-FP16).

    `torch.backends.cpu.get_cpu_capability()` names only the vector width (AVX2, AVX512), not these units, so the
    CPU's flags are asked through torch.cpu's probes (False where this torch build has none).
    """
    probes = {
        torch.bfloat16: ("_is_avx512_bf16_supported", "_is_amx_tile_supported"),
        torch.float16: ("_is_amx_fp16_supported",),
    }.get(dtype, ())
    return any(bool(getattr(torch.cpu, probe, lambda: False)()) for probe in probes)


def computes_in_float32(x: torch.Tensor, rows: int | None = None) -> bool:
    """Whether a product with `x` as its left operand runs in float32 here (see the module docstring).

    Args:
        x: the left operand (its device and dtype decide, with the mode).
        rows: rows of the left operand (default: all but its last dimension, flattened).
    """
    rows = x.numel() // max(x.shape[-1], 1) if rows is None else rows
    return float32_for(x.dtype, x.device, rows=rows)


def float32_for(dtype: torch.dtype, device: torch.device, *, rows: int) -> bool:
    """Whether a product of `rows` rows of `dtype` on `device` runs in float32 (what ll.plan asks ahead)."""
    if torch.device(device).type != "cpu" or dtype not in HALF_DTYPES:
        return False
    chosen = mode()
    if chosen != "auto":
        return chosen == "float32"
    return rows >= MIN_ROWS and not has_native_support(dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, in float32 where `computes_in_float32(x)` says so, in x's dtype either way.

    Args:
        x: [..., d_in]
        weight: [d_out, d_in]
        bias: [d_out] or None.

    Returns:
        [..., d_out] in x's dtype.
    """
    if not computes_in_float32(x):
        return F.linear(x, weight, bias)
    d_out, d_in = weight.shape
    block_rows = block_rows_of(d_in)
    x_float = x.float()
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        # Autograd keeps each block for the backward pass, so each is a copy of its own (no reused buffer).
        parts = []
        for start in range(0, d_out, block_rows):
            rows = slice(start, start + block_rows)
            block_bias = None if bias is None else bias[rows].float()
            parts.append(F.linear(x_float, weight[rows].float(), block_bias).to(x.dtype))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    # Each block of weight rows is cast into this thread's reused buffer and multiplied at once, while it is in
    # the cache; the float32 product of the block is rounded into the output as it comes.
    out = x.new_empty(*x.shape[:-1], d_out)
    buffer = _cast_buffer(min(d_out, block_rows) * d_in)
    for start in range(0, d_out, block_rows):
        stop = min(start + block_rows, d_out)
        block = buffer[: (stop - start) * d_in].view(stop - start, d_in).copy_(weight[start:stop])
        block_bias = None if bias is None else bias[start:stop].float()
        out[..., start:stop] = F.linear(x_float, block, block_bias)
    return out


_buffers = threading.local()


def _cast_buffer(elements: int) -> torch.Tensor:
    """This thread's float32 buffer for weight blocks, at least `elements` long (kept: a fresh one would be fresh
    pages to fault in at every call). One per thread, as a streamed model's reader may multiply too."""
    buffer = getattr(_buffers, "float32", None)
    if buffer is None or buffer.numel() < elements:
        # An ordinary tensor even when made under inference_mode, so that later calls outside it may write it.
        with torch.inference_mode(False):
            buffer = _buffers.float32 = torch.empty(elements, dtype=torch.float32)
    return buffer


def block_rows_of(d_in: int) -> int:
    """Rows of a [d_out, d_in] weight that `linear` casts to float32 at a time."""
    return max(1, WEIGHT_BLOCK_ELEMENTS // max(d_in, 1))


def cast_elements(d_out: int, d_in: int) -> int:
    """Elements of the float32 copy `linear` makes at a time of a [d_out, d_in] weight (what ll.plan counts)."""
    return min(d_out, block_rows_of(d_in)) * d_in


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b` (batched as torch.matmul), in float32 where `computes_in_float32(a)` says so, in a's dtype.

    Args:
        a: [..., n, k]
        b: [..., k, m]

    Returns:
        [..., n, m] in a's dtype.
    """
    if not computes_in_float32(a, rows=a.shape[-2] if a.dim() > 1 else 1):
        return a @ b
    return (a.float() @ b.float()).to(a.dtype)


class Linear(nn.Linear):
    """nn.Linear (same parameters, names and init) whose forward goes through `linear` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
