"""Patching speed, in one process, on the embedded SmolLM2 (fp32, CPU by default), against the hand-written loop.

The issue's case (`--case ioi`): an equal-length IOI pair ("When Mary and John went to the store, John/Mary gave a
drink to"), the clean cache of `model.run_with_cache(clean)`, and a metric written the TransformerLens way,
`lambda logits: logits[0, -1, mary] - logits[0, -1, john]`. Prints:

  resid_pre  = ll.patching.get_act_patch_resid_pre over all layers x every position / the hand loop (one hooked
               forward pass per (layer, position), TransformerLens' recipe)                         (aim <= 0.1)
  z by pos   = ll.patching.get_act_patch_attn_head_out_by_pos / the hand loop over (layer, position, head) (aim
               <= 0.1). The loop's n_layers x pos x n_heads passes all cost the same, so it is timed on one head
               per (layer, position), cycling through the heads, and scaled by n_heads (`--full-loop`: every pass;
               `--loop-every k` times every k-th pass of both loops, scaled by k, for a busy machine)
  attr/fb    = ll.patching.attribution_patching (clean forward, corrupted forward + backward) / one forward +
               backward pass (`model(tokens, return_type="loss").backward()`)                      (aim <= 1.0)

The older case (`--case eiffel`): 15-token prompts with the ready `logit_diff_metric`, the resid_pre sweep with and
without the no-op shortcut (`skip_unchanged=False` also runs the 7 shared leading positions).

A roofline line follows each case: GFLOP/s against the float32 GEMM peak measured here on a [pos x n_layers,
d_model] x [d_model, d_mlp] product (llama_lens.loading.roofline). For the sweeps the FLOPs are the hand loop's
(one whole forward pass per patch: what the sweep stands in for, so its "loop-equivalent" rate may pass the peak
where it skips work); for forward + backward they are its own (3 x a forward pass's matmuls).

Every sweep is checked against its loop (max |difference| <= 1e-4) before anything is timed. Times are medians over
`--repeats` turns; each loop is timed once (it is the slow one). The load average is printed with the ratios: on a
shared machine, rerun when it is high.

Usage: python scripts/bench_patching.py [PATH] [--case ioi|eiffel|all] [--repeats 3] [--threads N] [--full-loop]
       [--loop-every K]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import llama_lens as ll
from llama_lens.loading import roofline

TOLERANCE = 1e-4


def hand_loop(model, corrupted, clean_cache, metric, hook_suffix, patches) -> list[float]:
    """TransformerLens' recipe: one full forward pass per patch (layer, position[, head]) with a hook that writes
    the clean activation there."""
    scores = []
    for patch in patches:
        layer, where = patch[0], patch[1:]
        name = f"blocks.{layer}.{hook_suffix}"

        def hook(act, *, hook, where=where, name=name):
            act[(slice(None), *where)] = clean_cache[name][(slice(None), *where)]

        with torch.no_grad():
            scores.append(float(metric(model.run_with_hooks(corrupted, fwd_hooks=[(name, hook)]))))
    return scores


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def load_average() -> str:
    return f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)"


def check(name: str, got: torch.Tensor, expected: torch.Tensor) -> None:
    diff = float((got - expected).abs().max())
    print(f"  {name}: max |sweep - loop| = {diff:.2e}")
    if diff > TOLERANCE:
        raise SystemExit(f"{name}: the sweep differs from the loop by {diff:.2e} > {TOLERANCE}")


def forward_backward(model, tokens) -> None:
    model(tokens, return_type="loss").backward()
    model.zero_grad(set_to_none=True)


def ioi_case(model, repeats: int, full_loop: bool, loop_every: int) -> None:
    clean = model.to_tokens("When Mary and John went to the store, John gave a drink to")
    corrupted = model.to_tokens("When Mary and John went to the store, Mary gave a drink to")
    assert clean.shape == corrupted.shape
    mary, john = model.to_single_token(" Mary"), model.to_single_token(" John")

    def metric(logits):
        return logits[0, -1, mary] - logits[0, -1, john]

    with torch.no_grad():
        _, cache = model.run_with_cache(clean)
    n_layers, pos, n_heads = model.cfg.n_layers, clean.shape[1], model.cfg.n_heads
    print(f"IOI: {n_layers} layers x {pos} positions; clean {model.to_str_tokens(clean)}")

    def resid_pre():
        return ll.patching.get_act_patch_resid_pre(model, corrupted, cache, metric, progress=False)

    def z_by_pos():
        return ll.patching.get_act_patch_attn_head_out_by_pos(model, corrupted, cache, metric, progress=False)

    def attribution():
        return ll.patching.attribution_patching(model, clean, corrupted, metric, sites="resid_pre")

    # Every `loop_every`-th patch (each pass of a loop costs the same: one full forward pass), scaled back up.
    resid_patches = [(layer, p) for layer in range(n_layers) for p in range(pos)][::loop_every]
    z_patches = [
        (layer, p, h)
        for layer in range(n_layers)
        for p in range(pos)
        for h in range(n_heads)
        if full_loop or h == (layer + p) % n_heads
    ][::loop_every]
    resid_scale = loop_every
    z_scale = (1 if full_loop else n_heads) * loop_every

    def resid_loop():
        return hand_loop(model, corrupted, cache, metric, "hook_resid_pre", resid_patches)

    def z_loop():
        return hand_loop(model, corrupted, cache, metric, "attn.hook_z", z_patches)

    # Agreement first (and a warm-up of every path).
    resid_loop_time, expected = timed(resid_loop)
    got = resid_pre()
    check("resid_pre", torch.stack([got[patch] for patch in resid_patches]), torch.tensor(expected))
    resid_loop_time *= resid_scale
    z_loop_time, expected_z = timed(z_loop)
    got_z = z_by_pos()
    check("z by pos", torch.stack([got_z[patch] for patch in z_patches]), torch.tensor(expected_z))
    attribution()
    forward_backward(model, corrupted)

    sweeps, z_sweeps, attrs, fbs = [], [], [], []
    for _ in range(repeats):
        sweeps.append(timed(resid_pre)[0])
        z_sweeps.append(timed(z_by_pos)[0])
        attrs.append(timed(attribution)[0])
        fbs.append(timed(lambda: forward_backward(model, corrupted))[0])
    swept, z_swept = statistics.median(sweeps), statistics.median(z_sweeps)
    attr, fb = statistics.median(attrs), statistics.median(fbs)
    z_loop_full = z_loop_time * z_scale
    print(
        f"  resid_pre: get_act_patch_resid_pre {swept:.2f} s, hand loop {resid_loop_time:.2f} s "
        f"({len(resid_patches)} passes timed x {resid_scale}) -> sweep/loop = {swept / resid_loop_time:.3f}"
    )
    print(
        f"  z by pos: get_act_patch_attn_head_out_by_pos {z_swept:.2f} s, hand loop {z_loop_full:.2f} s "
        f"({len(z_patches)} passes timed x {z_scale}) -> sweep/loop = "
        f"{z_swept / z_loop_full:.3f}"
    )
    print(f"  attribution patching {attr:.3f} s, forward+backward {fb:.3f} s -> attr/fb = {attr / fb:.2f}")
    roofline_line(model.cfg, pos, {"resid_pre sweep": (swept, n_layers * pos), "z sweep": (z_swept, n_layers * pos *
                  n_heads), "forward+backward": (fb, 3)})  # fmt: skip
    print(f"  {load_average()}")


def roofline_line(cfg, pos: int, runs: dict[str, tuple[float, int]]) -> None:
    """Each run's GFLOP/s, (seconds, forward passes' worth of matmuls), against the GEMM peak measured now."""
    peak = roofline.measure_gemm_rate(pos * cfg.n_layers, cfg.d_model, cfg.d_mlp)
    per_pass = roofline.layer_flops(cfg, tokens=pos) + roofline.unembed_flops(cfg, rows=pos)
    rate = {name: passes * per_pass / seconds for name, (seconds, passes) in runs.items()}
    rates = ", ".join(f"{name} {value / 1e9:.1f} GFLOP/s ({value / peak:.0%})" for name, value in rate.items())
    print(f"  roofline: {rates} of the float32 GEMM peak measured here, {peak / 1e9:.1f} GFLOP/s")


EIFFEL_CLEAN, EIFFEL_CORRUPTED, N_POS = "The Eiffel Tower is in the city of", "The Colosseum is in the city of", 15


def fifteen_tokens(model, text: str) -> torch.Tensor:
    """The prompt's ids padded on the left with a neutral prefix to exactly N_POS tokens."""
    ids = model.to_tokens(text, prepend_bos=False)[0]
    prefix = model.to_tokens("Question: where is it? Answer briefly. Fact:", prepend_bos=False)[0]
    ids = torch.cat([prefix, ids])[-N_POS:]
    if ids.shape[0] != N_POS:
        raise SystemExit(f"could not build a {N_POS}-token prompt from {text!r}")
    return ids[None]


