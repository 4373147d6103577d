"""Records circuit-tracer 0.5.0's attribution graph of SmolLM2-135M-Instruct with small random transcoders, for
tests/graphs/test_graph_parity.py to compare ours against.

Run in the parity environment (scripts/parity/make_env.sh), offline, from the repository root:

    LLAMA_LENS_HOME=... .cache/llama_lens/parity-venv/bin/python scripts/parity/record_graph.py

The transcoders (30 layers, ReLU, d_sae 128) come from a seeded numpy RandomState, which gives the same numbers
in every numpy version, so the test rebuilds them without storing them; only the encoder biases are stored,
calibrated here on the prompt so that about `ACTIVE` features fire per token. The fixture holds the tokens, the
biases, circuit-tracer's active and selected features, the feature and logit rows of its adjacency matrix,
its logit targets, replacement and completeness scores and pruned node mask (tests/graphs/data/graph_parity.npz).

With `--clt` it records the same with one small random cross-layer transcoder instead (30 layers, ReLU, d_sae 64
per layer, each feature writing every layer from its own up; circuit-tracer's `load_clt` layout) into
tests/graphs/data/graph_parity_clt.npz.

With `--interventions` it records, on the same per-layer graph, circuit-tracer's `feature_intervention` (see
`record_interventions`) into tests/graphs/data/graph_parity_interventions.npz.

With `--check-export DIR` it instead reads our exports back with circuit-tracer: DIR/graph.pt (written by
`AttributionGraph.to_pt`) through `Graph.from_pt`, and DIR/graph.json (`to_json`) through its pydantic `Model`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

N_LAYERS, D_MODEL, D_SAE, ACTIVE, SEED = 30, 576, 128, 6, 0
PROMPT = "The capital of France is"
MAX_FEATURE_NODES, BATCH_SIZE = 120, 32
OUT = Path(__file__).resolve().parents[2] / "tests" / "graphs" / "data" / "graph_parity.npz"
CLT_D_SAE = 64
CLT_OUT = OUT.with_name("graph_parity_clt.npz")
INTERVENTIONS_OUT = OUT.with_name("graph_parity_interventions.npz")
# circuit-tracer's three ways to run an intervention, by the name of our run that each should equal.
PROTOCOLS = {
    "model": {"freeze_attention": False},
    "model_frozen_attention": {"freeze_attention": True},
    "model_constrained": {"freeze_attention": True, "constrained_layers": range(N_LAYERS)},
}


def random_weights(layer: int, d_model: int = D_MODEL, d_sae: int = D_SAE, seed: int = SEED) -> dict[str, np.ndarray]:
    """W_enc, W_dec [d_sae, d_model] and b_dec [d_model] of one layer (b_enc is calibrated)."""
    rng = np.random.RandomState(seed * 1000 + layer)
    return {
        "W_enc": (rng.standard_normal((d_sae, d_model)) / np.sqrt(d_model)).astype(np.float32),
        "W_dec": (rng.standard_normal((d_sae, d_model)) * 0.05).astype(np.float32),
        "b_dec": (rng.standard_normal(d_model) * 0.01).astype(np.float32),
    }


def write_set(folder: Path, b_enc: np.ndarray, **shape) -> Path:
    """A circuit-tracer transcoder set (config.yaml + layer_{i}.safetensors)."""
    folder.mkdir(parents=True, exist_ok=True)
    for layer in range(len(b_enc)):
        save_file(random_weights(layer, **shape) | {"b_enc": b_enc[layer]}, str(folder / f"layer_{layer}.safetensors"))
    (folder / "config.yaml").write_text(
        "model_name: SmolLM2-135M-Instruct\nfeature_input_hook: mlp.hook_in\nfeature_output_hook: hook_mlp_out\n"
    )
    return folder


def random_clt_weights(layer: int, d_model: int = D_MODEL, d_sae: int = CLT_D_SAE, seed: int = SEED):
    """W_enc_{layer} [d_sae, d_model], W_dec_{layer} [d_sae, N_LAYERS - layer, d_model], b_dec_{layer} of a CLT."""
    rng = np.random.RandomState(seed * 1000 + 500 + layer)
    return {
        "W_enc": (rng.standard_normal((d_sae, d_model)) / np.sqrt(d_model)).astype(np.float32),
        "W_dec": (rng.standard_normal((d_sae, N_LAYERS - layer, d_model)) * 0.05).astype(np.float32),
        "b_dec": (rng.standard_normal(d_model) * 0.01).astype(np.float32),
    }


def write_clt(folder: Path, b_enc: np.ndarray) -> Path:
    """A circuit-tracer CLT folder (W_enc_{i} / W_dec_{i}.safetensors + config.yaml) reading mlp.hook_in."""
    folder.mkdir(parents=True, exist_ok=True)
    for layer in range(len(b_enc)):
        weights = random_clt_weights(layer)
        encoder = {
            f"W_enc_{layer}": weights["W_enc"],
            f"b_enc_{layer}": b_enc[layer],
            f"b_dec_{layer}": weights["b_dec"],
        }
        save_file(encoder, str(folder / f"W_enc_{layer}.safetensors"))
        save_file({f"W_dec_{layer}": weights["W_dec"]}, str(folder / f"W_dec_{layer}.safetensors"))
    (folder / "config.yaml").write_text(
        "model_kind: cross_layer_transcoder\nfeature_input_hook: mlp.hook_in\nfeature_output_hook: hook_mlp_out\n"
    )
    return folder


def calibrate(mlp_in: np.ndarray, active: int, weights=random_weights) -> np.ndarray:
    """Encoder biases [n_layers, d_sae] so that about `active` features fire per token (after position 0)."""
    b_enc = []
    for layer, x in enumerate(mlp_in):  # x [pos, d_model]
        pre = x[1:] @ weights(layer)["W_enc"].T
        b_enc.append(np.full(pre.shape[1], -np.quantile(pre, 1 - active / pre.shape[1]), dtype=np.float32))
    return np.stack(b_enc)


def circuit_tracer_model(model_dir: Path, hf, tokenizer, transcoders):
    """circuit-tracer's TransformerLens replacement model of SmolLM2 (TransformerLens does not list it by name,
    so its config is written out and the weights converted from the transformers model; its nnsight backend
    does not import with the nnsight installed beside it)."""
    from circuit_tracer.replacement_model.replacement_model_transformerlens import TransformerLensReplacementModel
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    cfg = HookedTransformerConfig(
        d_model=576, d_head=64, n_heads=9, n_key_value_heads=3, d_mlp=1536, n_layers=N_LAYERS, n_ctx=2048,
        d_vocab=49152, act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary",
        rotary_base=100000, rotary_adjacent_pairs=False, rotary_dim=64, final_rms=True, gated_mlp=True, eps=1e-5,
        original_architecture="LlamaForCausalLM", tokenizer_name=str(model_dir), model_name="SmolLM2-135M-Instruct",
        default_prepend_bos=False, dtype=torch.float32, device="cpu",
    )  # fmt: skip
    model = TransformerLensReplacementModel(cfg, tokenizer=tokenizer)
    model.load_and_process_state_dict(
        convert_llama_weights(hf, cfg), fold_ln=False, center_writing_weights=False, center_unembed=False
    )
    model._configure_replacement_model(transcoders)
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--check-export", type=Path, help="a folder holding graph.pt and graph.json to check")
    parser.add_argument("--clt", action="store_true", help="record with a cross-layer transcoder")
    parser.add_argument("--interventions", action="store_true", help="record feature interventions on the graph")
    args = parser.parse_args()
    from circuit_tracer import attribute
    from circuit_tracer.graph import Graph, compute_graph_scores, prune_graph
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt
    from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set

    if args.check_export:
        from circuit_tracer.frontend.graph_models import Model

        graph = Graph.from_pt(str(args.check_export / "graph.pt"))
        Model.model_validate(json.loads((args.check_export / "graph.json").read_text()))
        print("from_pt:", graph.adjacency_matrix.shape, graph.logit_targets[:2], compute_graph_scores(graph))
        return

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(os.environ["LLAMA_LENS_HOME"]) / "models" / "SmolLM2-135M-Instruct"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokens = [tokenizer.bos_token_id or 0] + tokenizer(PROMPT, add_special_tokens=False).input_ids
    hf = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    with torch.no_grad():
        captured = []
        handles = [
            layer.post_attention_layernorm.register_forward_hook(lambda m, i, o: captured.append(o[0].numpy()))
            for layer in hf.model.layers
        ]
        hf(torch.tensor([tokens]))
        for handle in handles:
            handle.remove()
    b_enc = calibrate(np.stack(captured), ACTIVE, random_clt_weights if args.clt else random_weights)

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        if args.clt:
            transcoders = load_clt(
                str(write_clt(Path(tmp) / "clt", b_enc)),
                feature_input_hook="mlp.hook_in",
                feature_output_hook="hook_mlp_out",
                scan="random",
                device=torch.device("cpu"),
                dtype=torch.float32,
                lazy_decoder=False,
            )
        else:
            folder = write_set(Path(tmp) / "set", b_enc)
            transcoders = load_transcoder_set(
                {i: str(folder / f"layer_{i}.safetensors") for i in range(N_LAYERS)},
                scan="random",
                feature_input_hook="mlp.hook_in",
                feature_output_hook="hook_mlp_out",
                device=torch.device("cpu"),
                dtype=torch.float32,
                lazy_encoder=False,
                lazy_decoder=False,
            )
        model = circuit_tracer_model(model_dir, hf, tokenizer, transcoders)
        graph = attribute(
            torch.tensor(tokens),
            model,
            max_n_logits=10,
            desired_logit_prob=0.95,
            max_feature_nodes=MAX_FEATURE_NODES,
            batch_size=BATCH_SIZE,
        )
        if args.interventions:
            record_interventions(model, graph, tokens)
            return
    n_features, n_logits = len(graph.selected_features), len(graph.logit_targets)
    adjacency = graph.adjacency_matrix
    node_mask, edge_mask, cumulative = prune_graph(graph, 0.8, 0.98)
    replacement, completeness = compute_graph_scores(graph)
    out = CLT_OUT if args.clt else OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out,
        tokens=np.array(tokens),
        b_enc=b_enc,
        active_features=graph.active_features.numpy().astype(np.int32),
        activation_values=graph.activation_values.numpy(),
        selected_features=graph.selected_features.numpy().astype(np.int32),
        feature_rows=adjacency[:n_features].numpy(),
        logit_rows=adjacency[-n_logits:].numpy(),
        logit_tokens=np.array([t.vocab_idx for t in graph.logit_targets]),
        logit_probabilities=graph.logit_probabilities.numpy(),
        scores=np.array([replacement, completeness]),
        node_mask=node_mask.numpy(),
        shape=np.array([N_LAYERS, D_MODEL, CLT_D_SAE if args.clt else D_SAE, SEED, MAX_FEATURE_NODES, BATCH_SIZE]),
    )
    print(f"{out}: {out.stat().st_size / 1e3:.0f} kB; {len(graph.active_features)} active, {n_features} selected,")
    print(f"{n_logits} logits, scores {replacement:.4f} {completeness:.4f}, {int(node_mask.sum())} nodes kept")


def intervention_cases(graph) -> list[list[tuple[int, int, int, float]]]:
    """The interventions recorded: three features, each ablated (set to 0) and halved, then two of them at once
    (the first ablated, the second five times its activation).

    The features: the two selected features with the largest direct edge to the top logit, and the one of the
    first half of the layers with the largest (so that its effect travels through many MLPs)."""
    n_features = len(graph.selected_features)
    edges = graph.adjacency_matrix[-len(graph.logit_targets)][:n_features].abs()
    keys = graph.active_features[graph.selected_features]  # [n_features, 3] (layer, pos, feature)
    values = graph.activation_values[graph.selected_features]
    order = edges.argsort(descending=True).tolist()
    early = next(node for node in order[2:] if keys[node, 0] < N_LAYERS // 2)
    nodes = [*order[:2], early]
    cases = []
    for node in nodes:
        layer, pos, feature = map(int, keys[node].tolist())
        cases += [[(layer, pos, feature, 0.0)], [(layer, pos, feature, 0.5 * float(values[node]))]]
    first, second = (tuple(map(int, keys[node].tolist())) for node in nodes[:2])
    cases.append([(*first, 0.0), (*second, 5.0 * float(values[nodes[1]]))])
    return cases


def record_interventions(model, graph, tokens: list[int]) -> None:
    """circuit-tracer's `feature_intervention` on the graph's prompt, for each case and protocol: the logits of
    the graph's logit tokens minus the mean logit, at the last position, before and after.

    Stored: cases [n_cases, 2, 4] (layer, pos, feature, value; a one-feature case repeats its row with
    value NaN), clean [n_logits], and for each protocol an array [n_cases, n_logits]."""
    logit_tokens = torch.tensor([t.vocab_idx for t in graph.logit_targets])

    def demeaned(logits: torch.Tensor) -> np.ndarray:
        last = logits[0, -1].double()
        return (last - last.mean())[logit_tokens].numpy()

    inputs = torch.tensor(tokens)
    with torch.no_grad():
        clean = demeaned(model(inputs[None]))
    cases = intervention_cases(graph)
    rows = np.full((len(cases), 2, 4), np.nan)
    for i, case in enumerate(cases):
        rows[i, : len(case)] = case
    recorded = {name: [] for name in PROTOCOLS}
    for case in cases:
        for name, options in PROTOCOLS.items():
            logits, _ = model.feature_intervention(inputs, case, return_activations=False, **options)
            recorded[name].append(demeaned(logits))
    INTERVENTIONS_OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        INTERVENTIONS_OUT,
        tokens=np.array(tokens),
        logit_tokens=logit_tokens.numpy(),
        cases=rows,
        clean=clean,
        **{name: np.stack(values) for name, values in recorded.items()},
    )
    print(f"{INTERVENTIONS_OUT}: {INTERVENTIONS_OUT.stat().st_size / 1e3:.1f} kB; {len(cases)} cases")
    for name in PROTOCOLS:
        print(f"  {name}: change of the top logit {np.stack(recorded[name])[:, 0] - clean[0]}")


if __name__ == "__main__":
    main()
