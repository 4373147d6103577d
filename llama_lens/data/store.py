"""An activation store: chosen hook points of every prompt written to disk, read back as a torch Dataset.

Written by the dataset runner (`ll.lens_dataset(..., activations=[...])`, `ll.store_activations`), one
safetensors file per shard of prompts, beside an index:

    out/activations/index.json                   hook names, shapes, dtype, the shards and their sizes
    out/activations/shard-00000.safetensors      per hook name: [n_tokens, *shape]; "prompt", "position": [n_tokens]

A row is one token of one prompt: `prompt` is the prompt's index in the input, `position` the token's index
within the prompt's own tokens (0 = its first token, BOS included), whatever padding the batch had.
Hooks whose tensors are not [batch, pos, ...] (the attention pattern and scores, [batch, n_heads, q_pos, k_pos])
cannot be stored per token and are refused.

    data = ll.ActivationDataset(out, unit="token")      # one item per stored token, in (prompt, position) order
    data[0]  # {"blocks.3.hook_resid_post": [d_model], "prompt": 0, "position": 0}
    data = ll.ActivationDataset(out, unit="prompt")     # one item per prompt, in prompt order
    data[0]  # {"blocks.3.hook_resid_post": [n_stored, d_model], "prompt": 0, "position": [n_stored]}
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import ArgumentError, MissingFileError, OutOfRangeError, UnknownNameError, UsageError, did_you_mean
from .safe_files import digest, read_record, write_atomic
from .shard_reader import ShardReader
from .store_index import read_index

STORE_FOLDER = "activations"
INDEX_FILE = "index.json"
# Hooks whose tensors are [batch, n_heads, q_pos, k_pos]: a token's row would be as long as its prompt.
NOT_PER_TOKEN = ("hook_attn_scores", "hook_pattern")


def shard_file(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def check_hook_names(hook_names: Sequence[str], valid: Sequence[str]) -> list[str]:
    """The hook names to store, checked against the model's (`valid`).

    Raises:
        UnknownNameError: a name that is not a hook point (with the closest valid names).
        ValueError: no names, or a hook that has no row per token (attention pattern and scores).
    """
    names = [hook_names] if isinstance(hook_names, str) else list(hook_names)
    if not names:
        raise ArgumentError("activations is empty; pass hook names, e.g. activations=['blocks.3.hook_resid_post']")
    for name in names:
        if name not in valid:
            raise UnknownNameError(f"no hook {name!r}{did_you_mean(name, valid, hint='see model.hook_names')}")
        if name.endswith(NOT_PER_TOKEN):
            raise ArgumentError(
                f"{name!r} is [batch, n_heads, q_pos, k_pos], not one row per token, so it cannot go in the "
                "activation store; store blocks.{i}.attn.hook_z or hook_result instead"
            )
    return list(dict.fromkeys(names))


class ActivationCapture:
    """Hook functions that keep, for each prompt of a batch, the rows of its chosen positions.

    The batch is left-padded: a prompt of n tokens holds the last n positions, so its own position r is at
    pos - n + r. Only a hook's first call per batch is kept: the lens calls `ln_final` once more on its
    read-outs, with a different shape.
    """

    def __init__(self, hook_names: Sequence[str], dtype: torch.dtype | None) -> None:
        self.hook_names = list(hook_names)
        self.dtype = dtype
        self.rows: dict[str, list[torch.Tensor]] = {name: [] for name in self.hook_names}
        self.prompts: list[torch.Tensor] = []
        self.positions: list[torch.Tensor] = []
        self._batch_index: torch.Tensor | None = None  # [n_rows] the batch row of each kept row
        self._pos_index: torch.Tensor | None = None  # [n_rows] ... and its padded position
        self._seen: set[str] = set()

    def start_batch(self, prompt_ids: Sequence[int], n_tokens: Sequence[int], *, positions: Sequence[Sequence[int]]):
        """Sets the batch's layout: each prompt's index, its token count and its positions to keep."""
        pos = max(n_tokens)
        batch_index, pos_index, kept_prompts, kept_positions = [], [], [], []
        for b, (prompt, n, own) in enumerate(zip(prompt_ids, n_tokens, positions)):
            for r in own:
                batch_index.append(b)
                pos_index.append(pos - n + r)
                kept_prompts.append(prompt)
                kept_positions.append(r)
        self._batch_index = torch.tensor(batch_index, dtype=torch.long)
        self._pos_index = torch.tensor(pos_index, dtype=torch.long)
        self.prompts.append(torch.tensor(kept_prompts, dtype=torch.long))
        self.positions.append(torch.tensor(kept_positions, dtype=torch.long))
        self._seen.clear()

    def hook(self, tensor: torch.Tensor, *, hook) -> None:
        if hook.name in self._seen:
            return
        self._seen.add(hook.name)
        device = tensor.device
        kept = tensor[self._batch_index.to(device), self._pos_index.to(device)]  # [n_rows, *shape]
        self.rows[hook.name].append(kept.to("cpu", self.dtype or kept.dtype, copy=True))

    def fwd_hooks(self) -> list[tuple[list[str], Any]]:
        return [(self.hook_names, self.hook)]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything kept so far: per hook [n_rows, *shape], and "prompt", "position" [n_rows]."""
        missing = [name for name in self.hook_names if len(self.rows[name]) != len(self.prompts)]
        if missing:
            raise UsageError(f"hooks {missing} did not fire in every batch; is the model's forward pass stopped early?")
        out = {name: torch.cat(parts) for name, parts in self.rows.items()}
        out["prompt"] = torch.cat(self.prompts)
        out["position"] = torch.cat(self.positions)
        return out


