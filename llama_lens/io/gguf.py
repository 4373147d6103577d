"""GGUF files (llama.cpp, Ollama, LM Studio): the header, the config it implies, and reads dequantized per tensor.

A GGUF file is a little-endian header (magic "GGUF", version, tensor and key counts), metadata key/values
(`general.*`, `llama.*` or `qwen2.*`, `tokenizer.ggml.*`), one record per tensor (name, dims, quantization type,
offset), then the tensor data, aligned. Each quantized tensor is rows of blocks (32 or 256 values each, with their
scales), so rows dequantize independently: a read takes a few rows at a time, dequantizes them with
`gguf.quants.dequantize` and casts them into the caller's tensor, never holding the whole tensor in float32 beside
the result.

The header is parsed here rather than by `gguf.GGUFReader`, which makes a numpy view of every vocabulary entry
and takes seconds on a 50k-token vocabulary; the quantization tables and the dequantizers are the `gguf`
package's. Tensor data is read with plain file reads, never a memory map (see `safetensors_io`).

Architectures (`general.architecture`, as llama.cpp's `convert_hf_to_gguf.py` writes them): "llama" (Llama 1-3,
SmolLM, TinyLlama, and Mistral, which the converter writes as "llama"), "qwen2" (Qwen2/2.5 and the models distilled
onto them: biases on q, k and v) and "qwen3" (RMSNorm on each head's q and k, `attn_q_norm`/`attn_k_norm`).
For "llama" the converter stores q/k weights in Meta's interleaved RoPE order, because llama.cpp rotates adjacent
pairs for that architecture; a read with `qk_heads` puts them back in Hugging Face's rotate-half order
(`names.permute_qk_to_rotate_half`). llama.cpp rotates halves for qwen2/qwen3, so their rows are stored as in the
Hugging Face checkpoint and read unchanged.
"""

from __future__ import annotations

import collections
import functools
import math
import mmap
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from ..config import ARCHITECTURES, LlamaConfig, RopeScaling
from ..errors import CheckpointError, ConfigError
from .names import permute_qk_to_rotate_half
from .safetensors import read_exactly_into

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)  # version 1 (2023) used 32-bit counts; llama.cpp itself no longer reads it
DEFAULT_ALIGNMENT = 32
# Output values dequantized at a time: 1 MiB of float32 (the gguf dequantizers make a few temporaries of that
# size), whatever the size of the tensor; small enough that a layer's matrices split into chunks for the threads.
CHUNK_VALUES = 2**18
# Threads dequantizing chunks at once (numpy lets go of the GIL inside them), at most torch's thread count.
MAX_THREADS = 8

# GGUF tensor names (llama.cpp) -> canonical names of HookedLlama; "{i}" is the layer index.
GGUF_TO_CANONICAL = {
    "token_embd.weight": "embed.weight",
    "blk.{i}.attn_norm.weight": "blocks.{i}.ln1.weight",
    "blk.{i}.attn_q.weight": "blocks.{i}.attn.q_proj.weight",
    "blk.{i}.attn_q.bias": "blocks.{i}.attn.q_proj.bias",
    "blk.{i}.attn_k.weight": "blocks.{i}.attn.k_proj.weight",
    "blk.{i}.attn_k.bias": "blocks.{i}.attn.k_proj.bias",
    "blk.{i}.attn_v.weight": "blocks.{i}.attn.v_proj.weight",
    "blk.{i}.attn_v.bias": "blocks.{i}.attn.v_proj.bias",
    "blk.{i}.attn_output.weight": "blocks.{i}.attn.o_proj.weight",
    "blk.{i}.attn_output.bias": "blocks.{i}.attn.o_proj.bias",
    "blk.{i}.attn_q_norm.weight": "blocks.{i}.attn.q_norm.weight",  # qwen3
    "blk.{i}.attn_k_norm.weight": "blocks.{i}.attn.k_norm.weight",
    "blk.{i}.ffn_norm.weight": "blocks.{i}.ln2.weight",
    "blk.{i}.ffn_gate.weight": "blocks.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_gate.bias": "blocks.{i}.mlp.gate_proj.bias",
    "blk.{i}.ffn_up.weight": "blocks.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_up.bias": "blocks.{i}.mlp.up_proj.bias",
    "blk.{i}.ffn_down.weight": "blocks.{i}.mlp.down_proj.weight",
    "blk.{i}.ffn_down.bias": "blocks.{i}.mlp.down_proj.bias",
    "output_norm.weight": "ln_final.weight",
    "output.weight": "unembed.weight",
}
# rope_freqs.weight: Llama 3.1's RoPE factors, read into the config's rope scaling (see `gguf_config`).
GGUF_IGNORED = frozenset({"rope_freqs.weight"})

