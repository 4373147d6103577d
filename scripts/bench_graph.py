"""Attribution graph cost, ours against circuit-tracer 0.5.0, side by side on this machine.

SmolLM2-135M-Instruct (float32), 30 random ReLU transcoders of 2,304 latents with encoder biases calibrated so
that about 32 features fire per token, an 11-token prompt, max_feature_nodes=1024, batch_size=64. Each side
runs in its own subprocess (ours in this venv, circuit-tracer in the parity venv) and reports its wall time
(whole run and the graph alone) and its peak RSS (resource.getrusage, the whole process, loading included).

    LLAMA_LENS_HOME=... python scripts/bench_graph.py [--threads N] [--skip-circuit-tracer]

The machine is shared: the load average is printed beside every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts" / "parity"))
PARITY_PYTHON = (
    Path(os.environ.get("LLAMA_LENS_HOME", ROOT / ".cache" / "llama_lens")) / "parity-venv" / "bin" / "python"
)
D_SAE, ACTIVE, MAX_FEATURE_NODES, BATCH_SIZE = 2304, 32, 1024, 64
PROMPT = "The Eiffel Tower is located in the city of"


def model_dir() -> Path:
    return Path(os.environ["LLAMA_LENS_HOME"]) / "models" / "SmolLM2-135M-Instruct"


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def child_ours(folder: Path, tokens: list[int]) -> dict:
    import torch

    import llama_lens as ll

    start = time.perf_counter()
    model = ll.load(model_dir(), dtype=torch.float32, progress=False)
    transcoders = ll.load_dictionary(folder)
    graph_start = time.perf_counter()
    graph = ll.attribution_graph(
        model, torch.tensor(tokens), transcoders, max_feature_nodes=MAX_FEATURE_NODES, batch_size=BATCH_SIZE
    )
    end = time.perf_counter()
    return {"wall_s": end - start, "graph_s": end - graph_start, "rss_gb": peak_rss_gb(), "nodes": graph.n_nodes}


def child_circuit_tracer(folder: Path, tokens: list[int]) -> dict:
    import torch
    from circuit_tracer import attribute
    from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set
    from record_graph import circuit_tracer_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    hf = AutoModelForCausalLM.from_pretrained(model_dir(), dtype=torch.float32)
    transcoders = load_transcoder_set(
        {i: str(folder / f"layer_{i}.safetensors") for i in range(30)},
        scan="random",
        feature_input_hook="mlp.hook_in",
        feature_output_hook="hook_mlp_out",
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    model = circuit_tracer_model(model_dir(), hf, tokenizer, transcoders)
    del hf
    graph_start = time.perf_counter()
    graph = attribute(
        torch.tensor(tokens), model, max_feature_nodes=MAX_FEATURE_NODES, batch_size=BATCH_SIZE, verbose=False
    )
    end = time.perf_counter()
    nodes = graph.adjacency_matrix.shape[0]
    return {"wall_s": end - start, "graph_s": end - graph_start, "rss_gb": peak_rss_gb(), "nodes": nodes}


def prepare(folder: Path) -> list[int]:
    """Writes the transcoder set (calibrated on the prompt with our model) and returns the prompt's tokens."""
    import numpy as np
    import torch
    from record_graph import calibrate, write_set

    import llama_lens as ll

    model = ll.load(model_dir(), dtype=torch.float32, progress=False)
    tokens = [model.tokenizer.bos_id] + model.tokenizer.encode(PROMPT, bos=False)
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.tensor([tokens]), names_filter=lambda n: n.endswith("mlp.hook_in"))
    mlp_in = np.stack([cache[f"blocks.{i}.mlp.hook_in"][0].numpy() for i in range(model.cfg.n_layers)])
    write_set(folder, calibrate(mlp_in, ACTIVE, d_sae=D_SAE), d_sae=D_SAE)
    return tokens


def run_child(python: Path, side: str, folder: Path, tokens: list[int], threads: int) -> dict:
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env["PYTHONPATH"] = str(ROOT) if side == "ours" else ""
    load = os.getloadavg()[0]
    out = subprocess.run(
        [str(python), __file__, "--child", side, "--folder", str(folder), "--tokens", json.dumps(tokens)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"{side} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["load_before"], result["load_after"] = load, os.getloadavg()[0]
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", choices=("ours", "circuit-tracer"))
    parser.add_argument("--folder", type=Path)
    parser.add_argument("--tokens")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-circuit-tracer", action="store_true")
    args = parser.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        run = child_ours if args.child == "ours" else child_circuit_tracer
        print(json.dumps(run(args.folder, json.loads(args.tokens))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "set"
        tokens = prepare(folder)
        print(f"{len(tokens)} tokens, 30 ReLU transcoders of {D_SAE} latents (~{ACTIVE} active per token), "
              f"max_feature_nodes={MAX_FEATURE_NODES}, batch_size={BATCH_SIZE}, {args.threads} threads")  # fmt: skip
        results = {"ours": run_child(Path(sys.executable), "ours", folder, tokens, args.threads)}
        if not args.skip_circuit_tracer:
            results["circuit-tracer"] = run_child(PARITY_PYTHON, "circuit-tracer", folder, tokens, args.threads)
    for side, r in results.items():
        print(
            f"{side:>15}: wall {r['wall_s']:6.1f} s (graph {r['graph_s']:6.1f} s), peak RSS {r['rss_gb']:.2f} GB, "
            f"{r['nodes']} nodes; load average {r['load_before']:.1f} -> {r['load_after']:.1f}"
        )
    if "circuit-tracer" in results:
        ours, theirs = results["ours"], results["circuit-tracer"]
        print(
            f"ours / circuit-tracer: wall {ours['wall_s'] / theirs['wall_s']:.2f}x, graph "
            f"{ours['graph_s'] / theirs['graph_s']:.2f}x, peak RSS {ours['rss_gb'] / theirs['rss_gb']:.2f}x"
        )


if __name__ == "__main__":
    main()
