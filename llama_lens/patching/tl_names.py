"""TransformerLens' `patching.get_act_patch_*` functions: the same names, signatures and result layouts, run by
the batched sweep (sweep.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.activation_cache import ActivationCache
from ..model.llama import HookedLlama
from .metrics import Metric
from .sites import SITES, corrupted_reference, reference_names, resolve_layers
from .sweep import patch_sweep


@dataclass(frozen=True)
class _Sweep:
    """What a TransformerLens-named function sweeps: a site, by position or not, and its scores' axis order."""

    site: str
    by_pos: bool | str
    head_first: bool = False  # TransformerLens orders a pattern's by-position scores by head, then position

    def run(self, model, corrupted_tokens, clean_cache, metric, progress, max_batch, corrupted_cache=None):
        scores = patch_sweep(
            model,
            corrupted_tokens,
            clean_cache,
            metric,
            self.site,
            by_pos=self.by_pos,
            corrupted_cache=corrupted_cache,
            max_batch=max_batch,
            progress=progress,
        )[0]
        return scores.permute(0, 2, 1) if self.head_first else scores


def _tl(site: str, by_pos: bool | str, doc: str, head_first: bool = False):
    sweep = _Sweep(site, by_pos, head_first)

    def patch(
        model: HookedLlama,
        corrupted_tokens: torch.Tensor,
        clean_cache: ActivationCache,
        patching_metric: Metric,
        *,
        progress: bool = True,
        max_batch: int = 64,
    ) -> torch.Tensor:
        return sweep.run(model, corrupted_tokens, clean_cache, patching_metric, progress, max_batch)

    patch.sweep = sweep
    patch.__doc__ = (
        f"TransformerLens' name: patches clean `{SITES[site][0]}` into the corrupted run {doc}.\n\n"
        "Args: model, corrupted_tokens [batch, pos], clean_cache (run_with_cache of the clean tokens), "
        "patching_metric(logits) -> [] (any metric: see `patch_sweep`); progress (a tqdm bar counting patched "
        "runs), max_batch (rows per forward pass).\n"
    )
    return patch


get_act_patch_resid_pre = _tl("resid_pre", True, "per (layer, position): [n_layers, pos]")
get_act_patch_resid_mid = _tl("resid_mid", True, "per (layer, position): [n_layers, pos]")
get_act_patch_resid_post = _tl("resid_post", True, "per (layer, position): [n_layers, pos]")
get_act_patch_attn_out = _tl("attn_out", True, "per (layer, position): [n_layers, pos]")
get_act_patch_mlp_out = _tl("mlp_out", True, "per (layer, position): [n_layers, pos]")
get_act_patch_attn_head_out_all_pos = _tl("z", False, "per (layer, head), all positions: [n_layers, n_heads]")
get_act_patch_attn_head_out_by_pos = _tl("z", True, "per (layer, position, head): [n_layers, pos, n_heads]")
get_act_patch_attn_head_q_all_pos = _tl("q", False, "per (layer, head), all positions: [n_layers, n_heads]")
get_act_patch_attn_head_q_by_pos = _tl("q", True, "per (layer, position, head): [n_layers, pos, n_heads]")
get_act_patch_attn_head_k_all_pos = _tl("k", False, "per (layer, KV head): [n_layers, n_kv_heads]")
get_act_patch_attn_head_k_by_pos = _tl("k", True, "per (layer, position, KV head): [n_layers, pos, n_kv_heads]")
get_act_patch_attn_head_v_all_pos = _tl("v", False, "per (layer, KV head): [n_layers, n_kv_heads]")
get_act_patch_attn_head_v_by_pos = _tl("v", True, "per (layer, position, KV head): [n_layers, pos, n_kv_heads]")
get_act_patch_attn_head_pattern_all_pos = _tl("pattern", False, "per (layer, head): [n_layers, n_heads]")
get_act_patch_attn_head_pattern_by_pos = _tl(
    "pattern", True, "per (layer, head, query position): [n_layers, n_heads, dest_pos]", head_first=True
)
get_act_patch_attn_head_pattern_dest_src_pos = _tl(
    "pattern", "dest_src", "per (layer, head, query, key) entry: [n_layers, n_heads, dest_pos, src_pos]"
)


def _every(functions, model, corrupted_tokens, clean_cache, metric, progress, max_batch) -> torch.Tensor:
    # One corrupted pass holds what every function's sweep reads from it.
    sweeps = [function.sweep for function in functions]
    layers = resolve_layers(model, None)
    names = sorted({name for sweep in sweeps for name in reference_names(model, sweep.site, layers)})
    tokens, mask = model.prepare_tokens(corrupted_tokens)
    corrupted_cache = corrupted_reference(model, tokens, mask, names, clean_cache)
    results = []
    for sweep in sweeps:
        scores = sweep.run(model, corrupted_tokens, clean_cache, metric, progress, max_batch, corrupted_cache)
        if sweep.site in ("k", "v"):
            # As TransformerLens: one entry per key/value head, zero-padded to n_heads (grouped-query attention).
            scores = torch.nn.functional.pad(scores, (0, model.cfg.n_heads - scores.shape[-1]))
        results.append(scores)
    return torch.stack(results)


def _every_function(name: str, functions, doc: str):
    def every(
        model: HookedLlama,
        corrupted_tokens: torch.Tensor,
        clean_cache: ActivationCache,
        metric: Metric,
        *,
        progress: bool = True,
        max_batch: int = 64,
    ) -> torch.Tensor:
        return _every(functions, model, corrupted_tokens, clean_cache, metric, progress, max_batch)

    every.__name__ = every.__qualname__ = name
    every.__doc__ = doc
    return every


get_act_patch_attn_head_all_pos_every = _every_function(
    "get_act_patch_attn_head_all_pos_every",
    [
        get_act_patch_attn_head_out_all_pos,
        get_act_patch_attn_head_q_all_pos,
        get_act_patch_attn_head_k_all_pos,
        get_act_patch_attn_head_v_all_pos,
        get_act_patch_attn_head_pattern_all_pos,
    ],
    """TransformerLens' name: each head patched at every position, for its output (z), query, key, value and
    pattern: [5, n_layers, n_heads]. With grouped-query attention, the key and value rows hold one score per
    key/value head in their first n_kv_heads columns and zeros after, as TransformerLens' do.""",
)
get_act_patch_attn_head_by_pos_every = _every_function(
    "get_act_patch_attn_head_by_pos_every",
    [
        get_act_patch_attn_head_out_by_pos,
        get_act_patch_attn_head_q_by_pos,
        get_act_patch_attn_head_k_by_pos,
        get_act_patch_attn_head_v_by_pos,
        _tl("pattern", True, "per (layer, query position, head)"),
    ],
    """TransformerLens' name: each head patched at each position, for its output (z), query, key, value and
    pattern (query position): [5, n_layers, pos, n_heads]; key and value rows zero-padded from n_kv_heads to
    n_heads as in `get_act_patch_attn_head_all_pos_every`.""",
)
get_act_patch_block_every = _every_function(
    "get_act_patch_block_every",
    [get_act_patch_resid_pre, get_act_patch_attn_out, get_act_patch_mlp_out],
    "TransformerLens' name: resid_pre, attn_out and mlp_out patched per (layer, position): [3, n_layers, pos].",
)
