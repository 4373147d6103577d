"""Writes a random bf16 checkpoint in Llama-3.2-3B's shape, for streaming and memory benchmarks.

Shape: d_model 3072, 28 layers, 24 heads, 8 KV heads, d_mlp 8192, vocab 128256, tied embeddings, llama3 RoPE
(factor 32, original context 8192, theta 500000): 3.2 billion parameters, about 6.4 GB in bf16; with `--untied`
a separate unembedding (lm_head / output.weight) adds 0.79 GB, 7.2 GB in all.

The weights are written one shard at a time (each tensor drawn from its own seed, so reruns give the same
files), so memory stays at about one shard rather than the whole model. Layouts:
    hf    model-0000k-of-0000N.safetensors + model.safetensors.index.json + config.json
    meta  consolidated.0k.pth (one per model-parallel rank) + params.json

A Meta layout splits each weight across the ranks as Meta's model-parallel code does (output.weight over the
vocabulary); the embedding over d_model (`--embed-split d_model`, Llama 2's ParallelEmbedding) or over the
vocabulary (`--embed-split vocab`, Llama 3's VocabParallelEmbedding, the default).

Usage: python scripts/make_synthetic_checkpoint.py DIR [--layout hf|meta] [--shards 5] [--n-layers 28] [--untied]
           [--embed-split vocab|d_model]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import zlib
from pathlib import Path

import torch

from llama_lens.config import LlamaConfig, RopeScaling
from llama_lens.io.names import HF_TO_CANONICAL, META_TO_CANONICAL, inverse, meta_split_dim, param_shapes, rename
from llama_lens.io.writer import meta_params, split_evenly, write_safetensors_shards

DTYPE = torch.bfloat16


def llama_3_2_3b_config(n_layers: int = 28, *, tied: bool = True) -> LlamaConfig:
    """Llama-3.2-3B's shape (Meta's published config.json), optionally with fewer layers or untied embeddings."""
    return LlamaConfig(
        d_model=3072,
        n_layers=n_layers,
        n_heads=24,
        n_kv_heads=8,
        d_head=128,
        d_mlp=8192,
        d_vocab=128256,
        rope_theta=500000.0,
        norm_eps=1e-5,
        tie_embeddings=tied,
        max_position_embeddings=131072,
        rope_scaling=RopeScaling(
            kind="llama3",
            factor=32.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
        bos_token_id=128000,
        eos_token_ids=(128001,),
        checkpoint_dtype="bfloat16",
    )


def random_tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Weights as `testing.random_state_dict` draws them (norms near 1, matrices std 0.02), seeded by name."""
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    values = torch.randn(shape, generator=generator)
    values = 1 + 0.1 * values if ".ln" in f".{name}" else 0.02 * values
    return values.to(DTYPE)


def write_hf(folder: Path, cfg: LlamaConfig, shards: int) -> None:
    to_hf = inverse(HF_TO_CANONICAL)
    canonical = {rename(name, to_hf): name for name in stored_shapes(cfg)}
    shapes = param_shapes(cfg)
    sizes = {stored: torch.Size(shapes[name]).numel() * DTYPE.itemsize for stored, name in canonical.items()}

    def tensor_for(stored: str) -> torch.Tensor:
        return random_tensor(canonical[stored], shapes[canonical[stored]])

    groups = split_evenly(sizes, shards)
    for k, group in enumerate(groups, start=1):
        print(f"  shard {k}/{len(groups)}: {len(group)} tensors, {sum(sizes[n] for n in group) / 1e9:.2f} GB")
    write_safetensors_shards(folder, groups, tensor_for)  # one shard in memory at a time
    (folder / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))


def stored_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape of the tensors a checkpoint stores (a tied model stores no unembedding)."""
    return {
        name: shape for name, shape in param_shapes(cfg).items() if name != "unembed.weight" or not cfg.tie_embeddings
    }


def write_meta(folder: Path, cfg: LlamaConfig, mp: int, *, embed_split: str = "vocab") -> None:
    """One consolidated.0k.pth per rank, each holding its slice of every weight (drawn independently: the
    weights are random anyway, so a rank need not be a slice of one full tensor)."""
    to_meta = inverse(META_TO_CANONICAL)
    shapes = stored_shapes(cfg)
    for rank in range(mp):
        tensors = {}
        for name, shape in shapes.items():
            meta_name = rename(name, to_meta)
            split_dim = meta_split_dim(meta_name, vocab_parallel=embed_split == "vocab")
            piece = list(shape)
            if split_dim is not None:
                piece[split_dim] //= mp
            tensors[meta_name] = random_tensor(f"{name}/{rank if split_dim is not None else 0}", tuple(piece))
        torch.save(tensors, folder / f"consolidated.{rank:02d}.pth")
        print(f"  consolidated.{rank:02d}.pth: {sum(t.nbytes for t in tensors.values()) / 1e9:.2f} GB")
        del tensors
    (folder / "params.json").write_text(json.dumps(meta_params(cfg), indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="where to write (created; must be empty or absent)")
    parser.add_argument("--layout", choices=["hf", "meta"], default="hf")
    parser.add_argument("--shards", type=int, default=5, help="safetensors shards, or model-parallel ranks for meta")
    parser.add_argument("--n-layers", type=int, default=28, help="fewer layers for a quicker, smaller checkpoint")
    parser.add_argument("--untied", action="store_true", help="store a separate unembedding (lm_head, output.weight)")
    parser.add_argument(
        "--embed-split",
        choices=["vocab", "d_model"],
        default="vocab",
        help="meta: the axis the embedding is split on across ranks (Llama 3: vocab; Llama 2: d_model)",
    )
    args = parser.parse_args()

    cfg = llama_3_2_3b_config(args.n_layers, tied=not args.untied)
    n_params = sum(torch.Size(s).numel() for s in stored_shapes(cfg).values())
    need = n_params * DTYPE.itemsize
    folder = args.folder
    if folder.exists() and any(folder.iterdir()):
        raise SystemExit(f"{folder} is not empty; pick a new folder")
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < need * 1.1:
        raise SystemExit(f"{folder}: {need / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free")
    print(f"writing {n_params / 1e9:.2f}B parameters ({need / 1e9:.2f} GB, bf16, {args.layout}) to {folder}")
    start = time.perf_counter()
    if args.layout == "hf":
        write_hf(folder, cfg, args.shards)
    else:
        write_meta(folder, cfg, args.shards, embed_split=args.embed_split)
    print(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
