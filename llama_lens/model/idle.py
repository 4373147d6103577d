"""Work a model runs while its forward pass waits: a streamed model waits for the disk between layers.

A streamed model (`ll.load(path, stream=True)`) reads each decoder layer in a background thread while the layer
before it computes. Where reading is slower than computing, the forward pass waits for each layer with the CPU
idle. A caller with work that does not need the rest of the pass (the logit lens: reading out the layers
already done) hands it over as a step function,

    with idle_work(model, step):      # step() does a small piece of work; False when it has none now
        model(tokens)                 # while waiting for a read, the model calls step() until the read is in

and the model runs it in the waiting thread, between reads, one small step at a time (so that the layer that
arrived waits at most one step). The steps run in the forward pass's own thread: no second pool of compute
threads competes with the forward pass for the cores, and the results do not depend on the timing, only how
much of the work is done before the pass ends.

Models that never wait (held in memory) never call the step; `waits_for_reads(model)` tells the two apart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import nn

# What work done while waiting may hold until the forward pass ends: the logit lens keeps the logits of the rows
# it read out early (their KL to the final distribution needs that distribution, which the last layer makes).
# ll.plan counts this much for a streamed lens; 256 MB is 3.5% of a 3B-shaped bfloat16 checkpoint.
IDLE_WORK_BYTES = 256 * 2**20

# Residual vectors (rows x streams) the logit lens waits for before it starts a read-out sweep in the idle time
# (lens/early_readout.py): a product of few rows runs far below the CPU's GEMM rate (a float32 [256, 3072] x
# [3072, 1024] at 65% of its rate at 896 rows on a 2-core AVX2 CPU, roofline.measure_gemm_rate), and every sweep
# casts the whole unembedding to float32 once more, so few sweeps run.
MIN_EARLY_VECTORS = 256

# The attribute a model's waiting code reads; set only inside `idle_work`.
_STEP = "_llama_lens_idle_step"


def waits_for_reads(model: nn.Module) -> bool:
    """Whether `model`'s forward pass waits for reads, and runs idle work meanwhile (a streamed model)."""
    return bool(getattr(model, "waits_for_reads", False))


@contextmanager
def idle_work(model: nn.Module, step: Callable[[], bool]) -> Iterator[None]:
    """Within the block, `model` calls `step()` while its forward pass waits for a read (see the module
    docstring). `step` returns False when it has nothing to do now, and is not called again during that wait."""
    object.__setattr__(model, _STEP, step)
    try:
        yield
    finally:
        object.__delattr__(model, _STEP)


def run_while_waiting(model: nn.Module, done: Callable[[], bool]) -> None:
    """Runs `model`'s idle work, a step at a time, until `done()` or the work has nothing more to do now."""
    step = model.__dict__.get(_STEP)
    while step is not None and not done() and step():
        pass
