"""A long prompt's attribution graph: peak RSS and wall time, loaded or streamed, rows in memory or offloaded,
against `ll.plan(..., graph=...)`'s estimate.

SmolLM2-135M-Instruct (float32), 30 random ReLU transcoders of 2,304 latents (scripts/bench_graph.py's, encoder
biases calibrated on this prompt so that about 32 features fire per token), a prompt of --tokens tokens (a text
repeated), max_feature_nodes=--max-feature-nodes. Each case runs in a fresh subprocess: it asks `ll.plan` for
the peak RSS first (this process as it is, plus the plan's peak), then loads the model (whole or streamed),
builds the graph, and reports its peak RSS (resource.getrusage), then prunes the graph and reports it again.

The parent never imports torch: Linux carries a process's peak RSS across exec.

    LLAMA_LENS_HOME=... python scripts/bench_graph_long.py [--tokens 512] [--max-feature-nodes 2048]
        [--cases stream-offload,loaded-offload,stream-memory]
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
D_SAE, ACTIVE = 2304, 32
TEXT = (
    "The Eiffel Tower is located in the city of Paris, the capital of France. It was built for the world's fair "
    "of 1889 and stood as the tallest structure in the world for four decades. Each year millions of visitors "
    "climb its stairs or ride its lifts to look out over the river Seine and the roofs of the city. "
)


def model_dir() -> Path:
    return Path(os.environ["LLAMA_LENS_HOME"]) / "models" / "SmolLM2-135M-Instruct"


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def prompt_tokens(tokenizer, n_tokens: int) -> list[int]:
    ids = tokenizer.encode(TEXT * (1 + n_tokens // 40), bos=False)
    return [tokenizer.bos_id, *ids[: n_tokens - 1]]


def prepare(folder: Path, n_tokens: int) -> None:
    """Writes the transcoder set, calibrated on the prompt with the model loaded whole."""
    import numpy as np
    import torch
    from record_graph import calibrate, write_set

    import llama_lens as ll

    model = ll.load(model_dir(), dtype=torch.float32, progress=False)
    tokens = torch.tensor([prompt_tokens(model.tokenizer, n_tokens)])
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("mlp.hook_in"))
    mlp_in = np.stack([cache[f"blocks.{i}.mlp.hook_in"][0].numpy() for i in range(model.cfg.n_layers)])
    write_set(folder, calibrate(mlp_in, ACTIVE, d_sae=D_SAE), d_sae=D_SAE)


def child(folder: Path, n_tokens: int, max_feature_nodes: int, batch_size: int, stream: bool, offload: bool) -> dict:
    import torch

    import llama_lens as ll

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    transcoders = ll.load_dictionary(folder)
    graph_job = dict(
        transcoders=transcoders,
        max_feature_nodes=max_feature_nodes,
        batch_size=batch_size,
        offload=offload,
        active_features=ACTIVE * (n_tokens - 1) * 30,  # what the calibration aims at (position 0 left out)
    )
    plan = ll.plan(model_dir(), stream=stream, tokens=n_tokens, dtype="float32", cache=None, graph=graph_job)
    start = time.perf_counter()
    model = ll.load(model_dir(), dtype=torch.float32, stream=stream, progress=False)
    tokens = torch.tensor(prompt_tokens(model.tokenizer, n_tokens))
    graph = ll.attribution_graph(
        model, tokens, transcoders, max_feature_nodes=max_feature_nodes, batch_size=batch_size, offload=offload
    )
    wall = time.perf_counter() - start
    graph_peak = peak_rss()
    prune_start = time.perf_counter()
    node_mask, _, _ = graph.prune()
    replacement, completeness = graph.scores()
    return {
        "planned_peak_rss": plan.peak_rss_bytes,
        "planned_graph": plan.graph_bytes,
        "process_at_plan": plan.process_bytes,
        "peak_rss": graph_peak,
        "peak_rss_after_prune": peak_rss(),
        "wall_s": wall,
        "prune_s": time.perf_counter() - prune_start,
        "n_active": len(graph.active_features),
        "n_nodes": graph.n_nodes,
        "kept_nodes": int(node_mask.sum()),
        "scores": [replacement, completeness],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--max-feature-nodes", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", default="stream-offload,loaded-offload")
    parser.add_argument("--child", nargs=2, metavar=("FOLDER", "CASE"))
    parser.add_argument("--prepare", metavar="FOLDER")
    args = parser.parse_args()
    if args.prepare:
        prepare(Path(args.prepare), args.tokens)
        return
    if args.child:
        stream, offload = (part in ("stream", "offload") for part in args.child[1].split("-"))
        result = child(Path(args.child[0]), args.tokens, args.max_feature_nodes, args.batch_size, stream, offload)
        print(json.dumps(result))
        return

    env = os.environ | {
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": str(args.threads),
    }
    common = ["--tokens", str(args.tokens), "--max-feature-nodes", str(args.max_feature_nodes)]
    common += ["--batch-size", str(args.batch_size)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "set"
        subprocess.run([sys.executable, __file__, *common, "--prepare", str(folder)], check=True, env=env)
        print(
            f"SmolLM2-135M-Instruct float32, {args.tokens} tokens, 30 ReLU transcoders of {D_SAE} latents "
            f"(~{ACTIVE} active per token), max_feature_nodes={args.max_feature_nodes}, batch_size={args.batch_size}, "
            f"{args.threads} threads"
        )
        for case in args.cases.split(","):
            load_before = os.getloadavg()[0]
            done = subprocess.run(
                [sys.executable, __file__, *common, "--child", str(folder), case],
                capture_output=True,
                text=True,
                env=env,
            )
            if done.returncode != 0:
                raise SystemExit(done.stderr[-3000:])
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(
                f"  {case:<15} peak RSS {r['peak_rss'] / 1e9:.2f} GB, planned {r['planned_peak_rss'] / 1e9:.2f} GB "
                f"(process {r['process_at_plan'] / 1e9:.2f} GB + plan; graph part {r['planned_graph'] / 1e9:.2f} "
                f"GB), measured/planned {r['peak_rss'] / r['planned_peak_rss']:.3f}; wall {r['wall_s']:.0f} s; "
                f"{r['n_active']} active features, {r['n_nodes']} nodes; after prune+scores peak RSS "
                f"{r['peak_rss_after_prune'] / 1e9:.2f} GB ({r['prune_s']:.0f} s, {r['kept_nodes']} nodes kept); "
                f"load average {load_before:.2f} -> {os.getloadavg()[0]:.2f}"
            )


if __name__ == "__main__":
    main()
