"""Streaming: a model whose decoder layers stay on disk until the forward pass reaches them.

`ll.load(path, stream=True)` returns a `StreamedLlama`. The final norm is held in memory; the embedding is
read by rows, only the prompt's, at each pass, and the unembedding is held or, with `unembed="stream"` (or
"auto" when memory is short), read a block of the vocabulary at a time (stream_vocab.py). Each block is built
on the meta device (no memory) and filled just before it runs:

    forward starts ──> read layer 0 (loader thread)
    run_block(0)   ──> wait for layer 0, assign it to block 0, queue the read of layer 1, run block 0,
                       put block 0 back on the meta device
    run_block(1)   ──> ... layer 1 was read while block 0 computed

So at most two layers are in memory (the one computing, the one being read), and reading overlaps compute
(torch releases the GIL in copies and matmuls, so one background thread is enough). Everything else is
HookedLlama unchanged: hooks, `run_with_cache`, batches (one pass over the layers per forward), the logit
lens. Generation with a KV cache works too, but re-reads every layer for each new token.

The streamed weights do not require grad: a backward pass through the model would keep every layer's
weights alive in the autograd graph, which is what streaming avoids. Gradients with respect to activations
still work; they just cost the memory of the weights the graph saves.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from ..config import LlamaConfig
from ..errors import ArgumentError, CheckpointError, UsageError
from ..io.checkpoint import Checkpoint, dropped_on_error
from ..io.names import block_param_shapes
from ..model.idle import run_while_waiting
from ..model.kv_cache import KVCache
from ..model.llama import HookedLlama
from .host_memory import empty_cpu_tensors, release_free_heap
from .stream_vocab import OnDiskWeight, StreamedEmbedding, StreamedUnembed

# layer -> (its parameters under block-relative names such as "attn.q_proj.weight", bytes read from disk)
LayerReader = Callable[[int], tuple[dict[str, torch.Tensor], int]]


class CheckpointLayerReader:
    """Reads decoder layers of a Checkpoint into fresh tensors: the `reader` of a StreamedLlama.

    Each layer goes into one new block of memory (see `empty_cpu_tensors`) and is filled by
    `Checkpoint.read_into`, the same read as a full load's, cast on the way in:
    - Safetensors files are read with plain reads straight into the layer's memory (no intermediate copy, no
      memory map), and opened for each layer (an open is cheap).
    - Meta .pth shards are opened once, here, and stay open for the reader's lifetime (`Checkpoint.open_files`):
      opening one unpickles its whole table of tensors, which would cost more than the reads themselves if done
      per layer. Their data is read with plain positioned reads, never mapped (see `llama_lens.io.pth`).

    A read that fails drops the layer it was reading before the error goes on (see `dropped_on_error`).

    Args:
        ckpt: an open `Checkpoint`.
        dtype: dtype of the result (None: as stored).
        device: where the result goes.
    """

    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype | None, device: torch.device) -> None:
        self.ckpt, self.dtype, self.device = ckpt, dtype, device
        self.files = ckpt.open_files(lazy=False)

    def specs(self, layer: int) -> dict[str, tuple[torch.Size, torch.dtype]]:
        """Block-relative name -> (shape, dtype after the cast) of the layer's parameters."""
        prefix = f"blocks.{layer}."
        return {
            name.removeprefix(prefix): (torch.Size(shape), self.dtype or self.ckpt.param_dtype(name))
            for name, shape in block_param_shapes(self.ckpt.config, layer).items()
        }

    def __call__(self, layer: int) -> tuple[dict[str, torch.Tensor], int]:
        """Reads layer `layer`; returns block-relative name -> tensor, and the bytes read as stored."""
        specs = self.specs(layer)
        targets = dict(zip(specs, empty_cpu_tensors(list(specs.values()))))
        by_name = {f"blocks.{layer}.{relative}": target for relative, target in targets.items()}
        # Only these two dicts hold the layer in this frame: on an error they are emptied, the frames below cleared.
        with dropped_on_error(targets, by_name):
            read_bytes = self.ckpt.read_into(by_name, files=self.files)
            if self.device.type != "cpu":
                # Read into host memory first, so that the disk read never waits inside a device copy.
                for relative in targets:
                    targets[relative] = targets[relative].to(self.device)
        return targets, read_bytes


