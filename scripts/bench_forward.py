"""Forward-pass speed against transformers, in one process, on the same weights (fp32, CPU by default).

Prints, for prompts of 32 and 512 tokens:
  forward ratio   = our model(tokens) time / transformers' model(tokens) time            (aim <= 1.0)
  cache ratio     = our run_with_cache(all hooks) time / transformers' forward with
                    output_hidden_states=True, output_attentions=True (eager attention)  (aim <= 1.3)

Usage: python scripts/bench_forward.py [PATH] [--lengths 32 512] [--repeats 5] [--device cuda] [--dtype bfloat16]
PATH defaults to the embedded SmolLM2-135M (ll.demo_model_path()). On CUDA, TF32 stays off (torch's default)
and every timing waits for the GPU to finish.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import llama_lens as ll


def median_time(fn, repeats: int, device: torch.device) -> float:
    def timed() -> float:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # kernels run asynchronously: wait for them before reading the clock
        return time.perf_counter() - start

    timed()  # warm-up: allocator, kernels, lazy init
    return statistics.median(timed() for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", nargs="?", help="checkpoint folder (default: the embedded SmolLM2-135M)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 512])
    parser.add_argument("--repeats", type=int, default=5)
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
    print(f"{'tokens':>7} {'ours fwd':>10} {'hf fwd':>10} {'ratio':>6} {'ours cache':>11} {'hf h+attn':>10} {'ratio':>6}")
    for length in args.lengths:
        tokens = torch.randint(100, ours.cfg.d_vocab, (1, length)).to(device)
        with torch.inference_mode():
            t_ours = median_time(lambda: ours(tokens), args.repeats, device)
            t_hf = median_time(lambda: hf_sdpa(tokens, use_cache=False), args.repeats, device)
            t_cache = median_time(lambda: ours.run_with_cache(tokens), args.repeats, device)
            t_hf_all = median_time(
                lambda: hf_eager(tokens, use_cache=False, output_hidden_states=True, output_attentions=True),
                args.repeats,
                device,
            )
        print(
            f"{length:>7} {t_ours * 1e3:>8.1f}ms {t_hf * 1e3:>8.1f}ms {t_ours / t_hf:>6.2f} "
            f"{t_cache * 1e3:>9.1f}ms {t_hf_all * 1e3:>8.1f}ms {t_cache / t_hf_all:>6.2f}"
        )


if __name__ == "__main__":
    main()
