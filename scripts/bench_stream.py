"""Streaming benchmark: memory and speed of the logit lens on a checkpoint streamed from disk.

Run on the synthetic Llama-3.2-3B-shaped checkpoint (scripts/make_synthetic_checkpoint.py). Each measurement
runs in a fresh subprocess, so its peak RSS (ru_maxrss) is its own. Prints:

  peak RSS, as a share of the checkpoint's bytes, of
    streamed   ll.load(path, stream=True) + ll.logit_lens                        (target <= 30%)
    loaded     ll.load(path) + ll.logit_lens
    hf         transformers from_pretrained + output_hidden_states, final norm + lm_head per layer
  streamed lens time / floor, floor = max(layer bytes / disk read bandwidth, lens time on the loaded model)
                                                                                 (target <= 1.3)

The disk bandwidth is measured in the same run by reading the weight files with the page cache dropped. As
writing /proc/sys/vm/drop_caches needs privileges a container rarely has, each file is evicted from the page
cache with posix_fadvise(POSIX_FADV_DONTNEED) before every cold read (the script says how much stayed cached,
from `fincore`). The streamed pass is cold too: its layers come from disk, not from the page cache.

The streamed run loads with `unembed="auto"` (the unembedding held when memory allows); for the memory floor
(the embedding by rows, the unembedding streamed from disk) see scripts/bench_stream_floor.py.

Usage: python scripts/bench_stream.py DIR [--tokens 128] [--dtype bfloat16] [--no-transformers]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

READ_CHUNK = 16 << 20


# ------------------------------------------------------------------------------------------------ helpers
def weight_files(path: Path) -> list[Path]:
    return sorted([*path.glob("*.safetensors"), *path.glob("consolidated.*.pth")])


def evict(path: Path) -> None:
    """Drops the checkpoint's files from the page cache (clean pages only; they were written long ago)."""
    for file in weight_files(path):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cached_bytes(path: Path) -> int | None:
    """Bytes of the checkpoint's files in the page cache, from util-linux `fincore` (None without it)."""
    if shutil.which("fincore") is None:
        return None
    files = [str(f) for f in weight_files(path)]
    command = ["fincore", "--bytes", "--noheadings", "--output", "RES", *files]
    out = subprocess.run(command, capture_output=True, text=True)
    return sum(int(line) for line in out.stdout.split()) if out.returncode == 0 else None


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def lens_tokens(tokens: int):
    import torch

    # No tokenizer ships with the synthetic checkpoint: fixed random ids, the same in every child.
    return torch.randint(1000, 100_000, (1, tokens), generator=torch.Generator().manual_seed(0))


def run_lens(model, tokens):
    import llama_lens as ll

    return ll.logit_lens(model, tokens, target=int(tokens[0, -1]))


# ----------------------------------------------------------------------------------------------- children
def child_disk(path: Path) -> dict:
    evict(path)
    left = cached_bytes(path)
    total, start = 0, time.perf_counter()
    buffer = bytearray(READ_CHUNK)
    for file in weight_files(path):
        with open(file, "rb", buffering=0) as handle:
            while n := handle.readinto(buffer):
                total += n
    seconds = time.perf_counter() - start
    return {"bytes": total, "seconds": seconds, "cached_before": left}


def child_streamed(path: Path, tokens: int, dtype: str) -> dict:
    import torch

    import llama_lens as ll

    ids = lens_tokens(tokens)
    evict(path)
    start = time.perf_counter()
    model = ll.load(path, dtype=dtype, stream=True, progress=False)
    load_seconds = time.perf_counter() - start
    layer_bytes = []
    reader = model.reader

    def counted(layer):
        state, read_bytes = reader(layer)
        layer_bytes.append(read_bytes)
        return state, read_bytes

    model.reader = counted
    passes = []
    for _ in range(2):  # the first pass also pays one-time set-up (kernels, allocator); both are cold reads
        evict(path)
        cached = cached_bytes(path)
        start = time.perf_counter()
        with torch.inference_mode():
            run_lens(model, ids)
        passes.append({"seconds": time.perf_counter() - start, "cached_before": cached})
    layer_bytes_per_pass = sum(layer_bytes) // len(passes)
    return {"load_seconds": load_seconds, "passes": passes, "layer_bytes": layer_bytes_per_pass, "peak_rss": peak_rss()}


def child_loaded(path: Path, tokens: int, dtype: str) -> dict:
    import torch

    import llama_lens as ll

    ids = lens_tokens(tokens)
    start = time.perf_counter()
    model = ll.load(path, dtype=dtype, progress=False)
    load_seconds = time.perf_counter() - start
    passes = []
    for _ in range(2):
        start = time.perf_counter()
        with torch.inference_mode():
            run_lens(model, ids)
        passes.append({"seconds": time.perf_counter() - start})
    return {"load_seconds": load_seconds, "passes": passes, "peak_rss": peak_rss()}


