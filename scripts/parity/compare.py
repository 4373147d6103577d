"""Prints, per parity fixture, how far `ll.load_dictionary` is from the reference package's recorded outputs
(what tests/dictionaries/test_parity.py asserts): the encode max |Δ|, rows whose active sets differ, and the
decode max |Δ| / ‖x‖; plus each fixture's size on disk.

    python scripts/parity/compare.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's llama_lens

import llama_lens as ll  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "dictionaries" / "fixtures"


def inputs() -> dict[str, torch.Tensor]:
    arrays = np.load(FIXTURES / "inputs.npz")
    out = {}
    for key in arrays.files:
        if key.endswith(".hi"):
            site = key[:-3]
            bits = (arrays[key].astype(np.uint32) << 24) | (arrays[f"{site}.lo"].astype(np.uint32) << 16)
            out[site] = torch.from_numpy(bits.view(np.float32).copy())
    return out


def reference_acts(ref, layer: int, n_rows: int, d_sae: int) -> torch.Tensor:
    counts = torch.from_numpy(ref[f"counts_{layer}"].astype(np.int64))
    dense = torch.zeros(n_rows, d_sae)
    rows = torch.repeat_interleave(torch.arange(n_rows), counts)
    dense[rows, torch.from_numpy(ref[f"indices_{layer}"].astype(np.int64))] = torch.from_numpy(ref[f"values_{layer}"])
    return dense


def main() -> None:
    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    xs_by_site = inputs()
    print(f"{'fixture':26s} {'MB':>5s} {'encode max|Δ|':>14s} {'rows≠':>6s} {'decode max|Δ|/‖x‖':>18s}  reference")
    for name, entry in sorted(manifest.items()):
        ref = np.load(FIXTURES / name / "reference.npz")
        loaded = ll.load_dictionary(FIXTURES / entry["folder"])
        xs = [xs_by_site[site] for site in entry["inputs"]]
        n_rows, n_decode = len(xs[0]), len(ref["decode_0"])
        if isinstance(loaded, ll.CrossLayerTranscoder):
            acts = loaded.encode(torch.stack(xs))
            decoded = loaded.decode(acts[:, :n_decode])
        else:
            layers = loaded if isinstance(loaded, list) else [loaded]
            acts = [d.encode(x) for d, x in zip(layers, xs)]
            decoded = [d.decode(a[:n_decode], x[:n_decode]) for d, a, x in zip(layers, acts, xs)]
        encode_delta = decode_delta = 0.0
        rows_differ = 0
        for layer, x in enumerate(xs):
            theirs = reference_acts(ref, layer, n_rows, acts[layer].shape[-1])
            encode_delta = max(encode_delta, float((acts[layer] - theirs).abs().max()))
            rows_differ += int(((acts[layer] != 0) != (theirs != 0)).any(-1).sum())
            delta = (decoded[layer] - torch.from_numpy(ref[f"decode_{layer}"])).abs().max(-1).values
            decode_delta = max(decode_delta, float((delta / x[:n_decode].norm(dim=-1)).max()))
        size = sum(p.stat().st_size for p in (FIXTURES / name).rglob("*") if p.is_file()) / 1e6
        print(f"{name:26s} {size:5.2f} {encode_delta:14.2e} {rows_differ:6d} {decode_delta:18.2e} {entry['reference']}")
    total = sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file()) / 1e6
    print(f"inputs.npz {(FIXTURES / 'inputs.npz').stat().st_size / 1e6:.2f} MB; fixtures in all {total:.2f} MB")


if __name__ == "__main__":
    main()
