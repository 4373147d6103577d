"""Export of an AttributionGraph to the files circuit-tracer's tools read.

- `write_json`: the frontend's graph JSON (circuit_tracer/frontend/graph_models.py: metadata, qParams, nodes,
  links), node ids and fields as circuit_tracer/utils/create_graph_files.py writes them, after pruning.
- `write_pt`: the dict `Graph.to_pt` saves, which `Graph.from_pt` turns back into a Graph. Its cfg and logit
  targets are circuit-tracer objects; they are pickled as calls (`UnifiedConfig.from_dict(...)`,
  `LogitTarget(...)`) resolved when the file is loaded, so writing needs no circuit-tracer here.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import torch

from ..errors import UsageError
from ..files import atomic_path


def _cantor_pairing(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def _node(node_id: str, feature: int, layer: str, pos: int, kind: str, js_id: str, **extra) -> dict:
    """A node with every field of circuit-tracer's pydantic Node, in its order."""
    node = {
        "node_id": node_id,
        "feature": feature,
        "layer": layer,
        "ctx_idx": pos,
        "feature_type": kind,
        "token_prob": 0.0,
        "is_target_logit": False,
        "run_idx": 0,
        "reverse_ctx_idx": 0,
        "jsNodeId": js_id,
        "clerp": "",
        "influence": None,
        "activation": None,
    }
    node.update(extra)
    return node


def graph_json(graph, *, slug: str = "graph", scan: str | None = None, node_threshold=0.8, edge_threshold=0.98):
    """The frontend's graph dict of `graph` pruned at the thresholds."""
    node_mask, edge_mask, cumulative = graph.prune(node_threshold, edge_threshold)
    n_features, n_pos, n_layers = graph.n_features, graph.n_pos, graph.n_layers
    error_end = n_features + n_pos * n_layers
    token_end = error_end + n_pos
    selected = graph.active_features[graph.selected_features].tolist()
    activations = graph.activation_values[graph.selected_features].tolist()
    influence = cumulative.tolist()
    nodes: dict[int, dict] = {}
    for index in node_mask.nonzero().flatten().tolist():
        if index < n_features:
            layer, pos, feature = selected[index]
            nodes[index] = _node(
                f"{layer}_{feature}_{pos}", _cantor_pairing(layer, feature), str(layer), pos,
                "cross layer transcoder", f"{layer}_{feature}-0",
                influence=influence[index], activation=activations[index],
            )  # fmt: skip
        elif index < error_end:
            layer, pos = divmod(index - n_features, n_pos)
            nodes[index] = _node(
                f"0_{layer}_{pos}", -1, str(layer), pos, "mlp reconstruction error", f"{layer}_{pos}-0",
                influence=influence[index],
            )  # fmt: skip
        elif index < token_end:
            pos = index - error_end
            token = int(graph.tokens[pos])
            nodes[index] = _node(
                f"E_{token}_{pos}", pos, "E", pos, "embedding", f"E_{token}-{pos}", influence=influence[index]
            )
        else:
            rank = index - token_end
            token, prob = int(graph.logit_tokens[rank]), float(graph.logit_probabilities[rank])
            text = graph.logit_strings[rank] if graph.logit_strings else str(token)
            layer = str(n_layers + 1)
            nodes[index] = _node(
                f"{layer}_{token}_{n_pos - 1}", token, layer, n_pos - 1, "logit", f"L_{token}-{n_pos - 1}",
                token_prob=prob, is_target_logit=rank == 0, clerp=f'Output "{text}" (p={prob:.3f})',
            )  # fmt: skip
    targets, sources = edge_mask.nonzero(as_tuple=True)
    weights = graph.adjacency[targets, sources].tolist()
    links = [
        {"source": nodes[source]["node_id"], "target": nodes[target]["node_id"], "weight": weight}
        for source, target, weight in zip(sources.tolist(), targets.tolist(), weights, strict=True)
        if source in nodes and target in nodes
    ]
    connected = {link["source"] for link in links} | {link["target"] for link in links}
    used = [n for n in nodes.values() if n["node_id"] in connected or n["feature_type"] in ("embedding", "logit")]
    metadata = {
        "slug": slug,
        "scan": scan or graph.model_config.get("model_name", "llama_lens"),
        "transcoder_list": [],
        "prompt_tokens": list(graph.str_tokens),
        "prompt": graph.prompt,
        "node_threshold": node_threshold,
        "schema_version": 1,
    }
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": qparams, "nodes": used, "links": links}


def write_json(graph, path: str | os.PathLike, **options) -> dict:
    data = graph_json(graph, **options)
    with atomic_path(Path(path)) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=2))
    return data


class _Call:
    """Pickles as `func(*args)`, evaluated when the file is loaded (func itself being such a call or a plain
    global), so a circuit-tracer object can be written without importing circuit-tracer."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __call__(self, *args):  # pickle wants a callable as the function of a reduce
        raise UsageError("a placeholder for pickling only: circuit-tracer builds the object when it loads the file")

    def __reduce__(self):
        return self.func, self.args


def _circuit_tracer(module: str, name: str) -> _Call:
    return _Call(getattr, _Call(importlib.import_module, f"circuit_tracer.{module}"), name)


def write_pt(graph, path: str | os.PathLike, *, scan: str | None = None) -> None:
    config = dict(graph.model_config)
    config.setdefault("dtype", None)
    logit_target = _circuit_tracer("attribution.targets", "LogitTarget")
    strings = graph.logit_strings or [""] * graph.n_logits
    data = {
        "input_string": graph.prompt,
        "adjacency_matrix": graph.adjacency.float(),
        "cfg": _Call(_Call(getattr, _circuit_tracer("utils.tl_nnsight_mapping", "UnifiedConfig"), "from_dict"), config),
        "active_features": graph.active_features,
        "logit_targets": [
            _Call(logit_target, text, int(token))
            for text, token in zip(strings, graph.logit_tokens.tolist(), strict=True)
        ],
        "logit_probabilities": graph.logit_probabilities.float(),
        "vocab_size": graph.d_vocab,
        "input_tokens": graph.tokens,
        "selected_features": graph.selected_features,
        "activation_values": graph.activation_values.float(),
        "scan": scan,
    }
    with atomic_path(Path(path)) as tmp:
        torch.save(data, tmp)
