"""Forward-pass speed against transformers, in one process, on the same weights (fp32, CPU by default).

Prints, for prompts of 32 and 512 tokens:
  forward ratio   = our model(tokens) time / transformers' model(tokens) time            (aim <= 1.0)
  cache ratio     = our run_with_cache(all hooks) time / transformers' forward with
                    output_hidden_states=True, output_attentions=True (eager attention)  (aim <= 1.0)
  same ratio      = our run_with_cache of the tensors transformers returns there (hook_embed, every
                    hook_resid_post and attn.hook_pattern) / the same transformers time    (aim <= 1.0)

The full cache keeps about five times the bytes transformers returns (q, k, v and their rotations, scores and
pattern, z, each head's result, the norms' scales, the MLP's hidden activations: 1.7 GB at 512 tokens against
0.3 GB), and every kept tensor is fresh memory the kernels fault in as they first write it; the "same" column
compares like with like. Each line ends with the load average (1 min) before and after its turns: above the CPU
count the ratios are noisy.

The five candidates run in turns and each figure is a median over the turns.

Usage: python scripts/bench_forward.py [PATH] [--lengths 32 512] [--repeats 7] [--device cuda] [--dtype bfloat16]
PATH defaults to the embedded SmolLM2-135M (ll.demo_model_path()). On CUDA, TF32 stays off (torch's default)
and every timing waits for the GPU to finish.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import llama_lens as ll


def interleaved_medians(candidates: dict, repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each candidate, run in turns (a, b, c, a, b, c, ...) so that other load on the machine
    and its clock and cache states fall on all of them alike."""

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # kernels run asynchronously: wait for them before reading the clock
        return time.perf_counter() - start

    for fn in candidates.values():
        timed(fn)  # warm-up: allocator, kernels, lazy init
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            times[name].append(timed(fn))
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", nargs="?", help="checkpoint folder (default: the embedded SmolLM2-135M)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 512])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    from transformers import LlamaForCausalLM

    path = args.path or str(ll.demo_model_path())
    ours = ll.load(path, dtype=dtype, device=device)
    hf_sdpa = LlamaForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    hf_eager = LlamaForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").to(device).eval()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"model: {path}  {args.dtype} on {where}")
    columns = (
        f"{'ours fwd':>10} {'hf fwd':>10} {'ratio':>6} {'ours cache':>11} {'hf h+attn':>10} {'ratio':>6} "
        f"{'ours same':>10} {'ratio':>6}"
    )
    # What transformers returns with output_hidden_states and output_attentions, in our hook names.
    same_tensors = [
        name
        for name in ours.hook_names
        if name == "hook_embed" or name.endswith(("hook_resid_post", "attn.hook_pattern"))
    ]
    print(f"{'tokens':>7} {columns}")
    for length in args.lengths:
        tokens = torch.randint(100, ours.cfg.d_vocab, (1, length)).to(device)
        candidates = {
            "ours": lambda: ours(tokens),
            "hf": lambda: hf_sdpa(tokens, use_cache=False),
            "ours cache": lambda: ours.run_with_cache(tokens),
            "ours same": lambda: ours.run_with_cache(tokens, names_filter=same_tensors),
            "hf all": lambda: hf_eager(tokens, use_cache=False, output_hidden_states=True, output_attentions=True),
        }
        load_before = os.getloadavg()[0]
        with torch.inference_mode():
            t = interleaved_medians(candidates, args.repeats, device)
        load_after = os.getloadavg()[0]
        t_ours, t_hf, t_cache, t_hf_all, t_same = t["ours"], t["hf"], t["ours cache"], t["hf all"], t["ours same"]
        print(
            f"{length:>7} {t_ours * 1e3:>8.1f}ms {t_hf * 1e3:>8.1f}ms {t_ours / t_hf:>6.2f} "
            f"{t_cache * 1e3:>9.1f}ms {t_hf_all * 1e3:>8.1f}ms {t_cache / t_hf_all:>6.2f} "
            f"{t_same * 1e3:>8.1f}ms {t_same / t_hf_all:>6.2f}   (load {load_before:.1f} -> {load_after:.1f})",
            flush=True,
        )


if __name__ == "__main__":
    main()