# q/k tensors llama.cpp's converter permutes (weights and biases alike) in the architectures of GGUF_PERMUTING,
# with the config attribute giving their number of heads.
GGUF_PERMUTED = {
    "blk.{i}.attn_q.weight": "n_heads",
    "blk.{i}.attn_q.bias": "n_heads",
    "blk.{i}.attn_k.weight": "n_kv_heads",
    "blk.{i}.attn_k.bias": "n_kv_heads",
}
# convert_hf_to_gguf.py's LlamaModel permutes q/k (llama.cpp runs "llama" with interleaved RoPE); its Qwen2Model and
# Qwen3Model write them as transformers holds them (llama.cpp runs those with rotate-half, "NeoX", RoPE).
GGUF_PERMUTING = frozenset({"llama"})

# general.architecture -> the LlamaConfig model_type it is read as. Mistral has no architecture of its own here:
# the converter writes MistralForCausalLM as "llama", without its sliding window (see docs/gguf.md).
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

# `{arch}.*` metadata keys (the same for the three architectures): those read into the config, and those ignored on
# purpose (anything else is refused, as config.json keys are). `vocab_size` and the rope scaling keys are read too.
GGUF_KEYS_READ = frozenset(
    {
        "block_count",
        "embedding_length",
        "feed_forward_length",
        "attention.head_count",
        "attention.head_count_kv",
        "attention.key_length",
        "attention.value_length",
        "attention.layer_norm_rms_epsilon",
        "rope.freq_base",
        "rope.dimension_count",
        "rope.scaling.type",
        "rope.scaling.factor",
        "rope.scale_linear",
        "context_length",
        "vocab_size",
        "expert_count",
    }
)
# rope.scaling.finetuned: whether the model was fine-tuned at the scaled length (a fact about training);
# rope.scaling.original_context_length: linear scaling does not read it (YaRN does, and is refused);
# expert_used_count: means something only beside an expert_count, which is refused above 0;
# tensor_data_layout: a note some converters wrote about the q/k order, which is llama.cpp's in every llama GGUF.
GGUF_KEYS_IGNORED = frozenset(
    {"rope.scaling.finetuned", "rope.scaling.original_context_length", "expert_used_count", "tensor_data_layout"}
)

# GGUF metadata value types (gguf.GGUFValueType): struct format of the scalars; 8 is a string, 9 an array.
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
MAX_ARRAY_DEPTH = 64  # arrays of arrays: llama.cpp writes none; far more than any writer would
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor record of a GGUF header.

    Attributes:
        name: as stored ("blk.3.attn_q.weight").
        qtype: the quantization type's name ("Q4_1", "F32", ...), as gguf.GGMLQuantizationType names it.
        shape: in torch order (the last axis is the one stored contiguously, in blocks).
        start, end: the byte range of its data in the file.
    """

    name: str
    qtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class GGUFHeader:
    """What a GGUF file says before its tensor data: version, metadata and tensor records."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]


