"""Patching speed, in one process, on the embedded SmolLM2 (fp32, CPU by default), 15-token prompts.

Prints three ratios:

  sweep/loop = ll.patching's resid_pre sweep (every layer x every position: each run computing only the layers
               and positions from its patch on, batched with the runs that start at the same position) / the
               per-(layer, position) hook loop that TransformerLens' `get_act_patch_resid_pre` runs (one full
               hooked forward pass per patch)                                                       (aim <= 0.1)
  sweep/loop without the no-op shortcut = the same with `skip_unchanged=False`: the 7 leading positions the two
               prompts share (identical clean and corrupted activations) are run too, as any other
  attr/fb    = attribution patching over the same sites / one forward + backward pass of the same prompt   (aim <= 3)

Both sweeps are checked to agree before anything is timed. Times are medians over `--repeats` turns; the loop
is timed once per turn (it is the slow one).

Usage: python scripts/bench_patching.py [PATH] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import llama_lens as ll

CLEAN = "The Eiffel Tower is in the city of"
CORRUPTED = "The Colosseum is in the city of"
N_POS = 15


def fifteen_tokens(model, text: str) -> torch.Tensor:
    """The prompt's ids padded on the left with a neutral prefix to exactly N_POS tokens."""
    ids = model.to_tokens(text, prepend_bos=False)[0]
    prefix = model.to_tokens("Question: where is it? Answer briefly. Fact:", prepend_bos=False)[0]
    ids = torch.cat([prefix, ids])[-N_POS:]
    if ids.shape[0] != N_POS:
        raise SystemExit(f"could not build a {N_POS}-token prompt from {text!r}")
    return ids[None]


def naive_loop(model, corrupted, clean_cache, metric) -> torch.Tensor:
    """TransformerLens' recipe: one full forward pass per (layer, position) with a hook that patches it."""
    n_layers, pos = model.cfg.n_layers, corrupted.shape[1]
    scores = torch.empty(n_layers, pos)
    for layer in range(n_layers):
        name = f"blocks.{layer}.hook_resid_pre"
        for p in range(pos):

            def hook(act, *, hook, p=p, name=name):
                act[:, p] = clean_cache[name][:, p]

            with torch.no_grad():
                scores[layer, p] = float(metric(model.run_with_hooks(corrupted, fwd_hooks=[(name, hook)])))
    return scores


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", nargs="?", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = ll.load(args.path or ll.demo_model_path())
    clean, corrupted = fifteen_tokens(model, CLEAN), fifteen_tokens(model, CORRUPTED)
    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_resid_pre"))
        corrupted_logits = model(corrupted)
    metric = ll.patching.logit_diff_metric(model, clean_logits, corrupted_logits, " Paris", " Rome")
    print(f"{model.cfg.n_layers} layers x {N_POS} positions; clean {model.to_str_tokens(clean)}")

    def sweep():
        return ll.patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric, progress=False)

    def sweep_every_run():
        return ll.patching.patch_sweep(
            model, corrupted, clean_cache, metric, "resid_pre", skip_unchanged=False, progress=False
        )[0]

    def attribution():
        return ll.patching.attribution_patching(model, clean, corrupted, metric, sites="resid_pre")

    def forward_backward():
        model(corrupted, return_type="loss").backward()
        model.zero_grad(set_to_none=True)

    # Agreement first (and a warm-up of every path).
    loop_time, expected = timed(lambda: naive_loop(model, corrupted, clean_cache, metric))
    got, got_every_run = sweep(), sweep_every_run()
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(got_every_run, expected, atol=1e-3, rtol=1e-3)
    diff = max(float((got - expected).abs().max()), float((got_every_run - expected).abs().max()))
    print(f"both sweeps agree with the loop (max |diff| {diff:.2e})")
    attribution()
    forward_backward()

    loops, sweeps, every_runs, attrs, fbs = [loop_time], [], [], [], []
    for turn in range(args.repeats):
        sweeps.append(timed(sweep)[0])
        every_runs.append(timed(sweep_every_run)[0])
        attrs.append(timed(attribution)[0])
        fbs.append(timed(forward_backward)[0])
        if turn < args.repeats - 1:
            loops.append(timed(lambda: naive_loop(model, corrupted, clean_cache, metric))[0])
    loop, swept, every_run = statistics.median(loops), statistics.median(sweeps), statistics.median(every_runs)
    attr, fb = statistics.median(attrs), statistics.median(fbs)
    print(f"resid_pre sweep: ll.patching {swept:.2f} s, hook loop {loop:.2f} s -> sweep/loop = {swept / loop:.3f}")
    print(f"  without the no-op shortcut: {every_run:.2f} s -> sweep/loop = {every_run / loop:.3f}")
    print(f"attribution patching {attr:.3f} s, forward+backward {fb:.3f} s -> attr/fb = {attr / fb:.2f}")
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