class LayerStream:
    """Reads the layers of one forward pass in a background thread, one layer ahead of the compute.

    Args:
        reader: reads one layer (see `LayerReader`); called in the loader thread.
        layers: the layers the pass will run, in order.
        progress: show a tqdm bar with layers streamed and MB/s.
        model: whose idle work (`llama_lens.model.idle`) runs while a layer's read is awaited.
    """

    def __init__(
        self, reader: LayerReader, layers: Sequence[int], *, progress: bool = True, model: nn.Module | None = None
    ) -> None:
        self.reader, self.model = reader, model
        self.layers = list(layers)
        self._next = {a: b for a, b in zip(self.layers, self.layers[1:])}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama_lens-stream")
        self._pending: dict[int, Future] = {}
        self.read_bytes = 0
        self._start = time.perf_counter()
        from tqdm.auto import tqdm

        self._bar = tqdm(
            total=len(self.layers), desc="streaming layers", unit="layer", leave=False, disable=not progress
        )
        if self.layers:
            self._submit(self.layers[0])

    def _submit(self, layer: int) -> None:
        if layer not in self._pending:
            self._pending[layer] = self._pool.submit(self.reader, layer)

    def take(self, layer: int) -> dict[str, torch.Tensor]:
        """Waits for `layer`'s parameters, after queueing the read of the layer that runs next."""
        self._submit(layer)
        if layer in self._next:
            # Queued before waiting: the loader thread goes straight on to the next layer.
            self._submit(self._next[layer])
        future = self._pending.pop(layer)
        if self.model is not None:
            # The CPU would idle until the read is in: the caller's idle work (the logit lens reading out the
            # layers done so far) runs meanwhile, a small step at a time.
            run_while_waiting(self.model, future.done)
        state, read_bytes = future.result()
        self.read_bytes += read_bytes
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        self._bar.set_postfix_str(f"{self.read_bytes / elapsed / 1e6:.0f} MB/s", refresh=False)
        self._bar.update(1)
        return state

    def close(self) -> None:
        """Drops reads not taken (after an error, or a pass that stopped early) and ends the thread."""
        for future in self._pending.values():
            future.cancel()
        self._pool.shutdown(wait=True)
        self._pending.clear()  # a read that was already running finished; its tensors go with it
        self._bar.close()


