"""Trains a tuned lens on the embedded SmolLM2 from generated text and compares it with the logit lens.

Prints, on held-out generated text (another seed), the mean KL to the final distribution per translator for
the logit lens (an identity lens) and the tuned lens, their ratio over the middle layers, the training time
and the process's peak RSS. The lens is saved under $LLAMA_LENS_HOME/tuned_lens/<name> (not in the repo).

    python scripts/train_tuned_lens.py --steps 24 --tokens-per-step 64 --seq-len 64 [--stream]
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

import llama_lens as ll
from llama_lens.data.texts import generated_texts
from llama_lens.lens.train import mean_kl
from llama_lens.lens.tuned import TunedLens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--tokens-per-step", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--texts", type=int, default=400, help="generated training texts (seed 0)")
    parser.add_argument("--eval-rows", type=int, default=4, help="held-out rows of --seq-len tokens (seed 1)")
    parser.add_argument("--stream", action="store_true", help="load the model with stream=True")
    parser.add_argument("--name", default="smollm2-generated")
    args = parser.parse_args()

    model = ll.load(ll.demo_model_path(), stream=args.stream)
    start = time.perf_counter()
    lens = TunedLens.train(
        model,
        generated_texts(args.texts, seed=0),
        max_steps=args.steps,
        tokens_per_step=args.tokens_per_step,
        seq_len=args.seq_len,
        batch_tokens=args.tokens_per_step,
        lr=args.lr,
    )
    seconds = time.perf_counter() - start
    home = Path(os.environ.get("LLAMA_LENS_HOME", Path.home() / ".cache" / "llama_lens"))
    folder = lens.save(home / "tuned_lens" / args.name)

    held_out = generated_texts(50, seed=1)
    tuned = mean_kl(lens, model, texts=held_out, seq_len=args.seq_len, max_rows=args.eval_rows)
    logit = mean_kl(TunedLens.for_model(model), model, texts=held_out, seq_len=args.seq_len, max_rows=args.eval_rows)
    print(f"{'translator':>10} {'logit KL':>9} {'tuned KL':>9} {'ratio':>6}")
    for label in lens.labels:
        print(f"{label:>10} {logit[label]:9.3f} {tuned[label]:9.3f} {tuned[label] / logit[label]:6.3f}")
    n = len(lens.labels)
    middle = lens.labels[n // 4 : n - n // 4]
    logit_mid = sum(logit[label] for label in middle) / len(middle)
    tuned_mid = sum(tuned[label] for label in middle) / len(middle)
    print(
        f"middle translators {middle[0]}..{middle[-1]}: logit lens {logit_mid:.3f} nats, tuned lens {tuned_mid:.3f} "
        f"nats, ratio {tuned_mid / logit_mid:.3f}"
    )
    print(
        f"trained {lens.info['steps']} steps x {lens.info['tokens_per_step']} tokens in {seconds:.0f} s "
        f"(stream={args.stream}); first/last step loss {lens.losses[0]:.3f}/{lens.losses[-1]:.3f}; saved to {folder}"
    )
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
