"""A streamed model with a dictionary spliced in: its peak RSS against `ll.plan(..., dictionaries=[...])`.

Each case runs in a fresh subprocess, so its peak RSS (ru_maxrss) is its own. The child opens the dictionary
(headers only), asks `ll.plan(path, stream=True, tokens=..., cache=None, dictionaries=[d])` for the peak RSS
(this process as it is, plus the plan's peak), then loads the model streamed, runs two spliced forward passes and
reports its peak RSS. The ratio measured / planned should lie within 0.9-1.1.

The dictionary is a SAELens-format TopK SAE at blocks.<layer>.hook_resid_post written here (random weights, float32,
d_sae features), so its encoder is held and its decoder read by rows: with 16,384 features at d_model 576 the
encoder is 38 MB, the decoder another 38 MB left on disk but for the rows that fire.

The parent process never imports torch: Linux carries the peak RSS across exec, so a child forked from a big
parent would report the parent's. (The children import this checkout's llama_lens.)

Usage: python scripts/bench_stream_dictionary.py [CHECKPOINT] [--tokens 128] [--dtype float32] [--d-sae 16384]
       (default CHECKPOINT: the embedded model, $LLAMA_LENS_HOME/models/SmolLM2-135M-Instruct)
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


def write_sae(folder: Path, *, d_model: int, d_sae: int, k: int, hook: str) -> Path:
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        "W_enc": torch.randn(d_model, d_sae, generator=generator) / d_model**0.5,
        "W_dec": torch.randn(d_sae, d_model, generator=generator) / d_sae**0.5,
        "b_enc": torch.zeros(d_sae),
        "b_dec": torch.zeros(d_model),
    }
    save_file(tensors, folder / "sae_weights.safetensors")
    cfg = {"architecture": "topk", "d_in": d_model, "d_sae": d_sae, "k": k, "dtype": "float32",
           "apply_b_dec_to_input": True, "metadata": {"hook_name": hook}}  # fmt: skip
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def child(path: str, sae: str, tokens: int, dtype: str, with_dictionary: bool) -> dict:
    import torch

    import llama_lens as ll

    dictionaries = [ll.load_dictionary(sae)] if with_dictionary else []
    plan = ll.plan(path, stream=True, tokens=tokens, dtype=dtype, cache=None, dictionaries=dictionaries)
    model = ll.load(path, stream=True, dtype=dtype, progress=False)
    ids = torch.randint(100, 40_000, (1, tokens), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), ll.spliced(model, dictionaries):
        for _ in range(2):
            model(ids)
    return {
        "planned_peak_rss": plan.peak_rss_bytes,
        "planned_dictionaries": plan.dictionary_bytes,
        "process_at_plan": plan.process_bytes,
        "peak_rss": peak_rss(),
        "dictionary_bytes_read": sum(d.bytes_read for d in dictionaries),
    }


def main() -> None:
    home = Path(os.environ.get("LLAMA_LENS_HOME", Path.home() / ".cache" / "llama_lens"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", default=str(home / "models" / "SmolLM2-135M-Instruct"))
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--d-sae", type=int, default=16384)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--child", nargs=2, metavar=("SAE", "WITH"))
    parser.add_argument("--write", metavar="SAE")
    args = parser.parse_args()
    d_model = json.loads((Path(args.path) / "config.json").read_text())["hidden_size"]
    if args.write:
        write_sae(
            Path(args.write), d_model=d_model, d_sae=args.d_sae, k=args.k, hook=f"blocks.{args.layer}.hook_resid_post"
        )
        return
    if args.child:
        result = child(args.path, args.child[0], args.tokens, args.dtype, args.child[1] == "1")
        print(json.dumps(result))
        return

    # Linux carries a process's peak RSS across exec, and a child starts at its parent's RSS: the parent stays
    # small (no torch), and the dictionary is written by a child of its own.
    root = str(Path(__file__).resolve().parents[1])
    env = os.environ | {"PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    with tempfile.TemporaryDirectory() as tmp:
        sae = Path(tmp) / "sae"
        write = [sys.executable, __file__, args.path, "--write", str(sae), "--d-sae", str(args.d_sae)]
        subprocess.run([*write, "--k", str(args.k), "--layer", str(args.layer)], check=True, env=env)
        print(f"{args.path}: streamed, {args.dtype}, {args.tokens} tokens; TopK SAE d_sae={args.d_sae} k={args.k} "
              f"(file {(sae / 'sae_weights.safetensors').stat().st_size / 1e6:.0f} MB); load average "
              f"{os.getloadavg()[0]:.2f}")  # fmt: skip
        for with_dictionary in (False, True):
            command = [sys.executable, __file__, args.path, "--tokens", str(args.tokens), "--dtype", args.dtype]
            command += ["--child", str(sae), "1" if with_dictionary else "0"]
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise SystemExit(done.stderr[-3000:])
            r = json.loads(done.stdout.strip().splitlines()[-1])
            label = "with the SAE" if with_dictionary else "no dictionary"
            ratio = r["peak_rss"] / r["planned_peak_rss"]
            print(
                f"  {label:<14} peak RSS {r['peak_rss'] / 1e6:7.1f} MB, planned {r['planned_peak_rss'] / 1e6:7.1f} MB "
                f"(process {r['process_at_plan'] / 1e6:.0f} MB + plan; dictionaries "
                f"{r['planned_dictionaries'] / 1e6:.1f} MB), measured/planned {ratio:.3f}; "
                f"dictionary bytes read {r['dictionary_bytes_read'] / 1e6:.1f} MB"
            )
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