class StreamedLlama(HookedLlama):
    """A HookedLlama that reads each decoder layer from the checkpoint when the forward pass reaches it.

    Made by `ll.load(path, stream=True)`; see the module docstring. The dtype and device are fixed at load
    time (`.to(...)` raises).

    Args:
        cfg: the model's shape.
        reader: reads one layer (see `LayerReader`).
        layers: decoder layers to run (default: all).
        progress: show a progress bar for each forward pass.
    """

    # Its forward pass waits for reads, and runs idle work meanwhile (llama_lens.model.idle).
    waits_for_reads = True

    def __init__(
        self, cfg: LlamaConfig, reader: LayerReader, layers: Sequence[int] | None = None, *, progress: bool = True
    ) -> None:
        with torch.device("meta"):
            super().__init__(cfg, layers)
        # Frozen before any weight is assigned, so that assigned parameters inherit requires_grad=False.
        self.requires_grad_(False)
        self.reader = reader
        self.progress = progress
        self._stream: LayerStream | None = None
        self._in_forward = False
        self._forward_thread: int | None = None

    # ---------------------------------------------------------------- the forward pass
    def forward(self, *args, **kwargs) -> torch.Tensor:
        """HookedLlama.forward, reading each layer from disk as it is reached (same arguments)."""
        if self._in_forward:
            # The inner pass would free the block the outer pass is in the middle of; one layer is held at a time,
            # so a second thread's pass would too.
            if self._forward_thread != threading.get_ident():
                raise UsageError(
                    "a streamed model runs one forward pass at a time, and another thread is in one; load one "
                    "streamed model per thread, or wait for the other pass"
                )
            raise UsageError(
                "a streamed model cannot run a forward pass from inside one of its own hooks; "
                "save what the hook needs and run the second pass afterwards"
            )
        self._in_forward, self._forward_thread = True, threading.get_ident()
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._in_forward, self._forward_thread = False, None
            if self._stream is not None:
                self._stream.close()
                self._stream = None
            # After an error (a hook that raised, a bad read) a block may still hold its weights.
            for block in self.blocks.values():
                _to_meta(block)

    def _layers_to_run(self, start_layer: int | None, stop_at_layer: int | None, has_resid: bool) -> list[int]:
        # HookedLlama.forward asks for its layers once, before the embedding: the moment to start reading
        # the first one.
        layers = super()._layers_to_run(start_layer, stop_at_layer, has_resid)
        self._stream = LayerStream(self.reader, layers, progress=self.progress, model=self)
        return layers

    def run_block(self, layer: int, resid: torch.Tensor, cos, sin, mask, kv_cache: KVCache | None) -> torch.Tensor:
        """Fetches layer `layer`'s weights, runs the block, and frees the weights again."""
        if self._stream is not None:
            state = self._stream.take(layer)
        else:  # called outside forward: read it here
            state = self.reader(layer)[0]
        block = self.blocks[str(layer)]
        block.load_state_dict(state, strict=True, assign=True)
        del state
        try:
            return block(resid, cos, sin, mask, kv_cache)
        finally:
            _to_meta(block)
            release_free_heap()

    def _apply(self, fn, recurse: bool = True):
        # .to(), .cuda(), .half() ... would move the resident weights only and leave the streamed ones behind.
        raise ArgumentError(
            "a streamed model's dtype and device are fixed when it is loaded; "
            "pass dtype= and device= to ll.load(path, stream=True, ...)"
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + ", streamed"


def _to_meta(block: nn.Module) -> None:
    """Replaces a block's parameters by meta tensors, freeing their memory."""
    if any(not param.is_meta for param in block.parameters()):
        block.to_empty(device="meta")


def load_streamed(
    ckpt: Checkpoint,
    *,
    dtype: torch.dtype | None,
    device: torch.device,
    layers: Sequence[int] | None = None,
    tokenizer: Any = None,
    progress: bool = True,
    unembed: str = "memory",
) -> StreamedLlama:
    """A StreamedLlama over an open Checkpoint: the final norm (and the unembedding) read now, the rest on demand.

    Args:
        ckpt: an open `Checkpoint`.
        dtype: dtype of the weights (None: as stored); each layer is cast as it is read.
        device: where the weights go.
        layers: decoder layers to run (default: all).
        tokenizer: set as `model.tokenizer`.
        progress: show a progress bar for each forward pass.
        unembed: "memory" to read the unembedding now and hold it, "stream" to read it a vocabulary block at a
            time at each pass ("auto" is resolved by `ll.load`, see `plan.choose_unembed`). The embedding is read
            by rows at each pass either way, but from the unembedding held when the two are tied.

    Returns:
        StreamedLlama in eval mode, no decoder layer in memory.
    """
    from ..validate import check_choice

    check_choice("unembed", unembed, ("memory", "stream"), "way to hold the unembedding")
    cfg = ckpt.config
    dtype = dtype or ckpt.stored_dtype
    reader = CheckpointLayerReader(ckpt, dtype, device)
    model = StreamedLlama(cfg, reader, layers, progress=progress)
    resident = ["ln_final.weight"] + (["unembed.weight"] if unembed == "memory" else [])
    state = ckpt.state_dict(resident, dtype=dtype, device=device)
    if unembed == "memory" and cfg.tie_embeddings:
        # One Parameter under both names keeps the weights tied after assign=True.
        state["embed.weight"] = state["unembed.weight"] = nn.Parameter(state["unembed.weight"], requires_grad=False)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    on_disk = [name for name in ("embed.weight", "unembed.weight") if name not in state]
    if unexpected or any(not name.startswith("blocks.") and name not in on_disk for name in missing):
        raise CheckpointError(f"resident weights did not match the model: missing {missing}, unexpected {unexpected}")
    # Read with the layer reader's files (Meta shards stay mapped, not unpickled at each read).
    if "embed.weight" in on_disk:
        model.embed = StreamedEmbedding(OnDiskWeight(ckpt, "embed.weight", dtype, device, reader.files))
    if "unembed.weight" in on_disk:
        # Tied: one reader for both (the same stored tensor).
        weight = model.embed.weight if cfg.tie_embeddings else None
        if weight is None:
            weight = OnDiskWeight(ckpt, "unembed.weight", dtype, device, reader.files)
        model.unembed = StreamedUnembed(weight)
    model.tokenizer = tokenizer
    return model.eval()
