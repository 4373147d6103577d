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

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..model.activation_cache import ActivationCache
from ..model.kv_cache import KVCache
from ..model.llama import HookedLlama, rope_cos_sin
from ..validate import check_loaded_layers
from .metrics import Metric, PositionMetric

# site -> (hook name after "blocks.{layer}.", what the head axis counts or None)
SITES: dict[str, tuple[str, str | None]] = {
    "resid_pre": ("hook_resid_pre", None),
    "resid_mid": ("hook_resid_mid", None),
    "resid_post": ("hook_resid_post", None),
    "attn_out": ("hook_attn_out", None),
    "mlp_out": ("hook_mlp_out", None),
    "z": ("attn.hook_z", "n_heads"),
    "q": ("attn.hook_q", "n_heads"),
    "k": ("attn.hook_k", "n_kv_heads"),
    "v": ("attn.hook_v", "n_kv_heads"),
    "pattern": ("attn.hook_pattern", "n_heads"),
}


def check_site(site: str) -> tuple[str, str | None]:
    """The site's (hook name suffix, head axis); a ValueError naming the choices for an unknown site."""
    if site not in SITES:
        raise ValueError(f"unknown patching site {site!r}; choose from {', '.join(SITES)}")
    return SITES[site]


def site_indices(
    site: str, model: HookedLlama, pos: int, by_pos: bool | str
) -> tuple[list[tuple[int, ...]], tuple[str, ...]]:
    """Every patch of one layer as a tuple over the score axes after "layer", and those axes.

    `by_pos`: True patches one position (and head) at a time, False a head at every position, "dest_src" (pattern
    only) one (query, key) entry of a head's pattern, TransformerLens' [n_layers, n_heads, dest_pos, src_pos].
    """
    _, heads = check_site(site)
    if by_pos == "dest_src":
        if site != "pattern":
            raise ValueError(f"by_pos='dest_src' patches pattern entries; site {site!r} takes True or False")
        entries = [(h, dest, src) for h in range(model.cfg.n_heads) for dest in range(pos) for src in range(pos)]
        return entries, ("layer", "head", "dest_pos", "src_pos")
    if not isinstance(by_pos, bool):
        raise ValueError(f"by_pos must be True, False or 'dest_src' (pattern only), got {by_pos!r}")
    if heads is None:
        return [(p,) for p in range(pos)], ("layer", "pos")
    n_heads = getattr(model.cfg, heads)
    if by_pos:
        return [(p, h) for p in range(pos) for h in range(n_heads)], ("layer", "pos", "head")
    return [(h,) for h in range(n_heads)], ("layer", "head")


def first_changed_position(where: dict[str, int]) -> int:
    """The first position a patch can change: its (query) position, or 0 for a head patched at every position."""
    return where.get("pos", where.get("dest_pos", 0))


def site_region(act: torch.Tensor, site: str, where: dict[str, int], start: int = 0) -> torch.Tensor:
    """The view of `act` (one run's activation [batch, ...] holding positions start..) that a patch replaces.

    Args:
        act: [batch, pos, d_model] for the residual sites, [batch, pos, heads, d_head] for z/q/k/v,
            [batch, n_heads, q_pos, k_pos] for the pattern (its query positions start at `start`, its keys at 0).
        where: the patch, by axis name: "pos" or "dest_pos", "head", "src_pos" (a `site_indices` tuple named by
            its axes).
        start: the first position `act` holds.
    """
    pos, head = where.get("pos", where.get("dest_pos")), where.get("head")
    if site == "pattern":
        if pos is None:
            return act[:, head]
        return act[:, head, pos - start] if "src_pos" not in where else act[:, head, pos - start, where["src_pos"]]
    if SITES[site][1] is None:
        return act[:, pos - start]
    return act[:, :, head] if pos is None else act[:, pos - start, head]


def resolve_layers(model: HookedLlama, layers: Sequence[int] | None) -> list[int]:
    """The layers to patch, sorted, negative ones counted from cfg.n_layers; a ValueError for a layer that is not
    an integer or not loaded."""
    if layers is None:
        return list(model.layer_indices)
    given = list(layers)  # an iterator is read once
    resolved = [
        layer + model.cfg.n_layers if isinstance(layer, int) and not isinstance(layer, bool) and layer < 0 else layer
        for layer in given
    ]
    return check_loaded_layers(resolved, model.layer_indices)


def reference_names(model: HookedLlama, site: str, layers: Sequence[int]) -> list[str]:
    """The corrupted run's activations a sweep reads: the site and resid_pre of each patched layer, the keys
    (after RoPE) and values of every layer from the first patched one, and the final residual stream."""
    suffix, _ = check_site(site)
    first = min(layers)
    names = {f"blocks.{layer}.{suffix}" for layer in layers} | {f"blocks.{layer}.hook_resid_pre" for layer in layers}
    for layer in model.layer_indices:
        if layer >= first:
            names |= {f"blocks.{layer}.attn.hook_rot_k", f"blocks.{layer}.attn.hook_v"}
    names.add(final_resid_name(model))
    return sorted(names)