def eiffel_case(model, repeats: int) -> None:
    clean, corrupted = fifteen_tokens(model, EIFFEL_CLEAN), fifteen_tokens(model, EIFFEL_CORRUPTED)
    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_resid_pre"))
        corrupted_logits = model(corrupted)
    metric = ll.patching.logit_diff_metric(model, clean_logits, corrupted_logits, answer=" Paris", wrong=" Rome")
    n_layers = model.cfg.n_layers
    print(f"Eiffel: {n_layers} layers x {N_POS} positions, logit_diff_metric; clean {model.to_str_tokens(clean)}")

    def sweep():
        return ll.patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric, progress=False)

    def sweep_every_run():
        return ll.patching.patch_sweep(
            model, corrupted, clean_cache, metric, "resid_pre", skip_unchanged=False, progress=False
        )[0]

    patches = [(layer, p) for layer in range(n_layers) for p in range(N_POS)]
    loop_time, expected = timed(lambda: hand_loop(model, corrupted, clean_cache, metric, "hook_resid_pre", patches))
    expected = torch.tensor(expected).view(n_layers, N_POS)
    check("resid_pre", sweep(), expected)
    check("resid_pre, every run", sweep_every_run(), expected)
    swept = statistics.median(timed(sweep)[0] for _ in range(repeats))
    every_run = statistics.median(timed(sweep_every_run)[0] for _ in range(repeats))
    print(f"  resid_pre sweep {swept:.2f} s, hand loop {loop_time:.2f} s -> sweep/loop = {swept / loop_time:.3f}")
    print(f"  without the no-op shortcut: {every_run:.2f} s -> sweep/loop = {every_run / loop_time:.3f}")
    roofline_line(model.cfg, N_POS, {"sweep": (swept, len(patches)), "without the shortcut": (every_run, len(patches))})
    print(f"  {load_average()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", nargs="?", default=None)
    parser.add_argument("--case", choices=["ioi", "eiffel", "all"], default="all")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--full-loop", action="store_true", help="time every pass of the per-head loop")
    parser.add_argument(
        "--loop-every", type=int, default=1, help="time every k-th pass of the IOI loops, scaled by k (busy machines)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = ll.load(args.path or ll.demo_model_path())
    print(load_average())
    if args.case in ("ioi", "all"):
        ioi_case(model, args.repeats, args.full_loop, args.loop_every)
    if args.case in ("eiffel", "all"):
        eiffel_case(model, args.repeats)


if __name__ == "__main__":
    main()
