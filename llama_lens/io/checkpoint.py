"""Opens a Llama checkpoint folder, indexes its tensors from file headers, and reads only the ones asked for.

Layouts:
    "hf"    Hugging Face: `model.safetensors`, or `model-0000k-of-0000N.safetensors` shards named by
            `model.safetensors.index.json`; the shape comes from `config.json`.
    "meta"  Meta release: `consolidated.00.pth` (`.01`, ... for model-parallel shards, merged on read along the
            axis each weight was split on) + `params.json`.
    "gguf"  one llama.cpp `.gguf` file (given itself, or a folder holding only it): config and tokenizer from its
            metadata, each tensor dequantized as it is read (`gguf_io`).

Opening reads headers only and checks every tensor's name and shape against the config, so a bad file fails
at once with its name in the message. Reads go through one entry, `Checkpoint.read_into` (canonical name ->
a tensor the caller allocated), which full loads (`state_dict`) and streaming (`llama_lens.loading.stream`) share.

The loader, one job per module (imports point down the list):
    names.py            rename tables, `{i}` templates, Meta split axes, q/k permutation, expected shapes
    index.py            which file holds which bytes of each tensor; its on-disk cache and file stamps
    reader.py           what a format offers (`CheckpointReader`): config, tensor index, reads, tokenizer
    safetensors.py      safetensors headers and reads; `SafetensorsReader` ("hf")
    pth.py              .pth shards: tables by torch.load(weights_only=True) onto the meta device, data by
                        pread; `PthReader` ("meta")
    gguf*.py            GGUF headers, the config their metadata describe, dequantizing reads; `GGUFReader`
    layout.py           which files make up a checkpoint, in which format; the reader of that format
    matching.py         stored names and shapes checked against the config
    checkpoint.py       the Checkpoint: the index cache, tables, reads, each delegated to the format's reader
"""

from __future__ import annotations

import contextlib
import os
import traceback
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import ArgumentError, MissingFileError, UnknownNameError, did_you_mean
from ..files import warn_if_not_finite
from ..validate import check_layers, resolve_device, resolve_dtype
from .index import (
    StoredTensor,
    index_cache_path,
    join_pieces,
    read_index_cache,
    write_index_cache,
)
from .layout import open_reader
from .matching import check_n_layers, match_names
from .names import block_param_shapes, component, layer_template, param_shapes
from .reader import WEIGHT_DTYPES, WeightFiles

__all__ = ["WEIGHT_DTYPES", "Checkpoint", "WeightFiles", "dropped_on_error", "param_shapes"]


