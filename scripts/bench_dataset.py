"""Throughput of `ll.lens_dataset` on the embedded SmolLM2: in this process with 2 torch threads, and on Ray with
2 single-threaded actors, in one script, so that the ratio measures the engine's overhead on the same machine.

    python scripts/bench_dataset.py                  # 1,000 short prompts
    python scripts/bench_dataset.py --prompts 200    # quicker

Both runs start from the checkpoint path (each loads the model: in-process, or once per actor, in parallel)
and write to a fresh folder; the Ray cluster is started before the clock starts, as a running cluster would
be. Prints prompts/s of each and Ray / local (the target is >= 0.8), and checks that both wrote the same rows.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

import llama_lens as ll

SUBJECTS = ["France", "Japan", "Canada", "Italy", "Brazil", "Egypt", "Norway", "India", "Kenya", "Peru"]
TEMPLATES = [
    "The capital of {s} is",
    "The language spoken in {s} is",
    "{s} is a country in",
    "The currency of {s} is the",
    "A famous dish from {s} is",
    "The flag of {s} is",
    "People from {s} are called",
    "The largest city in {s} is",
    "In {s}, the weather in winter is",
    "The president or leader of {s} lives in",
]


def make_prompts(n: int) -> list[str]:
    """n short prompts (5 to 12 tokens), distinct."""
    prompts = []
    for i in range(n):
        text = TEMPLATES[i % len(TEMPLATES)].format(s=SUBJECTS[(i // len(TEMPLATES)) % len(SUBJECTS)])
        prompts.append(text if i < 100 else f"{text} ({i})")
    return prompts


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=125)
    parser.add_argument(
        "--keep-rfc3987-syntax", action="store_true", help="let Ray's processes import rfc3987-syntax (slow starts)"
    )
    args = parser.parse_args()

    import ray

    path = ll.demo_model_path()
    prompts = make_prompts(args.prompts)
    common = dict(batch_size=args.batch_size, shard_size=args.shard_size, progress=False)
    folder = Path(tempfile.mkdtemp(prefix="bench_dataset_"))
    print(f"SmolLM2 ({path}), {len(prompts)} prompts, batch_size {args.batch_size}, shard_size {args.shard_size}")
    print(f"load average before: {load_average()}")

    torch.set_num_threads(2)
    ll.lens_dataset(path, prompts[:16], out=folder / "warmup", **common)  # page cache, imports

    start = time.perf_counter()
    local = ll.lens_dataset(path, prompts, out=folder / "local", **common)
    local_seconds = time.perf_counter() - start
    print(f"local (2 threads):           {len(prompts) / local_seconds:7.1f} prompts/s  ({local_seconds:.1f} s)")

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not args.keep_rfc3987_syntax:
        # jsonschema's optional rfc3987-syntax builds a parser on import, ~10 s in every Ray process (imported by
        # ray itself, not by the engine's work): left out, as tests/runs/test_dataset.py does (docs/datasets.md).
        shim = folder / "shim"
        shim.mkdir()
        (shim / "rfc3987_syntax.py").write_text("raise ImportError('left out by scripts/bench_dataset.py')\n")
        os.environ["PYTHONPATH"] = os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")])
    start = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    print(f"ray cluster start:           {time.perf_counter() - start:7.1f} s (not counted)")
    try:
        start = time.perf_counter()
        distributed = ll.lens_dataset(
            path, prompts, out=folder / "ray", executor="ray", num_workers=2, num_cpus_per_worker=1, **common
        )
        ray_seconds = time.perf_counter() - start
    finally:
        ray.shutdown()
    print(f"ray (2 actors x 1 thread):   {len(prompts) / ray_seconds:7.1f} prompts/s  ({ray_seconds:.1f} s)")
    print(f"ray / local:                 {local_seconds / ray_seconds:7.2f}  (target >= 0.8)")
    print(f"load average after: {load_average()}")

    a, b = (
        local.frame(["prompt", "label", "position", "top_id", "entropy"]),
        distributed.frame(["prompt", "label", "position", "top_id", "entropy"]),
    )
    same_keys = a[["prompt", "label", "position"]].equals(b[["prompt", "label", "position"]])
    print(
        f"same rows: {same_keys} ({len(a)} rows); top-1 ids equal in {(a['top_id'] == b['top_id']).mean():.4f} of "
        f"rows; max |entropy difference| {(a['entropy'] - b['entropy']).abs().max():.2e}"
    )


if __name__ == "__main__":
    main()
