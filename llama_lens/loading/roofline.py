"""The arithmetic side of a plan: how many FLOPs a forward pass and a logit lens take, and how long a CPU or GPU
needs for them at its measured float32 GEMM rate.

A streamed lens can take no less than the larger of two times: reading the checkpoint once, and doing its
matmuls at the machine's own GEMM rate. `ll.plan(..., readouts=, gemm_rate=)` counts both and predicts the wall
time of the two phases of a lens (see `predicted_wall_seconds`); scripts/bench_stream_floor.py measures the
rates in the same run and prints the floor, the wall and their ratio.

Only the matmuls are counted (2 FLOPs per multiply-add): the norms, rotary embedding, softmax and the lens's
metrics are a few passes over [rows, d_model] or [rows, block] tensors, small beside them.
"""

from __future__ import annotations

import math
import time

import torch

from ..config import LlamaConfig
from ..io.names import block_param_shapes
from ..model import idle

# Float32 FLOP/s assumed when no rate is measured or given: a few cores of a recent AVX2 CPU. Measure the real
# one with `measure_gemm_rate` (about a second).
DEFAULT_GEMM_RATE = 50e9


def layer_matmul_params(cfg: LlamaConfig) -> int:
    """Weights of one decoder layer's matmuls (its 2-d parameters: attention and MLP projections)."""
    return sum(math.prod(shape) for shape in block_param_shapes(cfg, 0).values() if len(shape) == 2)


def layer_flops(cfg: LlamaConfig, *, tokens: int, batch: int = 1, n_layers: int | None = None) -> int:
    """FLOPs of the decoder layers' matmuls in one forward pass over [batch, tokens]: the projections, and
    attention's scores and weighted sums (every position against every one, as the fused kernel computes them
    before the causal mask)."""
    n_layers = cfg.n_layers if n_layers is None else n_layers
    rows = batch * tokens
    projections = 2 * rows * layer_matmul_params(cfg)
    attention = 2 * 2 * batch * cfg.n_heads * tokens * tokens * cfg.d_head
    return n_layers * (projections + attention)


def unembed_flops(cfg: LlamaConfig, *, rows: int, readouts: int = 0) -> int:
    """FLOPs of the unembedding of `rows` vectors (the model's own output), and of a logit lens's `readouts`
    further residual streams of as many vectors each."""
    return 2 * rows * (1 + readouts) * cfg.d_vocab * cfg.d_model


def measure_gemm_rate(rows: int, d_model: int, d_ff: int, *, seconds: float = 1.0) -> float:
    """This machine's float32 GEMM rate (FLOP/s) on a [rows, d_model] x [d_model, d_ff] product, with the threads
    torch uses now: the best of repeated products over about `seconds` (after one to warm up)."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(rows, d_model, generator=generator)
    b = torch.randn(d_model, d_ff, generator=generator)
    out = torch.empty(rows, d_ff)
    torch.mm(a, b, out=out)
    best, spent = math.inf, 0.0
    while spent < seconds or best == math.inf:
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
    return 2 * rows * d_model * d_ff / best


def predicted_wall_seconds(
    *,
    layer_read_seconds: float,
    head_read_seconds: float,
    layer_flops: int,
    head_flops: int,
    gemm_rate: float,
    stream: bool,
    unembed: str = "memory",
) -> float:
    """Wall time of a load and one pass of a logit lens (or a forward pass: no read-outs), from the two rates.

    Streamed, the pass has two phases, one after the other: the decoder layers, whose reads overlap their
    compute (a layer is read while the one before computes), then the unembedding's sweeps (the model's output
    and the read-outs), whose block reads overlap their compute when it is streamed (`unembed="stream"`) and
    come before everything when it is held (read at load time). Each overlapped phase takes the longer of its
    read and its compute. Without streaming, the whole checkpoint is read first and the compute follows.

    Args:
        layer_read_seconds: reading the decoder layers (and the embedding) once.
        head_read_seconds: reading the unembedding once.
        layer_flops, head_flops: from `layer_flops` and `unembed_flops`.
        gemm_rate: float32 FLOP/s (`measure_gemm_rate`).
        stream: whether the layers are streamed.
        unembed: "memory" or "stream", as the plan resolved it.
    """
    layer_seconds, head_seconds = layer_flops / gemm_rate, head_flops / gemm_rate
    if not stream:
        return layer_read_seconds + head_read_seconds + layer_seconds + head_seconds
    if unembed == "stream":
        return max(layer_read_seconds, layer_seconds) + max(head_read_seconds, head_seconds)
    return head_read_seconds + max(layer_read_seconds, layer_seconds) + head_seconds


def early_readouts(
    cfg: LlamaConfig, rows: int, readouts: int, idle_seconds: float, gemm_rate: float, weight_size: int
) -> int:
    """How many read-outs a streamed lens does while its pass waits for reads (model/idle.py), keeping their
    logits until the final distribution exists: as many as the idle time covers at the GEMM rate, and as
    `idle.IDLE_WORK_BYTES` holds; none under `idle.MIN_EARLY_VECTORS` vectors (rows x read-outs).

    Only the peak memory counts them: `predicted_wall_seconds` leaves the read-out after the layers, because
    the layers take longer than their FLOPs at the GEMM rate (the bf16 casts, the norms and the attention of
    few rows), so the idle time estimated here is an upper bound and crediting it made the wall estimate
    short (0.62-0.72 of the measured wall in scripts/bench_stream_floor.py).
    """
    if rows * readouts < idle.MIN_EARLY_VECTORS or idle_seconds <= 0:
        return 0
    per_readout = unembed_flops(cfg, rows=rows) / gemm_rate
    logit_bytes = rows * cfg.d_vocab * weight_size  # kept in the weights' dtype
    return min(readouts, idle.IDLE_WORK_BYTES // logit_bytes, math.ceil(idle_seconds / per_readout))
