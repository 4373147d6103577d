"""Streaming at the memory floor: peak RSS and wall time of a streamed logit lens, against the checkpoint's size,
a cold sequential read of its files, and ll.plan's estimate.

Run on a Llama-3.2-3B-shaped Meta MP2 bf16 checkpoint with a separate unembedding (7.2 GB):

    python scripts/make_synthetic_checkpoint.py /work/bigckpt/meta3b --layout meta --shards 2 --untied \\
        --embed-split d_model
    python scripts/bench_stream_floor.py /work/bigckpt/meta3b [--tokens 32] [--unembed stream] [--repeat 1]

Each measurement runs in a fresh subprocess, so its peak RSS (ru_maxrss) is its own:

  cold read   every weight file read once, in order, after evicting it from the page cache
  streamed    ll.plan(path, stream=True, unembed=...), then ll.load(path, stream=True, unembed=...) and
              ll.logit_lens over a prompt of --tokens ids, timed from before the load to the lens's result,
              the files evicted first
  warm        the same with the files left in the page cache: the compute alone (on a CPU without bfloat16
              matrix instructions the lens's matmuls, not the disk, can set the pace)

and prints:

  peak RSS / checkpoint bytes                                  (target <= 15%)
  streamed wall / cold read                                    (target <= 1.3)
  streamed wall / max(cold read, warm)                         (what streaming adds over its floor)
  ll.plan's peak RSS estimate / measured peak RSS              (target within 10%)

"Cold": each file is evicted with posix_fadvise(POSIX_FADV_DONTNEED) (its pages leave the page cache unless
another process maps them); the script also says whether /proc/sys/vm/drop_caches is writable here, and how
much of the files stayed cached (util-linux `fincore`, where installed). The CPUs may be shared: the load
average is printed beside each run, and wall times are noisy when it is above the CPU count.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# The cold read, page-cache eviction and peak RSS are measured as scripts/bench_stream.py measures them.
from bench_stream import (  # scripts/ is on the path
    READ_CHUNK,
    cached_bytes,
    evict,
    peak_rss,
    run_json_child,
    weight_files,
)


def drop_caches_writable() -> bool:
    return os.access("/proc/sys/vm/drop_caches", os.W_OK)


# ----------------------------------------------------------------------------------------------- children
def child_cold_read(path: Path) -> dict:
    evict(path)
    left = cached_bytes(path)
    total, start = 0, time.perf_counter()
    buffer = bytearray(READ_CHUNK)
    for file in weight_files(path):
        with open(file, "rb", buffering=0) as handle:
            while n := handle.readinto(buffer):
                total += n
    return {"bytes": total, "seconds": time.perf_counter() - start, "cached_before": left}


def child_streamed(path: Path, tokens: int, unembed: str, cold: bool = True) -> dict:
    import torch

    import llama_lens as ll

    # No tokenizer ships with the synthetic checkpoint: fixed random ids.
    ids = torch.randint(1000, 100_000, (1, tokens), generator=torch.Generator().manual_seed(0))
    if cold:
        evict(path)
    cached = cached_bytes(path)
    start = time.perf_counter()
    estimate = ll.plan(path, tokens=tokens, stream=True, dtype=torch.bfloat16, unembed=unembed, cache="resid")
    model = ll.load(path, dtype=torch.bfloat16, stream=True, unembed=unembed, progress=False)
    load_seconds = time.perf_counter() - start
    with torch.inference_mode():
        result = ll.logit_lens(model, ids, target=int(ids[0, -1]))
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "load_seconds": load_seconds,
        "cached_before": cached,
        "peak_rss": peak_rss(),
        "estimate_peak_rss": estimate.peak_rss_bytes,
        "estimate_peak": estimate.peak_bytes,
        "estimate_process": estimate.process_bytes,
        "embed": estimate.embed,
        "unembed": estimate.unembed,
        "model_embed": type(model.embed).__name__,
        "model_unembed": type(model.unembed).__name__,
        "readouts": result.n_readouts,
        "embed_read_bytes": getattr(model.embed.weight, "read_bytes", None),
    }


def run_child(args: argparse.Namespace, kind: str) -> dict:
    command = [sys.executable, __file__, str(args.path), "--child", kind, "--tokens", str(args.tokens)]
    command += ["--unembed", args.unembed]
    return run_json_child(command, kind)


# ---------------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path, help="checkpoint folder (scripts/make_synthetic_checkpoint.py writes one)")
    parser.add_argument("--tokens", type=int, default=32, help="prompt length (pos)")
    parser.add_argument("--unembed", default="stream", choices=["stream", "memory", "auto"], help="ll.load's unembed=")
    parser.add_argument("--repeat", type=int, default=1, help="cold read + streamed lens pairs to run")
    parser.add_argument("--child", choices=["cold_read", "streamed", "streamed_warm"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "cold_read":
        print(json.dumps(child_cold_read(args.path)))
        return
    if args.child in ("streamed", "streamed_warm"):
        print(json.dumps(child_streamed(args.path, args.tokens, args.unembed, cold=args.child == "streamed")))
        return

    checkpoint_bytes = sum(f.stat().st_size for f in weight_files(args.path))
    print(
        f"checkpoint {args.path}: {checkpoint_bytes / 1e9:.2f} GB in {len(weight_files(args.path))} files; streamed "
        f"lens over {args.tokens} tokens, bf16, unembed={args.unembed!r}; {os.cpu_count()} CPUs; "
        f"/proc/sys/vm/drop_caches {'writable' if drop_caches_writable() else 'not writable'} (not used: "
        "posix_fadvise evicts only these files)"
    )
    for turn in range(args.repeat):
        load = os.getloadavg()[0]
        cold = run_child(args, "cold_read")
        streamed = run_child(args, "streamed")
        warm = run_child(args, "streamed_warm")
        load_after = os.getloadavg()[0]
        print(f"\nrun {turn + 1}: load average {load:.1f} before, {load_after:.1f} after")
        print(
            f"  cold read   {cold['bytes'] / 1e9:.2f} GB in {cold['seconds']:.1f} s = "
            f"{cold['bytes'] / cold['seconds'] / 1e9:.2f} GB/s   ({_gb(cold['cached_before'])} cached before)"
        )
        print(
            f"  streamed    load {streamed['load_seconds']:.1f} s, load + lens {streamed['seconds']:.1f} s "
            f"({streamed['readouts']} read-outs; embed {streamed['model_embed']}, unembed "
            f"{streamed['model_unembed']}; {_gb(streamed['cached_before'])} cached before; embedding rows read: "
            f"{streamed['embed_read_bytes']} bytes)"
        )
        print(
            f"  peak RSS    {streamed['peak_rss'] / 1e9:.3f} GB = {streamed['peak_rss'] / checkpoint_bytes:.1%} of the "
            "checkpoint   (target <= 15%)"
        )
        print(
            f"  warm        the same with the files in the page cache (the compute, no disk wait): "
            f"{warm['seconds']:.1f} s ({_gb(warm['cached_before'])} cached before)"
        )
        print(f"  wall / cold read = {streamed['seconds'] / cold['seconds']:.2f}   (target <= 1.3)")
        floor = max(cold["seconds"], warm["seconds"])
        print(f"  wall / max(cold read, warm) = {streamed['seconds'] / floor:.2f}   (the part streaming adds)")
        print(
            f"  ll.plan     embed={streamed['embed']!r}, unembed={streamed['unembed']!r}: peak RSS "
            f"{streamed['estimate_peak_rss'] / 1e9:.3f} GB (process {streamed['estimate_process'] / 1e9:.3f} GB "
            f"+ peak {streamed['estimate_peak'] / 1e9:.3f} GB); estimate / measured = "
            f"{streamed['estimate_peak_rss'] / streamed['peak_rss']:.3f}   (target 0.9 .. 1.1)"
        )


def _gb(nbytes: int | None) -> str:
    return "unknown" if nbytes is None else f"{nbytes / 1e9:.2f} GB"


if __name__ == "__main__":
    main()