class Checkpoint:
    """A checkpoint folder, opened lazily: config, tensor index, and reads of only the tensors asked for.

    Opening reads the config and the tensor headers (safetensors headers; the pickle part of .pth files) and
    checks every tensor's name and shape against the config. The header index is cached as JSON, in
    `index_cache` if given, else in `default_index_cache_dir()/<sha1 of the folder's path>.json` (see
    `llama_lens.io.index`); it is rebuilt when any weight file's size, modification time or header (the
    bytes the index is built from) changes, or the cache itself was edited. Pass
    `index_cache=False` to skip the cache.

    A GGUF file is opened from its header alone (fast enough that no index is cached); its tensors are
    dequantized as they are read, into the dtype asked for.

    Args:
        path: the checkpoint folder, or a .gguf file.
        index_cache: a JSON file for the shard index, None for the default location, False for none.

    Attributes:
        path: the folder (absolute); for a GGUF, the folder holding the file (`files[0]`).
        format: "hf", "meta" or "gguf".
        config: the LlamaConfig.
        files: the weight files, in order.
        tokenizer_path: tokenizer.json or tokenizer.model beside the weights (for Meta releases, also a
            tokenizer.model one folder up, where Llama 2 releases keep it), the .gguf file itself when its
            metadata hold a vocabulary, or None.
        index_cache_path: the cache file used, or None.
        file_stamps: size and modification time of each weight file at opening, which reads check before
            and after; and a digest of each file's header, which decides whether the cached index is used.

    Raises:
        MissingFileError (a FileNotFoundError): the folder, its config/params.json, its weight files, or a
            shard named by the index does not exist.
        ArgumentError (a ValueError): a path to a file other than a .gguf.
        CheckpointError (a ValueError): a corrupt or truncated file, a missing, unexpected or misshapen
            tensor, or a .pth holding non-tensors.
    """

    def __init__(self, path: str | os.PathLike, *, index_cache: str | os.PathLike | bool | None = None) -> None:
        self.path = Path(path).expanduser().absolute()
        if not self.path.exists():
            raise MissingFileError(f"checkpoint folder {str(self.path)!r} does not exist")
        gguf_file = None
        if self.path.is_file() and self.path.suffix.lower() == ".gguf":
            self.path, gguf_file = self.path.parent, self.path
        elif not self.path.is_dir():
            raise ArgumentError(
                f"{self.path} is a file; pass the folder that holds the checkpoint ({self.path.parent})"
            )
        # The format's reader: its files, stamped now (reads check that no file changed since).
        self._reader = reader = open_reader(self.path, gguf_file)
        self.format, self.files, self.file_stamps = reader.format, reader.files, reader.stamps
        self.index_cache_path = index_cache_path(self.path, index_cache) if reader.caches_index else None
        raw = read_index_cache(self.index_cache_path, self.path, self.format, self.file_stamps)
        if raw is not None:
            try:
                self._use_index(raw)
            except (ValueError, LookupError, TypeError):
                # A cache that is well-formed but wrong (edited, or from another llama_lens) is rebuilt: the files
                # decide. Where they are at fault, the rebuild raises the same error again.
                raw = None
        if raw is None:
            raw = reader.raw_index()
            self._use_index(raw)
            write_index_cache(self.index_cache_path, self.path, self.format, self.file_stamps, raw)
        self.tokenizer_path = reader.tokenizer_path()

    def _use_index(self, raw: dict[str, list[dict[str, Any]]]) -> None:
        self.config = self._reader.read_config(raw)
        check_n_layers(raw, self.config, self._reader)
        self._stored = join_pieces(raw, self.config.d_model)  # stored name -> StoredTensor
        self._param_shapes = param_shapes(self.config)
        self._source = match_names(self._stored, self.config, self._reader)  # canonical name -> stored name

    # ----------------------------------------------------------------------------------------- overview
    @property
    def num_params(self) -> int:
        """Parameters of the model: each stored tensor used counted once (a tied embedding once)."""
        return sum(self._stored[name].numel for name in set(self._source.values()))

    @property
    def stored_dtype(self) -> torch.dtype:
        """The dtype most of the model's parameters are stored in (what `load(..., dtype=None)` casts all to)."""
        numel: dict[str, int] = {}
        for name in set(self._source.values()):
            stored = self._stored[name]
            dtype = str(self._value_dtype(stored)).removeprefix("torch.")
            numel[dtype] = numel.get(dtype, 0) + stored.numel
        return getattr(torch, max(numel, key=numel.get))

    @property
    def stored_bytes_per_param(self) -> float:
        """Bytes on disk per parameter, over the model's parameters (a fraction for quantized GGUF tensors)."""
        names = set(self._source.values())
        return sum(self._stored[name].nbytes for name in names) / sum(self._stored[name].numel for name in names)

    def _value_dtype(self, stored: StoredTensor) -> torch.dtype:
        """The dtype a stored tensor's values are read in: as stored, or what a GGUF type dequantizes to."""
        return self._reader.value_dtype(stored.dtype)

    def param_dtype(self, name: str) -> torch.dtype:
        """The dtype parameter `name` (a canonical name) is stored in.

        Raises:
            UnknownNameError (a KeyError): for a name that is not a parameter of this model.
        """
        self._check_param_name(name)
        return self._value_dtype(self._stored[self._source[name]])

    @property
    def param_names(self) -> list[str]:
        """Canonical names of all the model's parameters, in forward order."""
        return list(param_shapes(self.config))

    def params_for(self, layers: Iterable[int] | None) -> list[str]:
        """Canonical names a model holding `layers` needs: embedding, those blocks, final norm, unembedding.

        Raises:
            ArgumentError (a ValueError): for a layer outside [0, n_layers).
        """
        names = ["embed.weight"]
        for layer in check_layers(layers, self.config.n_layers):
            names += list(block_param_shapes(self.config, layer))
        return names + ["ln_final.weight", "unembed.weight"]

    def tensors(self):
        """One row per stored tensor, as a pandas DataFrame.

        Columns: name (as stored), param (canonical name, None when skipped), layer (Int64, NA outside
        blocks), component (embed/attn/mlp/norm/head, None when skipped), shape (tuple), dtype (str: a torch
        dtype's name, or a GGUF's quantization type such as "Q4_K"), numel, bytes (on disk), file. Rows come in
        forward order, skipped tensors (RoPE buffers, a tied model's lm_head) last. A Meta weight split over
        model-parallel shards is one row with the merged shape and its files joined by commas; `bytes` counts
        the merged tensor once.
        """
        import pandas as pd

        # Reversed so that a tied embedding's row is named after embed.weight, which comes first.
        stored_to_param = {stored: canonical for canonical, stored in reversed(self._source.items())}
        # Forward order (embedding, block 0, ..., final norm, unembedding), skipped tensors last.
        position = {name: k for k, name in enumerate(self.param_names)}
        names = sorted(self._stored, key=lambda name: position.get(stored_to_param.get(name), len(position)))
        rows = []
        for name in names:
            stored = self._stored[name]
            param = stored_to_param.get(name)
            layer = layer_template(param)[1] if param else None
            rows.append(
                {
                    "name": name,
                    "param": param,
                    "layer": layer,
                    "component": component(param),
                    "shape": stored.shape,
                    "dtype": stored.dtype,
                    "numel": stored.numel,
                    "bytes": stored.nbytes,
                    "file": ",".join(dict.fromkeys(piece.file for piece in stored.pieces)),
                }
            )
        columns = ["name", "param", "layer", "component", "shape", "dtype", "numel", "bytes", "file"]
        frame = pd.DataFrame(rows, columns=columns)
        frame["layer"] = frame["layer"].astype("Int64")
        return frame

    def __repr__(self) -> str:
        cfg = self.config
        return (
            f"Checkpoint({str(self._reader.display_path)!r}, format={self.format!r}, "
            f"files={len(self.files)}, n_layers={cfg.n_layers}, d_model={cfg.d_model}, params={self.num_params:,})"
        )

    # --------------------------------------------------------------------------------------------- reads
    def open_files(self, *, lazy: bool = True) -> WeightFiles:
        """The weight files, kept open for many `read_into` calls until closed (a `with` block closes them).

        Meta shards stay open: opening one unpickles its whole table of tensors, which costs more than reading
        a layer out of it. Safetensors files are opened by each read instead (an open is cheap), so that reads
        in several threads never share a file position.

        Args:
            lazy: open each Meta shard when a read first needs it, instead of all of them now.
        """
        return self._reader.open_files(lazy=lazy)

    def read_into(self, targets: dict[str, torch.Tensor], *, files: WeightFiles | None = None) -> int:
        """Reads parameters into tensors the caller allocated: the one read path of full loads and streaming.

        Each parameter is read from its stored tensor (model-parallel pieces joined, Meta and GGUF q/k rows
        permuted to the rotate-half layout, GGUF blocks dequantized), cast to its target's dtype and moved to its
        target's device on the way, with no copy beside the target but a buffer of a few MiB (or, for Meta q/k
        weights, the weight as stored).

        Args:
            targets: canonical name -> contiguous tensor of the parameter's shape (see `param_shapes`), any
                float dtype, any device.
            files: weight files kept open across reads (`open_files`); default: opened for this read only.

        Returns:
            bytes read, as stored.

        Raises:
            UnknownNameError (a KeyError): for a name that is not a parameter of this model.
            ArgumentError (a ValueError): for a target of the wrong shape, or not contiguous.
            CheckpointError: a file truncated or changed since the checkpoint was opened (the files are checked
                before anything is read, and again after).
        """
        for name, target in targets.items():
            self._check_param_name(name)
            if tuple(target.shape) != self._param_shapes[name] or not target.is_contiguous():
                raise ArgumentError(
                    f"read_into: the target for {name!r} must be a contiguous tensor of shape "
                    f"{list(self._param_shapes[name])}, got {list(target.shape)}"
                    + ("" if target.is_contiguous() else " (not contiguous)")
                )
        reads = [(self._stored[self._source[name]], target) for name, target in targets.items()]
        return self._read(reads, files, rotate_half=True)

    def read_rows(
        self, name: str, start: int, target: torch.Tensor, *, files: WeightFiles | None = None
    ) -> int:  # fmt: skip
        """Reads rows start .. start + len(target) of a 2-d parameter (the embedding, the unembedding) into
        `target`, cast on the way: only those rows' bytes are read, from each model-parallel shard that holds
        a part of them (a Meta embedding split over d_model: a slice of every row from every shard).

        Args:
            name: canonical name of a parameter whose rows are stored as they are used (not a q/k weight that
                a read permutes: Meta's, a llama GGUF's).
            start: the first row.
            target: contiguous tensor [rows, columns], any float dtype, any device.
            files: weight files kept open across reads (`open_files`); default: opened for this read only.

        Returns:
            bytes read, as stored.

        Raises:
            UnknownNameError (a KeyError): for a name that is not a parameter of this model.
            ArgumentError (a ValueError): for a parameter whose rows are permuted on read, a bad target, or rows
                out of range.
            CheckpointError: a file truncated or changed since the checkpoint was opened.
        """
        self._check_param_name(name)
        stored = self._stored[self._source[name]]
        n_rows, n_columns = self._param_shapes[name] if len(self._param_shapes[name]) == 2 else (0, 0)
        if not n_rows or self._reader.qk_heads(stored.name, self.config) is not None:
            raise ArgumentError(f"read_rows reads the rows of a 2-d parameter stored as it is used, not {name!r}")
        if target.dim() != 2 or target.shape[1] != n_columns or not target.is_contiguous():
            raise ArgumentError(f"read_rows: the target for {name!r} must be a contiguous tensor [rows, {n_columns}]")
        if not 0 <= start <= start + target.shape[0] <= n_rows:
            raise ArgumentError(
                f"read_rows: rows {start}..{start + target.shape[0]} of {name!r} are outside 0..{n_rows}"
            )
        self.file_stamps.check_all(stored.files)
        read_bytes = self._reader.read_rows(stored, start, target, files)
        warn_if_not_finite(target, f"rows {start}..{start + len(target)} of tensor {stored.name!r} in {self.path}")
        self.file_stamps.check_all(stored.files)  # as _read: a file replaced while it was read gave other weights
        return read_bytes

    def load_tensor(self, name: str) -> torch.Tensor:
        """One tensor by its stored name, as stored (dtype, layout), Meta shards merged; a GGUF tensor dequantized
        (float32, or float16/bfloat16 for F16/BF16), its q/k rows in llama.cpp's order.

        Raises:
            UnknownNameError (a KeyError): for a name the checkpoint does not hold, with the closest stored names.
        """
        if name not in self._stored:
            if name in self._source:
                hint = f"; it is stored as {self._source[name]!r} (state_dict([{name!r}]) reads it by our name)"
            else:
                hint = did_you_mean(name, self._stored)
            raise UnknownNameError(f"no tensor {name!r} in {self._reader.files_text()}{hint}")
        stored = self._stored[name]
        target = torch.empty(stored.shape, dtype=self._value_dtype(stored))
        self._read([(stored, target)], None, rotate_half=False)
        return target

    def state_dict(
        self,
        params: Iterable[str] | None = None,
        *,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str = "cpu",
        progress: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Reads parameters under our names: renamed, merged, permuted, cast and moved; nothing else is read.

        Each tensor is read into fresh memory of its final dtype and device (`read_into`), so the peak memory
        is the result plus a read buffer of a few MiB (a Meta q/k weight: that weight as stored). The Meta
        shards are opened once for the whole read.

        Args:
            params: canonical names, or one name (default: all, see `param_names`; `params_for(layers)` for some
                layers).
            dtype: dtype of the result (default: as stored).
            device: device of the result.
            progress: show a tqdm bar over the layers.

        Returns:
            canonical name -> tensor. With tied embeddings `unembed.weight` is the same tensor object as
            `embed.weight`.

        Raises:
            UnknownNameError (a KeyError): for a name that is not a parameter of this model.
            CheckpointError: a file is truncated or changed since the checkpoint was opened (nothing read is kept).
        """
        dtype, device = resolve_dtype(dtype), resolve_device(device)
        if isinstance(params, str):  # one name would be iterated letter by letter
            params = [params]
        names = self.param_names if params is None else list(params)
        for name in names:
            self._check_param_name(name)
        groups: dict[int | None, list[str]] = {}
        for name in names:
            groups.setdefault(layer_template(name)[1], []).append(name)
        layer_keys = sorted(key for key in groups if key is not None)
        outside = groups.get(None, [])
        result: dict[str, torch.Tensor] = {}
        read: dict[str, torch.Tensor] = {}  # stored name -> tensor, so a tied embedding is read once

        from tqdm.auto import tqdm

        shown = self._reader.display_path.name
        bar = tqdm(total=len(layer_keys), desc=f"loading {shown}", unit="layer", disable=not progress)
        with dropped_on_error(result, read), bar, self.open_files() as files:

            def read_group(group: list[str]) -> None:
                targets = {}
                for name in group:
                    stored_name = self._source[name]
                    if stored_name not in read:
                        stored = self._stored[stored_name]
                        read[stored_name] = targets[name] = torch.empty(
                            stored.shape, dtype=dtype or self._value_dtype(stored), device=device
                        )
                    result[name] = read[stored_name]
                self.read_into(targets, files=files)

            read_group([n for n in outside if n == "embed.weight"])
            for layer in layer_keys:
                read_group(groups[layer])
                bar.update(1)
            read_group([n for n in outside if n != "embed.weight"])
        return {name: result[name] for name in names}

    def layer_state_dict(
        self, layer: int, *, dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu"
    ) -> dict[str, torch.Tensor]:
        """The parameters of decoder layer `layer` under our names (`blocks.{layer}.…`).

        Raises:
            ArgumentError (a ValueError): for a layer outside [0, n_layers).
        """
        check_layers([layer], self.config.n_layers)
        return self.state_dict(block_param_shapes(self.config, layer), dtype=dtype, device=device)

    def _check_param_name(self, name: str) -> None:
        if name not in self._param_shapes:
            raise UnknownNameError(f"{name!r} is not a parameter of this model{did_you_mean(name, self._param_shapes)}")

    def _read(
        self, reads: list[tuple[StoredTensor, torch.Tensor]], files: WeightFiles | None, *, rotate_half: bool
    ) -> int:
        """Copies stored tensors into their targets; with `rotate_half`, Meta and GGUF q/k rows are permuted on the
        way."""
        # Every file before anything is read, and again after: a file replaced since (or while it was read)
        # would give other weights at the indexed offsets. A file truncated meanwhile fails the read itself.
        file_names = list(dict.fromkeys(name for stored, _ in reads for name in stored.files))
        self.file_stamps.check_all(file_names)
        # The heads of each q/k tensor whose rows the format stores in another order than ours.
        heads = [self._reader.qk_heads(stored.name, self.config) if rotate_half else None for stored, _ in reads]
        read_bytes = self._reader.read([(stored, target, h) for (stored, target), h in zip(reads, heads)], files)
        self.file_stamps.check_all(file_names)
        return read_bytes


@contextlib.contextmanager
def dropped_on_error(*partial: dict) -> Iterator[None]:
    """On an exception: empties the dicts `partial` and the locals of the frames the exception came through,
    then lets it go on.

    A caller that keeps the error (a notebook keeps the last one) keeps its traceback, whose frames would
    otherwise keep every tensor read so far alive: up to a whole layer, or a whole model.
    """
    try:
        yield
    except BaseException as err:
        for tensors in partial:
            tensors.clear()
        # Frames still running (the caller's, among them) cannot be cleared; `partial` holds what they read.
        traceback.clear_frames(err.__traceback__)
        raise
