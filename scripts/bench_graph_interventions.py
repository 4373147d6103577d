"""How well an attribution graph predicts interventions: the graph's predicted change of the target logit against
the model's, for the top features by influence on that logit, each scaled in turn by each size (`--sizes`,
default 0 (ablation), 0.5 and 0.9: a linear prediction should hold better as the change gets smaller).

SmolLM2-135M-Instruct (the embedded model, float32), transcoders at all 30 layers, the prompt below,
`max_feature_nodes` features (default 1024). The target logit is the graph's first logit node (the most probable
next token); every change is of that logit minus the mean logit, as the graph's logit node is. Per feature and
size, the predicted change, the direct effect, and the change measured under each protocol (`ll.InterventionResult`):

    predicted  the graph's linear prediction (direct + indirect effects through its feature nodes)
    linear     the model with patterns, norm scales and errors frozen, graph features linear (= predicted)
    frozen     patterns, scales and errors frozen, features through their activation function
    frozen_attention  patterns and errors frozen, norm scales move
    actual     only the error nodes frozen: attention and norms move
    model      the model's own MLPs with the feature's change of write added, nothing frozen (circuit-tracer's
               feature_intervention, freeze_attention=False)
    model_frozen_attention  as model, attention patterns frozen (circuit-tracer's default, freeze_attention=True)
    model_constrained  patterns, scales and MLP outputs frozen: the direct effect (circuit-tracer's
               constrained_layers=range(30))

and below it the gap |predicted - x| / |x| against each; at the end the median gap over the top features per
protocol and size.

Transcoder sets (`--transcoders`):
    random     circuit-tracer-format ReLU transcoders with random weights (scripts/parity/record_graph.py's), encoder
               biases calibrated on the prompt so that about 32 of 2,304 features fire per token.
    fitted     ReLU transcoders fitted to the model's MLPs on generated text in a minute or two, without gradient
               steps (see `fitted_set`), cached under $LLAMA_LENS_HOME/dictionaries.

    LLAMA_LENS_HOME=... PYTHONPATH=. python scripts/bench_graph_interventions.py [--transcoders random|fitted]
        [--top 5] [--sizes 0 0.5 0.9] [--max-feature-nodes 1024]

(`--max-feature-nodes 9000` keeps every active feature of the fitted set: slower, and no indirect path is lost.)

The machine is shared: the load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import llama_lens as ll

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts" / "parity"))
PROMPT = "The Eiffel Tower is located in the city of"
N_LAYERS, D_MODEL = 30, 576


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def random_set(model, tokens: list[int], folder: Path, d_sae: int = 2304, active: int = 32) -> Path:
    """bench_graph.py's set: random ReLU transcoders, encoder biases calibrated on the prompt."""
    from record_graph import calibrate, random_weights, write_set

    with torch.no_grad():
        _, cache = model.run_with_cache(torch.tensor([tokens]), names_filter=lambda n: n.endswith("mlp.hook_in"))
    mlp_in = np.stack([cache[f"blocks.{i}.mlp.hook_in"][0].numpy() for i in range(N_LAYERS)])
    weights = functools.partial(random_weights, d_sae=d_sae)
    return write_set(folder, calibrate(mlp_in, active, weights), d_sae=d_sae)


