"""matplotlib figures: logit-lens heatmaps and trajectories, attention patterns and per-head summaries.

Every function returns a `matplotlib.figure.Figure` built without pyplot; matplotlib is imported inside the
functions, so importing this module stays cheap.
"""

from __future__ import annotations

# ------------------------------------------------------------------------- attention (llama_lens/viz/attention.py)
from .viz.attention import attention, attention_summary, head_statistics, top_heads  # noqa: F401

# ------------------------------------------------------------------------- logit lens (llama_lens/viz/heatmap.py)
from .viz.heatmap import lens_heatmap, lens_trajectory, logit_attribution, visible_token  # noqa: F401
