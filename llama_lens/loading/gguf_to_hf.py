"""A llama GGUF's dequantized weights, config and tokenizer written as a Hugging Face checkpoint folder: the
parts of the demo model's conversion (`demo.write_checkpoint`) that know the GGUF and HF formats.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

# ~270 MB of bf16 weights in 100 MiB shards: three shards, so the demo exercises the sharded layout.
SHARD_MAX_BYTES = 100 * 2**20


def checked_metadata(meta: dict[str, Any], gguf_path: Path) -> dict[str, Any]:
    """The metadata, after checking the GGUF is a llama with a byte-level BPE vocabulary (what `hf_config`
    and `write_tokenizer` write)."""
    if meta.get("general.architecture") != "llama":
        raise CheckpointError(f"{gguf_path}: architecture {meta.get('general.architecture')!r}, expected 'llama'")
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise CheckpointError(f"{gguf_path}: tokenizer {meta.get('tokenizer.ggml.model')!r}, expected 'gpt2' (BPE)")
    return meta


def hf_config(meta: dict[str, Any], *, tied: bool) -> dict[str, Any]:
    """config.json in the shape of SmolLM2-135M-Instruct's own, with the numbers read from the GGUF."""
    n_heads = int(meta["llama.attention.head_count"])
    d_model = int(meta["llama.embedding_length"])
    pad = meta.get("tokenizer.ggml.padding_token_id")
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": int(meta["tokenizer.ggml.bos_token_id"]),
        "eos_token_id": int(meta["tokenizer.ggml.eos_token_id"]),
        "hidden_act": "silu",
        "hidden_size": d_model,
        "initializer_range": 0.041666666666666664,
        "intermediate_size": int(meta["llama.feed_forward_length"]),
        "max_position_embeddings": int(meta["llama.context_length"]),
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": n_heads,
        "num_hidden_layers": int(meta["llama.block_count"]),
        "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", n_heads)),
        "pad_token_id": int(pad) if pad is not None else None,
        "pretraining_tp": 1,
        # GGUF stores float32(1e-5) = 9.999999747e-06; round back to the value of the original config.
        "rms_norm_eps": float(f"{meta['llama.attention.layer_norm_rms_epsilon']:.6g}"),
        "rope_scaling": None,
        "rope_theta": float(meta.get("llama.rope.freq_base", 10000.0)),
        "tie_word_embeddings": tied,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": int(meta.get("llama.vocab_size", len(meta["tokenizer.ggml.tokens"]))),
    }


def write_shards(ckpt: Any, out_dir: Path, progress: bool) -> None:
    """The GGUF's parameters dequantized to bf16 under HF names, in shards of at most SHARD_MAX_BYTES (one
    shard's tensors in memory at a time)."""
    import torch
    from tqdm.auto import tqdm

    from ..io.names import HF_TO_CANONICAL, inverse, rename
    from ..io.writer import split_by_max_bytes, write_safetensors_shards

    to_hf = inverse(HF_TO_CANONICAL)
    params = [name for name in ckpt.param_names if not (name == "unembed.weight" and ckpt.config.tie_embeddings)]
    canonical = {rename(name, to_hf): name for name in params}
    bar = tqdm(total=len(canonical), desc="dequantizing", unit="tensor", disable=not progress, file=sys.stderr)

    def dequantized(hf_name: str) -> torch.Tensor:
        name = canonical[hf_name]
        bar.update(1)
        return ckpt.state_dict([name], dtype=torch.bfloat16)[name]

    shapes = ckpt.tensors().set_index("param")["numel"]
    sizes = {hf_name: int(shapes[name]) * 2 for hf_name, name in canonical.items()}  # bf16
    with bar:
        write_safetensors_shards(out_dir, split_by_max_bytes(sizes, SHARD_MAX_BYTES), dequantized)


def write_tokenizer(meta: dict[str, Any], out_dir: Path) -> None:
    """tokenizer.json (byte-level BPE from the GGUF's vocabulary and merges) and tokenizer_config.json."""
    from ..tokenizer.gguf import CONTROL, gguf_backend_tokenizer

    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    token_types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    gguf_backend_tokenizer(meta, "the demo GGUF").save(str(out_dir / "tokenizer.json"))
    control = [t for t, kind in zip(tokens, token_types) if kind == CONTROL]

    def token(key: str) -> str | None:
        token_id = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(token_id)] if token_id is not None else None

    tokenizer_config = {
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(tokens.index(t)): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }  # fmt: skip
            for t in control
        },
        "additional_special_tokens": [t for t in (token("bos_token_id"), token("eos_token_id")) if t],
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "pad_token": token("padding_token_id"),
        "unk_token": token("unknown_token_id"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta["llama.context_length"]),
        "tokenizer_class": "GPT2Tokenizer",
    }
    if "tokenizer.chat_template" in meta:
        tokenizer_config["chat_template"] = meta["tokenizer.chat_template"]
    write_json(out_dir / "tokenizer_config.json", tokenizer_config)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Indented JSON and a newline, non-ASCII kept as is (as transformers writes its files)."""
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
