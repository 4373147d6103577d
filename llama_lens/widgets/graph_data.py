"""The graph explorer's data: an AttributionGraph pruned, with each feature's read-out and activating contexts.

Only the pruned graph travels (`AttributionGraph.prune`, circuit-tracer's pruning: the nodes and links
`to_json` writes for its frontend), as JSON:

    prompt, tokens        the prompt and its tokens' texts
    n_layers              the model's layers (embeddings sit at layer -1, logits at n_layers)
    metadata              circuit-tracer's graph metadata (for the page's export)
    nodes                 one per node, in to_json's order: id (circuit-tracer's node_id, made unique: see
                          circuit_json), kind ("feature", "error", "embedding", "logit"), layer, pos, feature
                          (the transcoder feature, the token id of an embedding or a logit, -1 for an error),
                          act (a feature's), infl (not a logit's), and where known:
                          readout (the top tokens of its decoder direction, as the feature lens reads one),
                          ctx (activating contexts: {tokens, at, acts (3 digits), max}), text (an embedding's or logit's
                          token), prob, rank and clerp (a logit's)
    edges                 [source, target, weight] with indices into nodes, weights to 6 significant digits

A feature's read-out is `features.lens.readout_tokens` of its decoder direction (summed over the layers a
cross-layer transcoder writes). Its contexts come from one pass of the model over the `contexts` prompts, to
the last layer holding a graph feature, encoding only at those layers: for each feature the prompts where it
fired most, each cut to a window around the position where it fired most.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import ArgumentError, ArgumentTypeError
from ..features.lens import readout_tokens
from ..graphs.result import AttributionGraph
from ..graphs.transcoders import as_transcoder_set
from ..lens.inputs import prepare_inputs, token_texts

CT_TYPES = {
    "feature": "cross layer transcoder",
    "error": "mlp reconstruction error",
    "embedding": "embedding",
    "logit": "logit",
}
BATCH = 8  # context prompts per forward pass


def _short(value: float) -> float:
    return float(f"{value:.6g}") + 0.0  # + 0.0: no "-0.0" in the page


def graph_payload(
    graph: AttributionGraph,
    *,
    model: Any = None,
    transcoders: Any = None,
    contexts: Sequence[str] | None = None,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    n_readout: int = 5,
    n_contexts: int = 3,
    window: int = 8,
) -> tuple[dict[str, Any], list[int]]:
    """(the page's data (see the module docstring), each of its nodes' index in the graph)."""
    if not isinstance(graph, AttributionGraph):
        what = type(graph).__name__
        raise ArgumentTypeError(f"GraphExplorer takes an AttributionGraph (ll.attribution_graph), got {what}")
    if (model is None) != (transcoders is None):
        raise ArgumentError("read-outs and contexts need both model= and transcoders= (the graph's transcoders)")
    if contexts is not None and model is None:
        raise ArgumentError("contexts= needs model= and transcoders= to run the prompts")
    node_mask, edge_mask, cumulative = graph.prune(node_threshold, edge_threshold)
    kinds, influence = graph.node_kinds(), cumulative.tolist()
    activations = graph.activation_values[graph.selected_features].tolist()
    kept = set(node_mask.nonzero().flatten().tolist())
    targets, sources = edge_mask.nonzero(as_tuple=True)
    weights = graph.adjacency[targets, sources].tolist()
    pairs = [(s, t, w) for s, t, w in zip(sources.tolist(), targets.tolist(), weights) if s in kept and t in kept]
    connected = {i for s, t, _ in pairs for i in (s, t)}
    used = [i for i in sorted(kept) if i in connected or kinds[i][0] in ("embedding", "logit")]
    place = {index: k for k, index in enumerate(used)}
    nodes, seen = [], set()
    logit_tokens = graph.logit_tokens.tolist()
    for index in used:
        kind, layer, pos, feature = kinds[index]
        item: dict[str, Any] = {"kind": kind, "layer": layer, "pos": pos, "feature": feature}
        if kind == "feature":
            node_id, item["act"] = f"{layer}_{feature}_{pos}", activations[index]
        elif kind == "error":
            node_id = f"0_{layer}_{pos}"
        elif kind == "embedding":
            node_id, item["text"] = f"E_{feature}_{pos}", graph.str_tokens[pos]
        else:
            node_id, rank = f"{graph.n_layers + 1}_{feature}_{pos}", logit_tokens.index(feature)
            prob = float(graph.logit_probabilities[rank])
            text = graph.logit_strings[rank] if graph.logit_strings else str(feature)
            item |= {"text": text, "prob": prob, "rank": rank, "clerp": f'Output "{text}" (p={prob:.3f})'}
        if kind != "logit":
            item["infl"] = influence[index]
        while node_id in seen:  # circuit-tracer's ids collide: feature f < n_layers of layer 0 and error (f, pos)
            node_id += f"~{kind}"
        seen.add(node_id)
        nodes.append({"id": node_id} | item)
    edges = [[place[s], place[t], _short(w)] for s, t, w in pairs]
    metadata = {
        "slug": "graph",
        "scan": graph.model_config.get("model_name", "llama_lens"),
        "transcoder_list": [],
        "prompt_tokens": list(graph.str_tokens),
        "prompt": graph.prompt,
        "node_threshold": node_threshold,
        "schema_version": 1,
    }
    if model is not None:
        tset = as_transcoder_set(transcoders, graph.n_layers, dtype=torch.float32)
        features = [n for n in nodes if n["kind"] == "feature"]
        _add_readouts(model, tset, features, n_readout)
        if contexts is not None:
            _add_contexts(model, tset, features, _prompts(contexts), n_contexts, window)
    payload = {
        "prompt": graph.prompt,
        "tokens": list(graph.str_tokens),
        "n_layers": graph.n_layers,
        "metadata": metadata,
        "nodes": nodes,
        "edges": edges,
    }
    return payload, used


def _prompts(contexts: Any) -> list[str]:
    if isinstance(contexts, str) or not isinstance(contexts, Sequence):
        raise ArgumentTypeError(
            "contexts must be a list of prompt texts (ll.read_prompts(path)[0] reads a file), "
            f"got {type(contexts).__name__}"
        )
    for text in contexts:
        if not isinstance(text, str) or not text:
            raise ArgumentError(f"contexts must hold non-empty texts, got {text!r}")
    return list(contexts)


def _by_layer(features: list[dict[str, Any]]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for i, node in enumerate(features):
        out.setdefault(node["layer"], []).append(i)
    return out


def _add_readouts(model: Any, tset: Any, features: list[dict[str, Any]], n_readout: int) -> None:
    """Each feature's read-out tokens: the decoder direction it writes (summed over output layers)."""
    if not features:
        return
    directions = torch.zeros(len(features), model.cfg.d_model)
    with torch.no_grad():
        for layer, rows in _by_layer(features).items():
            ids = torch.tensor([features[i]["feature"] for i in rows])
            written = tset.decoder_rows(layer, ids, torch.ones(len(rows), dtype=torch.float32))
            directions[rows] = sum(w.float().cpu() for w in written.values())
        top_ids, _ = readout_tokens(model, directions, n_readout)
    texts = token_texts(model, top_ids.unique().tolist())
    for node, row in zip(features, top_ids.tolist()):
        node["readout"] = [texts[i] for i in row]


