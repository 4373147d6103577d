"""GGUF files (llama.cpp, Ollama, LM Studio): the header, the config it implies, and reads dequantized per tensor.

One job per module: `gguf_header` parses the header, `gguf_config` reads the config its metadata describe,
`gguf_quants` dequantizes tensors as they are read (the quantization tables and dequantizers are the `gguf`
package's). Here: the names llama.cpp gives the tensors, which q/k rows its converter permuted, and the reader
of GGUF checkpoints (`GGUFReader`). The names of those modules that callers use are importable from here too.

Architectures (`general.architecture`, as llama.cpp's `convert_hf_to_gguf.py` writes them): "llama" (Llama 1-3,
SmolLM, TinyLlama, and Mistral, which the converter writes as "llama"), "qwen2" (Qwen2/2.5 and the models distilled
onto them: biases on q, k and v) and "qwen3" (RMSNorm on each head's q and k, `attn_q_norm`/`attn_k_norm`).
For "llama" the converter stores q/k weights in Meta's interleaved RoPE order, because llama.cpp rotates adjacent
pairs for that architecture; a read with `qk_heads` puts them back in Hugging Face's rotate-half order
(`names.permute_qk_to_rotate_half`). llama.cpp rotates halves for qwen2/qwen3, so their rows are stored as in the
Hugging Face checkpoint and read unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import LlamaConfig
from ..files import warn_if_not_finite
from .gguf_config import GGUF_ARCHITECTURES, GGUF_KEYS_IGNORED, GGUF_KEYS_READ, gguf_config, llama3_rope_factors
from .gguf_header import GGUFHeader, GGUFTensor, read_gguf_header
from .gguf_quants import (
    CHUNK_VALUES,
    MAX_THREADS,
    can_dequantize,
    check_qtype,
    dequantized_dtype,
    gguf_row_bytes,
    read_gguf_into,
    supported_qtypes,
)
from .index import RawIndex, StoredTensor
from .names import layer_template
from .reader import CheckpointReader, Read, WeightFiles, WeightLayout

__all__ = [
    "CHUNK_VALUES",
    "GGUF_ARCHITECTURES",
    "GGUF_IGNORED",
    "GGUF_KEYS_IGNORED",
    "GGUF_KEYS_READ",
    "GGUF_PERMUTED",
    "GGUF_PERMUTING",
    "GGUF_TO_CANONICAL",
    "MAX_THREADS",
    "GGUFHeader",
    "GGUFReader",
    "GGUFTensor",
    "can_dequantize",
    "check_qtype",
    "dequantized_dtype",
    "gguf_config",
    "gguf_raw_index",
    "gguf_row_bytes",
    "llama3_rope_factors",
    "permuted_qk_heads",
    "read_gguf_header",
    "read_gguf_into",
    "supported_qtypes",
]

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


class GGUFReader(CheckpointReader):
    """One llama.cpp `.gguf` file: config and vocabulary in its metadata, each tensor dequantized as it is read.

    The header is read at each opening (fast enough that no index is cached).
    """

    format = "gguf"
    config_name = "its metadata"
    n_layers_key = "n_layers"
    to_canonical = GGUF_TO_CANONICAL
    ignored = GGUF_IGNORED
    caches_index = False

    def __init__(self, layout: WeightLayout) -> None:
        super().__init__(layout)
        self.header = read_gguf_header(self.files[0])

    def content_digest(self, path: Path) -> str | None:
        return None  # the index is never cached, so nothing needs the digest (it would read the whole file)

    def raw_index(self) -> RawIndex:
        return gguf_raw_index(self.header)

    def read_config(self, raw: RawIndex) -> LlamaConfig:
        return gguf_config(self.header)

    def tokenizer_path(self) -> Path | None:
        """The .gguf file itself when its metadata hold a vocabulary (read by `llama_lens.tokenizer.gguf`)."""
        if "tokenizer.ggml.model" in self.header.metadata:
            return self.files[0]
        return super().tokenizer_path()

    @property
    def display_path(self) -> Path:
        return self.files[0]

    def value_dtype(self, dtype: str) -> torch.dtype:
        return dequantized_dtype(dtype)

    def check_dtype(self, stored: StoredTensor) -> None:
        check_qtype(stored.name, stored.dtype, self.files[0])

    def qk_heads(self, stored_name: str, cfg: LlamaConfig) -> int | None:
        return permuted_qk_heads(self.header, layer_template(stored_name)[0], cfg)

    def read(self, reads: list[Read], files: WeightFiles | None) -> int:
        read_bytes = 0
        with open(self.files[0], "rb", buffering=0) as handle:
            for stored, target, qk_heads in reads:
                start = stored.pieces[0].offsets[0]
                read_bytes += read_gguf_into(
                    handle, start, stored.dtype, target, qk_heads=qk_heads, what=repr(stored.name)
                )
                warn_if_not_finite(target, f"tensor {stored.name!r} in {self.files[0]}")
        return read_bytes

    def read_rows(self, stored: StoredTensor, start: int, target: torch.Tensor, files: WeightFiles | None) -> int:
        # Rows are whole quantization blocks, stored one after another.
        first_byte = stored.pieces[0].offsets[0] + start * gguf_row_bytes(stored.dtype, target.shape[1])
        with open(self.files[0], "rb", buffering=0) as handle:
            return read_gguf_into(handle, first_byte, stored.dtype, target, what=repr(stored.name))
