"""The feature lens on the embedded SmolLM2-135M with one random SAELens dictionary per layer: what it reads
from the dictionaries' files, how long it takes, and what the explorer ships.

Writes `--layers` random standard SAEs (d_sae `--d-sae`, float32, at blocks.{i}.hook_resid_post) to a temporary
folder, runs `ll.feature_lens` over a prompt of `--tokens` tokens with `--top-k`, and prints:

  rows read     decoder rows read ÷ decoder rows in the files (and the bytes of each)
  read/total    every byte read from the files (encoders whole, reported decoder rows) ÷ the files' tensor bytes
  seconds       the feature lens's wall time (the forward pass, the encoders, the read-outs), and its ratio to
                one plain forward pass of the same tokens (`model(tokens)`, logits included)
  payload       the FeatureExplorer's payload (meta JSON + deflated arrays) in MB, and its distinct features
  peak RSS      of this process (resource.getrusage)

Random dictionaries are not trained ones (their features recur along a prompt differently), so the payload here
is an example, not a bound; tests/widgets/test_feature_explorer.py checks the bound on a Zipf-law result. The
load average is printed beside the figures: the machine may be shared.

Usage: python scripts/bench_feature_lens.py [--layers 30] [--tokens 300] [--top-k 10] [--d-sae 4096]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import llama_lens as ll  # noqa: E402
from llama_lens.widgets.feature_data import pack  # noqa: E402

PARAGRAPH = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after the "
    "engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. "
)


def write_sae(folder: Path, hook: str, d_in: int, d_sae: int, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "W_enc": torch.randn(d_in, d_sae, generator=g) / d_in**0.5,
        "b_enc": torch.randn(d_sae, generator=g) * 0.1 - 0.5,
        "W_dec": torch.randn(d_sae, d_in, generator=g) / d_in**0.5,
        "b_dec": torch.zeros(d_in),
    }
    folder.mkdir(parents=True)
    save_file(tensors, folder / "sae_weights.safetensors")
    cfg = {"architecture": "standard", "d_in": d_in, "d_sae": d_sae, "dtype": "float32",
           "apply_b_dec_to_input": True, "metadata": {"hook_name": hook, "sae_lens_version": "6.54.12"}}  # fmt: skip
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--d-sae", type=int, default=4096)
    args = parser.parse_args()
    model = ll.load(ll.demo_model_path(), dtype=torch.float32, progress=False)
    tokens = model.to_tokens(PARAGRAPH * 20)[:, : args.tokens]
    with torch.no_grad():
        started = time.perf_counter()
        model(tokens)
        forward = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        saes = [
            ll.load_dictionary(write_sae(Path(tmp) / f"l{i}", f"blocks.{i}.hook_resid_post", 576, args.d_sae, i))
            for i in range(args.layers)
        ]
        started = time.perf_counter()
        result = ll.feature_lens(model, tokens, saes, target=" Paris", top_k=args.top_k)
        seconds = time.perf_counter() - started
        row_bytes = 576 * 4
        rows = sum(len(r.features) for r in result.readouts)
        total_rows = args.layers * args.d_sae
        read = sum(s.bytes_read for s in saes)
        files = sum((Path(s.path) / "sae_weights.safetensors").stat().st_size for s in saes)
        meta, data = pack(result)
        payload = len(json.dumps(meta)) + len(data)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"feature lens: {args.layers} SAEs x {tokens.shape[1]} tokens, top-{args.top_k}, d_sae {args.d_sae}")
    print(f"  rows read   {rows} / {total_rows} decoder rows = {rows / total_rows:.3f} "
          f"({rows * row_bytes / 1e6:.2f} MB of {total_rows * row_bytes / 1e6:.1f} MB)")  # fmt: skip
    print(f"  read/total  {read / 1e6:.1f} MB / {files / 1e6:.1f} MB = {read / files:.3f}")
    print(f"  seconds     {seconds:.2f} (a plain forward pass: {forward:.2f}; ratio {seconds / forward:.1f})")
    print(f"  payload     {payload / 1e6:.3f} MB ({sum(meta['n_unique'])} distinct features)")
    print(f"  peak RSS    {peak:.0f} MB")
    print(f"  load avg    {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