# ------------------------------------------------------------------------------------------------- header
class _Cursor:
    """Sequential little-endian reads from a buffer, each past-the-end read naming the file as truncated."""

    def __init__(self, buffer: Any, path: Path) -> None:
        self.buffer, self.path, self.pos = buffer, path, 0

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buffer):
            raise self.truncated()
        (value,) = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        length = self.unpack("<Q")
        if self.pos + length > len(self.buffer):
            raise self.truncated()
        raw = self.buffer[self.pos : self.pos + length]
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(
                f"{self.path}: a string in the GGUF header is not UTF-8; the file is corrupt"
            ) from None

    def strings(self, count: int) -> list[str]:
        """`count` strings in a row: a vocabulary's tokens or merges, so the loop is kept tight."""
        buffer, pos, unpack = self.buffer, self.pos, _U64.unpack_from
        strings = []
        try:
            for _ in range(count):
                (length,) = unpack(buffer, pos)
                strings.append(buffer[pos + 8 : pos + 8 + length].decode("utf-8"))
                pos += 8 + length
        except struct.error:
            raise self.truncated() from None
        except UnicodeDecodeError:
            raise CheckpointError(
                f"{self.path}: a string in the GGUF header is not UTF-8; the file is corrupt"
            ) from None
        if pos > len(buffer):  # the last string's slice stopped at the end of the file
            raise self.truncated()
        self.pos = pos
        return strings

    def value(self, value_type: int, key: str, depth: int = 0) -> Any:
        if depth > MAX_ARRAY_DEPTH:
            # 12 bytes per level: a few MB of nested arrays would otherwise end in a RecursionError.
            raise CheckpointError(
                f"{self.path}: metadata key {key!r} nests arrays more than {MAX_ARRAY_DEPTH} deep; the file is corrupt"
            )
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            item_type, count = self.unpack("<I"), self.unpack("<Q")
            if item_type == _STRING:
                return self.strings(count)
            if item_type in _SCALAR_FORMATS:
                # Numeric arrays (token types, scores) in one step rather than one value at a time.
                fmt = _SCALAR_FORMATS[item_type]
                size = struct.calcsize(fmt) * count
                if self.pos + size > len(self.buffer):
                    raise self.truncated()
                values = np.frombuffer(self.buffer, dtype=np.dtype(fmt), count=count, offset=self.pos).tolist()
                self.pos += size
                return values
            return [self.value(item_type, key, depth + 1) for _ in range(count)]
        if value_type not in _SCALAR_FORMATS:
            raise CheckpointError(
                f"{self.path}: metadata key {key!r} has unknown value type {value_type}; corrupt file"
            )
        return self.unpack(_SCALAR_FORMATS[value_type])

    def truncated(self) -> CheckpointError:
        return CheckpointError(
            f"{self.path}: the GGUF header ends early (at byte {len(self.buffer)}); the file is truncated or not a "
            "GGUF file; download it again"
        )


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """Parses a GGUF file's metadata and tensor records, checked against the file's size.

    Args:
        path: the .gguf file.

    Returns:
        GGUFHeader; `metadata` maps each key (except the format's own `GGUF.*`) to an int, float, bool, str or
        list, as `gguf.ReaderField.contents()` gives it.

    Raises:
        CheckpointError: naming the file (and tensor), for a file that is truncated, corrupt, big-endian, of an
            unknown version, or holds a tensor of a type the gguf package does not know.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    size = path.stat().st_size
    if size < 24:
        raise CheckpointError(f"{path}: {size} bytes, too short for a GGUF file; the file is truncated")
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        cursor = _Cursor(mapped, path)
        if mapped[:4] != GGUF_MAGIC:
            raise CheckpointError(f"{path}: not a GGUF file (it does not start with b'GGUF')")
        cursor.pos = 4
        version = cursor.unpack("<I")
        if version not in GGUF_VERSIONS:
            swapped = struct.unpack(">I", struct.pack("<I", version))[0]
            why = "a big-endian GGUF, which" if swapped in GGUF_VERSIONS else f"GGUF version {version}, which"
            raise CheckpointError(f"{path}: {why} llama_lens cannot read (it reads little-endian versions 2 and 3)")
        n_tensors, n_keys = cursor.unpack("<Q"), cursor.unpack("<Q")
        metadata: dict[str, Any] = {}
        for _ in range(n_keys):
            key = cursor.string()
            metadata[key] = cursor.value(cursor.unpack("<I"), key)
        records = []
        for _ in range(n_tensors):
            name = cursor.string()
            n_dims = cursor.unpack("<I")
            dims = [cursor.unpack("<Q") for _ in range(n_dims)]
            type_id, offset = cursor.unpack("<I"), cursor.unpack("<Q")
            records.append((name, dims, type_id, offset))
        header_end = cursor.pos
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0:
        raise CheckpointError(f"{path}: general.alignment must be a positive integer, got {alignment!r}")
    data_start = -(-header_end // alignment) * alignment
    tensors = {}
    for name, dims, type_id, offset in records:
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            raise CheckpointError(
                f"{path}: tensor {name!r} has quantization type id {type_id}, which the installed gguf package "
                "does not know; upgrade it (pip install -U gguf)"
            ) from None
        block_size, block_bytes = GGML_QUANT_SIZES[qtype]
        if dims and dims[0] % block_size:
            raise CheckpointError(
                f"{path}: tensor {name!r} has rows of {dims[0]} values, not a multiple of the {qtype.name} block size "
                f"{block_size}; the file is corrupt"
            )
        start = data_start + offset
        end = start + math.prod(dims) // block_size * block_bytes
        if end > size:
            raise CheckpointError(
                f"{path}: tensor {name!r} ends at byte {end}, past the end of the file ({size} bytes); the file is "
                "truncated; download it again"
            )
        if name in tensors:
            raise CheckpointError(f"{path}: tensor {name!r} is stored twice; the file is corrupt")
        tensors[name] = GGUFTensor(name, qtype.name, tuple(reversed(dims)), start, end)
    return GGUFHeader(path, version, metadata, tensors)


def permuted_qk_heads(header: GGUFHeader, template: str, cfg: LlamaConfig) -> int | None:
    """The heads of a stored q/k tensor that llama.cpp's converter permuted (see GGUF_PERMUTED), else None.

    Args:
        template: the stored name with its layer as "{i}" ("blk.{i}.attn_q.weight").
    """
    heads_attr = GGUF_PERMUTED.get(template)
    if heads_attr is None or header.metadata.get("general.architecture") not in GGUF_PERMUTING:
        return None
    return getattr(cfg, heads_attr)


def gguf_raw_index(header: GGUFHeader) -> dict[str, list[dict[str, Any]]]:
    """The header's tensors in the form of `tensor_index.build_index` (the quantization type as the dtype)."""
    return {
        name: [{"file": header.path.name, "dtype": t.qtype, "shape": list(t.shape), "offsets": [t.start, t.end]}]
        for name, t in header.tensors.items()
    }


