"""One splice of a TopK SAE, alone: the peak RSS it adds against `Dictionary.splice_memory`'s working bytes.

Each case runs in a fresh subprocess that opens the SAE, reads its encoder and biases (what the plan holds) and
warms the splice on 4 rows; then it splices `rows` rows of the activation (float32 or bfloat16, as a streamed
model in that dtype hands them over) and reports the peak RSS the splice added. The SAE is the one
scripts/bench_stream_dictionary.py writes (random, float32, d_model 576 of the embedded model, 16,384 features,
k = 32). The parent never imports torch (Linux carries the peak RSS across exec).

Usage: python scripts/bench_splice_memory.py [--rows 128 512 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def child(sae_path: str, rows: int, dtype: str) -> dict:
    import torch

    import llama_lens as ll
    from llama_lens.dictionaries.splice import splice_hooks

    torch.set_num_threads(1)
    sae = ll.load_dictionary(sae_path)
    for name in ("W_enc", "b_enc", "b_dec"):
        sae.param(name)
    x = torch.randn(1, rows, sae.d_in, generator=torch.Generator().manual_seed(0)).to(getattr(torch, dtype))
    ((_, splice),) = splice_hooks(_Points(sae.hook_out), sae)  # the splice's forward hook
    with torch.inference_mode():
        splice(x[:, :4], hook=None)
        before = peak_rss()
        splice(x, hook=None)
        after = peak_rss()
    return {"measured": after - before, "planned": sae.splice_memory(rows)[1]}


class _Points:
    """Just the hook names `splice_hooks` checks."""

    def __init__(self, name: str) -> None:
        self.hook_dict = {name: None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--child", nargs=3, metavar=("SAE", "ROWS", "DTYPE"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.child[2])))
        return
    root = Path(__file__).resolve().parents[1]
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    home = Path(os.environ.get("LLAMA_LENS_HOME", Path.home() / ".cache" / "llama_lens"))
    demo = str(home / "models" / "SmolLM2-135M-Instruct")
    with tempfile.TemporaryDirectory() as tmp:
        sae = str(Path(tmp) / "sae")
        subprocess.run([sys.executable, str(root / "scripts" / "bench_stream_dictionary.py"), demo, "--write", sae],
                       check=True, env=env)  # fmt: skip
        print(f"TopK SAE d_sae=16384 k=32 at d_model 576, one splice; load average {os.getloadavg()[0]:.2f}")
        for dtype in ("float32", "bfloat16"):
            for rows in args.rows:
                command = [sys.executable, __file__, "--child", sae, str(rows), dtype]
                done = subprocess.run(command, capture_output=True, text=True, env=env)
                if done.returncode != 0:
                    raise SystemExit(done.stderr[-3000:])
                r = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"  {dtype:<8} {rows:5} rows: splice added {r['measured'] / 1e6:6.1f} MB, planned working "
                      f"{r['planned'] / 1e6:6.1f} MB, measured/planned {r['measured'] / r['planned']:.2f}")  # fmt: skip
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
