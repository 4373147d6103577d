"""The graph explorer's data: an AttributionGraph pruned, with each feature's read-out and activating contexts.

Only the pruned graph travels (circuit-tracer's pruning, `graphs/export.graph_json`: the nodes and links its
frontend would get), as JSON:

    prompt, tokens        the prompt and its tokens' texts
    n_layers              the model's layers (embeddings sit at layer -1, logits at n_layers)
    metadata              circuit-tracer's graph metadata (for the page's export)
    nodes                 one per node, in graph_json's order: id (circuit-tracer's node_id), kind ("feature",
                          "error", "embedding", "logit"), layer, pos, feature (the transcoder feature, the token
                          id of an embedding or a logit, -1 for an error), act, infl, and where known:
                          readout (the top tokens of its decoder direction, as the feature lens reads one),
                          ctx (activating contexts: {tokens, at, acts, max}), text (an embedding's or logit's
                          token), prob and clerp (a logit's)
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
from ..graphs.export import graph_json
from ..graphs.result import AttributionGraph
from ..graphs.transcoders import as_transcoder_set
from ..lens.inputs import prepare_inputs, token_texts

KINDS = {
    "cross layer transcoder": "feature",
    "mlp reconstruction error": "error",
    "embedding": "embedding",
    "logit": "logit",
}
BATCH = 8  # context prompts per forward pass


def _short(value: float) -> float:
    return float(f"{value:.6g}")


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
) -> dict[str, Any]:
    """The page's data (see the module docstring)."""
    if not isinstance(graph, AttributionGraph):
        what = type(graph).__name__
        raise ArgumentTypeError(f"GraphExplorer takes an AttributionGraph (ll.attribution_graph), got {what}")
    if (model is None) != (transcoders is None):
        raise ArgumentError("read-outs and contexts need both model= and transcoders= (the graph's transcoders)")
    if contexts is not None and model is None:
        raise ArgumentError("contexts= needs model= and transcoders= to run the prompts")
    data = graph_json(graph, node_threshold=node_threshold, edge_threshold=edge_threshold)
    index = {node["node_id"]: i for i, node in enumerate(data["nodes"])}
    nodes = []
    for node in data["nodes"]:
        kind = KINDS[node["feature_type"]]
        layer = {"embedding": -1, "logit": graph.n_layers}.get(kind) if kind in ("embedding", "logit") else None
        layer = int(node["layer"]) if layer is None else layer
        pos = node["ctx_idx"]
        item: dict[str, Any] = {"id": node["node_id"], "kind": kind, "layer": layer, "pos": pos}
        if kind == "feature":
            item["feature"] = int(node["node_id"].split("_")[1])
        elif kind == "embedding":
            item["feature"] = int(graph.tokens[pos])
            item["text"] = graph.str_tokens[pos]
        elif kind == "logit":
            item["feature"] = node["feature"]
            item["prob"] = node["token_prob"]
            item["rank"] = graph.logit_tokens.tolist().index(node["feature"])
            item["clerp"] = node["clerp"]
            rank = item["rank"]
            item["text"] = graph.logit_strings[rank] if graph.logit_strings else str(node["feature"])
        else:
            item["feature"] = -1
        item["act"] = node["activation"]
        item["infl"] = node["influence"]
        nodes.append(item)
    edges = [[index[link["source"]], index[link["target"]], _short(link["weight"])] for link in data["links"]]
    if model is not None:
        tset = as_transcoder_set(transcoders, graph.n_layers, dtype=torch.float32)
        features = [n for n in nodes if n["kind"] == "feature"]
        _add_readouts(model, tset, features, n_readout)
        if contexts is not None:
            _add_contexts(model, tset, features, _prompts(contexts), n_contexts, window)
    return {
        "prompt": graph.prompt,
        "tokens": list(graph.str_tokens),
        "n_layers": graph.n_layers,
        "metadata": data["metadata"],
        "nodes": nodes,
        "edges": edges,
    }


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
            acts = [_short(a) for a in acts_of[p][lo:hi, f].tolist()]
            node["ctx"].append({"tokens": tokens_of[p][lo:hi], "at": pos - lo, "acts": acts, "max": _short(value)})
