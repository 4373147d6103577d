"""Full-load time of the same weights in the Meta and Hugging Face layouts, and torch.load calls per shard.

Writes a random toy model in both layouts (HF: 2 safetensors shards; Meta: `--mp` model-parallel .pth shards),
then times `ll.load(path)` on each, with the files in the page cache and the shard index cached (so the
difference is the reading itself). Prints the median and best of `--repeat` loads and the Meta/HF ratio.

    python scripts/bench_meta_load.py                         # d_model 256, 8 layers, mp=2, float32
    python scripts/bench_meta_load.py --layers 32 --threads 1 # torch ops on one thread (a busy machine)

On a machine whose cores are busy, torch's intra-op threads wait for each other inside every copy; `--threads 1`
gives steadier figures.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--mp", type=int, default=2, help="Meta model-parallel shards")
    parser.add_argument("--stored", default="float32", help="dtype the weights are stored in")
    parser.add_argument("--dtype", default="float32", help="dtype to load to")
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()

    import torch

    import llama_lens as ll
    from llama_lens.config import LlamaConfig
    from llama_lens.testing import random_state_dict, write_hf_checkpoint, write_meta_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    d_model = args.d_model
    cfg = LlamaConfig(
        d_model=d_model,
        n_layers=args.layers,
        n_heads=d_model // 64,
        n_kv_heads=max(1, d_model // 128),
        d_head=64,
        d_mlp=3 * d_model,
        d_vocab=1024,
        rope_theta=10000.0,
        norm_eps=1e-5,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_ids=(2,),
    )
    opened: collections.Counter = collections.Counter()
    torch_load = torch.load

    def counting(path, *load_args, **kwargs):
        opened[os.path.basename(path)] += 1
        return torch_load(path, *load_args, **kwargs)

    torch.load = counting
    with tempfile.TemporaryDirectory() as tmp:
        state = random_state_dict(cfg, dtype=getattr(torch, args.stored))
        folders = {
            "hf": write_hf_checkpoint(Path(tmp) / "hf", cfg, state, shards=2),
            "meta": write_meta_checkpoint(Path(tmp) / "meta", cfg, state, mp=args.mp),
        }
        del state
        print(
            f"toy model: d_model {d_model}, {args.layers} layers, {cfg.n_heads} heads, {cfg.n_kv_heads} KV heads, "
            f"stored {args.stored}, loaded as {args.dtype}, Meta mp={args.mp}, torch threads {torch.get_num_threads()}"
        )
        medians = {}
        for layout, folder in folders.items():
            ckpt = ll.Checkpoint(folder, index_cache=Path(tmp) / f"{layout}-index.json")
            ll.load(ckpt, dtype=args.dtype, progress=False)  # warm-up: page cache, lazy imports
            times = []
            for _ in range(args.repeat):
                opened.clear()
                start = time.perf_counter()
                ll.load(ckpt, dtype=args.dtype, progress=False)
                times.append(time.perf_counter() - start)
            medians[layout] = statistics.median(times)
            loads = ", ".join(f"{name} {count}" for name, count in sorted(opened.items())) or "none"
            print(
                f"{layout:>4}: median {medians[layout] * 1e3:7.1f} ms, best {min(times) * 1e3:7.1f} ms "
                f"over {args.repeat} loads; torch.load calls per load: {loads}"
            )
        print(f"Meta / HF (medians): {medians['meta'] / medians['hf']:.2f}")


if __name__ == "__main__":
    main()