def _add_contexts(
    model: Any, tset: Any, features: list[dict[str, Any]], prompts: list[str], n_contexts: int, window: int
) -> None:
    """Each feature's top contexts over `prompts`: [{tokens, at, acts, max}], most active first."""
    groups = _by_layer(features)
    if not features or not prompts:
        for node in features:
            node["ctx"] = []
        return
    best: list[list[tuple[float, int, int]]] = [[] for _ in features]  # (max act, prompt, position) per prompt
    acts_of: dict[int, torch.Tensor] = {}  # prompt -> [pos, n_features] activations
    tokens_of: dict[int, list[str]] = {}
    for start in range(0, len(prompts), BATCH):
        batch = prompts[start : start + BATCH]
        inputs = prepare_inputs(model, batch, target=None, positions=None, prepend_bos=None, what="GraphExplorer")
        found = torch.zeros(*inputs.tokens.shape, len(features))

        def encode(layer: int):
            rows = groups[layer]
            ids = torch.tensor([features[i]["feature"] for i in rows])

            def hook(x: torch.Tensor, *, hook) -> None:
                _, acts = tset.encode(layer, x.reshape(-1, x.shape[-1]).float())
                found[..., rows] = acts[:, ids.to(acts.device)].float().cpu().reshape(*x.shape[:2], len(rows))

            return hook

        hooks = [(f"blocks.{layer}.mlp.hook_in", encode(layer)) for layer in groups]
        with torch.no_grad(), model.hooks(hooks):
            model(inputs.tokens, attention_mask=inputs.attention_mask, stop_at_layer=max(groups) + 1)
        mask = inputs.attention_mask.cpu().bool()
        found[~mask] = 0.0
        for b in range(len(batch)):
            keep = mask[b].nonzero().flatten()
            p = start + b
            acts_of[p] = found[b, keep]
            tokens_of[p] = [inputs.str_tokens[b][i] for i in keep.tolist()]
            values, positions = acts_of[p].max(0)
            for f, (value, pos) in enumerate(zip(values.tolist(), positions.tolist())):
                if value > 0:
                    best[f].append((value, p, pos))
    for f, node in enumerate(features):
        node["ctx"] = []
        for value, p, pos in sorted(best[f], key=lambda t: -t[0])[:n_contexts]:
            lo, hi = max(0, pos - window), min(len(tokens_of[p]), pos + 3)
            acts = [float(f"{a:.3g}") + 0.0 for a in acts_of[p][lo:hi, f].tolist()]  # for shading: 3 digits
            node["ctx"].append({"tokens": tokens_of[p][lo:hi], "at": pos - lo, "acts": acts, "max": _short(value)})


