"""What a checkpoint format offers the `Checkpoint`: one small protocol, one implementation per format.

    "hf"    safetensors.py  SafetensorsReader   safetensors files (+ shard index) and config.json
    "meta"  pth.py          PthReader           consolidated.*.pth model-parallel shards and params.json
    "gguf"  gguf.py         GGUFReader          one llama.cpp .gguf file, config and vocabulary in its metadata

A reader knows its files and their bytes: the tensor index its headers give, the config, the names tensors are
stored under, the dtype a stored tensor's values are read in, which rows a read permutes, where the tokenizer
is, and the reads themselves. The `Checkpoint` picks the reader (`layout.open_reader`) and does what is the same
for every format: the index cache, name and shape checks against the config, and the public reads.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from ..config import LlamaConfig
from ..errors import CheckpointError, MissingFileError
from .index import FileStamps, RawIndex, StoredTensor

# Only float dtypes hold the weights of a model we run; others (int8 quantized checkpoints) are refused.
WEIGHT_DTYPES = ("float32", "bfloat16", "float16", "float64")

# (stored tensor, target, heads of the q/k rows to permute on the way or None): one read of `CheckpointReader.read`.
Read = tuple[StoredTensor, torch.Tensor, int | None]


@dataclass(frozen=True)
class WeightLayout:
    """The weight files of one checkpoint (see `layout.find_weight_files`).

    Attributes:
        folder: the checkpoint folder (absolute).
        format: "hf", "meta" or "gguf".
        files: the weight files, in order (Meta shards by rank).
        stamped_files: the files whose size and modification time are checked before reads and decide whether
            the cached index is used: the weight files, and the shard index of a sharded HF checkpoint.
        weight_map: the HF shard index's "weight_map" (tensor name -> file name), or None without one.
    """

    folder: Path
    format: str
    files: list[Path]
    stamped_files: list[Path]
    weight_map: dict[str, str] | None = None


class Closable(Protocol):
    def close(self) -> None: ...


class WeightFiles:
    """A checkpoint's weight files kept open across reads: see `Checkpoint.open_files`.

    Attributes:
        shards: a Meta checkpoint's open shards (`pth.PthShards`); None for the formats whose reads open
            their file themselves.
    """

    def __init__(self, shards: Closable | None) -> None:
        self.shards = shards

    def close(self) -> None:
        """Closes the shards; a later read opens them again."""
        if self.shards is not None:
            self.shards.close()

    def __enter__(self) -> WeightFiles:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class CheckpointReader(abc.ABC):
    """The files of one checkpoint in one format, and what can be read from them.

    Args:
        layout: the checkpoint's weight files; their stamps (`FileStamps`) are taken now.

    Attributes:
        format: "hf", "meta" or "gguf".
        config_name: how messages name what describes the model ("config.json", ...).
        n_layers_key: how that file names the number of layers.
        to_canonical: stored name template -> canonical name template (`{i}` for the layer).
        ignored: stored name templates that are not parameters (RoPE buffers).
        caches_index: whether the tensor index is worth caching on disk (building it reads every header).
        folder, files, weight_map: as in `WeightLayout`.
        stamps: the files' `FileStamps`.
    """

    format: ClassVar[str]
    config_name: ClassVar[str]
    n_layers_key: ClassVar[str]
    to_canonical: ClassVar[dict[str, str]]
    ignored: ClassVar[frozenset[str]]
    caches_index: ClassVar[bool] = True

    def __init__(self, layout: WeightLayout) -> None:
        self.folder, self.files, self.weight_map = layout.folder, layout.files, layout.weight_map
        self.stamps = FileStamps(self.folder, layout.stamped_files, self.content_digest)

    # ------------------------------------------------------------------------------------ what a format says
    @abc.abstractmethod
    def content_digest(self, path: Path) -> str | None:
        """sha256 of the bytes of `path` that the index is built from (None: it cannot be read so)."""

    @abc.abstractmethod
    def raw_index(self) -> RawIndex:
        """Stored name -> its pieces [{"file", "dtype", "shape", "offsets"}], from the headers.

        Raises:
            CheckpointError: a tensor stored twice, or headers that disagree with each other.
        """

    @abc.abstractmethod
    def read_config(self, raw: RawIndex) -> LlamaConfig:
        """The config the checkpoint describes (`raw` fills in what the config file leaves out).

        Raises:
            MissingFileError: the config file is missing.
            ConfigError: the config cannot be run.
        """

    def required_file(self, name: str, checkpoint_kind: str) -> Path:
        """`folder / name`, which a checkpoint of this kind cannot do without (its config file).

        Raises:
            MissingFileError: naming the file and the kind of checkpoint that needs it.
        """
        path = self.folder / name
        if not path.exists():
            raise MissingFileError(f"{path} is missing; a {checkpoint_kind} checkpoint needs its {name}")
        return path

    def tokenizer_path(self) -> Path | None:
        """tokenizer.json or tokenizer.model beside the weights, or None."""
        for name in ("tokenizer.json", "tokenizer.model"):
            if (self.folder / name).is_file():
                return self.folder / name
        return None

    @property
    def display_path(self) -> Path:
        """What names the checkpoint in its repr and progress bar: the folder."""
        return self.folder

    def value_dtype(self, dtype: str) -> torch.dtype:
        """The dtype a stored tensor of `dtype` (as the index names it) is read in."""
        return getattr(torch, dtype)

    def check_dtype(self, stored: StoredTensor) -> None:
        """Refuses a tensor this format cannot read as weights.

        Raises:
            CheckpointError: naming the tensor, its files and dtype.
        """
        if stored.dtype not in WEIGHT_DTYPES:
            raise CheckpointError(
                f"tensor {stored.name!r} in {self.where(stored)} has dtype {stored.dtype}; llama_lens reads float "
                f"weights ({', '.join(WEIGHT_DTYPES)}) only, not quantized checkpoints"
            )

    def qk_heads(self, stored_name: str, cfg: LlamaConfig) -> int | None:
        """Heads of a stored q/k tensor whose rows a read permutes to the rotate-half layout; None for others."""
        return None

    def split_fraction(self, name: str, shape: torch.Size, expected: torch.Size) -> int | None:
        """k when a stored tensor holds 1/k of its expected size along a model-parallel axis, else None."""
        return None

    def missing_hint(self, canonical: str) -> str:
        """Why a missing parameter should have been stored, when the format's config says so ("" otherwise)."""
        return ""

    # ------------------------------------------------------------------------------------------------ reads
    def open_files(self, *, lazy: bool = True) -> WeightFiles:
        """Files kept open across reads; most formats open theirs per read (an open is cheap)."""
        return WeightFiles(None)

    @abc.abstractmethod
    def read(self, reads: list[Read], files: WeightFiles | None) -> int:
        """Copies each stored tensor into its target, cast (and q/k rows permuted) on the way.

        The caller checked the files' stamps before, and checks them after.

        Returns:
            bytes read, as stored.

        Raises:
            CheckpointError: a file ends early.
        """

    @abc.abstractmethod
    def read_rows(self, stored: StoredTensor, start: int, target: torch.Tensor, files: WeightFiles | None) -> int:
        """Reads rows start .. start + len(target) of a 2-d stored tensor into `target`: those rows' bytes only.

        Returns:
            bytes read, as stored.
        """

    # ----------------------------------------------------------------------------------------------- naming
    def files_text(self) -> str:
        """The file, or the folder and its number of files, for messages."""
        if len(self.files) == 1:
            return str(self.files[0])
        return f"{self.folder} ({len(self.files)} files)"

    @staticmethod
    def where(stored: StoredTensor) -> str:
        """The files holding a stored tensor, for messages."""
        return ", ".join(dict.fromkeys(piece.file for piece in stored.pieces))
