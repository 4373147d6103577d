"""Opens a Llama checkpoint folder, indexes its tensors from file headers, and reads only the ones asked for.

Layouts:
    "hf"    Hugging Face: `model.safetensors`, or `model-0000k-of-0000N.safetensors` shards named by
            `model.safetensors.index.json`; the shape comes from `config.json`.
    "meta"  Meta release: `consolidated.00.pth` (`.01`, ... for model-parallel shards, merged on read along the
            axis each weight was split on) + `params.json`.

Tensors are renamed to the parameter names of `HookedLlama` (the "canonical" names: `embed.weight`,
`blocks.{i}.attn.q_proj.weight`, ...) by the two literal tables below. Meta's `wq`/`wk` rows are stored in the
interleaved RoPE layout; they are permuted to Hugging Face's rotate-half layout on read so that q and k (and
their hooks) mean the same in both layouts.

Opening reads headers only and checks every tensor's name and shape against the config, so a bad file fails
at once with its name in the message. The header index is cached on disk (see `Checkpoint`).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import math
import mmap
import os
import pickle
import re
import struct
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from .config import LlamaConfig, read_json_object
from .errors import CheckpointError, UnknownNameError, did_you_mean
from .validate import check_layers, resolve_device, resolve_dtype

# --------------------------------------------------------------------------------------------- rename tables
# `{i}` is the layer index. Each table maps a stored name to the parameter name of HookedLlama.
HF_TO_CANONICAL = {
    "model.embed_tokens.weight": "embed.weight",
    "model.layers.{i}.input_layernorm.weight": "blocks.{i}.ln1.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blocks.{i}.attn.q_proj.weight",
    "model.layers.{i}.self_attn.q_proj.bias": "blocks.{i}.attn.q_proj.bias",
    "model.layers.{i}.self_attn.k_proj.weight": "blocks.{i}.attn.k_proj.weight",
    "model.layers.{i}.self_attn.k_proj.bias": "blocks.{i}.attn.k_proj.bias",
    "model.layers.{i}.self_attn.v_proj.weight": "blocks.{i}.attn.v_proj.weight",
    "model.layers.{i}.self_attn.v_proj.bias": "blocks.{i}.attn.v_proj.bias",
    "model.layers.{i}.self_attn.o_proj.weight": "blocks.{i}.attn.o_proj.weight",
    "model.layers.{i}.self_attn.o_proj.bias": "blocks.{i}.attn.o_proj.bias",
    "model.layers.{i}.post_attention_layernorm.weight": "blocks.{i}.ln2.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blocks.{i}.mlp.gate_proj.weight",
    "model.layers.{i}.mlp.gate_proj.bias": "blocks.{i}.mlp.gate_proj.bias",
    "model.layers.{i}.mlp.up_proj.weight": "blocks.{i}.mlp.up_proj.weight",
    "model.layers.{i}.mlp.up_proj.bias": "blocks.{i}.mlp.up_proj.bias",
    "model.layers.{i}.mlp.down_proj.weight": "blocks.{i}.mlp.down_proj.weight",
    "model.layers.{i}.mlp.down_proj.bias": "blocks.{i}.mlp.down_proj.bias",
    "model.norm.weight": "ln_final.weight",
    "lm_head.weight": "unembed.weight",
}

# Meta's names: w1 is the gate, w3 the up projection, w2 the down projection.
META_TO_CANONICAL = {
    "tok_embeddings.weight": "embed.weight",
    "layers.{i}.attention_norm.weight": "blocks.{i}.ln1.weight",
    "layers.{i}.attention.wq.weight": "blocks.{i}.attn.q_proj.weight",
    "layers.{i}.attention.wk.weight": "blocks.{i}.attn.k_proj.weight",
    "layers.{i}.attention.wv.weight": "blocks.{i}.attn.v_proj.weight",
    "layers.{i}.attention.wo.weight": "blocks.{i}.attn.o_proj.weight",
    "layers.{i}.ffn_norm.weight": "blocks.{i}.ln2.weight",
    "layers.{i}.feed_forward.w1.weight": "blocks.{i}.mlp.gate_proj.weight",
    "layers.{i}.feed_forward.w3.weight": "blocks.{i}.mlp.up_proj.weight",
    "layers.{i}.feed_forward.w2.weight": "blocks.{i}.mlp.down_proj.weight",
    "norm.weight": "ln_final.weight",
    "output.weight": "unembed.weight",
}

# Stored tensors we skip on purpose: RoPE frequencies, which the model recomputes from the config
# (transformers < 4.31 saved `inv_freq` buffers; Llama 2's consolidated files hold `rope.freqs`).
HF_IGNORED = frozenset({"model.layers.{i}.self_attn.rotary_emb.inv_freq"})
META_IGNORED = frozenset({"rope.freqs"})

# Axis along which Meta's model-parallel code splits each weight: column-parallel layers (wq, wk, wv, w1, w3,
# output) split their output rows (dim 0), row-parallel layers (wo, w2) their input columns (dim 1). Norms are
# replicated. The embedding is split on dim 1 by Llama 2 (ParallelEmbedding) and on dim 0 by Llama 3
# (VocabParallelEmbedding), so its axis is found from the shapes.
META_SPLIT_DIM = {
    "layers.{i}.attention.wq.weight": 0,
    "layers.{i}.attention.wk.weight": 0,
    "layers.{i}.attention.wv.weight": 0,
    "layers.{i}.feed_forward.w1.weight": 0,
    "layers.{i}.feed_forward.w3.weight": 0,
    "output.weight": 0,
    "layers.{i}.attention.wo.weight": 1,
    "layers.{i}.feed_forward.w2.weight": 1,
}

# Meta q/k weights to permute on read, with the config attribute giving their number of heads.
META_PERMUTED = {
    "layers.{i}.attention.wq.weight": "n_heads",
    "layers.{i}.attention.wk.weight": "n_kv_heads",
}

# safetensors dtype codes: torch dtype name and bytes per element. Only float dtypes hold Llama weights;
# the others are listed so that a file holding them still gets its offsets checked and a clear error.
SAFETENSORS_DTYPES = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "U64": ("uint64", 8),
    "I32": ("int32", 4),
    "U32": ("uint32", 4),
    "I16": ("int16", 2),
    "U16": ("uint16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}
WEIGHT_DTYPES = ("float32", "bfloat16", "float16", "float64")

READ_CHUNK_BYTES = 8 * 2**20  # stored bytes converted (safetensors) or copied out of a mapped shard (Meta) at a time
HF_INDEX_FILE = "model.safetensors.index.json"
HF_SINGLE_FILE = "model.safetensors"
INDEX_CACHE_VERSION = 1


# ------------------------------------------------------------------------------------------------ renaming
_LAYER = re.compile(r"\.(\d+)\.")


def _template(name: str) -> tuple[str, int | None]:
    """("model.layers.{i}.mlp.up_proj.weight", 3) for "model.layers.3.mlp.up_proj.weight"."""
    match = _LAYER.search(name)
    if match is None:
        return name, None
    return name[: match.start()] + ".{i}." + name[match.end() :], int(match.group(1))


def rename(name: str, table: dict[str, str]) -> str | None:
    """Looks `name` up in a rename table (either direction); None when the table does not hold it."""
    template, layer = _template(name)
    target = table.get(template)
    if target is None:
        return None
    return target if layer is None else target.replace("{i}", str(layer))


def inverse(table: dict[str, str]) -> dict[str, str]:
    """The same table read the other way (canonical name -> stored name)."""
    return {canonical: stored for stored, canonical in table.items()}


def permute_qk_to_rotate_half(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved RoPE layout of q/k rows to Hugging Face's rotate-half layout.

    Within each head Meta pairs rows (0, 1), (2, 3), ...; Hugging Face pairs row j with row j + d_head // 2.
    This is `permute` of transformers' convert_llama_weights_to_hf.py.

    Args:
        weight: [n_heads * d_head, d_model] (or [n_heads * d_head] for a bias).
        n_heads: heads in this projection (n_kv_heads for k).

    Returns:
        [n_heads * d_head, d_model], a new tensor.
    """
    rows, rest = weight.shape[0], weight.shape[1:]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *rest).transpose(1, 2).reshape(weight.shape)


