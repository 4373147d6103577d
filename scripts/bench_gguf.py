"""Opening a GGUF file: llama_lens (whole model, and a layer range) against transformers' `gguf_file=` loader.

Each load runs in a fresh Python process (so that memory freed by one load cannot hide the next one's peak): after
the imports it resets the peak resident set size (VmHWM, Linux; elsewhere `ru_maxrss`), loads, and reports the
seconds taken and how much the peak grew. Both loaders dequantize the weights to float32.

    python scripts/bench_gguf.py                     # the embedded model's GGUF (SmolLM2-135M-Instruct, Q4_1)
    python scripts/bench_gguf.py --path MODEL.gguf   # another llama GGUF
    python scripts/bench_gguf.py --skip-transformers # llama_lens only (transformers takes about a minute here)

Prints one line per load (seconds, peak RSS growth in MiB, and that growth over the float32 bytes of the weights
loaded), then the ratios transformers / llama_lens of the full loads' time and peak.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
MIB = 2**20


def _peak_rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak() -> int:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM to the current RSS (Linux)
    except OSError:
        pass
    return _peak_rss_bytes()


def measure(kind: str, path: str) -> dict:
    """Runs in the child process: one load of `kind`, timed, with its peak RSS growth."""
    import torch

    import llama_lens as ll
    from llama_lens.loading.plan import layer_param_count

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    ckpt = ll.Checkpoint(path)
    cfg, n_params = ckpt.config, ckpt.num_params
    if kind == "llama_lens":
        load, loaded_params = (lambda: ll.load(ckpt, progress=False)), n_params
    elif kind == "llama_lens_layers":
        few = range(0, min(3, cfg.n_layers))
        load = lambda: ll.load(ckpt, layers=few, progress=False)  # noqa: E731
        loaded_params = n_params - (cfg.n_layers - len(few)) * layer_param_count(cfg)
    else:
        from transformers import LlamaForCausalLM
        from transformers.utils import logging

        logging.disable_progress_bar()
        folder, name = os.path.split(path)
        load = lambda: LlamaForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)  # noqa: E731
        loaded_params = n_params
    gc.collect()
    baseline = _reset_peak()
    started = time.perf_counter()
    model = load()
    seconds = time.perf_counter() - started
    growth = _peak_rss_bytes() - baseline
    del model
    return {"seconds": seconds, "growth": growth, "weight_bytes": loaded_params * 4}


LABELS = {
    "llama_lens": "llama_lens ll.load (float32)",
    "llama_lens_layers": "llama_lens layers=range(0, 3)",
    "transformers": "transformers gguf_file= (float32)",
}


def run_child(kind: str, path: str) -> dict:
    command = [sys.executable, __file__, "--child", kind, "--path", path]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"PYTHONPATH": str(REPO)})
    if done.returncode:
        sys.exit(f"{kind} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    ratio = result["growth"] / result["weight_bytes"]
    print(
        f"{LABELS[kind]:<34}{result['seconds']:8.2f} s   peak RSS +{result['growth'] / MIB:7.0f} MiB   "
        f"({ratio:.2f} x the fp32 weights loaded)",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", help="a llama GGUF file (default: the embedded model's, ll.demo_gguf_path())")
    parser.add_argument("--skip-transformers", action="store_true", help="time llama_lens only")
    parser.add_argument("--child", choices=sorted(LABELS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.path)))
        return

    import gguf  # noqa: F401  (imports are not part of the times below)

    import llama_lens as ll
    import llama_lens.io.checkpoint  # noqa: F401

    path = Path(args.path) if args.path else ll.demo_gguf_path()
    started = time.perf_counter()
    ckpt = ll.Checkpoint(path)
    opened = time.perf_counter() - started
    cfg = ckpt.config
    size = path.stat().st_size
    print(f"{path.name}: {size / 1e6:.0f} MB, {ckpt.num_params / 1e6:.0f} M parameters, {cfg.n_layers} layers")
    print(f"{'open (header, config)':<34}{opened:8.2f} s")
    started = time.perf_counter()
    ll.load_tokenizer(path)
    print(f"{'tokenizer from the metadata':<34}{time.perf_counter() - started:8.2f} s")
    ours = run_child("llama_lens", str(path))
    run_child("llama_lens_layers", str(path))
    if args.skip_transformers:
        return
    theirs = run_child("transformers", str(path))
    print(
        f"ratio transformers / llama_lens: load time {theirs['seconds'] / ours['seconds']:.1f}, "
        f"peak RSS growth {theirs['growth'] / ours['growth']:.2f}"
    )


if __name__ == "__main__":
    main()
