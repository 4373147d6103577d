"""The engine of activation patching: all the patched runs of a sweep, batched, each computing only what its patch
can change.

A patch at layer L and position p changes nothing before layer L and, attention being causal, nothing at the
positions before p in any layer (a key or value patched at p is read by the queries from p on; a pattern row or a
query at p feeds position p only). So a patched run starts at layer L from the corrupted run's residual stream at
positions p.. only, with the corrupted run's keys and values of the positions before p as a fixed prefix (a KV
cache), and its logits before p are the corrupted run's. A patch of a whole head (every position) starts at
position 0. A patch that writes the values already there (clean and corrupted activations equal, as where the
prompts share their first tokens) changes nothing: its score is the corrupted run's, and it is not run.

Runs that start at the same position have the same length and share a batch (a group, cut at `max_batch` rows).
A group runs as a staircase: it enters the lowest layer any of its runs patches, and at each later layer the runs
patched there join the batch, from the corrupted run's residual stream. So one block call per group and layer
serves every run in the group, whatever layer it starts at.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import ArgumentError
from ..model.activation_cache import ActivationCache
from ..model.kv_cache import KVCache
from ..model.llama import HookedLlama, rope_cos_sin
from .metrics import Metric
from .scoring import PatchScorer
from .sites import (
    SITES,
    check_site,
    corrupted_reference,
    final_resid_name,
    first_changed_position,
    reference_names,
    resolve_layers,
    site_indices,
    site_region,
)


@dataclass
class PatchRun:
    """One patched run: the patch (layer, axis name -> index), the first position it changes, its score's slot."""

    slot: int
    layer: int
    where: dict[str, int]
    start: int


class SuffixInputs:
    """What a group's block calls share: RoPE cos/sin and the attention mask of positions start.., repeated for
    up to `copies` runs, and the corrupted run's keys/values of the positions before `start`."""

    def __init__(
        self,
        model: HookedLlama,
        mask: torch.Tensor | None,
        reference: ActivationCache,
        batch: int,
        pos: int,
        start: int,
        copies: int,
    ) -> None:
        device = model.device
        full = torch.ones(batch, pos, dtype=torch.long, device=device) if mask is None else mask
        prefix = None
        if start > 0:
            prefix = KVCache()
            prefix.attention_mask = full[:, :start]
        positions, attn_mask = model.positions_and_mask(batch, pos - start, full[:, start:], prefix, device)
        cos, sin = rope_cos_sin(model.cfg, positions, dtype=model.dtype)  # [batch, pos - start, 1, d_head]
        self.cos, self.sin = cos.repeat(copies, 1, 1, 1), sin.repeat(copies, 1, 1, 1)
        self.mask = None if attn_mask is None else attn_mask.repeat(copies, 1, 1, 1)  # [rows, 1, q_pos, k_pos]
        self.reference, self.start, self.batch = reference, start, batch

    def kv_prefix(self, layer: int, rows: int) -> KVCache | None:
        """A KV cache holding the corrupted keys/values of positions < start for `rows` rows (None at start 0)."""
        if self.start == 0:
            return None
        copies = rows // self.batch
        cache = KVCache()
        for store, name in ((cache.keys, "attn.hook_rot_k"), (cache.values, "attn.hook_v")):
            # [batch, pos, n_kv_heads, d_head] -> [rows, n_kv_heads, start, d_head], the layout Attention caches
            prefix = self.reference[f"blocks.{layer}.{name}"][:, : self.start].transpose(1, 2)
            store[layer] = prefix.to(self.cos.device).repeat(copies, 1, 1, 1)
        return cache

    def run_block(self, model: HookedLlama, layer: int, resid: torch.Tensor) -> torch.Tensor:
        rows = resid.shape[0]
        mask = None if self.mask is None else self.mask[:rows]
        return model.run_block(layer, resid, self.cos[:rows], self.sin[:rows], mask, self.kv_prefix(layer, rows))


def run_group(
    model: HookedLlama,
    group: list[PatchRun],
    inputs: SuffixInputs,
    site: str,
    cleans: dict[int, torch.Tensor],
    reference: ActivationCache,
) -> torch.Tensor:
    """Runs one group (runs sorted by layer, one start) as a staircase; returns the final residual stream
    [runs * batch, pos - start, d_model], run-major in the group's order."""
    suffix, _ = SITES[site]
    start, batch = inputs.start, inputs.batch
    resid, joined = None, 0
    for layer in [layer for layer in model.layer_indices if layer >= group[0].layer]:
        joining = [run for run in group[joined:] if run.layer == layer]
        if joining:
            entering = reference[f"blocks.{layer}.hook_resid_pre"][:, start:].to(model.device)
            entering = entering.repeat(len(joining), 1, 1)  # [joining runs * batch, pos - start, d_model]
            resid = entering if resid is None else torch.cat([resid, entering])
        clean = cleans.get(layer)

        def patch(act: torch.Tensor, *, hook, joining=joining, clean=clean) -> None:
            first = act.shape[0] - len(joining) * batch  # the joining runs are the last rows
            for i, run in enumerate(joining):
                rows = act[first + i * batch : first + (i + 1) * batch]
                site_region(rows, site, run.where, start).copy_(site_region(clean, site, run.where))

        with model.hooks([(f"blocks.{layer}.{suffix}", patch)] if joining else []):
            resid = inputs.run_block(model, layer, resid)
        joined += len(joining)
    return resid