def permute_qk_to_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `permute_qk_to_rotate_half` (used to write Meta checkpoints)."""
    rows, rest = weight.shape[0], weight.shape[1:]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *rest).transpose(1, 2).reshape(weight.shape)


# ----------------------------------------------------------------------------------------- expected shapes
def block_param_shapes(cfg: LlamaConfig, layer: int) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape of every parameter of decoder layer `layer`."""
    d_model, d_mlp = cfg.d_model, cfg.d_mlp
    d_q, d_kv = cfg.n_heads * cfg.d_head, cfg.n_kv_heads * cfg.d_head
    prefix = f"blocks.{layer}."
    shapes = {
        "ln1.weight": (d_model,),
        "attn.q_proj.weight": (d_q, d_model),
        "attn.k_proj.weight": (d_kv, d_model),
        "attn.v_proj.weight": (d_kv, d_model),
        "attn.o_proj.weight": (d_model, d_q),
    }
    if cfg.attention_bias:
        shapes |= {
            "attn.q_proj.bias": (d_q,),
            "attn.k_proj.bias": (d_kv,),
            "attn.v_proj.bias": (d_kv,),
            "attn.o_proj.bias": (d_model,),
        }
    shapes |= {
        "ln2.weight": (d_model,),
        "mlp.gate_proj.weight": (d_mlp, d_model),
        "mlp.up_proj.weight": (d_mlp, d_model),
        "mlp.down_proj.weight": (d_model, d_mlp),
    }
    if cfg.mlp_bias:
        shapes |= {"mlp.gate_proj.bias": (d_mlp,), "mlp.up_proj.bias": (d_mlp,), "mlp.down_proj.bias": (d_model,)}
    return {prefix + name: shape for name, shape in shapes.items()}


