"""Activation patching and attribution patching between a clean and a corrupted prompt batch.

Activation patching runs the corrupted prompts with one activation (a site: a layer, a position, a head) taken
from the clean run, and scores the output with a metric; attribution patching estimates all of those scores at
once from one forward and one backward pass (gradient x (clean - corrupted) activation, Syed et al. 2023,
arXiv:2310.10348; Nanda 2023).

    result = ll.patching.activation_patching(model, clean, corrupted, metric, sites=["resid_pre", "z"])
    result.to_frame(); result.plot()
    ll.patching.get_act_patch_resid_pre(model, corrupted_tokens, clean_cache, metric)   # TransformerLens' name

Sites (scores' shapes; `by_pos=False` patches every position of a head at once):

    resid_pre, resid_mid, resid_post, attn_out, mlp_out     [n_layers, pos]
    z, q, pattern (per query head)                          [n_layers, pos, n_heads]     or [n_layers, n_heads]
    k, v (per key/value head: grouped-query attention)      [n_layers, pos, n_kv_heads]  or [n_layers, n_kv_heads]

For `pattern`, `pos` is the query (destination) position. A patched run recomputes only what its patch can
change: the layers from the patched one, the positions from the patched one (causal attention), batched with the
runs that start at the same position (the engine: sweep.py; the metrics: metrics.py; the logits a metric reads,
computed where it reads them: lazy_logits.py).

Modules: sites.py (what a patch is), sweep.py (activation patching), scoring.py and lazy_logits.py (the metric
of each patched run), attribution.py, api.py (the one-call entry points), result.py (PatchingResult), tl_names.py
(TransformerLens' `get_act_patch_*`), signature.py (old call forms kept for one release).
"""

from .api import activation_patching, attribution_patching
from .attribution import attribution_sweep
from .metrics import (
    BatchedMetric,
    Metric,
    PositionMetric,
    logit_diff_metric,
    target_prob_metric,
)
from .result import PatchingResult
from .sites import SITES
from .sweep import patch_sweep
from .tl_names import (
    get_act_patch_attn_head_all_pos_every,
    get_act_patch_attn_head_by_pos_every,
    get_act_patch_attn_head_k_all_pos,
    get_act_patch_attn_head_k_by_pos,
    get_act_patch_attn_head_out_all_pos,
    get_act_patch_attn_head_out_by_pos,
    get_act_patch_attn_head_pattern_all_pos,
    get_act_patch_attn_head_pattern_by_pos,
    get_act_patch_attn_head_pattern_dest_src_pos,
    get_act_patch_attn_head_q_all_pos,
    get_act_patch_attn_head_q_by_pos,
    get_act_patch_attn_head_v_all_pos,
    get_act_patch_attn_head_v_by_pos,
    get_act_patch_attn_out,
    get_act_patch_block_every,
    get_act_patch_mlp_out,
    get_act_patch_resid_mid,
    get_act_patch_resid_post,
    get_act_patch_resid_pre,
)

__all__ = [
    "SITES",
    "BatchedMetric",
    "Metric",
    "PatchingResult",
    "PositionMetric",
    "activation_patching",
    "attribution_patching",
    "attribution_sweep",
    "logit_diff_metric",
    "patch_sweep",
    "target_prob_metric",
    "get_act_patch_resid_pre",
    "get_act_patch_resid_mid",
    "get_act_patch_resid_post",
    "get_act_patch_attn_out",
    "get_act_patch_mlp_out",
    "get_act_patch_attn_head_out_all_pos",
    "get_act_patch_attn_head_out_by_pos",
    "get_act_patch_attn_head_q_all_pos",
    "get_act_patch_attn_head_q_by_pos",
    "get_act_patch_attn_head_k_all_pos",
    "get_act_patch_attn_head_k_by_pos",
    "get_act_patch_attn_head_v_all_pos",
    "get_act_patch_attn_head_v_by_pos",
    "get_act_patch_attn_head_pattern_all_pos",
    "get_act_patch_attn_head_pattern_by_pos",
    "get_act_patch_attn_head_pattern_dest_src_pos",
    "get_act_patch_attn_head_all_pos_every",
    "get_act_patch_attn_head_by_pos_every",
    "get_act_patch_block_every",
]