def final_resid_name(model: HookedLlama) -> str:
    """The hook of the residual stream the logits are read from (after the last loaded layer)."""
    return f"blocks.{model.layer_indices[-1]}.hook_resid_post"


@dataclass
class PatchRun:
    """One patched run: the patch (layer, axis name -> index), the first position it changes, its score's slot."""

    slot: int
    layer: int
    where: dict[str, int]
    start: int


class PatchScorer:
    """Scores patched runs from their final residual stream at positions start.., with the corrupted run's
    filling the positions before `start`."""

    def __init__(self, model: HookedLlama, metric: Metric, corrupted_final: torch.Tensor) -> None:
        self.model, self.metric = model, metric
        self.final = corrupted_final  # [batch, pos, d_model]
        batch, pos, _ = corrupted_final.shape
        if isinstance(metric, PositionMetric):
            self.where = metric.positions(batch, pos, corrupted_final.device)  # [batch]
            self.logits = None
        else:
            self.logits = self.unembed(corrupted_final)  # [batch, pos, d_vocab]

    def unembed(self, resid: torch.Tensor) -> torch.Tensor:
        return self.model.unembed(self.model.ln_final(resid))

    def corrupted_score(self) -> float:
        return self.scores(self.final[:, :0], start=self.final.shape[1])[0]

    def scores(self, final: torch.Tensor, start: int) -> list[float]:
        """One score per run: `final` is [runs * batch, pos - start, d_model], run-major."""
        batch = self.final.shape[0]
        runs = max(1, final.shape[0] // batch)
        if isinstance(self.metric, PositionMetric):
            # Each prompt's row at the metric's position: from the patched run where it was recomputed.
            prompts = torch.arange(batch, device=final.device)
            rows = self.final[prompts, self.where].expand(runs, batch, -1)  # [runs, batch, d_model]
            if final.shape[1] > 0:
                new = final.view(runs, batch, final.shape[1], -1)[:, prompts, (self.where - start).clamp(min=0)]
                rows = torch.where((self.where >= start)[None, :, None], new, rows)
            logits = self.unembed(rows.reshape(runs * batch, -1))  # [runs * batch, d_vocab]
            return [float(self.metric.at_position(logits[r * batch : (r + 1) * batch])) for r in range(runs)]
        prefix = self.logits[:, :start]
        return [
            float(self.metric(torch.cat([prefix, self.unembed(final[r * batch : (r + 1) * batch])], dim=1)))
            for r in range(runs)
        ]


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
    on_layer: Callable[[int], object] | None = None,
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
        if on_layer is not None:
            on_layer(joined)
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
        metric: metric(logits [batch, pos, d_vocab]) -> [] for one patched run. A `PositionMetric` (the ready
            metrics) is given the logits of its position only, computed from the final residual stream there.
        site: one of SITES.
        by_pos: patch each position separately (head sites: False patches all positions of a head at once;
            "pattern" also takes "dest_src": each (query, key) entry of a head's pattern).
        layers: the layers to patch (default: all loaded; negative ones count from the last).
        attention_mask: [batch, pos] of the corrupted tokens (default: inferred as `forward` does).
        corrupted_cache: a cache of the corrupted run holding `reference_names(model, site, layers)` (computed
            when omitted or incomplete).
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
            _, corrupted_cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=names)
        reference = corrupted_cache
        scorer = PatchScorer(model, metric, reference[final_resid_name(model)].to(model.device))
        baseline = scorer.corrupted_score()
    scores = torch.empty(len(layers) * len(indices))
    cleans: dict[int, torch.Tensor] = {}
    runs: list[PatchRun] = []
    for row, layer in enumerate(layers):
        name = f"blocks.{layer}.{suffix}"
        if name not in clean_cache:
            raise ValueError(f"the clean cache has no {name!r}; run run_with_cache on the clean tokens with it")
        clean, corrupted = clean_cache[name].to(model.device), reference[name].to(model.device)
        if clean.shape != corrupted.shape:
            raise ValueError(f"clean {name} is {tuple(clean.shape)}, the corrupted run's is {tuple(corrupted.shape)}")
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
    last = model.layer_indices[-1]
    bar = _progress(sum(last + 1 - run.layer for run in runs), progress, f"patching {site}")
    with torch.no_grad(), bar:
        inputs: dict[int, SuffixInputs] = {}
        for group in groups:
            start = group[0].start
            if start not in inputs:
                inputs[start] = SuffixInputs(model, mask, reference, batch, pos, start, per_batch)
            final = run_group(model, group, inputs[start], site, cleans, reference, on_layer=bar.update)
            for run, score in zip(group, scorer.scores(final, start)):
                scores[run.slot] = score
    shape = [len(layers)] + [len({index[k] for index in indices}) for k in range(len(indices[0]))]
    return scores.view(shape), axes


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, leave=False)