def circuit_json(
    payload: dict[str, Any], weights: list[float], pinned: list[str], supernodes: list[list[str]], *, pinned_only=False
) -> dict[str, Any]:
    """circuit-tracer's graph JSON (AttributionGraph.to_json's nodes and links) of the payload's graph, with the
    pins and supernodes in its qParams; `weights` are the edges' full weights. graph.js's export is the same."""
    n_layers, nodes = payload["n_layers"], []
    for n in payload["nodes"]:
        kind, layer, pos, f = n["kind"], n["layer"], n["pos"], n["feature"]
        ct_layer = {"embedding": "E", "logit": str(n_layers + 1)}.get(kind, str(layer))
        feature = {"feature": (layer + f) * (layer + f + 1) // 2 + f, "error": -1, "embedding": pos}.get(kind, f)
        js = {"feature": f"{layer}_{f}-0", "error": f"{layer}_{pos}-0", "embedding": f"E_{f}-{pos}"}.get(kind)
        nodes.append({
            "node_id": n["id"], "feature": feature, "layer": ct_layer, "ctx_idx": pos, "feature_type": CT_TYPES[kind],
            "token_prob": n.get("prob", 0.0), "is_target_logit": n.get("rank") == 0, "run_idx": 0, "reverse_ctx_idx": 0,
            "jsNodeId": js or f"L_{f}-{pos}", "clerp": n.get("clerp", ""), "influence": n.get("infl"),
            "activation": n.get("act"),
        })  # fmt: skip
    ids = [n["id"] for n in payload["nodes"]]
    links = [
        {"source": ids[s], "target": ids[t], "weight": w}
        for (s, t, _), w in zip(payload["edges"], weights, strict=True)
    ]
    if pinned_only:
        keep = set(pinned) | {node_id for _, *members in supernodes for node_id in members}
        nodes = [n for n in nodes if n["node_id"] in keep]
        links = [x for x in links if x["source"] in keep and x["target"] in keep]
    qparams = {"pinnedIds": list(pinned), "supernodes": [list(s) for s in supernodes], "linkType": "both",
               "clickedId": "", "sg_pos": ""}  # fmt: skip
    return {"metadata": payload["metadata"], "qParams": qparams, "nodes": nodes, "links": links}
