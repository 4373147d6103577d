"""matplotlib figures: logit-lens heatmaps and trajectories, attention patterns and per-head summaries.

Every function returns a `matplotlib.figure.Figure` built without pyplot; matplotlib is imported inside the
functions, so importing this module stays cheap.
"""

from __future__ import annotations

# ------------------------------------------------------------------------- attention (llama_lens/plot_attention.py)
from .plot_attention import attention, attention_summary, head_statistics, top_heads  # noqa: F401

# ------------------------------------------------------------------------- logit lens (llama_lens/plot_lens.py)
from .plot_lens import lens_heatmap, lens_trajectory, logit_attribution, visible_token  # noqa: F401
