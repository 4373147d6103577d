"""bfloat16 products on this CPU: PyTorch's native kernel against float32 compute of the same inputs (cpu_matmul.py).

    python scripts/bench_cpu_matmul.py [--tokens 32] [--vocab-fraction 8] [--repeat 2]

In one process, with LLAMA_LENS_CPU_MATMUL switched between "native" and "float32":

  (a) one Llama-3.2-3B-shaped decoder layer (d_model 3072, 24 heads, 8 KV heads, d_mlp 8192) forward over
      --tokens positions, bfloat16 random weights;
  (b) the lens read-out of 28 read-outs x --tokens rows against a 128256 x 3072 bfloat16 unembedding, run on
      1/--vocab-fraction of the vocabulary and scaled up (the time grows with the vocabulary);
  (c) the row count at which float32 compute starts to pay for one [8192, 3072] weight (cpu_matmul.MIN_ROWS).

Each prints native / float32 time and each path's max abs difference from a float64 computation of the same
bfloat16 inputs: the float32 path should be no farther (both round a float32 accumulation once). The CPUs may
be shared: the load average is printed, and timings are noisy when it is above the CPU count.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch

from llama_lens.config import LlamaConfig
from llama_lens.lens.readout import read_out
from llama_lens.model import cpu_matmul
from llama_lens.model.attention import rope_cos_sin
from llama_lens.model.llama import Block


def set_mode(value: str) -> None:
    os.environ[cpu_matmul.ENV_VAR] = value
    cpu_matmul.mode.cache_clear()


def best_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def layer_3b(tokens: int, repeat: int) -> None:
    cfg = LlamaConfig(
        d_model=3072, n_layers=28, n_heads=24, n_kv_heads=8, d_head=128, d_mlp=8192, d_vocab=128256,
        rope_theta=500000.0, norm_eps=1e-5, max_position_embeddings=131072, bos_token_id=1, eos_token_ids=(2,),
    )  # fmt: skip
    block = Block(cfg, 0)
    with torch.no_grad():
        for param in block.parameters():
            param.copy_(torch.randn_like(param) * (0.02 if param.dim() == 2 else 1.0))
    block = block.to(torch.bfloat16)
    x = torch.randn(1, tokens, cfg.d_model).bfloat16()
    positions = torch.arange(tokens)[None]
    cos, sin = rope_cos_sin(cfg, positions, dtype=torch.bfloat16)
    with torch.no_grad():
        exact = copy.deepcopy(block).double()(
            x.double(), *rope_cos_sin(cfg, positions, dtype=torch.float64), None, None
        )
        results = {}
        for mode in ("native", "float32"):
            set_mode(mode)
            out = block(x, cos, sin, None, None)
            seconds = best_time(lambda: block(x, cos, sin, None, None), repeat)
            results[mode] = seconds, (out.double() - exact).abs().max().item()
    flops = 2 * tokens * sum(p.numel() for p in block.parameters() if p.dim() == 2)
    (native, native_err), (ours, our_err) = results["native"], results["float32"]
    print(f"(a) 3B layer forward, {tokens} tokens ({flops / 1e9:.1f} GFLOP): native bf16 {native:.3f} s "
          f"({flops / native / 1e9:.1f} GFLOPS), float32 compute {ours:.3f} s ({flops / ours / 1e9:.1f} GFLOPS); "
          f"native / float32 = {native / ours:.2f}")  # fmt: skip
    print(f"    max abs diff from float64: native {native_err:.3e}, float32 compute {our_err:.3e}")


def lens_readout(tokens: int, fraction: int, repeat: int) -> None:
    d_vocab, d_model, n_readouts = 128256 // fraction, 3072, 28
    weight = (torch.randn(d_vocab, d_model) * 0.02).bfloat16()
    normed = torch.randn(tokens, n_readouts, d_model).bfloat16()
    final_logits = torch.randn(tokens, d_vocab)
    exact = normed.double() @ weight.double().T  # [tokens, n_readouts, d_vocab]
    results = {}
    for mode in ("native", "float32"):
        set_mode(mode)
        _, metrics = read_out(normed, weight, final_logits=final_logits, top_k=5, keep_logits=True)
        seconds = best_time(lambda: read_out(normed, weight, final_logits=final_logits, top_k=5), repeat)
        results[mode] = seconds * fraction, (metrics.logits.double() - exact).abs().max().item()
    flops = 2 * tokens * n_readouts * 128256 * d_model
    (native, native_err), (ours, our_err) = results["native"], results["float32"]
    print(f"(b) lens read-out, {n_readouts} x {tokens} rows x 128256 x 3072 ({flops / 1e12:.2f} TFLOP; 1/{fraction} "
          f"run, times x{fraction}): native bf16 {native:.1f} s, float32 compute {ours:.1f} s; "
          f"native / float32 = {native / ours:.2f}")  # fmt: skip
    print(f"    max abs diff of the logits from float64: native {native_err:.3e}, float32 compute {our_err:.3e}")


def crossover(repeat: int) -> None:
    weight = torch.randn(8192, 3072).bfloat16()
    ratios = []
    for rows in (16, 32, 48, 64, 128):
        x = torch.randn(rows, 3072).bfloat16()
        times = {}
        for mode in ("native", "float32"):
            set_mode(mode)
            times[mode] = best_time(lambda: cpu_matmul.linear(x, weight), repeat)
        ratios.append(f"{rows}: {times['native'] / times['float32']:.2f}")
    print(f"(c) native / float32 time for x [rows, 3072] @ [8192, 3072].T, by rows (MIN_ROWS = "
          f"{cpu_matmul.MIN_ROWS}): " + ", ".join(ratios))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--vocab-fraction", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}, "
          f"native bf16 units: {cpu_matmul.has_native_support(torch.bfloat16)}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")  # fmt: skip
    layer_3b(args.tokens, args.repeat)
    lens_readout(args.tokens, args.vocab_fraction, args.repeat)
    crossover(args.repeat)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
