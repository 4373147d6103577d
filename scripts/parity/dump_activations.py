"""Real activations of the embedded model at the parity fixtures' sites, for scripts/parity/record.py.

Runs in the project's environment (the parity environment has no llama_lens model loader of its own):

    python scripts/parity/dump_activations.py tests/dictionaries/fixtures/inputs.npz

The text is the project's own prose (README.md and docs/*.md), cut into 128-token windows; position 0 of each
window (the attention sink, whose residual stream carries the model's outsized activations) is left out. Each site
keeps N_ROWS rows, rounded to bf16 (so the fp32 values the fixtures compare on are exact in 16 bits) and stored
as their bf16 bit patterns split into high and low bytes (`<site>.hi`, `<site>.lo`, uint8 [N_ROWS, width]) in a
compressed npz: the high bytes (sign and exponent) compress well apart from the noisy low ones.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's llama_lens

import llama_lens as ll  # noqa: E402
from llama_lens.loading.demo import demo_model_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
N_ROWS = 4096
WINDOW = 128
# SAEs read the residual stream; transcoders (SAELens, sparsify, and the layer-0/1 sets of circuit-tracer) read
# the MLP's input after its norm.
SITES = ("blocks.1.hook_resid_post", "blocks.0.mlp.hook_in", "blocks.1.mlp.hook_in")


def text() -> str:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return "\n\n".join(path.read_text() for path in files)


def main(out: Path) -> None:
    model = ll.load(demo_model_path(), dtype=torch.float32, layers=range(0, 2), progress=False)
    ids = model.to_tokens(text(), prepend_bos=False)[0]
    n_windows = -(-N_ROWS // (WINDOW - 1))
    if len(ids) < n_windows * WINDOW:
        raise SystemExit(f"only {len(ids)} tokens of text; {n_windows * WINDOW} needed")
    tokens = ids[: n_windows * WINDOW].reshape(n_windows, WINDOW)
    rows: dict[str, list[torch.Tensor]] = {site: [] for site in SITES}
    with torch.no_grad():
        for first in range(0, n_windows, 8):
            _, cache = model.run_with_cache(tokens[first : first + 8], names_filter=lambda name: name in SITES)
            for site in SITES:
                rows[site].append(cache[site][:, 1:].reshape(-1, cache[site].shape[-1]))
    arrays = {}
    for site in SITES:
        x = torch.cat(rows[site])[:N_ROWS].to(torch.bfloat16)
        bits = x.view(torch.int16).numpy().view(np.uint16)
        arrays[f"{site}.hi"], arrays[f"{site}.lo"] = (bits >> 8).astype(np.uint8), (bits & 0xFF).astype(np.uint8)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    print(f"{out}: {N_ROWS} rows at {', '.join(SITES)}; {out.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests/dictionaries/fixtures/inputs.npz")
