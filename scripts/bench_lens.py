"""Logit-lens speed, in one process, on the same weights (fp32, CPU by default).

The lens's floor is its unembedding matmul: read-outs × positions × d_model × d_vocab × 2 FLOPs. For each
prompt length this prints

  beyond/mm = (our logit_lens time - our forward time) / bare unembedding matmul time      (aim <= 1.15)
  lens/hf   = our logit_lens time / the transformers recipe's time                        (aim <= 0.8)
  lse/mm    = the same blocked matmul followed by nothing but each block's logsumexp (max, exponentials, their
              sum), / bare matmul time: what the least of the lens's metrics costs on this machine

and a roofline line: the lens's matmul FLOPs (forward and read-outs, llama_lens.loading.roofline) over its time,
against the float32 GEMM peak measured here on a [read-outs x tokens, d_model] x [d_model, d_mlp] product
(`roofline.measure_gemm_rate`), so that a regression shows as a share of the machine's own peak.

Read-outs: the embedding and every layer's resid_post (31 for SmolLM2, as many as transformers' hidden_states).
The bare matmul is F.linear over all those rows (normed), timed as one call, in the lens's own blocks
([chunk_size rows] × [VOCAB_BLOCK ids]) and in blocks of 1024 × 2048 and 1024 × 4096; the fastest counts. The
transformers recipe is the usual one: `output_hidden_states=True`, then for each hidden state model.model.norm
(except the last entry, which transformers has already normed) -> lm_head -> softmax -> top-k. Our lens computes more on
the same read-outs (entropy, KL to the final distribution, the target's probability / logit / rank).

The candidates run in turns (forward, lens, matmuls, recipe, forward, ...) so that other load on the machine
falls on all of them alike. The times are medians over the turns; the two ratios are medians of each turn's
own ratio (its lens against its forward pass, its matmuls and its recipe, all run within seconds of each
other), which a slow stretch of a shared machine moves less than a ratio of medians.

At long prompts (more than LONG tokens: 512 tokens make 15,872 read-out rows, 0.9 TFLOP per lens, ~30 s each on
2 cores) only the lens's own blocks and 1024 x 2048 blocks are timed as the bare matmul ("mm 1call" would write a
3.1 GB [rows, d_vocab] output, and "mm 1024x4096" and "mm+lse" add a minute a turn), the turns are --long-repeats
(3) without a separate warm-up (the short prompt's turns warmed the kernels), so that the 512-token line comes in
about 6 minutes on a quiet 2-core machine instead of half an hour. Each line prints the load average (1 min)
before and after its turns: above the CPU count the ratios are noisy.

Usage: python scripts/bench_lens.py [PATH] [--lengths 29 512] [--repeats 5] [--long-repeats 3] [--chunk-size N]
                                     [--vocab-block N] [--threads N]
PATH defaults to the embedded SmolLM2-135M (ll.demo_model_path()). Threads: torch's default unless given.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

import llama_lens as ll
from llama_lens.lens import readout
from llama_lens.loading import roofline

# Prompts longer than this run the short list of candidates, --long-repeats turns, no warm-up (see above).
LONG = 256
SHORT_ONLY = ("mm 1call", "mm 1024x4096", "mm+lse")


def interleaved_times(candidates: dict, repeats: int, *, warm_up: bool = True) -> dict[str, list[float]]:
    for fn in candidates.values() if warm_up else ():
        fn()  # warm-up: allocator, kernels, lazy init
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def cell_width(name: str) -> int:
    return max(7, len(name) - 2)


def transformers_recipe(hf, tokens: torch.Tensor, top_k: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = hf(tokens, output_hidden_states=True, use_cache=False)
    hidden = out.hidden_states  # embeddings, then each layer's output; the last entry is already normed
    results = []
    for i, h in enumerate(hidden):
        normed = h if i == len(hidden) - 1 else hf.model.norm(h)
        probs = torch.softmax(hf.lm_head(normed), dim=-1)
        results.append(torch.topk(probs, top_k, dim=-1))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", nargs="?", help="checkpoint folder (default: the embedded SmolLM2-135M)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[29, 512])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--long-repeats", type=int, default=3, help="turns for prompts over --long tokens")
    parser.add_argument("--long", type=int, default=LONG, help="prompts longer than this run the short list")
    parser.add_argument("--chunk-size", type=int, default=None, help="rows per chunk (default: the lens's)")
    parser.add_argument("--vocab-block", type=int, default=None, help="ids per block (default: the lens's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import LlamaForCausalLM

    chunk = args.chunk_size or readout.DEFAULT_CHUNK_SIZE
    if args.vocab_block:
        readout.VOCAB_BLOCK = args.vocab_block
    block = readout.VOCAB_BLOCK
    path = args.path or str(ll.demo_model_path())
    model = ll.load(path, dtype=torch.float32)
    hf = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cfg = model.cfg
    n_readouts = cfg.n_layers + 1  # the embedding and every layer's resid_post, as hidden_states has
    print(f"model: {path}  threads: {torch.get_num_threads()}  chunk: {chunk} rows x {block} ids  "
          f"repeats: {args.repeats} (interleaved)")  # fmt: skip
    names = ["forward", "lens", "mm 1call", "mm blocks", "mm 1024x2048", "mm 1024x4096", "hf recipe", "mm+lse"]
    header = " ".join(f"{name:>{cell_width(name) + 2}}" for name in names)
    print(f"{'tokens':>6} {'GFLOP':>6} {header} {'beyond/mm':>9} {'lens/hf':>7} {'lse/mm':>6}", flush=True)
    generator = torch.Generator().manual_seed(0)
    weight = model.unembed.weight
    for length in args.lengths:
        tokens = torch.randint(100, cfg.d_vocab, (1, length), generator=generator)
        target = int(tokens[0, -1])
        with torch.inference_mode():
            rows = model.ln_final(torch.randn(n_readouts * length, cfg.d_model, generator=generator))

        def blocked_matmul(chunk: int, block: int):
            def run():
                buffer = torch.empty(min(chunk, len(rows)) * min(block, cfg.d_vocab))  # reused, as the lens does
                for start in range(0, len(rows), chunk):
                    x = rows[start : start + chunk]
                    for v0 in range(0, cfg.d_vocab, block):
                        w = weight[v0 : v0 + block]
                        torch.mm(x, w.t(), out=buffer[: len(x) * len(w)].view(len(x), len(w)))

            return run

        def matmul_and_logsumexp():
            # The lens's blocks, each followed by the passes any logsumexp needs and nothing more: the part of
            # "beyond/mm" that no arrangement of the metrics can avoid (exp2 of a fused multiply-add, as the lens).
            size = min(chunk, len(rows)) * min(block, cfg.d_vocab)
            buffer, weights = torch.empty(size), torch.empty(size)
            for start in range(0, len(rows), chunk):
                x = rows[start : start + chunk]
                for v0 in range(0, cfg.d_vocab, block):
                    w = weight[v0 : v0 + block]
                    logits = torch.mm(x, w.t(), out=buffer[: len(x) * len(w)].view(len(x), len(w)))
                    shift = logits.amax(dim=1) * readout.LOG2_E
                    exps = weights[: logits.numel()].view_as(logits)
                    torch.add(-shift[:, None], logits, alpha=readout.LOG2_E, out=exps).exp2_().sum(dim=1)

        def inference(fn):
            def run():
                with torch.inference_mode():
                    return fn()

            return run

        candidates = {
            "forward": inference(lambda: model(tokens)),
            "lens": lambda: ll.logit_lens(model, tokens, target=target, chunk_size=chunk),
            "mm 1call": inference(lambda: F.linear(rows, weight)),
            # The lens's own blocks and two other shapes: the fastest of all the bare matmuls is the floor.
            "mm blocks": inference(blocked_matmul(chunk, block)),
            "mm 1024x2048": inference(blocked_matmul(1024, 2048)),
            "mm 1024x4096": inference(blocked_matmul(1024, 4096)),
            "hf recipe": inference(lambda: transformers_recipe(hf, tokens)),
            "mm+lse": inference(matmul_and_logsumexp),
        }
        long = length > args.long
        if long:
            candidates = {name: fn for name, fn in candidates.items() if name not in SHORT_ONLY}
        repeats = args.long_repeats if long else args.repeats
        load_before = os.getloadavg()[0]
        times = interleaved_times(candidates, repeats, warm_up=not long)
        load_after = os.getloadavg()[0]
        gflop = n_readouts * length * cfg.d_model * cfg.d_vocab * 2 / 1e9
        matmuls = [name for name in candidates if name.startswith("mm ")]
        beyond, versus_hf, least = [], [], []
        for turn in range(repeats):
            t = {name: values[turn] for name, values in times.items()}
            beyond.append((t["lens"] - t["forward"]) / min(t[name] for name in matmuls))
            versus_hf.append(t["lens"] / t["hf recipe"])
            if "mm+lse" in t:
                least.append(t["mm+lse"] / min(t[name] for name in matmuls))
        median = {name: statistics.median(values) for name, values in times.items()}
        assert set(candidates) <= set(names)
        cells = " ".join(
            f"{median[name] * 1e3:>{cell_width(name)}.0f}ms" if name in median else f"{'-':>{cell_width(name) + 2}}"
            for name in names
        )
        lse = f"{statistics.median(least):>6.3f}" if least else f"{'-':>6}"
        spread = f"(turns: beyond/mm {min(beyond):.3f}-{max(beyond):.3f}; load {load_before:.1f} -> {load_after:.1f})"
        print(f"{length:>6} {gflop:>6.0f} {cells} {statistics.median(beyond):>9.3f} "
              f"{statistics.median(versus_hf):>7.3f} {lse}   {spread}", flush=True)  # fmt: skip
        roofline_line(cfg, length, n_readouts, median["lens"], median["forward"])


def roofline_line(cfg, length: int, n_readouts: int, lens_seconds: float, forward_seconds: float) -> None:
    """Achieved GFLOP/s of the forward pass and of the lens, against the GEMM peak measured now."""
    peak = roofline.measure_gemm_rate(n_readouts * length, cfg.d_model, cfg.d_mlp)
    forward = roofline.layer_flops(cfg, tokens=length) + roofline.unembed_flops(cfg, rows=length)
    # The last read-out is the model's own output: n_readouts - 1 more through the unembedding.
    lens = roofline.layer_flops(cfg, tokens=length) + roofline.unembed_flops(cfg, rows=length, readouts=n_readouts - 1)
    lens_rate, forward_rate = lens / lens_seconds, forward / forward_seconds
    print(
        f"{'':>6} roofline: forward {forward_rate / 1e9:.1f} GFLOP/s, lens {lens_rate / 1e9:.1f} GFLOP/s = "
        f"{lens_rate / peak:.0%} of the float32 GEMM peak measured here, {peak / 1e9:.1f} GFLOP/s on "
        f"[{n_readouts * length}, {cfg.d_model}] x [{cfg.d_model}, {cfg.d_mlp}]",
        flush=True,
    )


if __name__ == "__main__":
    main()
