"""Draws the logit-lens figure in the docs: SmolLM2-135M on "The Eiffel Tower is located in the city of".

Writes docs/logit_lens_paris.png (layer × position heatmap, coloured by the top token's probability) and
docs/logit_lens_paris_trajectory.png (" Paris" across layers at the last position), and prints the last
position's table: each read-out's top token and the rank and probability of " Paris".

Usage: python scripts/make_lens_figure.py [PATH] [--out docs]
PATH defaults to the embedded SmolLM2-135M (ll.demo_model_path()).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import llama_lens as ll

PROMPT = "The Eiffel Tower is located in the city of"
TARGET = " Paris"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", nargs="?", help="checkpoint folder (default: the embedded SmolLM2-135M)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs"))
    args = parser.parse_args()

    model = ll.load(args.path or ll.demo_model_path(), dtype=torch.float32)
    lens = ll.logit_lens(model, PROMPT, target=TARGET)
    frame = lens.to_frame()
    last = frame[frame.position == frame.position.max()]
    print(last[["label", "top_token", "top_prob", "target_rank", "target_prob", "entropy", "kl_to_final"]]
          .to_string(index=False, float_format=lambda v: f"{v:.3g}"))  # fmt: skip

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    heatmap = lens.plot("prob")
    heatmap.savefig(out / "logit_lens_paris.png", dpi=110)
    lens.plot_trajectory().savefig(out / "logit_lens_paris_trajectory.png", dpi=110)
    print(f"wrote {out / 'logit_lens_paris.png'} and {out / 'logit_lens_paris_trajectory.png'}")


if __name__ == "__main__":
    main()
