"""Steering and feature attribution on the embedded SmolLM2-135M-Instruct (fp32, CPU), as ratios to the plain
runs they add to, with the peak RSS of the process that ran them.

  steer/plain     greedy generate (PROMPTS prompts x TOKENS tokens, KV cache) steered at one layer ÷ unsteered
  attr/forward    ll.feature_attribution with top_n=0 (one forward + one backward, two dictionaries spliced)
                  ÷ one plain forward pass of the prompt
  ablate/loop     the batched ablation of the top N nodes (ll.ablate_features: one clean spliced pass, then
                  the clean row and N ablations in one batch) ÷ N + 1 plain forward passes of the prompt
                  (what a loop of single ablated runs costs at the least)
  nodes           how many nodes (active features + error terms) the attribution scored
  peak RSS        of the child process that ran everything (resource.getrusage)

The dictionaries are random TopK SAEs (d_sae 4096, k 32) at blocks.10 and blocks.20 hook_resid_post, written
to a temporary folder. Timings are medians of --repeats; the machine's load average is printed beside them.

Usage: python scripts/bench_features.py [--repeats 3] [--top-n 32] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROMPT = "The Eiffel Tower is located in the city of Paris, and the Colosseum is located in the city of"
PROMPTS, TOKENS = 8, 16


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def child(repeats: int, top_n: int, threads: int | None) -> dict:
    import resource

    import torch

    sys.path[:0] = [str(REPO), str(REPO / "tests")]  # this checkout's package, and the tests' dictionary writer
    from support.dictionaries import write_saelens

    import llama_lens as ll

    if threads:
        torch.set_num_threads(threads)
    model = ll.load(ll.demo_model_path(), dtype=torch.float32, progress=False)
    d_model = model.cfg.d_model
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        saes = [
            ll.load_dictionary(
                write_saelens(Path(folder) / f"sae{layer}", f"blocks.{layer}.hook_resid_post", architecture="topk",
                              d_in=d_model, d_sae=4096, k=32)
            )
            for layer in (10, 20)
        ]  # fmt: skip
        tokens = model.prepare_tokens(PROMPT)[0]
        paris, rome = model.to_single_token(" Paris"), model.to_single_token(" Rome")

        def metric(logits):
            return logits[0, -1, paris] - logits[0, -1, rome]

        with torch.no_grad():
            forward = _median_seconds(lambda: model(tokens), repeats)
        attribution = _median_seconds(lambda: ll.feature_attribution(model, tokens, saes, metric, top_n=0), repeats)
        result = ll.feature_attribution(model, tokens, saes, metric, top_n=0)
        frame = result.to_frame()
        top = frame[frame.kind == "feature"].head(top_n)
        nodes = list(zip(top.site, top.position, top.feature))
        ablation = _median_seconds(lambda: ll.ablate_features(model, tokens, saes, nodes, metric), repeats)

        prompts = [f"{PROMPT} {i}" for i in range(PROMPTS)]
        vector = torch.randn(d_model) * 4

        def generate():
            model.generate(prompts, max_new_tokens=TOKENS, temperature=0, stop_at_eos=False)

        def steered():
            with ll.steer(model, vector, layers=[12], positions="generated"):
                generate()

        plain_gen, steered_gen = _median_seconds(generate, repeats), _median_seconds(steered, repeats)
    return {
        "forward_s": forward,
        "attribution_s": attribution,
        "attr/forward": attribution / forward,
        "ablation_s": ablation,
        "ablate/loop": ablation / ((len(nodes) + 1) * forward),
        "ablated": len(nodes),
        "nodes": len(result),
        "generate_s": plain_gen,
        "steer/plain": steered_gen / plain_gen,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top-n", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.repeats, args.top_n, args.threads)))
        return
    load_before = os.getloadavg()
    command = [sys.executable, __file__, "--child", "--repeats", str(args.repeats), "--top-n", str(args.top_n)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    run = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if run.returncode != 0:
        sys.exit(f"the benchmark's process failed:\n{run.stderr[-3000:]}")
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    load_after = os.getloadavg()
    for key, value in figures.items():
        print(f"{key:>14}  {value:.3f}" if isinstance(value, float) else f"{key:>14}  {value}")
    print(f"{'load average':>14}  {load_before[0]:.2f} before, {load_after[0]:.2f} after (1 min)")


if __name__ == "__main__":
    main()