def write_shard(folder: Path, index: int, *, tensors: dict[str, torch.Tensor]) -> Path:
    """Writes one shard atomically (a temporary file renamed into place), with its digest record beside it: a file
    under its final name is whole, and a later change to it is seen (`safe_files.matches_record`)."""
    from safetensors.torch import save_file

    path = folder / shard_file(index)
    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    write_atomic(path, lambda temporary: save_file(contiguous, temporary, metadata={"format": "pt"}), record=True)
    return path


def write_index(folder: Path, n_shards: int, *, hook_names: Sequence[str], positions: Any) -> dict[str, Any]:
    """Writes index.json from the shards' headers (read without loading their tensors), with each shard's size
    and SHA-256 (from its digest record, written with the shard), which every reader checks."""
    shards, shapes, dtype = [], {}, None
    for k in range(n_shards):
        path = folder / shard_file(k)
        reader = ShardReader(path)
        try:
            n_rows = reader.shape("prompt")[0]
            prompts = reader.rows("prompt")
            for name in hook_names:
                shapes[name] = list(reader.shape(name)[1:])
                dtype = reader.dtype_name(name)
        finally:
            reader.close()
        checksum = read_record(path) or digest(path)
        shards.append({"file": shard_file(k), "n_tokens": n_rows, "n_prompts": len(prompts.unique())} | checksum)
    index = {
        "format": 1,
        "hook_names": list(hook_names),
        "shapes": shapes,
        "dtype": dtype,
        "positions": positions,
        "n_tokens": sum(s["n_tokens"] for s in shards),
        "n_prompts": sum(s["n_prompts"] for s in shards),
        "shards": shards,
    }
    write_atomic(folder / INDEX_FILE, lambda temporary: temporary.write_text(json.dumps(index, indent=2)))
    return index