def param_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape of every parameter of the full model, in forward order.

    `unembed.weight` is listed even for tied embeddings, where it is the same tensor as `embed.weight`.
    """
    shapes = {"embed.weight": (cfg.d_vocab, cfg.d_model)}
    for layer in range(cfg.n_layers):
        shapes |= block_param_shapes(cfg, layer)
    return shapes | {"ln_final.weight": (cfg.d_model,), "unembed.weight": (cfg.d_vocab, cfg.d_model)}


# ------------------------------------------------------------------------------------------------- headers
def read_safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """Tensor name -> {"dtype", "shape", "offsets"} from a safetensors header, checked against the file size.

    `dtype` is the torch dtype name; `offsets` the [start, end) byte range from the start of the file.

    Raises:
        CheckpointError: naming the file (and tensor) for a truncated or corrupt file.
    """
    size = path.stat().st_size
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: truncated ({size} bytes), not a safetensors file; re-download it")
        (header_len,) = struct.unpack("<Q", prefix)
        if 8 + header_len > size:
            raise CheckpointError(
                f"{path}: header length {header_len} runs past the end of the file ({size} bytes); "
                "the file is truncated or not a safetensors file; re-download it"
            )
        raw = file.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: corrupt safetensors header (not valid JSON: {err}); re-download it") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object); re-download it")
    data_start = 8 + header_len
    index = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            code, shape, (start, end) = info["dtype"], [int(n) for n in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}: {info!r}") from None
        if code not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {code!r}, which llama_lens cannot read")
        dtype, itemsize = SAFETENSORS_DTYPES[code]
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end):
            raise CheckpointError(f"{path}: tensor {name!r} has bad data offsets {[start, end]}")
        if data_start + end > size:
            raise CheckpointError(
                f"{path}: tensor {name!r} ends at byte {data_start + end}, past the end of the file "
                f"({size} bytes); the file is truncated; re-download it"
            )
        if end - start != math.prod(shape) * itemsize:
            raise CheckpointError(
                f"{path}: tensor {name!r} holds {end - start} bytes but its shape {shape} and dtype {dtype} "
                f"need {math.prod(shape) * itemsize}; the file is corrupt"
            )
        index[name] = {"dtype": dtype, "shape": shape, "offsets": [data_start + start, data_start + end]}
    # Two tensors sharing bytes would load one's weights as the other's; the safetensors library refuses that.
    by_start = sorted(index.items(), key=lambda item: item[1]["offsets"])
    for (before, first), (after, second) in zip(by_start, by_start[1:]):
        if second["offsets"][0] < first["offsets"][1]:
            raise CheckpointError(
                f"{path}: tensors {before!r} and {after!r} overlap in the file (bytes {first['offsets']} and "
                f"{second['offsets']}); the file is corrupt; re-download it"
            )
    return index


def load_pth(path: Path) -> dict[str, torch.Tensor]:
    """A Meta consolidated.*.pth as a dict of memory-mapped tensors (tensor data is not read).

    Raises:
        CheckpointError: for a file holding anything but a dict of tensors (never executed: weights_only),
            or one torch cannot read.
    """
    try:
        state = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: holds objects other than tensors, so it was not executed (weights_only=True refused it: "
            f"{first_line}). Only open .pth files from a source you trust, and convert them to a plain "
            "state dict of tensors."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot be read as a torch checkpoint ({err}); it may be truncated") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, expected a dict of tensors")
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{path}: entry {name!r} is a {type(value).__name__}, expected tensors only (a Meta state dict)"
            )
    return state


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


@functools.cache
def _madvise() -> Callable[..., int] | None:
    if not hasattr(mmap, "MADV_DONTNEED"):  # Windows
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError, TypeError):
        return None
    madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return madvise


def _release_mapped_pages(tensor: torch.Tensor) -> None:
    """Drops the pages lying wholly under `tensor` from the process; they stay in the page cache.

    Only for tensors memory-mapped from a file (`load_pth`) and never written: the next access reads the pages
    back from the file, whereas written pages of a private map, or anonymous memory, would be lost. Pages
    shared with a neighbouring tensor are kept, so a neighbour handed out elsewhere is never affected.
    """
    madvise = _madvise()
    if madvise is None or not tensor.is_contiguous():
        return
    page = mmap.PAGESIZE
    first = -(-tensor.data_ptr() // page) * page
    last = (tensor.data_ptr() + tensor.nbytes) // page * page
    if last > first:
        madvise(first, last - first, mmap.MADV_DONTNEED)  # advice only: a failure costs memory, not data


def can_release_mapped_pages() -> bool:
    """Whether `_release_mapped_pages` works here (it needs madvise: Linux, macOS; not Windows)."""
    return _madvise() is not None


def read_safetensors_tensor(
    file: BinaryIO,
    offsets: tuple[int, int],
    shape: tuple[int, ...],
    stored_dtype: str,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Reads one tensor of a safetensors file into a fresh tensor of `dtype` on `device`.

    Plain reads rather than a memory map: read pages of a mapped file stay in the process's memory until it
    is unmapped, so a bfloat16 -> float32 load would briefly hold both copies. Here the stored bytes pass
    through one buffer of at most READ_CHUNK_BYTES, converted into the result as they arrive.

    Args:
        file: the safetensors file, opened in binary mode.
        offsets: [start, end) byte range of the tensor from the start of the file (see read_safetensors_header).
        shape: the tensor's shape.
        stored_dtype: its dtype name in the file ("bfloat16", ...).
        dtype: dtype of the result (default: as stored).
        device: device of the result.
    """
    stored = getattr(torch, stored_dtype)
    result = torch.empty(shape, dtype=dtype or stored, device=device)
    file.seek(offsets[0])
    read_stored_into(file, result.view(-1), stored)
    return result


