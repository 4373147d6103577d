"""Opening a big dictionary: time and memory of `ll.load_dictionary` on a 131,072 × 4,096 bf16 SAELens SAE
(Llama Scope's width at Llama-3.1-8B's d_model; W_enc and W_dec 1 GiB each), and of reading the decoder rows
of the features a 64-token feature lens would show.

    python scripts/bench_dictionary_open.py [--dir DIR]

The file is written sparse (a real header, then the file extended to its full size with zeros), so writing it
takes milliseconds and no disk blocks; what is measured is what opening costs, not what the weights hold. Each
measurement runs in a fresh subprocess, which prints its own wall time, its resident memory before and after
(VmRSS) and its peak (getrusage), so the figures leave out this process and the ones before.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
D_SAE, D_IN = 131_072, 4_096

PROBE = r"""
import json, resource, sys, time
sys.path.insert(0, {repo!r})
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
import torch
import llama_lens as ll
import llama_lens.dictionaries.load  # the lazy ll.load_dictionary import, done before the clock
before = rss_mb()
start = time.perf_counter()
sae = ll.load_dictionary({path!r})
open_s = time.perf_counter() - start
after_open = rss_mb()
# a 64-token feature lens: ~30 active features a token, ~1,500 distinct among 131,072
ids = torch.randperm({d_sae}, generator=torch.Generator().manual_seed(0))[:1500]
start = time.perf_counter()
rows = sae.W_dec_rows(ids)
rows_s = time.perf_counter() - start
print(json.dumps({{
    "open_s": open_s, "rss_before_mb": before, "rss_after_open_mb": after_open,
    "rows_s": rows_s, "rows_bytes_read": sae.bytes_read, "rss_after_rows_mb": rss_mb(),
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}}))
"""


def write_sparse_saelens(folder: Path) -> int:
    """cfg.json and a sae_weights.safetensors whose tensors are holes; returns the file size."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {"W_enc": (D_IN, D_SAE), "W_dec": (D_SAE, D_IN), "b_enc": (D_SAE,), "b_dec": (D_IN,)}
    header, offset = {}, 0
    for name, shape in sizes.items():
        n_bytes = 2 * (shape[0] * (shape[1] if len(shape) > 1 else 1))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n_bytes]}
        offset += n_bytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = folder / "sae_weights.safetensors"
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(raw)) + raw)
        file.truncate(8 + len(raw) + offset)
    cfg = {
        "architecture": "standard",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "bfloat16",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "metadata": {"hook_name": "blocks.12.hook_resid_post", "sae_lens_version": "6.54.12"},
    }
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=None, help="where to write the dictionary (default: a temp dir)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp) / "blocks.12.hook_resid_post"
        size = write_sparse_saelens(folder)
        print(f"{folder}: {D_SAE:,} x {D_IN:,} bf16, sae_weights.safetensors {size / 2**30:.2f} GiB (sparse)")
        print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
        probe = PROBE.format(repo=str(REPO), path=str(folder), d_sae=D_SAE)
        for run in range(args.repeat):
            out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            grown = r["rss_after_open_mb"] - r["rss_before_mb"]
            print(
                f"run {run}: open {r['open_s'] * 1e3:.1f} ms, RSS +{grown:.1f} MB "
                f"({r['rss_before_mb']:.0f} -> {r['rss_after_open_mb']:.0f} MB); 1,500 decoder rows "
                f"{r['rows_s'] * 1e3:.1f} ms, {r['rows_bytes_read'] / 2**20:.1f} MiB read, RSS "
                f"{r['rss_after_rows_mb']:.0f} MB, peak {r['peak_rss_mb']:.0f} MB"
            )
        print(f"load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