# ------------------------------------------------------------------------------------------------- config
def gguf_config(header: GGUFHeader) -> LlamaConfig:
    """The LlamaConfig a GGUF's `{arch}.*` metadata (and its tensors' shapes) describe.

    The architecture gives the model_type (GGUF_ARCHITECTURES); the tensors present give what the metadata do not
    say: tied embeddings (no output.weight), biases (llama: on q/k/v/o and the MLP when stored; qwen2: always on
    q/k/v; qwen3: on q/k/v/o when stored).

    Raises:
        ConfigError: naming the file and key, for an architecture other than llama, qwen2 and qwen3, a missing
            required key, a key that changes the forward pass in a way llama_lens does not implement (mixture of
            experts, YaRN, partial rotary, pooling for embeddings), or an unknown `{arch}.*` key.
    """
    meta, source = header.metadata, str(header.path)
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ConfigError(
            f"{source}: general.architecture is {arch!r}; llama_lens reads GGUF files of the "
            f"{', '.join(repr(a) for a in GGUF_ARCHITECTURES)} architectures (Llama 1-3, SmolLM, TinyLlama, Mistral "
            "7B as llama.cpp converts it, Qwen2/2.5, Qwen3, ...); for other models load their Hugging Face folder"
        )
    model_type = GGUF_ARCHITECTURES[arch]
    prefix = f"{arch}."
    keys = {key.removeprefix(prefix) for key in meta if key.startswith(prefix)}
    unknown = sorted(keys - GGUF_KEYS_READ - GGUF_KEYS_IGNORED)
    if unknown:
        raise ConfigError(
            f"{source}: unsupported metadata key(s) {[prefix + k for k in unknown]}. They may change the forward "
            f"pass, which llama_lens implements as transformers' {ARCHITECTURES[model_type][0]} does without them"
        )

    def number(key: str, default: Any = None, *, kind: type = int) -> Any:
        value = meta.get(prefix + key, default)
        if value is None:
            raise ConfigError(f"{source}: required metadata key {prefix + key!r} is missing")
        # A float32 inf or NaN is not an integer either (and int() of one raises an unrelated error).
        integral = isinstance(value, int) or (math.isfinite(value) and value == int(value))
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not integral):
            raise ConfigError(
                f"{source}: {prefix + key} must be {'an integer' if kind is int else 'a number'}, got {value!r}"
            )
        return kind(value)

    if number("expert_count", 0) > 0:
        raise ConfigError(
            f"{source}: {prefix}expert_count is {meta[prefix + 'expert_count']} (a mixture of experts, such as "
            "Mixtral); llama_lens implements dense models only"
        )
    d_model, n_heads = number("embedding_length"), number("attention.head_count")
    d_head = number("attention.key_length", d_model // n_heads if n_heads else 0)
    if number("attention.value_length", d_head) != d_head:
        raise ConfigError(
            f"{source}: {prefix}attention.value_length differs from key_length; llama_lens implements attention "
            "with one d_head for queries, keys and values"
        )
    if number("rope.dimension_count", d_head) != d_head:
        raise ConfigError(
            f"{source}: {prefix}rope.dimension_count is {meta[prefix + 'rope.dimension_count']} but d_head is "
            f"{d_head}; partial rotary embeddings are not supported"
        )
    embedding = header.tensors.get("token_embd.weight")
    if embedding is None:
        raise CheckpointError(f"{source}: missing tensor 'token_embd.weight'; not a complete model")
    # The embedding's rows are the model's vocabulary (a token list may be shorter than a padded embedding).
    d_vocab = number("vocab_size", embedding.shape[0])
    rope_theta = number("rope.freq_base", 10000.0, kind=float)
    eos = _token_id(meta, "tokenizer.ggml.eos_token_id", source)
    has_q_bias = "blk.0.attn_q.bias" in header.tensors
    fields = dict(
        model_type=model_type,
        d_model=d_model,
        n_layers=number("block_count"),
        n_heads=n_heads,
        n_kv_heads=number("attention.head_count_kv", n_heads),
        d_head=d_head,
        d_mlp=number("feed_forward_length"),
        d_vocab=d_vocab,
        rope_theta=rope_theta,
        rope_scaling=_rope_scaling(header, prefix, d_head, rope_theta),
        # GGUF stores epsilon as float32 (1e-5 becomes 9.99999975e-06); the original config's value is the
        # shortest decimal that rounds to it.
        norm_eps=float(np.format_float_positional(np.float32(number("attention.layer_norm_rms_epsilon", kind=float)))),
        # llama.cpp ties the embeddings when a file has no output.weight.
        tie_embeddings="output.weight" not in header.tensors,
        # Qwen2 always has q/k/v biases (without one on o); a missing one is then named as a missing tensor.
        attention_bias=has_q_bias and model_type in ("llama", "qwen3"),
        qkv_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
        mlp_bias="blk.0.ffn_up.bias" in header.tensors and model_type == "llama",
        max_position_embeddings=number("context_length", 2048),
        bos_token_id=_token_id(meta, "tokenizer.ggml.bos_token_id", source),
        eos_token_ids=(eos,) if eos is not None else (),
        pad_token_id=_token_id(meta, "tokenizer.ggml.padding_token_id", source),
    )
    try:
        return LlamaConfig(**fields)
    except ValueError as err:
        raise ConfigError(f"{source}: {str(err).removeprefix('config: ')}") from None


def _token_id(meta: dict[str, Any], key: str, source: str) -> int | None:
    value = meta.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ConfigError(f"{source}: {key} must be a token id, got {value!r}")
    return value


def _rope_scaling(header: GGUFHeader, prefix: str, d_head: int, rope_theta: float) -> RopeScaling | None:
    meta, source = header.metadata, str(header.path)
    kind = meta.get(prefix + "rope.scaling.type", "none")
    factor = meta.get(prefix + "rope.scaling.factor", meta.get(prefix + "rope.scale_linear"))
    if kind == "none" and prefix + "rope.scale_linear" in meta:
        kind = "linear"  # older files: only `rope.scale_linear`
    if "rope_freqs.weight" in header.tensors:
        if kind != "none":
            raise ConfigError(f"{source}: holds rope_freqs.weight and sets {prefix}rope.scaling.type={kind!r}")
        return _llama3_scaling(header, d_head, rope_theta)
    if kind == "none":
        return None
    if kind != "linear":
        raise ConfigError(
            f"{source}: {prefix}rope.scaling.type is {kind!r}; llama_lens implements 'none' and 'linear' RoPE "
            "scaling for GGUF files (and Llama 3.1's, stored as rope_freqs.weight)"
        )
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not factor > 0:
        raise ConfigError(f"{source}: linear RoPE scaling needs a positive {prefix}rope.scaling.factor, got {factor!r}")
    return RopeScaling(kind="linear", factor=float(factor))


def llama3_rope_factors(d_head: int, rope_theta: float, scaling: RopeScaling) -> torch.Tensor:
    """[d_head / 2] the factor dividing each RoPE frequency under Llama 3.1's scaling, as llama.cpp's converter
    computes them for rope_freqs.weight (1 for high frequencies, `factor` for low ones, smoothed between)."""
    freqs = 1.0 / (rope_theta ** (torch.arange(0, d_head, 2, dtype=torch.float32) / d_head))
    original = scaling.original_max_position_embeddings
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            factors.append(1.0)
        elif wavelen > original / low:
            factors.append(scaling.factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / scaling.factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def _llama3_scaling(header: GGUFHeader, d_head: int, rope_theta: float) -> RopeScaling:
    """Llama 3.1's rope scaling recovered from the factors llama.cpp stores: the file keeps the factors only, so
    the usual parameters (low 1, high 4, original context 8192, factor the largest) must reproduce them."""
    stored = header.tensors["rope_freqs.weight"]
    check_qtype(stored.name, stored.qtype, header.path)
    if stored.shape != (d_head // 2,):
        raise ConfigError(f"{header.path}: rope_freqs.weight has shape {list(stored.shape)}, expected [{d_head // 2}]")
    factors = torch.empty(stored.shape, dtype=torch.float32)
    with open(header.path, "rb") as file:
        read_gguf_into(file, stored.start, stored.qtype, factors, what="'rope_freqs.weight'")
    scaling = RopeScaling(
        kind="llama3",
        factor=float(factors.max()),
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    )
    if not torch.allclose(factors, llama3_rope_factors(d_head, rope_theta, scaling), rtol=1e-6, atol=0):
        raise ConfigError(
            f"{header.path}: rope_freqs.weight holds RoPE factors that Llama 3.1's scaling with low_freq_factor 1, "
            "high_freq_factor 4 and an original context of 8192 does not give; llama_lens cannot tell the "
            "parameters from the factors alone: load the model's Hugging Face folder"
        )
    return scaling


# ----------------------------------------------------------------------------------------------------- reads
@functools.cache
def can_dequantize(qtype: str) -> bool:
    """Whether the installed gguf package dequantizes this quantization type (tried once on one block)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    ggml_type = GGMLQuantizationType[qtype]
    try:
        dequantize(np.zeros((1, GGML_QUANT_SIZES[ggml_type][1]), dtype=np.uint8), ggml_type)
    except NotImplementedError:
        return False
    return True


def dequantized_dtype(qtype: str) -> torch.dtype:
    """The torch dtype that holds a type's values exactly: float16/bfloat16 for those, else float32."""
    return {"F16": torch.float16, "BF16": torch.bfloat16}.get(qtype, torch.float32)


def supported_qtypes() -> list[str]:
    """The quantization types this installation can read (F32, F16, BF16, Q8_0, Q4_K, ...)."""
    from gguf import GGMLQuantizationType

    return [t.name for t in GGMLQuantizationType if can_dequantize(t.name)]


def check_qtype(tensor_name: str, qtype: str, path: Path) -> None:
    """Raises CheckpointError naming the tensor, type and file when the type cannot be dequantized."""
    if not can_dequantize(qtype):
        raise CheckpointError(
            f"{path}: tensor {tensor_name!r} is stored as {qtype}, which the installed gguf package cannot "
            f"dequantize (it reads {', '.join(supported_qtypes())}); upgrade gguf, or use a file quantized "
            "to one of these"
        )


def gguf_row_bytes(qtype: str, n_columns: int) -> int:
    """Bytes one row of `n_columns` values takes when stored as `qtype` (rows are whole blocks)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block_size, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    return n_columns // block_size * block_bytes


def read_gguf_into(
    file: BinaryIO,
    start: int,
    qtype: str,
    target: torch.Tensor,
    *,
    qk_heads: int | None = None,
    what: str = "a tensor",
) -> int:
    """Fills `target` with the dequantized values of a tensor stored from byte `start` of a GGUF file.

    Reads CHUNK_VALUES values (whole rows) at a time, dequantizes them (`gguf.quants.dequantize`, float32) and
    casts them into `target` on its device; with `qk_heads`, rows are moved from llama.cpp's interleaved RoPE
    order to the rotate-half order on the way (chunks then hold whole heads). The file is read in order by the
    calling thread; chunks are dequantized by up to `torch.get_num_threads()` threads (MAX_THREADS at most),
    each holding one chunk.

    Args:
        file: the GGUF file, opened for reading in binary mode.
        start: the tensor's first byte (`GGUFTensor.start`).
        qtype: its quantization type ("Q4_K", ...).
        target: a contiguous tensor of the stored shape (torch order), any float dtype, any device.
        qk_heads: the heads of a q/k weight or bias to permute, else None.
        what: names the tensor in errors.

    Returns:
        bytes read.

    Raises:
        CheckpointError: the file ends early.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    ggml_type = GGMLQuantizationType[qtype]
    block_size, block_bytes = GGML_QUANT_SIZES[ggml_type]
    # A 1-D tensor (a norm, a bias) is one row; q/k biases are permuted whole.
    n_rows = target.shape[0] if target.dim() > 1 else 1
    n_cols = target.numel() // max(n_rows, 1)
    row_bytes = n_cols // block_size * block_bytes
    rows = target.view(n_rows, n_cols)
    heads_rows = 1 if qk_heads is None or target.dim() == 1 else n_rows // qk_heads  # rows of one head
    step = max(heads_rows, CHUNK_VALUES // max(n_cols, 1) // heads_rows * heads_rows)

    def convert(raw: torch.Tensor, first: int, count: int) -> None:
        values = torch.from_numpy(dequantize(raw.numpy().reshape(count, row_bytes), ggml_type))
        if qk_heads is None:
            rows[first : first + count].copy_(values)
        elif target.dim() == 1:
            permute_qk_to_rotate_half(values.view(-1), qk_heads, out=target)
        else:
            permute_qk_to_rotate_half(values, count // heads_rows, out=rows[first : first + count])

    file.seek(start)
    chunks = [(first, min(step, n_rows - first)) for first in range(0, n_rows, step)]
    threads = min(torch.get_num_threads(), MAX_THREADS, len(chunks))
    if threads <= 1:
        buffer = torch.empty(chunks[0][1] * row_bytes, dtype=torch.uint8)
        for first, count in chunks:
            raw = buffer[: count * row_bytes]
            read_exactly_into(file, raw, what)
            convert(raw, first, count)
        return n_rows * row_bytes
    with ThreadPoolExecutor(threads, thread_name_prefix="llama_lens-gguf") as pool:
        running: collections.deque[Future] = collections.deque()
        for first, count in chunks:
            raw = torch.empty(count * row_bytes, dtype=torch.uint8)
            read_exactly_into(file, raw, what)
            running.append(pool.submit(convert, raw, first, count))
            if len(running) >= threads:  # at most one chunk per thread in memory
                running.popleft().result()
        for done in running:
            done.result()
    return n_rows * row_bytes
