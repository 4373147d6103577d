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

STORE_FOLDER = "activations"
INDEX_FILE = "index.json"
# Hooks whose tensors are [batch, n_heads, q_pos, k_pos]: a token's row would be as long as its prompt.
NOT_PER_TOKEN = ("hook_attn_scores", "hook_pattern")


def temporary_name(path: Path) -> Path:
    """Where a file is written before it is renamed into place: hidden (a leading dot), so that readers of the
    folder (pyarrow, `pd.read_parquet(folder)`) skip a killed run's leftovers."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


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
    """Writes one shard atomically (a temporary file renamed into place): a file under its final name is whole."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / shard_file(index)
    temporary = temporary_name(path)
    save_file({k: v.contiguous() for k, v in tensors.items()}, temporary, metadata={"format": "pt"})
    os.replace(temporary, path)
    return path


def write_index(folder: Path, n_shards: int, *, hook_names: Sequence[str], positions: Any) -> dict[str, Any]:
    """Writes index.json from the shards' headers (read without loading their tensors)."""
    from safetensors import safe_open

    shards, shapes, dtype = [], {}, None
    for k in range(n_shards):
        with safe_open(folder / shard_file(k), framework="pt") as f:
            n_rows = f.get_slice("prompt").get_shape()[0]
            prompts = f.get_tensor("prompt")
            for name in hook_names:
                piece = f.get_slice(name)
                shapes[name] = list(piece.get_shape()[1:])
                dtype = str(piece.get_dtype())
        shards.append({"file": shard_file(k), "n_tokens": n_rows, "n_prompts": len(prompts.unique())})
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
    temporary = temporary_name(folder / INDEX_FILE)
    temporary.write_text(json.dumps(index, indent=2))
    os.replace(temporary, folder / INDEX_FILE)
    return index


class ActivationDataset(torch.utils.data.Dataset):
    """The activation store of a dataset run, as a torch Dataset (for a DataLoader training a probe or an SAE).

    Args:
        folder: the run's `out` folder, or its `activations` folder.
        hook_names: which stored hooks each item holds (default all).
        unit: "token": one item per stored token, {hook: [*shape], "prompt": int, "position": int};
            "prompt": one item per prompt, {hook: [n_stored, *shape], "prompt": int, "position": [n_stored]}.
            Items come in (prompt, position) order either way; shuffle in the DataLoader.

    Rows are read from the memory-mapped shards as items are asked for; nothing is loaded up front except
    each shard's prompt and position columns.
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
        self.index = json.loads(index_path.read_text())
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
        self._files = [folder / shard["file"] for shard in self.index["shards"]]
        self._handles: dict[int, Any] = {}
        # (prompt, position, shard, row) of every stored token, sorted by (prompt, position).
        prompts, positions, shards, rows = [], [], [], []
        for k in range(len(self._files)):
            f = self._open(k)
            prompt, position = f.get_tensor("prompt"), f.get_tensor("position")
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

    def _open(self, k: int):
        from safetensors import safe_open

        if k not in self._handles:
            self._handles[k] = safe_open(self._files[k], framework="pt")
        return self._handles[k]

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers reopen the files themselves: open safetensors handles do not pickle.
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
            item = {name: f.get_slice(name)[row : row + 1][0] for name in self.hook_names}
            return item | {"prompt": int(self.prompt[i]), "position": int(self.position[i])}
        start, stop = self._starts[i], self._starts[i + 1]
        # One prompt's tokens sit in one shard, in consecutive rows (the runner writes them so).
        f = self._open(int(self._shard[start]))
        row0, row1 = int(self._row[start]), int(self._row[stop - 1]) + 1
        item = {name: f.get_slice(name)[row0:row1] for name in self.hook_names}
        return item | {"prompt": int(self.prompt_ids[i]), "position": self.position[start:stop].clone()}

    def __repr__(self) -> str:
        return (
            f"ActivationDataset({len(self)} {self.unit}s, hooks={self.hook_names}, dtype={self.index['dtype']}, "
            f"folder={str(self.folder)!r})"
        )
