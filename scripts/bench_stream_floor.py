"""The streamed logit lens against its floor: peak RSS and wall time, against the checkpoint's size, a cold read of
its files, the lens's FLOPs at this machine's float32 GEMM rate, and ll.plan's estimates.

Run on a Llama-3.2-3B-shaped Meta MP2 bf16 checkpoint with a separate unembedding (7.2 GB):

    python scripts/make_synthetic_checkpoint.py /work/bigckpt/meta3b --layout meta --shards 2 --untied \\
        --embed-split d_model
    python scripts/bench_stream_floor.py /work/bigckpt/meta3b [--tokens 32] [--unembed stream] [--repeat 1] [--warm] \\
        [--sequential]

Each measurement runs in a fresh subprocess, so its peak RSS (ru_maxrss) is its own:

  cold read   every weight file read once, in order, after evicting it from the page cache
  GEMM rate   float32 [rows, d_model] x [d_model, d_mlp] products, rows = tokens x read-outs (the read-out
              sweep's shape), best of about a second; and at rows = tokens (the forward pass's shape)
  streamed    ll.load(path, stream=True, unembed=...) and ll.logit_lens over a prompt of --tokens ids, timed
              from before the load to the lens's result, the files evicted first
  warm        (--warm) the same with the files left in the page cache: the compute alone
  sequential  (--sequential) the same, cold, with the read-out after the pass (none in the layers' waits,
              lens/early_readout.py): the schedule before the overlap, for a comparison within one run

and prints:

  FLOPs       the matmuls of the lens (llama_lens.loading.roofline: layers, the model's own unembedding, the
              read-outs)
  floor       max(cold read, FLOPs / GEMM rate): no pipelined run can be faster
  wall / floor                                                 (target <= 1.3 streamed, <= 1.2 held)
  achieved    FLOPs / wall, against the GEMM rate
  phases      the decoder layers' phase (and how long it waited for reads) and what follows it (the model's
              unembedding and the read-out), each beside its FLOPs at the GEMM rate
  schedule    (--unembed memory) read at load + max(layers' read, layers' compute) + read-out compute: the
              least a schedule that starts the read-out after the last layer can take, as a multiple of the floor
  peak RSS / checkpoint bytes                                  (target <= 15%)
  ll.plan     its peak RSS estimate / measured, and its wall estimate from the same two rates / measured
              (target 0.75 .. 1.25)

"Cold": each file is evicted with posix_fadvise(POSIX_FADV_DONTNEED) (its pages leave the page cache unless
another process maps them); the script also says how much of the files stayed cached (util-linux `fincore`,
where installed). The CPUs may be shared: the load average is printed beside each run, and wall times are
noisy when it is above the CPU count.
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


def child_gemm(path: Path, tokens: int) -> dict:
    import torch

    from llama_lens.io.checkpoint import Checkpoint
    from llama_lens.loading import roofline

    cfg = Checkpoint(path).config
    rows = tokens * _n_readouts(path)
    return {
        "rows": rows,
        "threads": torch.get_num_threads(),
        "rate": roofline.measure_gemm_rate(rows, cfg.d_model, cfg.d_mlp),
        "forward_rate": roofline.measure_gemm_rate(tokens, cfg.d_model, cfg.d_mlp),
        "shape": [cfg.d_model, cfg.d_mlp],
        "capability": torch.backends.cpu.get_cpu_capability(),
    }


def _n_readouts(path: Path) -> int:
    """The lens's read-outs over the checkpoint's model (the embedding and every layer's resid_post)."""
    import torch

    from llama_lens.io.checkpoint import Checkpoint
    from llama_lens.lens.logit import _readout_points
    from llama_lens.model.llama import HookedLlama

    with torch.device("meta"):
        return len(_readout_points(HookedLlama(Checkpoint(path).config), ("embed", "resid_post"), None))


def child_streamed(path: Path, tokens: int, unembed: str, cold: bool = True) -> dict:
    import torch

    import llama_lens as ll

    # No tokenizer ships with the synthetic checkpoint: fixed random ids.
    ids = torch.randint(1000, 100_000, (1, tokens), generator=torch.Generator().manual_seed(0))
    if cold:
        evict(path)
    cached = cached_bytes(path)
    start, cpu_start = time.perf_counter(), time.process_time()
    estimate = ll.plan(
        path, tokens=tokens, stream=True, dtype=torch.bfloat16, unembed=unembed, cache="resid",
        readouts=_n_readouts(path) - 1,
    )  # fmt: skip
    model = ll.load(path, dtype=torch.bfloat16, stream=True, unembed=unembed, progress=False)
    load_seconds = time.perf_counter() - start
    phases = _time_layer_phase(model)
    with torch.inference_mode():
        result = ll.logit_lens(model, ids, target=int(ids[0, -1]))
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    from llama_lens.loading import roofline

    rows, readouts = tokens, result.n_readouts - 1  # the last read-out is the model's own output
    flops = roofline.layer_flops(model.cfg, tokens=tokens) + roofline.unembed_flops(
        model.cfg, rows=rows, readouts=readouts
    )
    return {
        "flops": flops,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
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
        # From the lens's start: the decoder layers' phase (first block in to last block out), the seconds the
        # compute waited there for a layer's read, and what came after (the model's unembedding and the read-out).
        "layers_seconds": phases["last_out"] - phases["first_in"],
        "read_wait_seconds": phases["wait"],
        "head_seconds": time.perf_counter() - phases["last_out"],
        # The read-out steps run while the layers waited for reads (lens/early_readout.py), and the streams taken
        # by the early sweeps (the last one may end after the pass).
        "early_seconds": phases["early"],
        "early_streams": phases["early_streams"],
    }


def _time_layer_phase(model) -> dict:
    """Wraps the streamed model's run_block and its layer stream's take (in this child process only) to time the
    decoder layers' phase of the next forward pass."""
    from llama_lens.lens import early_readout
    from llama_lens.loading import stream

    phases = {"first_in": None, "last_out": None, "wait": 0.0, "early": 0.0, "early_streams": 0}
    run_block, take = model.run_block, stream.LayerStream.take
    step, start = early_readout.EarlyReadout.step, early_readout.EarlyReadout._start

    def timed_block(*args, **kwargs):
        if phases["first_in"] is None:
            phases["first_in"] = time.perf_counter()
        try:
            return run_block(*args, **kwargs)
        finally:
            phases["last_out"] = time.perf_counter()

    def timed_take(self, layer):
        begin = time.perf_counter()
        phases["in_take"] = True
        try:
            return take(self, layer)
        finally:
            phases["in_take"] = False
            phases["wait"] += time.perf_counter() - begin

    def timed_step(self):
        begin = time.perf_counter()
        try:
            return step(self)
        finally:
            if phases.get("in_take"):  # not the end of a sweep after the pass (EarlyReadout.finish)
                phases["early"] += time.perf_counter() - begin

    def counted_start(self):
        before = len(self.taken)
        try:
            return start(self)
        finally:
            phases["early_streams"] += len(self.taken) - before

    model.run_block = timed_block
    stream.LayerStream.take = timed_take
    early_readout.EarlyReadout.step = timed_step
    early_readout.EarlyReadout._start = counted_start
    return phases


def plan_child(path: Path, tokens: int, unembed: str, readouts: int, gemm_rate: float, bandwidth: float) -> dict:
    import torch

    import llama_lens as ll

    estimate = ll.plan(
        path, tokens=tokens, stream=True, dtype=torch.bfloat16, unembed=unembed, cache="resid",
        readouts=readouts, gemm_rate=gemm_rate, read_bandwidth=bandwidth,
    )  # fmt: skip
    return {"est_wall_seconds": estimate.est_wall_seconds, "flops": estimate.flops, "read_bytes": estimate.read_bytes}


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
    parser.add_argument("--warm", action="store_true", help="also run the lens with the files in the page cache")
    parser.add_argument(
        "--sequential", action="store_true",
        help="also run the lens with its read-out after the pass (none in the layers' waits), cold, for comparison",
    )  # fmt: skip
    parser.add_argument(
        "--child", choices=["cold_read", "gemm", "streamed", "streamed_warm", "streamed_sequential"],
        help=argparse.SUPPRESS,
    )  # fmt: skip
    args = parser.parse_args()
    if args.child == "cold_read":
        print(json.dumps(child_cold_read(args.path)))
        return
    if args.child == "gemm":
        print(json.dumps(child_gemm(args.path, args.tokens)))
        return
    if args.child == "streamed_sequential":
        from llama_lens.lens import early_readout

        early_readout.MIN_EARLY_VECTORS = 2**62  # no early sweep: the read-out after the pass, as before overlap
    if args.child in ("streamed", "streamed_warm", "streamed_sequential"):
        print(json.dumps(child_streamed(args.path, args.tokens, args.unembed, cold=args.child != "streamed_warm")))
        return

    checkpoint_bytes = sum(f.stat().st_size for f in weight_files(args.path))
    print(
        f"checkpoint {args.path}: {checkpoint_bytes / 1e9:.2f} GB in {len(weight_files(args.path))} files; streamed "
        f"lens over {args.tokens} tokens, bf16, unembed={args.unembed!r}; {os.cpu_count()} CPUs; "
        f"/proc/sys/vm/drop_caches {'writable' if drop_caches_writable() else 'not writable'} (not used: "
        "posix_fadvise evicts only these files)"
    )
    for turn in range(args.repeat):
        load = os.getloadavg()
        cold = run_child(args, "cold_read")
        gemm = run_child(args, "gemm")
        streamed = run_child(args, "streamed")
        sequential = run_child(args, "streamed_sequential") if args.sequential else None
        warm = run_child(args, "streamed_warm") if args.warm else None
        load_after = os.getloadavg()
        bandwidth = cold["bytes"] / cold["seconds"]
        readouts = streamed["readouts"] - 1
        estimate = plan_child(args.path, args.tokens, args.unembed, readouts, gemm["rate"], bandwidth)
        flops, wall = streamed["flops"], streamed["seconds"]
        compute = flops / gemm["rate"]
        floor = max(cold["seconds"], compute)
        print(
            f"\nrun {turn + 1}: load average {load[0]:.1f} / {load[1]:.1f} (1 / 5 min) before, "
            f"{load_after[0]:.1f} / {load_after[1]:.1f} after"
        )
        print(
            f"  cold read   {cold['bytes'] / 1e9:.2f} GB in {cold['seconds']:.1f} s = {bandwidth / 1e9:.2f} GB/s   "
            f"({_gb(cold['cached_before'])} cached before)"
        )
        print(
            f"  GEMM rate   {gemm['rate'] / 1e9:.1f} GFLOP/s float32 on [{gemm['rows']}, {gemm['shape'][0]}] x "
            f"{gemm['shape']} ({gemm['threads']} threads, {gemm['capability']}); "
            f"{gemm['forward_rate'] / 1e9:.1f} GFLOP/s at the forward pass's {args.tokens} rows"
        )
        print(
            f"  FLOPs       {flops / 1e12:.3f} TFLOP ({streamed['readouts']} read-outs x {args.tokens} tokens, "
            f"the forward pass included) = {compute:.1f} s at the GEMM rate"
        )
        print(f"  floor       max(cold read, FLOPs / GEMM rate) = {floor:.1f} s")
        print(
            f"  streamed    load {streamed['load_seconds']:.1f} s, load + lens {wall:.1f} s, CPU time "
            f"{streamed['cpu_seconds']:.1f} s (embed "
            f"{streamed['model_embed']}, unembed {streamed['model_unembed']}; {_gb(streamed['cached_before'])} "
            "cached before)"
        )
        target = 1.3 if args.unembed == "stream" else 1.2
        print(f"  wall / floor = {wall / floor:.2f}   (target <= {target})")
        print(
            f"  achieved    {flops / wall / 1e9:.1f} GFLOP/s = {flops / wall / gemm['rate']:.0%} of the measured "
            "GEMM rate"
        )
        print(
            f"  peak RSS    {streamed['peak_rss'] / 1e9:.3f} GB = {streamed['peak_rss'] / checkpoint_bytes:.1%} of the "
            "checkpoint   (target <= 15%)"
        )
        layer_flops = flops - roofline_head_flops(args.path, args.tokens, readouts)
        print(
            f"  phases      layers {streamed['layers_seconds']:.1f} s (waited {streamed['read_wait_seconds']:.1f} s "
            f"for reads; their FLOPs at the GEMM rate {layer_flops / gemm['rate']:.1f} s, at the forward's "
            f"{layer_flops / gemm['forward_rate']:.1f} s), then unembedding + read-out "
            f"{streamed['head_seconds']:.1f} s ({(flops - layer_flops) / gemm['rate']:.1f} s at the GEMM rate); "
            f"within the layers' waits, {streamed['early_seconds']:.1f} s of read-out steps (early sweeps over "
            f"{streamed['early_streams']} of the {readouts} read-outs)"
        )
        if args.unembed == "memory":
            # Held, the unembedding is read at load, and the read-out starts after the last layer: this
            # schedule cannot beat the sum below, whatever the kernels (ll.plan's estimate is this sum).
            print(
                f"  schedule    held unembedding: read at load + max(layers' read, layers' compute) + read-out "
                f"compute = {estimate['est_wall_seconds']:.1f} s = {estimate['est_wall_seconds'] / floor:.2f} x the "
                f"floor; wall / that = {wall / estimate['est_wall_seconds']:.2f}"
            )
        if sequential is not None:
            print(
                f"  sequential  the same with the read-out after the pass: {sequential['seconds']:.1f} s, "
                f"{sequential['seconds'] / floor:.2f} x the floor (layers {sequential['layers_seconds']:.1f} s, then "
                f"{sequential['head_seconds']:.1f} s); overlapped / sequential = {wall / sequential['seconds']:.2f}; "
                f"CPU time {streamed['cpu_seconds']:.1f} s overlapped, {sequential['cpu_seconds']:.1f} s sequential"
            )
        if warm is not None:
            print(
                f"  warm        the same with the files in the page cache: {warm['seconds']:.1f} s "
                f"({_gb(warm['cached_before'])} cached before), {flops / warm['seconds'] / 1e9:.1f} GFLOP/s"
            )
        print(
            f"  ll.plan     peak RSS {streamed['estimate_peak_rss'] / 1e9:.3f} GB, estimate / measured = "
            f"{streamed['estimate_peak_rss'] / streamed['peak_rss']:.3f}   (target 0.9 .. 1.1); wall "
            f"{estimate['est_wall_seconds']:.1f} s from the same two rates, estimate / measured = "
            f"{estimate['est_wall_seconds'] / wall:.2f}   (target 0.75 .. 1.25)"
        )


def roofline_head_flops(path: Path, tokens: int, readouts: int) -> int:
    """FLOPs of the model's own unembedding and the read-outs (the part of the lens after the layers)."""
    from llama_lens.io.checkpoint import Checkpoint
    from llama_lens.loading import roofline

    return roofline.unembed_flops(Checkpoint(path).config, rows=tokens, readouts=readouts)


def _gb(nbytes: int | None) -> str:
    return "unknown" if nbytes is None else f"{nbytes / 1e9:.2f} GB"


if __name__ == "__main__":
    main()