def child_transformers(path: Path, tokens: int, dtype: str) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    ids = lens_tokens(tokens)
    target = int(ids[0, -1])
    start = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    load_seconds = time.perf_counter() - start
    start = time.perf_counter()
    with torch.inference_mode():
        hidden = model(ids, output_hidden_states=True).hidden_states
        probs = []
        for k, resid in enumerate(hidden):
            # The last hidden state already went through the final norm.
            normed = resid if k == len(hidden) - 1 else model.model.norm(resid)
            logits = model.lm_head(normed).float()  # [batch, pos, d_vocab], one layer at a time
            probs.append(logits.log_softmax(-1)[..., target].exp())
    return {"load_seconds": load_seconds, "passes": [{"seconds": time.perf_counter() - start}], "peak_rss": peak_rss()}


CHILDREN = {"disk": child_disk, "streamed": child_streamed, "loaded": child_loaded, "transformers": child_transformers}


def run_json_child(command: list[str], kind: str) -> dict:
    """Runs a measurement in a fresh process (its own peak RSS) and returns the JSON its last line prints."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{kind} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_child(kind: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, str(args.path), "--child", kind]
    command += ["--tokens", str(args.tokens), "--dtype", args.dtype]
    return run_json_child(command, kind)


# ---------------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path, help="checkpoint folder (scripts/make_synthetic_checkpoint.py writes one)")
    parser.add_argument("--tokens", type=int, default=128, help="prompt length (pos)")
    parser.add_argument(
        "--dtype",
        default="bfloat16",
        help="dtype of every run (bfloat16: a float32 full load of "
        "a 3B model would not leave room for the rest on a 24 GiB machine)",
    )
    parser.add_argument("--no-transformers", action="store_true", help="skip the transformers comparison")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child == "disk":
        print(json.dumps(child_disk(args.path)))
        return
    if args.child:
        print(json.dumps(CHILDREN[args.child](args.path, args.tokens, args.dtype)))
        return

    checkpoint_bytes = sum(f.stat().st_size for f in weight_files(args.path))
    print(
        f"checkpoint {args.path}: {checkpoint_bytes / 1e9:.2f} GB in {len(weight_files(args.path))} files; "
        f"lens over {args.tokens} tokens in {args.dtype}; {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f}"
    )
    disk = run_child("disk", args)
    bandwidth = disk["bytes"] / disk["seconds"]
    print(
        f"disk read (page cache evicted by posix_fadvise DONTNEED; {_gb(disk['cached_before'])} still cached): "
        f"{disk['bytes'] / 1e9:.2f} GB in {disk['seconds']:.1f} s = {bandwidth / 1e9:.2f} GB/s"
    )

    results = {kind: run_child(kind, args) for kind in ("streamed", "loaded")}
    if not args.no_transformers:
        results["transformers"] = run_child("transformers", args)

    print("\npeak RSS (whole process, fresh subprocess each)")
    for kind, result in results.items():
        share = result["peak_rss"] / checkpoint_bytes
        print(
            f"  {kind:<13}{result['peak_rss'] / 1e9:6.2f} GB  = {share:6.1%} of the checkpoint   "
            f"(load {result['load_seconds']:.1f} s, lens {_seconds(result['passes'])} s)"
        )

    streamed, loaded = results["streamed"], results["loaded"]
    layer_bytes = streamed["layer_bytes"]
    io_floor = layer_bytes / bandwidth
    compute_floor = min(p["seconds"] for p in loaded["passes"])
    floor = max(io_floor, compute_floor)
    stream_seconds = min(p["seconds"] for p in streamed["passes"])
    print(
        f"\nstreamed lens pass (cold page cache; {_gb(streamed['passes'][-1]['cached_before'])} cached before): "
        f"{stream_seconds:.1f} s, reading {layer_bytes / 1e9:.2f} GB of layers"
    )
    print(
        f"floor = max(read {io_floor:.1f} s at {bandwidth / 1e9:.2f} GB/s, "
        f"lens on the loaded model {compute_floor:.1f} s) = {floor:.1f} s"
    )
    print(f"streamed / floor = {stream_seconds / floor:.2f}   (target <= 1.3)")
    print(f"streamed peak RSS = {streamed['peak_rss'] / checkpoint_bytes:.1%} of the checkpoint   (target <= 30%)")


def _seconds(passes: list[dict]) -> str:
    return " / ".join(f"{p['seconds']:.1f}" for p in passes)


def _gb(nbytes: int | None) -> str:
    return "unknown" if nbytes is None else f"{nbytes / 1e9:.2f} GB"


if __name__ == "__main__":
    main()