def fitted_set(model, folder: Path, *, n_texts: int = 32, d_sae: int = 1536, active: int = 32) -> Path:
    """ReLU transcoders fitted in closed form, one per layer, to the MLP on generated texts (BOS rows left out).

    Encoder: the MLP's own gate rows, each with both signs (2 x 1,536 candidates, the `d_sae` that vary most
    kept), biases set so that about `active` features fire per token. Decoder and b_dec: ridge regression
    of the MLP output on the activations, fitted on 80% of the tokens (the held-out FVU of the rest is printed).
    No gradient steps: minutes on a CPU, where training 30 TopK transcoders with ll.train_dictionary takes far
    longer. The set is cached in `folder`.
    """
    from safetensors.numpy import save_file

    from llama_lens.data.token_rows import token_rows

    if (folder / "config.yaml").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)
    rows = token_rows(model.tokenizer, ll.generated_texts(n_texts, seed=0), seq_len=128)
    wanted = ("mlp.hook_in", "hook_mlp_out")
    inputs = [[] for _ in range(N_LAYERS)]
    outputs = [[] for _ in range(N_LAYERS)]
    for batch in rows.split(8):
        _, cache = model.run_with_cache(batch, names_filter=lambda n: n.endswith(wanted))
        for layer in range(N_LAYERS):
            inputs[layer].append(cache[f"blocks.{layer}.mlp.hook_in"][:, 1:].reshape(-1, D_MODEL))
            outputs[layer].append(cache[f"blocks.{layer}.hook_mlp_out"][:, 1:].reshape(-1, D_MODEL))
    for layer in range(N_LAYERS):
        x = torch.cat(inputs[layer]).double()  # [tokens, d_model]
        y = torch.cat(outputs[layer]).double()
        mlp = model.blocks[layer].mlp
        candidates = torch.cat([mlp.gate_proj.weight, -mlp.gate_proj.weight]).detach().double()
        candidates = candidates / candidates.norm(dim=1, keepdim=True)
        pre = x @ candidates.T  # [tokens, candidates]
        keep = pre.std(0).topk(d_sae).indices
        w_enc, pre = candidates[keep], pre[:, keep]
        b_enc = -torch.quantile(pre.flatten()[:: max(1, pre.numel() // 2_000_000)], 1 - active / d_sae)
        acts = torch.relu(pre + b_enc)
        design = torch.cat([acts, torch.ones(len(acts), 1, dtype=acts.dtype)], dim=1)
        # Fitted on the first 80% of the tokens, scored on the rest.
        n_fit = int(0.8 * len(design))
        fit, held = design[:n_fit], design[n_fit:]
        gram = fit.T @ fit
        gram += 1e-2 * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
        solution = torch.linalg.solve(gram, fit.T @ y[:n_fit])  # [d_sae + 1, d_model]
        w_dec, b_dec = solution[:-1], solution[-1]
        y_held = y[n_fit:]
        fvu = float((held @ solution - y_held).pow(2).sum() / (y_held - y_held.mean(0)).pow(2).sum())
        print(f"  layer {layer:2d}: held-out FVU {fvu:.3f}", flush=True)
        tensors = {"W_enc": w_enc, "b_enc": b_enc.expand(d_sae), "W_dec": w_dec, "b_dec": b_dec}
        arrays = {name: value.float().contiguous().numpy() for name, value in tensors.items()}
        save_file(arrays, str(folder / f"layer_{layer}.safetensors"))
    torch.set_grad_enabled(True)
    (folder / "config.yaml").write_text(
        "model_name: SmolLM2-135M-Instruct\nfeature_input_hook: mlp.hook_in\nfeature_output_hook: hook_mlp_out\n"
    )
    return folder


PROTOCOLS = ("linear", "frozen", "frozen_attention", "actual", "model", "model_frozen_attention", "model_constrained")
SHORT = {"frozen_attention": "frz_attn", "model_frozen_attention": "mdl_frz_at", "model_constrained": "mdl_constr"}


def size_name(size: float) -> str:
    return "set to 0" if size == 0 else f"x{size:g}"


def median(values: list[float]) -> str:
    defined = [v for v in values if v == v]  # NaN: the change was under min_change (1e-4 logits)
    left_out = len(values) - len(defined)
    return (f"{statistics.median(defined):7.1%}" if defined else "    n/a") + (f" ({left_out} n/a)" if left_out else "")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--transcoders", choices=("random", "fitted"), default="fitted")
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.0, 0.5, 0.9],
                        help="each feature's activation is multiplied by each size in turn (0: ablation)")  # fmt: skip
    parser.add_argument("--max-feature-nodes", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average at start: {load_average()} ({os.cpu_count()} cores)")
    model = ll.load(ll.demo_model_path(), dtype=torch.float32, progress=False)
    tokens = [model.tokenizer.bos_id] + model.tokenizer.encode(PROMPT, bos=False)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        if args.transcoders == "random":
            folder = random_set(model, tokens, Path(tmp) / "set")
        else:
            home = Path(os.environ.get("LLAMA_LENS_HOME", ROOT / ".cache" / "llama_lens"))
            folder = fitted_set(model, home / "dictionaries" / "SmolLM2-135M-Instruct" / "graph-fitted-relu-1536")
        transcoders = ll.load_dictionary(folder)
        print(f"transcoders ({args.transcoders}) ready in {time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        graph = ll.attribution_graph(
            model, torch.tensor(tokens), transcoders, max_feature_nodes=args.max_feature_nodes, batch_size=64
        )
        replacement, completeness = graph.scores()
        print(f"{graph} in {time.perf_counter() - start:.1f} s; replacement score {replacement:.3f}, "
              f"completeness {completeness:.3f}; load average {load_average()}")  # fmt: skip
        target = graph.logit_strings[0]
        print(f"target logit {target!r} (p = {float(graph.logit_probabilities[0]):.3f}); top {args.top} features "
              f"by influence on it; changes of that logit (minus the mean logit) in logits, "
              f"gaps |predicted - x| / |x|")  # fmt: skip
        features = graph.top_features(args.top, logit=0)
        gaps = {(size, name): [] for size in args.sizes for name in PROTOCOLS}
        start = time.perf_counter()
        for size in args.sizes:
            print(f"\n-- each feature's activation {size_name(size)} --")
            print(f"{'layer':>5} {'pos':>3} {'feature':>7} {'activation':>10} {'predicted':>10} {'direct':>9} "
                  + " ".join(f"{SHORT.get(c, c):>10}" for c in PROTOCOLS))  # fmt: skip
            for layer, pos, feature in features:
                result = graph.intervene(model, transcoders, [(layer, pos, feature, size)], scale=True)
                changes = " ".join(f"{float(getattr(result, c)[0]):+10.4f}" for c in PROTOCOLS)
                print(f"{layer:5d} {pos:3d} {feature:7d} {result.clean_activations[0]:10.3f} "
                      f"{float(result.predicted[0]):+10.4f} {float(result.direct[0]):+9.4f} {changes}")  # fmt: skip
                row = []
                for name in PROTOCOLS:
                    gap = float(result.gap(name)[0])
                    gaps[size, name].append(gap)
                    row.append(f"{gap:10.1%}")
                print(f"{'gap':>39} {'':>9} " + " ".join(row))
        elapsed = time.perf_counter() - start

    print(f"\nmedian gap over the top {args.top} features, by protocol (rows) and intervention size (columns); "
          f"load average {load_average()}")  # fmt: skip
    print(f"{'protocol':>24} " + " ".join(f"{size_name(size):>9}" for size in args.sizes))
    for name in PROTOCOLS:
        print(f"{name:>24} " + " ".join(f"{median(gaps[size, name]):>9}" for size in args.sizes))
    print(f"({args.top * len(args.sizes)} interventions in {elapsed:.1f} s; load average {load_average()})")


if __name__ == "__main__":
    main()