class ActivationDataset(torch.utils.data.Dataset):
    """The activation store of a dataset run, as a torch Dataset (for a DataLoader training a probe or an SAE).

    Args:
        folder: the run's `out` folder, or its `activations` folder.
        hook_names: which stored hooks each item holds (default all).
        unit: "token": one item per stored token, {hook: [*shape], "prompt": int, "position": int};
            "prompt": one item per prompt, {hook: [n_stored, *shape], "prompt": int, "position": [n_stored]}.
            Items come in (prompt, position) order either way; shuffle in the DataLoader.

    Rows are read from the shards (with `pread`, not a memory map: a shard cut short while open is an error, not a
    SIGBUS) as items are asked for; nothing is loaded up front except each shard's prompt and position columns.
    Each shard's size is checked against the index on open and its SHA-256 on first use; file names in the index
    that lead out of the store's folder are refused.
    """

    def __init__(
        self, folder: str | os.PathLike, hook_names: Sequence[str] | None = None, *, unit: str = "token"
    ) -> None:
        folder = Path(folder)
        if (folder / STORE_FOLDER / INDEX_FILE).exists():
            folder = folder / STORE_FOLDER
        index_path = folder / INDEX_FILE
        if not index_path.exists():
            raise MissingFileError(
                f"no activation store at {folder}: {INDEX_FILE} is missing (run lens_dataset with activations=[...] "
                "to the end; the index is written last)"
            )
        if unit not in ("token", "prompt"):
            raise ArgumentError(f"unit must be 'token' or 'prompt', got {unit!r}")
        self.folder, self.unit = folder, unit
        self.index = read_index(index_path)
        stored = self.index["hook_names"]
        if hook_names is None:
            self.hook_names = list(stored)
        else:
            names = [hook_names] if isinstance(hook_names, str) else list(hook_names)
            for name in names:
                if name not in stored:
                    raise UnknownNameError(
                        f"hook {name!r} is not in the activation store at {folder}"
                        f"{did_you_mean(name, stored, hint=f'it holds {stored}')}"
                    )
            self.hook_names = names
        self.shapes = {name: tuple(self.index["shapes"][name]) for name in self.hook_names}
        self._files = [shard["path"] for shard in self.index["shards"]]
        self._handles: dict[int, ShardReader] = {}
        self._verified: set[int] = set()
        # (prompt, position, shard, row) of every stored token, sorted by (prompt, position).
        prompts, positions, shards, rows = [], [], [], []
        for k in range(len(self._files)):
            f = self._open(k, verify=False)  # only two columns are read here: the digest is checked on first use
            prompt, position = f.rows("prompt"), f.rows("position")
            prompts.append(prompt)
            positions.append(position)
            shards.append(torch.full_like(prompt, k))
            rows.append(torch.arange(len(prompt)))
        prompt, position = torch.cat(prompts), torch.cat(positions)
        order = torch.argsort(prompt * (int(position.max()) + 1 if len(position) else 1) + position, stable=True)
        self.prompt, self.position = prompt[order], position[order]
        self._shard, self._row = torch.cat(shards)[order], torch.cat(rows)[order]
        # unit="prompt": the start of each prompt's run of tokens.
        self.prompt_ids, counts = torch.unique_consecutive(self.prompt, return_counts=True)
        self._starts = [0] + torch.cumsum(counts, 0).tolist()

    def _open(self, k: int, *, verify: bool = True) -> ShardReader:
        """Shard k's reader, its size checked against the index; with `verify`, its SHA-256 too, once per process
        (a full read of the shard, so a damaged one is refused by name before any of its rows is served)."""
        shard = self.index["shards"][k]
        if k not in self._handles:
            if not self._files[k].is_file():
                raise MissingFileError(f"{self._files[k]} (shards[{k}] of {self.folder / INDEX_FILE}) is missing")
            self._handles[k] = ShardReader(self._files[k], size=shard["size"])
        if verify and k not in self._verified and shard["sha256"] is not None:
            found = digest(self._files[k])
            if found != {"size": shard["size"], "sha256": shard["sha256"]}:
                raise ArgumentError(
                    f"{self._files[k]} does not match its digest in {self.folder / INDEX_FILE} (shards[{k}].sha256): "
                    "the shard was changed after it was written; rerun the dataset run into its folder to recompute it"
                )
            self._verified.add(k)
        return self._handles[k]

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers reopen the files themselves: open file descriptors do not pickle.
        return self.__dict__ | {"_handles": {}}

    def __len__(self) -> int:
        return len(self.prompt) if self.unit == "token" else len(self.prompt_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= i < n:
            raise OutOfRangeError(f"item {i} is out of range for an activation store of {n} {self.unit}s")
        i %= n
        if self.unit == "token":
            f = self._open(int(self._shard[i]))
            row = int(self._row[i])
            item = {name: f.rows(name, row, row + 1)[0] for name in self.hook_names}
            return item | {"prompt": int(self.prompt[i]), "position": int(self.position[i])}
        start, stop = self._starts[i], self._starts[i + 1]
        # One prompt's tokens sit in one shard, in consecutive rows (the runner writes them so).
        f = self._open(int(self._shard[start]))
        row0, row1 = int(self._row[start]), int(self._row[stop - 1]) + 1
        item = {name: f.rows(name, row0, row1) for name in self.hook_names}
        return item | {"prompt": int(self.prompt_ids[i]), "position": self.position[start:stop].clone()}

    def __repr__(self) -> str:
        return (
            f"ActivationDataset({len(self)} {self.unit}s, hooks={self.hook_names}, dtype={self.index['dtype']}, "
            f"folder={str(self.folder)!r})"
        )
