"""matplotlib figures: logit-lens heatmaps and trajectories, direct logit attribution, attention patterns and
per-head summaries.

Every function returns a `matplotlib.figure.Figure` built without pyplot; matplotlib is imported inside the
functions, so importing this module stays cheap. The lens figures are chosen by the lens (which prompt, metric
and cells) and drawn by `llama_lens.viz` from neutral values (a grid, lines, bars) that know no result type.
"""

from __future__ import annotations

# ------------------------------------------------------------------------- logit lens (llama_lens/lens/)
from .lens.attribution import logit_attribution  # noqa: F401
from .lens.logit_result import lens_heatmap, lens_trajectory  # noqa: F401

# ------------------------------------------------------------------------- attention (llama_lens/viz/)
from .viz.attention import attention  # noqa: F401
from .viz.head_stats import attention_summary, head_statistics, top_heads  # noqa: F401
from .viz.tokens import visible_token  # noqa: F401