def patch_sweep(
    model: HookedLlama,
    corrupted_tokens: torch.Tensor,
    clean_cache: ActivationCache,
    metric: Metric,
    site: str,
    *,
    by_pos: bool | str = True,
    layers: Sequence[int] | None = None,
    attention_mask: torch.Tensor | None = None,
    corrupted_cache: ActivationCache | None = None,
    max_batch: int = 64,
    skip_unchanged: bool = True,
    progress: bool = True,
) -> tuple[torch.Tensor, tuple[str, ...]]:
    """Activation patching of one site over layers x positions (x heads): the engine of `ll.patching`.

    Each patched run computes only the layers from the patched one and the positions from the patched one (see
    the module docstring); its scores equal those of a full forward pass per patch (TransformerLens' loop) to
    float rounding.

    Args:
        corrupted_tokens: [batch, pos] ids, the runs that receive the patch.
        clean_cache: a cache of the clean run holding the site's activations (same [batch, pos]).
        metric: metric(logits [batch, pos, d_vocab]) -> [], called once per patched run on logits that compute
            the positions it indexes only; a `BatchedMetric` once per group of runs; a `PositionMetric` (the
            ready metrics) on the logits of its position only (metrics.py).
        site: one of SITES.
        by_pos: patch each position separately (head sites: False patches all positions of a head at once;
            "pattern" also takes "dest_src": each (query, key) entry of a head's pattern).
        layers: the layers to patch (default: all loaded; negative ones count from the last).
        attention_mask: [batch, pos] of the corrupted tokens (default: inferred as `forward` does).
        corrupted_cache: a cache of the corrupted run holding `reference_names(model, site, layers)` (computed
            when omitted or incomplete, with the attention path the clean cache was computed with: see
            `corrupted_reference`).
        max_batch: the most rows (prompts x patched runs) per forward pass.
        skip_unchanged: give a patch that writes the values already there the corrupted run's score without
            running it (exact: the run would be the corrupted run).
        progress: show a tqdm progress bar.

    Returns:
        scores [n_layers_patched, ...site axes], and the axis names.
    """
    suffix, _ = check_site(site)
    tokens, inferred = model.prepare_tokens(corrupted_tokens)
    mask = inferred if attention_mask is None else attention_mask.to(model.device)
    batch, pos = tokens.shape
    layers = resolve_layers(model, layers)
    indices, axes = site_indices(site, model, pos, by_pos)
    names = reference_names(model, site, layers)
    with torch.no_grad():
        if corrupted_cache is None or any(name not in corrupted_cache for name in names):
            corrupted_cache = corrupted_reference(model, tokens, mask, names, clean_cache)
        reference = corrupted_cache
        scorer = PatchScorer(model, metric, reference[final_resid_name(model)].to(model.device))
        baseline = scorer.corrupted_score()
    scores = torch.empty(len(layers) * len(indices))
    cleans: dict[int, torch.Tensor] = {}
    runs: list[PatchRun] = []
    for row, layer in enumerate(layers):
        name = f"blocks.{layer}.{suffix}"
        if name not in clean_cache:
            raise ArgumentError(f"the clean cache has no {name!r}; run run_with_cache on the clean tokens with it")
        clean, corrupted = clean_cache[name].to(model.device), reference[name].to(model.device)
        if clean.shape != corrupted.shape:
            shapes = f"{tuple(clean.shape)}, the corrupted run's is {tuple(corrupted.shape)}"
            raise ArgumentError(f"clean {name} is {shapes}")
        cleans[layer] = clean
        for col, index in enumerate(indices):
            slot, where = row * len(indices) + col, dict(zip(axes[1:], index))
            if skip_unchanged and torch.equal(site_region(clean, site, where), site_region(corrupted, site, where)):
                scores[slot] = baseline
            else:
                runs.append(PatchRun(slot, layer, where, first_changed_position(where)))

    per_batch = max(1, max_batch // batch)
    groups: list[list[PatchRun]] = []
    for start in sorted({run.start for run in runs}):
        members = sorted((run for run in runs if run.start == start), key=lambda run: run.layer)
        groups += [members[i : i + per_batch] for i in range(0, len(members), per_batch)]
    bar = _progress(len(scores), progress, f"patching {site}")
    bar.update(len(scores) - len(runs))  # the patches that change nothing, scored without a run
    with torch.no_grad(), bar:
        inputs: dict[int, SuffixInputs] = {}
        for group in groups:
            start = group[0].start
            if start not in inputs:
                inputs[start] = SuffixInputs(model, mask, reference, batch, pos, start, per_batch)
            final = run_group(model, group, inputs[start], site, cleans, reference)
            for run, score in zip(group, scorer.scores(final, start)):
                scores[run.slot] = score
            bar.update(len(group))
    shape = [len(layers)] + [len({index[k] for index in indices}) for k in range(len(indices[0]))]
    return scores.view(shape), axes


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="run", leave=False)
