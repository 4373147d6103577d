"""The arithmetic side of a plan: how many FLOPs a forward pass and a logit lens take, and how long a CPU or GPU
needs for them at its measured float32 GEMM rate.

A streamed lens can take no less than the larger of two times: reading the checkpoint once, and doing its
matmuls at the machine's own GEMM rate. `ll.plan(..., readouts=, gemm_rate=)` counts both and predicts the wall
time of a lens, with the read-out overlapping the layers' reads where it can (see `predicted_wall_seconds`);
scripts/bench_stream_floor.py measures the rates in the same run and prints the floor, the wall and their ratio.

Only the matmuls are counted (2 FLOPs per multiply-add): the norms, rotary embedding, softmax and the lens's
metrics are a few passes over [rows, d_model] or [rows, block] tensors, small beside them.
"""

from __future__ import annotations

import math
import time

import torch

from ..config import LlamaConfig
from ..io.names import block_param_shapes

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
    early_flops: int = 0,
) -> float:
    """Wall time of a load and one pass of a logit lens (or a forward pass: no read-outs), from the two rates.

    Streamed, the decoder layers' reads overlap their compute (a layer is read while the one before computes),
    so that phase takes the longer of the two; where the reads are the longer, the CPU would idle, and the
    lens reads out the layers already done meanwhile (lens/early_readout.py): up to `early_flops` of the
    read-out move into that idle time. What is left of the unembedding's sweeps (the model's output and the
    read-outs) follows the last layer. A held unembedding (`unembed="memory"`) is read at load, before
    everything; a streamed one is read during the pass (by the early sweeps, with the layers, or after them,
    overlapping its compute). Without streaming the whole checkpoint is read first and the compute follows.

    Args:
        layer_read_seconds: reading the decoder layers (and the embedding) once.
        head_read_seconds: reading the unembedding once.
        layer_flops, head_flops: from `layer_flops` and `unembed_flops`.
        gemm_rate: float32 FLOP/s (`measure_gemm_rate`).
        stream: whether the layers are streamed.
        unembed: "memory" or "stream", as the plan resolved it.
        early_flops: the part of `head_flops` the lens may read out during the layers (0: none, the read-out
            all after them).
    """
    layer_seconds, head_seconds = layer_flops / gemm_rate, head_flops / gemm_rate
    if not stream:
        return layer_read_seconds + head_read_seconds + layer_seconds + head_seconds
    if unembed == "stream" and not early_flops:
        return max(layer_read_seconds, layer_seconds) + max(head_read_seconds, head_seconds)
    # Reads during the layers' phase: the layers, and a streamed unembedding (its first early sweep; later
    # sweeps find it in the page cache).
    read = layer_read_seconds + (head_read_seconds if unembed == "stream" else 0.0)
    early = min(max(read - layer_seconds, 0.0), early_flops / gemm_rate)
    layers_phase = max(read, layer_seconds + early)
    return (head_read_seconds if unembed == "memory" else 0.0) + layers_phase + head_seconds - early
