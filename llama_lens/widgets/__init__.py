"""Explorers for notebooks: the logit lens, attention patterns, the feature lens and attribution graphs, as anywidget
instruments.

Each explorer runs the model in Python and ships the numbers to the page once per model run; hovering,
clicking, pinning, zooming and colouring happen in the browser. The JavaScript and CSS are files in this
package (nothing is fetched at render time). Where no widget front-end runs (nbconvert HTML, GitHub), a static
picture shows instead, and `.save_html(path)` writes a standalone page that works offline.

    ll.widgets.LogitLensExplorer(model, "The Eiffel Tower is in the city of", target=" Paris")
    ll.widgets.AttentionExplorer(model, "When Mary and John went to the store, John gave a drink to")
    ll.widgets.FeatureExplorer(ll.feature_lens(model, prompt, dictionaries, target=" Paris"))
    ll.widgets.GraphExplorer(ll.attribution_graph(model, prompt, transcoders), model, transcoders, prompts)
"""

from __future__ import annotations

from .attention_explorer import AttentionExplorer
from .base import Control, Explorer, figure_png
from .feature_explorer import FeatureExplorer
from .graph_explorer import GraphExplorer
from .lens_explorer import METRICS, READOUTS, LogitLensExplorer

__all__ = [
    "AttentionExplorer", "Control", "Explorer", "FeatureExplorer", "GraphExplorer", "LogitLensExplorer", "METRICS",
    "READOUTS", "figure_png",
]  # fmt: skip
