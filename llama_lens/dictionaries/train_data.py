"""Training data for a dictionary: activations collected from the model into an activation store, and each
step's batch read back from it.

    store = collect_activations(model, tokens, hook_names=[...], folder=out / "activations")
    batches = StoreBatches(store, hook_in=..., hook_out=..., batch_tokens=4096, shuffle=True, ...)
    x, y = batches.batch(step)      # [batch_tokens, d_in], [batch_tokens, d_out], fp32

A step's batch is a function of the step alone (and the seed): the store is cut into buffers of whole steps, the
buffer's tokens permuted with a generator seeded from (seed, epoch, buffer). So a resumed run reads exactly the
batches the uninterrupted run would have, with nothing to replay, and memory holds one buffer, not the store.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..data.store import INDEX_FILE, ActivationCapture, ActivationDataset, check_hook_names, write_index, write_shard
from ..errors import ArgumentError, ArgumentTypeError
from ..files import write_text_atomic

TOKENS_FILE = "tokens.json"  # beside the store's index: which tokens it holds, so a rerun can reuse it
SHARD_TOKENS = 65536  # tokens per shard written by `collect_activations`


def _tokens_digest(tokens: torch.Tensor, hook_names: Sequence[str], skip_token: int | None = None) -> dict[str, Any]:
    sha = hashlib.sha256(tokens.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
    digest = {"sha256": sha, "shape": list(tokens.shape), "hook_names": sorted(hook_names)}
    return digest | ({"skip_token": skip_token} if skip_token is not None else {})


def collect_activations(
    model: Any,
    tokens: torch.Tensor,
    *,
    hook_names: Sequence[str],
    folder: str | Path,
    batch_rows: int = 8,
    progress: bool = True,
) -> ActivationDataset:
    """Runs `model` over token rows and stores the hooks' activations at every position, in the activation store's
    format (`ll.ActivationDataset` reads it; prompt i is row i). The forward pass stops after the last layer the
    hooks need. A folder that already holds these hooks for these tokens is reused as it is.

    Args:
        model: a HookedLlama (or anything with its hooks and forward).
        tokens: token ids [n_rows, pos] (a LongTensor), every position a real token (no padding).
        hook_names: the hooks to store.
        folder: the store's folder (created).
        batch_rows: rows per forward pass.

    Raises:
        ArgumentError: tokens of the wrong shape or type; UnknownNameError: a name that is not a hook point.
    """
    stores = collect_stores(model, tokens, {Path(folder): hook_names}, batch_rows=batch_rows, progress=progress)
    return stores[Path(folder)]


def collect_stores(
    model: Any,
    tokens: torch.Tensor,
    stores: dict[Path, Sequence[str]],
    *,
    batch_rows: int = 8,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
    shard_tokens: int = SHARD_TOKENS,
    skip_token: int | None = None,
) -> dict[Path, ActivationDataset]:
    """`collect_activations` into several stores from ONE pass of the model: store `folder` gets the hooks
    `stores[folder]`. A transcoder set keeps each layer's two hooks in a store of its own, so that training a
    layer reads (and checks the digest of) its own activations only, not all the layers'.

    Args:
        stores: {folder: hook names}; a folder that already holds its hooks for these tokens is reused as it is.
        dtype: what the activations are stored in (the trainer reads them back in fp32).
        shard_tokens: tokens per shard, about; all the stores' hooks for one shard are held in memory at once.
        skip_token: a token id whose positions are not stored (BOS: an attention sink's activations are outliers,
            up to hundreds of times the norm of the rest, that would dominate a dictionary's loss).

    Raises:
        ArgumentError: tokens of the wrong shape or type; UnknownNameError: a name that is not a hook point.
    """
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype != torch.long or not tokens.numel():
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ArgumentError(f"tokens must be a LongTensor [n_rows, pos] of token ids, got {shape}")
    wanted = {Path(folder): check_hook_names(names, model.hook_names) for folder, names in stores.items()}
    done = {folder: _reuse(folder, names, tokens, skip_token) for folder, names in wanted.items()}
    todo = {folder: names for folder, names in wanted.items() if done[folder] is None}
    for folder in todo:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / INDEX_FILE).unlink(missing_ok=True)  # the index is written last: without it the store is unfinished
    names = list(dict.fromkeys(name for hooks in todo.values() for name in hooks))
    if names:
        _run_and_write(model, tokens, names, todo, batch_rows=batch_rows, progress=progress, dtype=dtype,
                       shard_tokens=shard_tokens, skip_token=skip_token)  # fmt: skip
    for folder, hooks in todo.items():
        write_text_atomic(folder / TOKENS_FILE, json.dumps(_tokens_digest(tokens, hooks, skip_token)))
        done[folder] = ActivationDataset(folder, hooks, unit="prompt")
    return {folder: dataset for folder, dataset in done.items() if dataset is not None}


def _reuse(folder: Path, names: list[str], tokens: torch.Tensor, skip_token: int | None) -> ActivationDataset | None:
    """The store at `folder` if it is finished and holds the hooks `names` for `tokens`, else None."""
    digest = _tokens_digest(tokens, names, skip_token)
    if (folder / INDEX_FILE).is_file() and (folder / TOKENS_FILE).is_file():
        try:
            if json.loads((folder / TOKENS_FILE).read_text()) == digest:
                return ActivationDataset(folder, names, unit="prompt")
        except ValueError:
            pass  # a damaged note: collect again
    return None


def _run_and_write(
    model: Any, tokens: torch.Tensor, names: list[str], stores: dict[Path, list[str]], *, batch_rows: int,
    progress: bool, dtype: torch.dtype, shard_tokens: int, skip_token: int | None,
) -> None:  # fmt: skip
    """The forward passes, each shard's rows split among the stores as it is written."""
    from tqdm.auto import tqdm

    layers = [int(name.split(".")[1]) for name in names if name.startswith("blocks.")]
    only_blocks = all(name.startswith("blocks.") or name == "hook_embed" for name in names)
    stop = max(layers, default=-1) + 1 if only_blocks else None
    n_rows, pos = tokens.shape
    rows_per_shard = max(batch_rows, shard_tokens // pos // batch_rows * batch_rows)
    device = model.embed.weight.device
    bar = tqdm(total=n_rows * pos, desc="collecting activations", unit="tok", disable=not progress)
    n_shards = 0
    try:
        for shard_start in range(0, n_rows, rows_per_shard):
            capture = ActivationCapture(names, dtype=dtype)
            for start in range(shard_start, min(shard_start + rows_per_shard, n_rows), batch_rows):
                batch = tokens[start : min(start + batch_rows, shard_start + rows_per_shard, n_rows)]
                keep = [range(pos)] * len(batch)
                if skip_token is not None:
                    keep = [(row != skip_token).nonzero().squeeze(-1).tolist() for row in batch]
                capture.start_batch(range(start, start + len(batch)), [pos] * len(batch), positions=keep)
                with torch.no_grad(), model.hooks(fwd_hooks=capture.fwd_hooks()):
                    model(
                        batch.to(device),
                        return_type=None,
                        stop_at_layer=stop,
                        attention_mask=torch.ones_like(batch, device=device),
                    )
                bar.update(batch.numel())
            tensors = capture.tensors()
            for folder, hooks in stores.items():
                part = {name: tensors[name] for name in [*hooks, "prompt", "position"]}
                write_shard(folder, n_shards, tensors=part)
            n_shards += 1
    finally:
        bar.close()
    for folder, hooks in stores.items():
        write_index(folder, n_shards, hook_names=hooks, positions="all")


class StoreBatches:
    """Each step's (x, y) from an activation store: x at `hook_in`, y at `hook_out`, [batch_tokens, d] in fp32.

    Args:
        store: an ActivationDataset (any unit) or its folder.
        hook_in, hook_out: the hooks (the same for an SAE).
        batch_tokens: tokens per step.
        shuffle: permute each buffer's tokens (else store order: prompt by prompt).
        buffer_tokens: tokens per buffer, a whole number of steps.
        seed: of the permutations.

    Raises:
        UnknownNameError: a hook the store does not hold. ArgumentError: a store with fewer tokens than one step.
    """

    def __init__(
        self,
        store: ActivationDataset | str | Path,
        *,
        hook_in: str,
        hook_out: str,
        batch_tokens: int,
        shuffle: bool,
        buffer_tokens: int,
        seed: int,
    ) -> None:
        if isinstance(store, ActivationDataset):
            store = store.folder
        if not isinstance(store, (str, Path)):
            raise ArgumentTypeError(
                f"training data must be an activation store (its folder or an ActivationDataset), got "
                f"{type(store).__name__}"
            )
        self.hook_in, self.hook_out = hook_in, hook_out
        self.dataset = ActivationDataset(store, list(dict.fromkeys([hook_in, hook_out])), unit="prompt")
        self.d_in = self._width(hook_in)
        self.d_out = self._width(hook_out)
        counts = torch.unique_consecutive(self.dataset.prompt, return_counts=True)[1]
        self.starts = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        self.n_tokens = int(self.starts[-1])
        if self.n_tokens < batch_tokens:
            raise ArgumentError(
                f"the activation store at {self.dataset.folder} holds {self.n_tokens} tokens, fewer than one step of "
                f"batch_tokens={batch_tokens}: store more tokens or lower batch_tokens"
            )
        self.batch_tokens, self.shuffle, self.seed = batch_tokens, shuffle, seed
        self.steps_per_epoch = self.n_tokens // batch_tokens
        self.epoch_tokens = self.steps_per_epoch * batch_tokens
        self.buffer_tokens = min(buffer_tokens, self.epoch_tokens)
        self._buffer: tuple[tuple[int, int], torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def _width(self, hook: str) -> int:
        shape = self.dataset.shapes[hook]
        if len(shape) == 2:  # hook_z [n_heads, d_head]: dictionaries read it flattened
            return shape[0] * shape[1]
        if len(shape) != 1:
            raise ArgumentError(f"hook {hook!r} is stored as {list(shape)} per token; a dictionary reads one vector")
        return shape[0]

    def fingerprint(self) -> dict[str, Any]:
        """What the data is, for a checkpoint to check that a resumed run reads the same store."""
        shards = [shard.get("sha256") for shard in self.dataset.index["shards"]]
        return {"n_tokens": self.n_tokens, "shards_sha256": hashlib.sha256(json.dumps(shards).encode()).hexdigest()}

    def read(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens [start, stop) in store order, as (x, y) in fp32."""
        first = int(torch.searchsorted(self.starts, torch.tensor(start), right=True)) - 1
        parts: dict[str, list[torch.Tensor]] = {self.hook_in: [], self.hook_out: []}
        i = first
        while i < len(self.starts) - 1 and int(self.starts[i]) < stop:
            item = self.dataset[i]
            begin = int(self.starts[i])
            lo, hi = max(start - begin, 0), min(stop, int(self.starts[i + 1])) - begin
            for hook, chunks in parts.items():
                chunks.append(item[hook][lo:hi].flatten(1))
            i += 1
        x = torch.cat(parts[self.hook_in]).float()
        y = x if self.hook_out == self.hook_in else torch.cat(parts[self.hook_out]).float()
        return x, y

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Step `step`'s (x [batch_tokens, d_in], y [batch_tokens, d_out]); past the store's end, the next pass."""
        epoch, within = divmod(step, self.steps_per_epoch)
        offset = within * self.batch_tokens
        if not self.shuffle:
            return self.read(offset, offset + self.batch_tokens)
        index = offset // self.buffer_tokens
        if self._buffer is None or self._buffer[0] != (epoch, index):
            begin = index * self.buffer_tokens
            x, y = self.read(begin, min(begin + self.buffer_tokens, self.epoch_tokens))
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 1_000_003 + index)
            self._buffer = ((epoch, index), x, y, torch.randperm(len(x), generator=generator))
        _, x, y, order = self._buffer
        rows = order[offset - index * self.buffer_tokens :][: self.batch_tokens]
        return x[rows], (x if y is x else y)[rows]
