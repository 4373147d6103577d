"""Cost of the NaN/inf check made on every weight read (`llama_lens.files.warn_if_not_finite`).

Loads the same checkpoint (files in the page cache, index cached: the fastest a read can be) with the check
and with it replaced by a no-op, alternating, and prints the median load time of each and their ratio. Against
a read from disk the check costs less still.

    python scripts/bench_finite_check.py                       # the embedded default model (SmolLM2-135M, bf16)
    python scripts/bench_finite_check.py --dtype float32 --repeat 5 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", help="a checkpoint folder (default: the embedded default model)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()

    import torch

    import llama_lens as ll
    from llama_lens import files
    from llama_lens.io import checkpoint, gguf, pth, safetensors

    # The check runs where tensors are read: in each format's reader, and on rows in the Checkpoint.
    checking_modules = (checkpoint, gguf, pth, safetensors)

    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt = ll.Checkpoint(args.path or ll.demo_model_path())
    dtype = getattr(torch, args.dtype)
    ckpt.state_dict(dtype=dtype)  # into the page cache
    times: dict[str, list[float]] = {"with the check": [], "without": []}
    for _ in range(args.repeat):
        for label, check in (("with the check", files.warn_if_not_finite), ("without", lambda tensor, what: None)):
            for module in checking_modules:
                module.warn_if_not_finite = check
            started = time.perf_counter()
            ckpt.state_dict(dtype=dtype)
            times[label].append(time.perf_counter() - started)
    for module in checking_modules:
        module.warn_if_not_finite = files.warn_if_not_finite
    medians = {label: statistics.median(values) for label, values in times.items()}
    print(
        f"{ckpt.path.name}, loaded as {args.dtype}, torch threads {torch.get_num_threads()}, {args.repeat} loads each"
    )
    for label, median in medians.items():
        print(f"  {label:>15}: median {median * 1e3:7.1f} ms")
    print(f"with / without (medians): {medians['with the check'] / medians['without']:.2f}")


if __name__ == "__main__":
    main()
