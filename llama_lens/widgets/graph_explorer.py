"""GraphExplorer: an attribution graph as a node-link diagram in the browser.

The graph is pruned once (circuit-tracer's pruning at `node_threshold` / `edge_threshold`) and only the pruned
nodes and edges travel to the page (graph_data.py), with each feature's vocabulary read-out and, given prompts,
its top activating contexts. Hovering, pinning, selecting and grouping happen in the browser; the pins, the
selection and the supernodes are synced traits, so a notebook reads them (`explorer.pinned`,
`explorer.supernodes`) and `explorer.export(path)` writes them in circuit-tracer's graph JSON.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import traitlets

from ..errors import ArgumentError
from ..files import atomic_path
from .base import Control, Explorer, asset, number, one_of
from .graph_data import circuit_json, graph_payload

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..graphs.result import AttributionGraph

VIEWS = ("all", "pinned")
KIND_STYLE = {  # marker and colour of each kind of node in the static picture
    "feature": ("o", "#495057"),
    "error": ("s", "#adb5bd"),
    "embedding": ("s", "#2f9e44"),
    "logit": ("D", "#e8590c"),
}


def _node_ids(explorer: Any, value: Any, name: str) -> list[str]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ArgumentError(f"{name} must be a list of node ids (e.g. {explorer.node_ids[:2]}), got {value!r}")
    unknown = [v for v in value if v not in explorer.node_ids]
    if unknown:
        raise ArgumentError(f"{name}: {unknown[:5]} are not nodes of the pruned graph (explorer.node_ids lists them)")
    return list(dict.fromkeys(value))


def _check_supernodes(explorer: Any, value: Any) -> list[list[str]]:
    if not isinstance(value, (list, tuple)):
        raise ArgumentError(f"supernodes must be a list of [label, node_id, ...] lists, got {value!r}")
    out, seen = [], {}
    for item in value:
        if not isinstance(item, (list, tuple)) or len(item) < 2 or not isinstance(item[0], str):
            raise ArgumentError(f"a supernode is [label, node_id, ...] with at least one node, got {item!r}")
        ids = _node_ids(explorer, list(item[1:]), f"supernode {item[0]!r}")
        for node_id in ids:
            if node_id in seen:
                raise ArgumentError(f"node {node_id!r} is in two supernodes, {seen[node_id]!r} and {item[0]!r}")
            seen[node_id] = item[0]
        out.append([item[0], *ids])
    return out


class GraphExplorer(Explorer):
    """An attribution graph in the browser: layers up the y axis, the prompt's positions along the x axis.

    Hover a node for its read-out and activating contexts; click (or Enter) pins it and the "pinned" view shows
    the pinned nodes with their neighbours; shift-click (or Space) selects nodes and "group" merges them into a
    supernode, its edges to the rest summed; "export JSON" downloads circuit-tracer's graph JSON with the pins
    and supernodes in its qParams (as `export`).

    Args:
        graph: an AttributionGraph (`ll.attribution_graph`).
        model: the model the graph was made from; with `transcoders`, each feature gets its vocabulary read-out
            (its decoder direction through the final norm and the unembedding, as the feature lens reads one).
        transcoders: the graph's transcoders (the list, or TranscoderSet, given to `ll.attribution_graph`).
        contexts: prompt texts (`ll.read_prompts(path)[0]` reads a file): each feature's top activating
            contexts among them are shown on hover. Needs model and transcoders.
        node_threshold, edge_threshold: the pruning (`AttributionGraph.prune`).
        n_readout: read-out tokens per feature; n_contexts: contexts per feature.
        max_edges: edges drawn, the strongest first (the rest stay in the data and the export).
        threaded: as for the other explorers (nothing here runs the model after construction).
    """

    _esm = asset("common.js") + asset("graph.js")
    _css = asset("widgets.css") + asset("graph.css")

    CONTROLS = {
        "pinned": Control("redraw", lambda e, v: _node_ids(e, v, "pinned"), "pinned node ids"),
        "selected": Control("redraw", lambda e, v: _node_ids(e, v, "selected"), "selected node ids"),
        "supernodes": Control("redraw", _check_supernodes, "[label, node_id, ...] per supernode"),
        "view": Control("redraw", one_of("view", VIEWS), "the whole graph, or the pinned nodes and neighbours"),
        "max_edges": Control("redraw", number("max_edges", low=1, high=1_000_000, integer=True), "edges drawn"),
    }

    pinned = traitlets.List([]).tag(sync=True)
    selected = traitlets.List([]).tag(sync=True)
    supernodes = traitlets.List([]).tag(sync=True)
    view = traitlets.Unicode("all").tag(sync=True)
    max_edges = traitlets.Int(1500).tag(sync=True)
    meta = traitlets.Dict({}).tag(sync=True)

    def __init__(
        self,
        graph: AttributionGraph,
        model: Any = None,
        transcoders: Any = None,
        contexts: Sequence[str] | None = None,
        *,
        node_threshold: float = 0.8,
        edge_threshold: float = 0.98,
        n_readout: int = 5,
        n_contexts: int = 3,
        max_edges: int = 1500,
        threaded: bool | None = None,
    ) -> None:
        payload, self._indices = graph_payload(
            graph, model=model, transcoders=transcoders, contexts=contexts, node_threshold=node_threshold,
            edge_threshold=edge_threshold, n_readout=n_readout, n_contexts=n_contexts,
        )  # fmt: skip
        self.graph, self.thresholds = graph, {"node_threshold": node_threshold, "edge_threshold": edge_threshold}
        self.node_ids = [node["id"] for node in payload["nodes"]]
        super().__init__(threaded=threaded)
        self.max_edges = number("max_edges", low=1, high=1_000_000, integer=True)(self, max_edges)
        with self.hold_sync():
            self.meta = payload
            kinds = [node["kind"] for node in payload["nodes"]]
            self.status = (
                f"{kinds.count('feature')} features, {len(payload['edges'])} edges after pruning "
                f"(nodes {node_threshold}, edges {edge_threshold}; {len(json.dumps(payload)) / 1e3:.0f} kB)"
            )
        self._data_changed()

    # ------------------------------------------------------------------ reading
    def nodes_frame(self):
        """The pruned graph's nodes (id, kind, layer, pos, feature, act, infl, readout), with pinned, selected and
        supernode columns from the page's state."""
        import pandas as pd

        group = {node_id: label for label, *ids in self.supernodes for node_id in ids}
        rows = [
            {key: node.get(key) for key in ("id", "kind", "layer", "pos", "feature", "act", "infl", "readout")}
            | {
                "pinned": node["id"] in self.pinned,
                "selected": node["id"] in self.selected,
                "supernode": group.get(node["id"]),
            }  # fmt: skip
            for node in self.meta["nodes"]
        ]
        return pd.DataFrame(rows)

    def export(self, path: str | Path | None = None, *, pinned_only: bool = False) -> dict[str, Any]:
        """circuit-tracer's graph JSON of the pruned graph (as `AttributionGraph.to_json` writes it), with the pinned
        ids and the supernodes in its qParams, as its frontend keeps them; written to `path` when given.

        circuit-tracer's node ids collide where a layer-0 feature's index is below the layer count ("0_L_pos"
        names both feature L at layer 0 and the error node of layer L); here the second one gets "~error" added,
        so every id names one node.

        Args:
            pinned_only: keep only the pinned nodes and the supernodes' members, and the links between them.
        """
        at = self._indices
        weights = [float(self.graph.adjacency[at[t], at[s]]) for s, t, _ in self.meta["edges"]]
        data = circuit_json(self.meta, weights, self.pinned, self.supernodes, pinned_only=pinned_only)
        if path is not None:
            path = Path(path)
            if not path.parent.is_dir():
                raise ArgumentError(f"export: the folder {str(path.parent)!r} does not exist")
            with atomic_path(path) as tmp:
                Path(tmp).write_text(json.dumps(data, indent=2))
        return data

    def to_figure(self) -> Figure:
        """A matplotlib picture of the pruned graph: nodes at (position, layer), the drawn edges as lines."""
        from matplotlib.collections import LineCollection
        from matplotlib.colors import to_rgba
        from matplotlib.figure import Figure

        meta = self.meta
        nodes = meta["nodes"]
        fig = Figure(figsize=(max(6.0, 0.7 * len(meta["tokens"])), 0.45 * (meta["n_layers"] + 2) + 1.2))
        ax = fig.add_subplot()
        spread: dict[tuple[int, int], list[int]] = {}
        for i, node in enumerate(nodes):
            spread.setdefault((node["layer"], node["pos"]), []).append(i)
        xy = {}
        for (layer, pos), members in spread.items():
            for k, i in enumerate(members):
                xy[i] = (pos - 0.4 + 0.8 * (k + 0.5) / len(members), layer)
        edges = sorted(meta["edges"], key=lambda e: -abs(e[2]))[: self.max_edges][::-1]  # the strongest on top
        top = max((abs(e[2]) for e in edges), default=1.0) or 1.0
        colours = [to_rgba("#1c7ed6" if w >= 0 else "#e03131", 0.1 + 0.5 * abs(w) / top) for _, _, w in edges]
        widths = [0.3 + 2 * abs(w) / top for _, _, w in edges]
        ax.add_collection(LineCollection([[xy[s], xy[t]] for s, t, _ in edges], colors=colours, linewidths=widths))
        for kind, (marker, colour) in KIND_STYLE.items():
            points = [xy[i] for i, node in enumerate(nodes) if node["kind"] == kind]
            if points:
                ax.scatter(*zip(*points), marker=marker, color=colour, s=18, zorder=3, label=kind)
        ax.set_xticks(range(len(meta["tokens"])), [repr(t)[1:-1] for t in meta["tokens"]], rotation=45, ha="right")
        n_layers = meta["n_layers"]
        ax.set_yticks(range(-1, n_layers + 1), ["emb", *[f"L{i}" for i in range(n_layers)], "logit"])
        ax.legend(loc="upper left", fontsize=7, ncol=4)
        ax.set_title(f"attribution graph: {len(nodes)} nodes, {len(meta['edges'])} edges", fontsize=9)
        fig.tight_layout()
        return fig