def read_stored_into(file: BinaryIO, flat: torch.Tensor, stored: torch.dtype, what: str = "a tensor") -> None:
    """Fills `flat` (a contiguous tensor [numel]) from the next bytes of `file`, which hold `stored` values:
    straight in when the dtype agrees and `flat` is in host memory, else through one buffer of at most
    READ_CHUNK_BYTES, cast (and moved) into `flat` as they arrive."""
    if flat.dtype == stored and flat.device.type == "cpu":
        _read_into(file, flat, what)
        return
    chunk = max(1, READ_CHUNK_BYTES // stored.itemsize)
    buffer = torch.empty(min(chunk, flat.numel()), dtype=stored)
    for first in range(0, flat.numel(), chunk):
        part = buffer[: min(chunk, flat.numel() - first)]
        _read_into(file, part, what)
        flat[first : first + len(part)].copy_(part)


def _read_into(file: BinaryIO, tensor: torch.Tensor, what: str) -> None:
    """Fills a contiguous CPU tensor with the next bytes of `file` (readinto releases the GIL)."""
    view = memoryview(tensor.view(torch.uint8).numpy()).cast("B")
    done = 0
    while done < len(view):
        count = file.readinto(view[done:])
        if not count:
            raise CheckpointError(f"{file.name}: ended early while reading {what}; the file is truncated")
        done += count


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -------------------------------------------------------------------------------------------------- index
@dataclass(frozen=True)
class _Piece:
    """One stored tensor in one file (a Meta model-parallel shard holds one piece of each weight)."""

    file: str
    shape: tuple[int, ...]
    offsets: tuple[int, int] | None  # safetensors byte range; None for .pth


@dataclass(frozen=True)
class _Stored:
    """A logical stored tensor: its pieces and how they join."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    pieces: tuple[_Piece, ...]
    split_dim: int | None  # None: one piece, or replicated pieces (read the first)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def default_index_cache_dir() -> Path:
    """Where shard indexes are cached: `$LLAMA_LENS_HOME/cache/index`, else the user cache dir."""
    home = os.environ.get("LLAMA_LENS_HOME")
    if home:
        return Path(home) / "cache" / "index"
    import platformdirs

    return Path(platformdirs.user_cache_dir("llama_lens")) / "index"


class Checkpoint:
    """A checkpoint folder, opened lazily: config, tensor index, and reads of only the tensors asked for.

    Opening reads the config and the tensor headers (safetensors headers; the pickle part of .pth files) and
    checks every tensor's name and shape against the config. The header index is cached as JSON, in
    `index_cache` if given, else in `default_index_cache_dir()/<sha1 of the folder's path>.json`; it is rebuilt
    when any weight file's size or modification time changes. Pass `index_cache=False` to skip the cache.

    Args:
        path: the checkpoint folder.
        index_cache: a JSON file for the shard index, None for the default location, False for none.

    Attributes:
        path: the folder (absolute).
        format: "hf" or "meta".
        config: the LlamaConfig.
        files: the weight files, in order.
        tokenizer_path: tokenizer.json or tokenizer.model beside the weights (for Meta releases, also one
            folder up, where Llama 2 releases keep it), or None.
        index_cache_path: the cache file used, or None.

    Raises:
        FileNotFoundError: the folder, its config/params.json, its weight files, or a shard named by the
            index does not exist.
        CheckpointError (a ValueError): a corrupt or truncated file, a missing, unexpected or misshapen
            tensor, or a .pth holding non-tensors.
    """

    def __init__(self, path: str | os.PathLike, *, index_cache: str | os.PathLike | bool | None = None) -> None:
        self.path = Path(path).expanduser().absolute()
        if not self.path.exists():
            raise FileNotFoundError(f"checkpoint folder {str(self.path)!r} does not exist")
        if not self.path.is_dir():
            raise ValueError(f"{self.path} is a file; pass the folder that holds the checkpoint ({self.path.parent})")
        self.format, self.files, self._fingerprint_files = self._find_files()
        self.index_cache_path = self._cache_path(index_cache)
        self._stats = self._fingerprint()  # reads check that no file changed since
        raw = self._cached_index()
        if raw is not None:
            try:
                self._use_index(raw)
            except (ValueError, LookupError, TypeError):
                # A cache that is well-formed but wrong (edited, or from another llama_lens) is rebuilt: the files
                # decide. Where they are at fault, the rebuild raises the same error again.
                raw = None
        if raw is None:
            raw = self._build_index()
            self._use_index(raw)
            self._write_cache(raw)
        self.tokenizer_path = self._find_tokenizer()

    def _use_index(self, raw: dict[str, list[dict[str, Any]]]) -> None:
        self.config = self._read_config(raw)
        self._stored = self._join_pieces(raw)
        self._source = self._match_names()  # canonical name -> stored name

    # --------------------------------------------------------------------------------- layout and config
    def _find_files(self) -> tuple[str, list[Path], list[Path]]:
        folder = self.path
        index_file = folder / HF_INDEX_FILE
        if index_file.exists():
            try:
                weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
                names = sorted(set(weight_map.values()))
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
                raise CheckpointError(
                    f"{index_file}: not a valid shard index (expected JSON with a 'weight_map'): {err}"
                ) from None
            for name in names:
                if not (folder / name).is_file():
                    raise FileNotFoundError(
                        f"shard {name!r} named by {index_file} is missing from {folder}; download it again"
                    )
            self._weight_map = weight_map
            files = [folder / name for name in names]
            return "hf", files, [*files, index_file]
        self._weight_map = None
        if (folder / HF_SINGLE_FILE).is_file():
            return "hf", [folder / HF_SINGLE_FILE], [folder / HF_SINGLE_FILE]
        shards = sorted(folder.glob("*.safetensors"))
        if shards:
            return "hf", shards, shards
        pths = sorted(folder.glob("consolidated.*.pth"), key=lambda p: p.name)
        if pths:
            numbers = [p.name.split(".")[1] for p in pths]
            for expected, number in enumerate(numbers):
                if not number.isdigit() or int(number) != expected:
                    raise CheckpointError(
                        f"{folder}: model-parallel shard consolidated.{expected:02d}.pth is missing "
                        f"(found {[p.name for p in pths]}); download it again"
                    )
            return "meta", pths, pths
        others = sorted(p.name for p in folder.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".gguf", ".ckpt"})
        hint = f" Found {others}, which llama_lens does not read; convert to safetensors." if others else ""
        raise FileNotFoundError(
            f"no weight files in {folder}: expected {HF_SINGLE_FILE}, model-*-of-*.safetensors with "
            f"{HF_INDEX_FILE}, or Meta's consolidated.00.pth.{hint}"
        )

    def _read_config(self, raw: dict[str, list[dict[str, Any]]]) -> LlamaConfig:
        if self.format == "hf":
            config_file = self.path / "config.json"
            if not config_file.is_file():
                raise FileNotFoundError(f"{config_file} is missing; a Hugging Face checkpoint needs its config.json")
            return LlamaConfig.from_file(config_file)
        params_file = self.path / "params.json"
        if not params_file.is_file():
            raise FileNotFoundError(f"{params_file} is missing; a Meta checkpoint needs its params.json")
        params = read_json_object(params_file)
        if "tok_embeddings.weight" not in raw:
            raise CheckpointError(f"missing tensor 'tok_embeddings.weight' in {self._files_text()}")
        # The embedding gives the vocabulary when params.json says -1 (Llama 2): its vocab rows are the ones
        # not split across shards (Llama 2 splits d_model), or the sum of them (Llama 3 splits the vocab).
        pieces = raw["tok_embeddings.weight"]
        d_model = params.get("dim")  # checked by from_meta below
        if len(pieces) > 1 and pieces[0]["shape"][1] != d_model:
            d_vocab = pieces[0]["shape"][0]
        else:
            d_vocab = sum(piece["shape"][0] for piece in pieces)
        cfg = LlamaConfig.from_meta(params, d_vocab=d_vocab, source=str(params_file))
        # params.json cannot say the embeddings are tied; a release without `output.weight` ties them.
        tied = "output.weight" not in raw
        return cfg.replace(tie_embeddings=tied, checkpoint_dtype=pieces[0]["dtype"])

    def _find_tokenizer(self) -> Path | None:
        folders = [self.path] + ([self.path.parent] if self.format == "meta" else [])
        for folder in folders:
            for name in ("tokenizer.json", "tokenizer.model"):
                if (folder / name).is_file():
                    return folder / name
        return None

    def _files_text(self) -> str:
        if len(self.files) == 1:
            return str(self.files[0])
        return f"{self.path} ({len(self.files)} files)"

    # -------------------------------------------------------------------------------------- index cache
    def _cache_path(self, index_cache: str | os.PathLike | bool | None) -> Path | None:
        if index_cache is False:
            return None
        if index_cache is not None and index_cache is not True:
            return Path(index_cache)
        digest = hashlib.sha1(str(self.path).encode()).hexdigest()
        return default_index_cache_dir() / f"{digest}.json"

    def _fingerprint(self) -> dict[str, list[int]]:
        stats = {}
        for file in self._fingerprint_files:
            stat = file.stat()
            stats[file.name] = [stat.st_size, stat.st_mtime_ns]
        return stats

    def _cached_index(self) -> dict[str, list[dict[str, Any]]] | None:
        if self.index_cache_path is None or not self.index_cache_path.is_file():
            return None
        try:
            cached = json.loads(self.index_cache_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None  # a damaged cache is rebuilt, never trusted
        valid = (
            isinstance(cached, dict)
            and cached.get("version") == INDEX_CACHE_VERSION
            and cached.get("path") == str(self.path)
            and cached.get("format") == self.format
            and cached.get("files") == self._stats
            and isinstance(cached.get("tensors"), dict)
            and all(self._valid_cached_pieces(pieces) for pieces in cached["tensors"].values())
        )
        return cached["tensors"] if valid else None

    def _valid_cached_pieces(self, pieces: Any) -> bool:
        """Whether a cache entry has the form `_build_index` writes (a damaged cache can still be valid JSON)."""
        if not isinstance(pieces, list) or not pieces:
            return False
        for piece in pieces:
            if not isinstance(piece, dict) or set(piece) != {"file", "dtype", "shape", "offsets"}:
                return False
            shape, offsets = piece["shape"], piece["offsets"]
            if not (
                piece["file"] in self._stats
                and isinstance(piece["dtype"], str)
                and isinstance(getattr(torch, piece["dtype"], None), torch.dtype)
                and isinstance(shape, list)
                and all(type(n) is int and n >= 0 for n in shape)
            ):
                return False
            if self.format == "meta":
                if offsets is not None:
                    return False
            elif not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)):
                return False
        return True

    def _write_cache(self, raw: dict[str, list[dict[str, Any]]]) -> None:
        if self.index_cache_path is None:
            return
        record = {
            "version": INDEX_CACHE_VERSION,
            "path": str(self.path),
            "format": self.format,
            "files": self._stats,
            "tensors": raw,
        }
        target = self.index_cache_path
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary = target.with_name(f"{target.name}.{os.getpid()}.tmp")
            temporary.write_text(json.dumps(record))
            os.replace(temporary, target)  # readers never see half a file
        except OSError as err:
            warnings.warn(f"could not write the shard index cache {target}: {err}", stacklevel=3)

    def _build_index(self) -> dict[str, list[dict[str, Any]]]:
        """Stored name -> its pieces [{"file", "dtype", "shape", "offsets"}], one per file holding it."""
        raw: dict[str, list[dict[str, Any]]] = {}
        if self.format == "hf":
            for file in self.files:
                for name, info in read_safetensors_header(file).items():
                    if name in raw:
                        raise CheckpointError(
                            f"tensor {name!r} is stored twice: in {raw[name][0]['file']} and in {file.name}"
                        )
                    raw[name] = [{"file": file.name} | info]
            for name, file_name in (self._weight_map or {}).items():
                if name not in raw or raw[name][0]["file"] != file_name:
                    raise CheckpointError(
                        f"{self.path / HF_INDEX_FILE} says tensor {name!r} is in {file_name}, but it is not there"
                    )
            return raw
        for file in self.files:
            for name, tensor in load_pth(file).items():
                piece = {"file": file.name, "dtype": _dtype_name(tensor.dtype), "shape": list(tensor.shape)}
                raw.setdefault(name, []).append(piece | {"offsets": None})
        for name, pieces in raw.items():
            if len(pieces) != len(self.files):
                where = [piece["file"] for piece in pieces]
                raise CheckpointError(
                    f"tensor {name!r} is in {where} but not in every model-parallel shard "
                    f"{[f.name for f in self.files]}; a shard is damaged or from another model"
                )
        return raw

    # ------------------------------------------------------------------------------------------ matching
    def _join_pieces(self, raw: dict[str, list[dict[str, Any]]]) -> dict[str, _Stored]:
        stored = {}
        for name, entries in raw.items():
            pieces = tuple(
                _Piece(e["file"], tuple(e["shape"]), tuple(e["offsets"]) if e["offsets"] else None) for e in entries
            )
            dtypes = {e["dtype"] for e in entries}
            if len(dtypes) > 1:
                raise CheckpointError(f"tensor {name!r} has different dtypes {sorted(dtypes)} in different shards")
            split_dim = self._split_dim(name, pieces)
            shape = list(pieces[0].shape)
            if split_dim is not None:
                shape[split_dim] = sum(piece.shape[split_dim] for piece in pieces)
            stored[name] = _Stored(name, dtypes.pop(), tuple(shape), pieces, split_dim)
        return stored

    def _split_dim(self, name: str, pieces: tuple[_Piece, ...]) -> int | None:
        if len(pieces) == 1:
            return None
        template, _ = _template(name)
        shapes = {piece.shape for piece in pieces}
        if template == "tok_embeddings.weight":
            split_dim = 1 if pieces[0].shape[1] != self.config.d_model else 0
        else:
            split_dim = META_SPLIT_DIM.get(template)
        if split_dim is None:
            if len(shapes) > 1:
                raise CheckpointError(
                    f"tensor {name!r} should be the same in every model-parallel shard but has shapes "
                    f"{sorted(shapes)} in {[p.file for p in pieces]}"
                )
            return None
        for piece in pieces:
            if len(piece.shape) != 2 or piece.shape[1 - split_dim] != pieces[0].shape[1 - split_dim]:
                raise CheckpointError(
                    f"tensor {name!r} cannot be joined along dim {split_dim}: shapes "
                    f"{[p.shape for p in pieces]} in {[p.file for p in pieces]}"
                )
        return split_dim

    def _split_fraction(self, name: str, shape: torch.Size, expected: torch.Size) -> int | None:
        """k when a Meta weight holds 1/k of its split axis and all of the other (k > 1), else None."""
        template = _template(name)[0]
        if self.format != "meta" or len(shape) != 2:
            return None
        # The embedding's axis depends on the Llama generation (see META_SPLIT_DIM): either may be split.
        axes = (0, 1) if template == "tok_embeddings.weight" else (META_SPLIT_DIM.get(template),)
        for split_dim in axes:
            if split_dim is not None and shape[1 - split_dim] == expected[1 - split_dim]:
                parts, rest = divmod(expected[split_dim], shape[split_dim])
                if parts > 1 and not rest:
                    return parts
        return None

    def _table(self) -> tuple[dict[str, str], frozenset[str]]:
        return (HF_TO_CANONICAL, HF_IGNORED) if self.format == "hf" else (META_TO_CANONICAL, META_IGNORED)

    def _match_names(self) -> dict[str, str]:
        cfg, config_name = self.config, self._config_name()
        table, ignored = self._table()
        expected = param_shapes(cfg)
        source, unexpected, misshapen, fractions = {}, [], [], set()
        for name, stored in self._stored.items():
            if _template(name)[0] in ignored:
                continue
            canonical = rename(name, table)
            if canonical == "unembed.weight" and cfg.tie_embeddings:
                continue  # tied: like transformers, use the embedding and skip a stored lm_head
            if canonical not in expected:
                unexpected.append(f"{name!r} in {self._where(stored)}{self._unexpected_hint(name)}")
                continue
            if stored.shape != expected[canonical]:
                misshapen.append(
                    f"tensor {name!r} in {self._where(stored)} has shape {list(stored.shape)}, but {config_name} "
                    f"implies {list(expected[canonical])}"
                )
                fractions.add(self._split_fraction(name, stored.shape, expected[canonical]))
            if stored.dtype not in WEIGHT_DTYPES:
                raise CheckpointError(
                    f"tensor {name!r} in {self._where(stored)} has dtype {stored.dtype}; llama_lens reads float "
                    f"weights ({', '.join(WEIGHT_DTYPES)}) only, not quantized checkpoints"
                )
            source[canonical] = name
        if unexpected:
            why = f"not a weight of the model {config_name} describes"
            raise CheckpointError(_listing("unexpected tensor", unexpected, why))
        if misshapen and len(fractions) == 1 and None not in fractions:
            # Every model-parallel weight is the same fraction of its size: shards are missing at the end.
            (parts,) = fractions
            n_found, n_expected = len(self.files), len(self.files) * parts
            missing = f"consolidated.{n_found:02d}.pth" + (
                f" to consolidated.{n_expected - 1:02d}.pth are" if n_expected - n_found > 1 else " is"
            )
            raise CheckpointError(
                f"{self.path}: every model-parallel weight is 1/{parts} of the size {config_name} implies, so "
                f"{n_expected} shards are expected but only {n_found} found; {missing} missing: download again"
            )
        if misshapen:
            raise CheckpointError(_listing("wrong shape", misshapen, "the weights do not match the config"))
        if cfg.tie_embeddings and "embed.weight" in source:
            source["unembed.weight"] = source["embed.weight"]
        inverse_table = inverse(table)
        missing = [name for name in expected if name not in source]
        if missing:
            described = []
            for name in missing:
                stored_name = rename(name, inverse_table)
                hint = ""
                if name == "unembed.weight" and self.format == "hf":
                    hint = f" ({config_name} sets tie_word_embeddings=false, so lm_head.weight must be stored)"
                described.append(f"{stored_name!r} (for {name}){hint}")
            raise CheckpointError(_listing("missing tensor", described, f"not found in {self._files_text()}"))
        return source

    def _config_name(self) -> str:
        return "config.json" if self.format == "hf" else "params.json"

    def _where(self, stored: _Stored) -> str:
        return ", ".join(dict.fromkeys(piece.file for piece in stored.pieces))

    def _unexpected_hint(self, name: str) -> str:
        template, layer = _template(name)
        if layer is not None and layer >= self.config.n_layers:
            return f" (layer {layer}, but {self._config_name()} says n_layers={self.config.n_layers})"
        if name.endswith(".bias"):
            flag = "attention_bias" if "attn" in name else "mlp_bias"
            return f" ({self._config_name()} sets {flag}=false)"
        return ""

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
            numel[stored.dtype] = numel.get(stored.dtype, 0) + stored.numel
        return getattr(torch, max(numel, key=numel.get))

    @property
    def param_names(self) -> list[str]:
        """Canonical names of all the model's parameters, in forward order."""
        return list(param_shapes(self.config))

    def params_for(self, layers: Iterable[int] | None) -> list[str]:
        """Canonical names a model holding `layers` needs: embedding, those blocks, final norm, unembedding.

        Raises:
            ValueError: for a layer outside [0, n_layers).
        """
        names = ["embed.weight"]
        for layer in check_layers(layers, self.config.n_layers):
            names += list(block_param_shapes(self.config, layer))
        return names + ["ln_final.weight", "unembed.weight"]

    def tensors(self):
        """One row per stored tensor, as a pandas DataFrame.

        Columns: name (as stored), param (canonical name, None when skipped), layer (Int64, NA outside
        blocks), component (embed/attn/mlp/norm/head, None when skipped), shape (tuple), dtype (str), numel,
        bytes, file. Rows come in forward order, skipped tensors (RoPE buffers, a tied model's lm_head) last.
        A Meta weight split over model-parallel shards is one row with the merged shape and its files joined
        by commas; `bytes` counts the merged tensor once.
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
            layer = _template(param)[1] if param else None
            rows.append(
                {
                    "name": name,
                    "param": param,
                    "layer": layer,
                    "component": _component(param),
                    "shape": stored.shape,
                    "dtype": stored.dtype,
                    "numel": stored.numel,
                    "bytes": stored.numel * getattr(torch, stored.dtype).itemsize,
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
            f"Checkpoint({str(self.path)!r}, format={self.format!r}, files={len(self.files)}, "
            f"n_layers={cfg.n_layers}, d_model={cfg.d_model}, params={self.num_params:,})"
        )

    # --------------------------------------------------------------------------------------------- reads
    def load_tensor(self, name: str) -> torch.Tensor:
        """One tensor by its stored name, as stored (dtype, layout), Meta shards merged.

        Raises:
            KeyError: for a name the checkpoint does not hold, with the closest stored names.
        """
        if name not in self._stored:
            if name in self._source:
                hint = f"; it is stored as {self._source[name]!r} (state_dict([{name!r}]) reads it by our name)"
            else:
                hint = did_you_mean(name, self._stored)
            raise UnknownNameError(f"no tensor {name!r} in {self._files_text()}{hint}")
        with self._open_files() as handles:
            return self._read(self._stored[name], handles, None, torch.device("cpu"))

    def state_dict(
        self,
        params: Iterable[str] | None = None,
        *,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str = "cpu",
        progress: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Reads parameters under our names: renamed, merged, permuted, cast and moved; nothing else is read.

        Each tensor is read into fresh memory of its final dtype and device, so the peak memory is the result
        plus the tensor being read, as stored: a safetensors read passes through one buffer of a few MiB; a
        Meta tensor is copied out of its memory-mapped shards, whose pages are dropped again after each copy.
        The files are opened once for the whole read.

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
            KeyError: for a name that is not a parameter of this model.
            CheckpointError: a file is truncated or changed since the checkpoint was opened (nothing read is kept).
        """
        dtype, device = resolve_dtype(dtype), resolve_device(device)
        if isinstance(params, str):  # one name would be iterated letter by letter
            params = [params]
        names = self.param_names if params is None else list(params)
        known = set(self.param_names)
        for name in names:
            if name not in known:
                raise UnknownNameError(f"{name!r} is not a parameter of this model{did_you_mean(name, known)}")
        groups: dict[int | None, list[str]] = {}
        for name in names:
            groups.setdefault(_template(name)[1], []).append(name)
        layer_keys = sorted(key for key in groups if key is not None)
        outside = groups.get(None, [])
        result: dict[str, torch.Tensor] = {}
        read: dict[str, torch.Tensor] = {}  # stored name -> tensor, so a tied embedding is read once
        # Where the pages of a mapped shard cannot be dropped after a copy (no madvise), they count towards the
        # process until the shard is unmapped: the shards are then mapped again for each layer, which costs an
        # unpickling of every shard per layer but holds at most one layer's pages.
        remap_per_layer = self.format == "meta" and not can_release_mapped_pages()

        from tqdm.auto import tqdm

        bar = tqdm(total=len(layer_keys), desc=f"loading {self.path.name}", unit="layer", disable=not progress)
        with dropped_on_error(result, read), bar, self._open_files() as handles:

            def read_group(group: list[str]) -> None:
                for name in group:
                    stored_name = self._source[name]
                    if stored_name not in read:
                        stored = self._stored[stored_name]
                        read[stored_name] = self._read(stored, handles, dtype, device, rotate_half=True)
                    result[name] = read[stored_name]
                if remap_per_layer:
                    handles.close()  # mapped again by the next read

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
            ValueError: for a layer outside [0, n_layers).
        """
        check_layers([layer], self.config.n_layers)
        return self.state_dict(block_param_shapes(self.config, layer), dtype=dtype, device=device)

    @contextlib.contextmanager
    def _open_files(self) -> Iterator[dict[str, Any] | MappedShards]:
        """The weight files, each opened on first use and closed on exit: file name -> binary file (safetensors),
        or the Meta shards as `MappedShards`.

        Closing matters for memory: pages of a memory-mapped file that were read and not dropped count towards
        the process's memory until the mapping goes away.
        """
        if self.format == "meta":
            shards = MappedShards(self, lazy=True)
            try:
                yield shards
            finally:
                shards.close()
            return
        with contextlib.ExitStack() as stack:
            handles = _LazyDict(lambda name: stack.enter_context(open(self._check_unchanged(name), "rb", buffering=0)))
            try:
                yield handles
            finally:
                handles.clear()

    def _check_unchanged(self, file_name: str) -> Path:
        path = self.path / file_name
        stat = path.stat() if path.exists() else None
        if stat is None or [stat.st_size, stat.st_mtime_ns] != self._stats.get(file_name):
            raise CheckpointError(f"{path} changed since the checkpoint was opened; open it again")
        return path

    def open_pth_shards(self) -> MappedShards:
        """Meta layout: the shards memory-mapped once (no tensor data is read), for many `read_into`s."""
        if self.format != "meta":
            raise ValueError(f"{self.path} is a {self.format!r} checkpoint; open_pth_shards reads Meta .pth shards")
        return MappedShards(self)

    def _read(
        self,
        stored: _Stored,
        handles: dict[str, Any] | MappedShards,
        dtype: torch.dtype | None,
        device: torch.device,
        rotate_half: bool = False,
    ) -> torch.Tensor:
        """A stored tensor (model-parallel pieces joined) in fresh memory, cast to `dtype`, on `device`.

        With `rotate_half`, Meta q/k rows are permuted to the rotate-half layout on the way; otherwise the
        tensor keeps its stored layout.
        """
        if self.format == "hf":
            piece = stored.pieces[0]
            return read_safetensors_tensor(handles[piece.file], piece.offsets, piece.shape, stored.dtype, dtype, device)
        target = torch.empty(stored.shape, dtype=dtype or getattr(torch, stored.dtype), device=device)
        handles.read_stored(stored.name, target, rotate_half=rotate_half)
        return target


class MappedShards:
    """The .pth shards of a Meta checkpoint, memory-mapped and kept open for many reads.

    Opening a shard unpickles its whole table of tensors, which costs more than copying a small tensor out of
    it (a 70B release: 8 shards of 80 layers): a reader that goes through the layers one by one opens the
    shards once, not once per layer or tensor. `Checkpoint.state_dict` (full loads) and the streaming reader
    (`read_into`) both read through here.

    Each model-parallel piece is copied (and cast) straight into its place in the caller's tensor, q/k rows
    permuted to the rotate-half layout on the way, so nothing else is allocated. The pages of each piece are
    then dropped from the process (they stay in the page cache): without this, every page read would count
    towards the process's memory for as long as the shards stay mapped, a second copy of the checkpoint.

    Args:
        ckpt: an open Meta `Checkpoint` (see `Checkpoint.open_pth_shards`).
        lazy: map each shard when a read first needs it (a replicated tensor needs only the first shard),
            instead of all of them now.
    """

    def __init__(self, ckpt: Checkpoint, *, lazy: bool = False) -> None:
        self.ckpt = ckpt
        # file name -> stored name -> tensor mapped from the file. Never written and never handed out, which is
        # what lets a read drop their pages.
        self._tensors: dict[str, dict[str, torch.Tensor]] = _LazyDict(
            lambda file_name: load_pth(ckpt._check_unchanged(file_name))
        )
        if not lazy:
            for file in ckpt.files:
                self._tensors[file.name]

    def close(self) -> None:
        """Unmaps the shards (a later read maps them again)."""
        self._tensors.clear()

    def read_into(self, targets: dict[str, torch.Tensor]) -> int:
        """Copies parameters into tensors allocated by the caller.

        Args:
            targets: canonical name -> contiguous tensor of the parameter's shape, in any float dtype, on any
                device (pieces are moved there as stored, then cast).

        Returns:
            bytes read, as stored.

        Raises:
            CheckpointError: a shard changed on disk since the checkpoint was opened (checked before anything
                is copied).
        """
        ckpt = self.ckpt
        stored = {name: ckpt._stored[ckpt._source[name]] for name in targets}
        self._check_unchanged([piece.file for tensor in stored.values() for piece in _used_pieces(tensor)])
        return sum(self._copy(stored[name], target, rotate_half=True) for name, target in targets.items())

    def read_stored(self, stored_name: str, target: torch.Tensor, *, rotate_half: bool) -> int:
        """Copies one stored tensor, model-parallel pieces joined, into `target` (see `read_into`).

        Args:
            stored_name: the name in the shards ("layers.3.attention.wq.weight").
            target: contiguous tensor of the stored tensor's (joined) shape, any float dtype, any device.
            rotate_half: permute q/k rows to the rotate-half layout (False: keep Meta's layout).

        Returns:
            bytes read, as stored.
        """
        stored = self.ckpt._stored[stored_name]
        self._check_unchanged([piece.file for piece in _used_pieces(stored)])
        return self._copy(stored, target, rotate_half=rotate_half)

    def _check_unchanged(self, file_names: list[str]) -> None:
        # Reading a mapped page past the end of a file truncated since would kill the process (SIGBUS).
        for file_name in dict.fromkeys(file_names):
            self.ckpt._check_unchanged(file_name)

    def _copy(self, stored: _Stored, target: torch.Tensor, *, rotate_half: bool) -> int:
        mapped = [self._tensors[piece.file][stored.name] for piece in _used_pieces(stored)]
        heads_attr = META_PERMUTED.get(_template(stored.name)[0]) if rotate_half else None
        if heads_attr is not None:
            n_heads, half = getattr(self.ckpt.config, heads_attr), self.ckpt.config.d_head // 2
            # Moved first, then cast: a GPU casts faster, and only the stored bytes cross the bus (CPU: no-op).
            pieces = [piece.to(target.device) for piece in mapped]
            # Joined first (a copy as stored, for model-parallel shards only): a split may fall inside a head,
            # e.g. one KV head shared by two ranks.
            source = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=stored.split_dim)
            # The rotate-half target seen in Meta's interleaved row order: [n_heads, d_head / 2, 2, d_model]
            destination = target.view(n_heads, 2, half, -1).transpose(1, 2)
            destination.copy_(source.view(n_heads, half, 2, -1))
            del pieces, source
        elif len(mapped) == 1:  # whole in one shard, or replicated
            _copy_dropping_pages(mapped[0], target)
        else:  # each model-parallel piece into its slice of the target
            start = 0
            for piece in mapped:
                size = piece.shape[stored.split_dim]
                _copy_dropping_pages(piece, target.narrow(stored.split_dim, start, size))
                start += size
        for piece in mapped:
            _release_mapped_pages(piece)  # all of it, pages that straddled two parts included
        return sum(piece.nbytes for piece in mapped)


def _copy_dropping_pages(source: torch.Tensor, destination: torch.Tensor) -> None:
    """`destination.copy_(source)` a few MiB of rows at a time, dropping the pages of each part of `source` (a
    mapped tensor, see `_release_mapped_pages`) once it is copied: a large tensor (the embedding) then adds only
    a few MiB of its stored pages to the process at any time, not all of them."""
    if source.dim() == 0:
        destination.copy_(source)
        return
    rows = source.shape[0]
    step = max(1, READ_CHUNK_BYTES * rows // max(source.nbytes, 1))
    for first in range(0, rows, step):
        part = source[first : first + step]
        # Moved first, then cast: a GPU casts faster, and only the stored bytes cross the bus (CPU: no-op).
        destination[first : first + step].copy_(part.to(destination.device))
        _release_mapped_pages(part)


def _used_pieces(stored: _Stored) -> tuple[_Piece, ...]:
    """The pieces a read needs: all of a split tensor, any one of a replicated one (the first)."""
    return stored.pieces[:1] if stored.split_dim is None else stored.pieces


class _LazyDict(dict):
    """A dict that fills a missing key with `make(key)`."""

    def __init__(self, make) -> None:
        super().__init__()
        self._make = make

    def __missing__(self, key: str) -> Any:
        value = self[key] = self._make(key)
        return value


def _component(param: str | None) -> str | None:
    if param is None:
        return None
    if param == "embed.weight":
        return "embed"
    if param == "unembed.weight":
        return "head"
    if ".ln" in f".{param}":
        return "norm"
    return "attn" if ".attn." in param else "mlp"


def _listing(what: str, items: list[str], why: str) -> str:
    """ "2 unexpected tensors: 'a' in f, 'b' in f (why)", listing at most five."""
    shown = "; ".join(items[:5]) + (f"; and {len(items) - 5} more" if len(items) > 5 else "")
    plural = f"{len(items)} {what}s" if len(items) > 1 else what
    return f"{plural}: {shown} ({why})"
