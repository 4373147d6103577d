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

For `pattern`, `pos` is the query (destination) position. A patched run does not recompute what comes before the
patched layer: it starts there (`start_at_layer`) from the corrupted run's cached residual stream, and the
patches of one layer run as one batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .cache import ActivationCache
from .model import HookedLlama
from .validate import check_loaded_layers

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

Metric = Callable[[torch.Tensor], torch.Tensor]

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


def _check_site(site: str) -> tuple[str, str | None]:
    if site not in SITES:
        raise ValueError(f"unknown patching site {site!r}; choose from {', '.join(SITES)}")
    return SITES[site]


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, leave=False)


# ----------------------------------------------------------------------------------------- metrics
def _answer_ids(model: HookedLlama, answer: int | str | Sequence[int] | torch.Tensor) -> torch.Tensor:
    if isinstance(answer, str):
        answer = model.to_single_token(answer)
    return torch.as_tensor(answer, dtype=torch.long, device=model.device)


class PositionMetric:
    """A metric that reads the logits at one position per prompt only. Called on full logits [batch, pos, d_vocab]
    as any metric; the sweeps call `at_position` with just those rows [batch, d_vocab], so they compute the
    unembedding (49,152 x d_model per position for SmolLM2) at that position alone."""

    def __init__(self, position: int | torch.Tensor, score: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.position, self._score = position, score

    def rows(self, logits: torch.Tensor) -> torch.Tensor:
        """[batch, pos, d_vocab] -> [batch, d_vocab] at `position`."""
        batch = logits.shape[0]
        positions = torch.as_tensor(self.position, device=logits.device).expand(batch)
        return logits[torch.arange(batch, device=logits.device), positions]

    def at_position(self, logits_at_position: torch.Tensor) -> torch.Tensor:
        return self._score(logits_at_position)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return self._score(self.rows(logits))


def logit_diff_metric(
    model: HookedLlama,
    clean_logits: torch.Tensor,
    corrupted_logits: torch.Tensor,
    answer: int | str | Sequence[int] | torch.Tensor,
    wrong: int | str | Sequence[int] | torch.Tensor,
    position: int | torch.Tensor = -1,
) -> PositionMetric:
    """The logit difference answer - wrong, averaged over prompts and normalised: 1 for the clean run's value,
    0 for the corrupted run's.

    Args:
        clean_logits, corrupted_logits: [batch, pos, d_vocab] of the unpatched runs.
        answer, wrong: a token (text or id) or one id per prompt [batch].
        position: where the next token is predicted: an int (-1 with left padding) or one per prompt [batch].

    Returns:
        metric(logits [batch, pos, d_vocab]) -> [] (differentiable, for attribution patching too).
    """
    answer_ids, wrong_ids = _answer_ids(model, answer), _answer_ids(model, wrong)

    def diff(rows: torch.Tensor) -> torch.Tensor:  # [batch, d_vocab] -> []
        batch = rows.shape[0]
        picked = rows.gather(-1, torch.stack([answer_ids.expand(batch), wrong_ids.expand(batch)], dim=-1))
        return (picked[:, 0] - picked[:, 1]).float().mean()

    raw = PositionMetric(position, diff)
    clean, corrupted = float(raw(clean_logits)), float(raw(corrupted_logits))
    if clean == corrupted:
        raise ValueError(f"the clean and corrupted logit differences are equal ({clean:.4g}): nothing to normalise")
    return PositionMetric(position, lambda rows: (diff(rows) - corrupted) / (clean - corrupted))


def target_prob_metric(
    model: HookedLlama, answer: int | str | Sequence[int] | torch.Tensor, position: int | torch.Tensor = -1
) -> PositionMetric:
    """The probability of `answer` at `position`, averaged over prompts: metric(logits [batch, pos, d_vocab]) -> []."""
    answer_ids = _answer_ids(model, answer)

    def prob(rows: torch.Tensor) -> torch.Tensor:
        return rows.float().softmax(-1).gather(-1, answer_ids.expand(rows.shape[0])[:, None]).mean()

    return PositionMetric(position, prob)


def _metric_kwargs(model: HookedLlama, metric: Metric) -> dict[str, int]:
    """Forward arguments for a metric: a PositionMetric takes the final residual stream, any other the logits."""
    return {"stop_at_layer": model.cfg.n_layers} if isinstance(metric, PositionMetric) else {}


def _apply_metric(model: HookedLlama, metric: Metric, output: torch.Tensor) -> torch.Tensor:
    """metric of one run's forward output (logits, or the final residual stream for a PositionMetric)."""
    if not isinstance(metric, PositionMetric):
        return metric(output)
    rows = metric.rows(output)  # [batch, d_model]
    return metric.at_position(model.unembed(model.ln_final(rows)))


# ----------------------------------------------------------------------------------------- results
@dataclass
class PatchingResult:
    """Scores per site. `scores[site]` is [n_layers, pos] or [n_layers, pos, heads] / [n_layers, heads]; `axes[site]`
    names its dimensions; `tokens` labels the positions (the first clean prompt's tokens)."""

    scores: dict[str, torch.Tensor]
    axes: dict[str, tuple[str, ...]]
    layers: list[int]
    tokens: list[str] = field(default_factory=list)
    method: str = "activation"

    def __post_init__(self) -> None:
        for site, score in self.scores.items():
            if score.dim() != len(self.axes[site]) or score.shape[0] != len(self.layers):
                raise ValueError(f"scores of {site!r} are {tuple(score.shape)}, expected axes {self.axes[site]}")

    def to_frame(self) -> pd.DataFrame:
        """One row per patched site: method, site, layer, pos, token, head (-1 where not per head), score."""
        import pandas as pd

        rows = []
        for site, score in self.scores.items():
            axes = self.axes[site]
            for index in torch.cartesian_prod(*[torch.arange(n) for n in score.shape]).view(-1, score.dim()).tolist():
                named = dict(zip(axes, index))
                pos = named.get("pos", -1)
                rows.append(
                    {
                        "method": self.method,
                        "site": site,
                        "layer": self.layers[named["layer"]],
                        "pos": pos,
                        "token": self.tokens[pos] if 0 <= pos < len(self.tokens) else "",
                        "head": named.get("head", -1),
                        "score": float(score[tuple(index)]),
                    }
                )
        return pd.DataFrame(rows)

    def plot(self, sites: Sequence[str] | None = None, *, figsize: tuple[float, float] | None = None) -> Figure:
        """A heatmap per site (layers down; positions or heads across; per-position heads as one panel per
        head axis flattened to position x head). Returns the matplotlib Figure."""
        from matplotlib.figure import Figure

        sites = list(self.scores) if sites is None else list(sites)
        for site in sites:
            if site not in self.scores:
                raise ValueError(f"no scores for site {site!r}; this result holds {list(self.scores)}")
        fig = Figure(figsize=figsize or (4.5 * len(sites), 0.25 * len(self.layers) + 2.5), layout="constrained")
        axes = fig.subplots(1, len(sites), squeeze=False)[0]
        for ax, site in zip(axes, sites):
            score = self.scores[site].float()
            names = self.axes[site]
            if score.dim() == 3:  # [layer, pos, head] -> [layer, pos * head]
                score = score.flatten(1)
                xlabel = "position x head"
            else:
                xlabel = names[1]
            limit = float(score.abs().max()) or 1.0
            image = ax.imshow(score.numpy(), cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
            ax.set_title(f"{self.method} patching: {site}")
            ax.set_ylabel("layer")
            ax.set_xlabel(xlabel)
            ax.set_yticks(range(len(self.layers)), [str(i) for i in self.layers])
            if names[1] == "pos" and score.shape[1] == len(self.tokens):
                ax.set_xticks(range(len(self.tokens)), [f"{t!r}"[1:-1] for t in self.tokens], rotation=90)
            fig.colorbar(image, ax=ax)
        return fig


# ----------------------------------------------------------------------------------------- the sweep
def _site_indices(site: str, model: HookedLlama, pos: int, by_pos: bool) -> tuple[list[tuple], tuple[str, ...]]:
    _, heads = _check_site(site)
    if heads is None:
        return [(p,) for p in range(pos)], ("layer", "pos")
    n_heads = getattr(model.cfg, heads)
    if by_pos:
        return [(p, h) for p in range(pos) for h in range(n_heads)], ("layer", "pos", "head")
    return [(h,) for h in range(n_heads)], ("layer", "head")


def _write(act: torch.Tensor, clean: torch.Tensor, site: str, index: tuple, by_pos: bool) -> None:
    """Copies the clean value of one site into `act` (one patched run [batch, ...]) in place."""
    if site == "pattern":  # [batch, n_heads, q_pos, k_pos]
        if by_pos:
            p, h = index
            act[:, h, p] = clean[:, h, p]
        else:
            act[:, index[0]] = clean[:, index[0]]
    elif SITES[site][1] is None:  # [batch, pos, d_model]
        act[:, index[0]] = clean[:, index[0]]
    elif by_pos:  # [batch, pos, heads, d_head]
        p, h = index
        act[:, p, h] = clean[:, p, h]
    else:
        act[:, :, index[0]] = clean[:, :, index[0]]


def patch_sweep(
    model: HookedLlama,
    corrupted_tokens: torch.Tensor,
    clean_cache: ActivationCache,
    metric: Metric,
    site: str,
    *,
    by_pos: bool = True,
    layers: Sequence[int] | None = None,
    attention_mask: torch.Tensor | None = None,
    corrupted_cache: ActivationCache | None = None,
    max_batch: int = 64,
    progress: bool = True,
) -> tuple[torch.Tensor, tuple[str, ...]]:
    """Activation patching of one site over layers x positions (x heads): the engine of every function here.

    Each patched run starts at the patched layer from the corrupted run's resid_pre (nothing before it changes),
    with up to `max_batch` prompts-with-one-patch per forward pass.

    Args:
        corrupted_tokens: [batch, pos] ids, the runs that receive the patch.
        clean_cache: a cache of the clean run holding the site's activations (same [batch, pos]).
        metric: metric(logits [batch, pos, d_vocab]) -> [] for one patched run. A `PositionMetric` (the ready
            metrics) is given the logits of its position only, computed from the final residual stream there.
        site: one of SITES.
        by_pos: patch each position separately (head sites: False patches all positions of a head at once).
        layers: the layers to patch (default: all).
        attention_mask: [batch, pos] of the corrupted tokens (default: inferred as `forward` does).
        corrupted_cache: a cache of the corrupted run with every layer's resid_pre (computed when omitted).
        max_batch: the most runs (prompts x patches) per forward pass.

    Returns:
        scores [n_layers_patched, ...site axes], and the axis names.
    """
    hook_suffix, _ = _check_site(site)
    tokens, inferred = model.prepare_tokens(corrupted_tokens)
    mask = inferred if attention_mask is None else attention_mask.to(model.device)
    batch, pos = tokens.shape
    layers = check_loaded_layers(layers, model.layer_indices)
    if corrupted_cache is None:
        with torch.no_grad():
            _, corrupted_cache = model.run_with_cache(
                tokens, attention_mask=mask, names_filter=lambda n: n.endswith("hook_resid_pre")
            )
    indices, axes = _site_indices(site, model, pos, by_pos)
    per_forward = max(1, max_batch // batch)
    scores = torch.empty(len(layers), len(indices))
    bar = _progress(len(layers) * len(indices), progress, f"patching {site}")
    with torch.no_grad(), bar:
        for row, layer in enumerate(layers):
            name = f"blocks.{layer}.{hook_suffix}"
            if name not in clean_cache:
                raise ValueError(f"the clean cache has no {name!r}; run run_with_cache on the clean tokens with it")
            clean = clean_cache[name].to(model.device)
            if clean.shape[:2] != (batch, pos) and site != "pattern":
                raise ValueError(f"clean {name} is {tuple(clean.shape)}, the corrupted tokens are {(batch, pos)}")
            resid = corrupted_cache[f"blocks.{layer}.hook_resid_pre"].to(model.device)
            for start in range(0, len(indices), per_forward):
                chunk = indices[start : start + per_forward]

                def patch(act: torch.Tensor, *, hook, chunk=chunk, clean=clean) -> torch.Tensor:
                    act = act.clone()
                    runs = act.view(len(chunk), batch, *act.shape[1:])
                    for i, index in enumerate(chunk):
                        _write(runs[i], clean, site, index, by_pos)
                    return act

                repeated_mask = None if mask is None else mask.repeat(len(chunk), 1)
                with model.hooks([(name, patch)]):
                    output = model(
                        resid.repeat(len(chunk), 1, 1),
                        start_at_layer=layer,
                        attention_mask=repeated_mask,
                        **_metric_kwargs(model, metric),
                    )
                for i in range(len(chunk)):
                    scores[row, start + i] = float(_apply_metric(model, metric, output[i * batch : (i + 1) * batch]))
                bar.update(len(chunk))
    shape = [len(layers)] + [len({index[k] for index in indices}) for k in range(len(indices[0]))]
    return scores.view(shape), axes


def attribution_sweep(
    model: HookedLlama,
    clean_cache: ActivationCache,
    corrupted_tokens: torch.Tensor,
    metric: Metric,
    sites: Sequence[str],
    *,
    by_pos: bool = True,
    layers: Sequence[int] | None = None,
    attention_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Attribution patching: (clean - corrupted) activation x d(metric)/d(activation) on the corrupted run, summed
    over the site's feature dimension, from one forward + backward pass.

    Returns:
        site -> scores shaped as `patch_sweep`'s.
    """
    for site in sites:
        _check_site(site)
    layers = check_loaded_layers(layers, model.layer_indices)
    names = {f"blocks.{layer}.{SITES[site][0]}" for site in sites for layer in layers}
    tokens, inferred = model.prepare_tokens(corrupted_tokens)
    mask = inferred if attention_mask is None else attention_mask.to(model.device)
    acts: dict[str, torch.Tensor] = {}

    def keep(tensor: torch.Tensor, *, hook) -> None:
        acts[hook.name] = tensor

    with torch.enable_grad(), model.hooks([(list(names), keep)]):
        value = _apply_metric(model, metric, model(tokens, attention_mask=mask, **_metric_kwargs(model, metric)))
        ordered = sorted(names)
        grads = torch.autograd.grad(value, [acts[n] for n in ordered], allow_unused=True)
    grad_of = dict(zip(ordered, grads))
    results = {}
    for site in sites:
        per_layer = []
        for layer in layers:
            name = f"blocks.{layer}.{SITES[site][0]}"
            if name not in clean_cache:
                raise ValueError(f"the clean cache has no {name!r}; run run_with_cache on the clean tokens with it")
            corrupted = acts[name].detach()
            grad = grad_of[name] if grad_of[name] is not None else torch.zeros_like(corrupted)
            product = ((clean_cache[name].to(corrupted) - corrupted) * grad).float()
            if site == "pattern":  # [batch, n_heads, q_pos, k_pos] -> [q_pos, n_heads] or [n_heads]
                score = product.sum(dim=(0, 3)).T if by_pos else product.sum(dim=(0, 2, 3))
            elif SITES[site][1] is None:  # [batch, pos, d_model] -> [pos]
                score = product.sum(dim=(0, 2))
            else:  # [batch, pos, heads, d_head] -> [pos, heads] or [heads]
                score = product.sum(dim=(0, 3)) if by_pos else product.sum(dim=(0, 1, 3))
            per_layer.append(score)
        results[site] = torch.stack(per_layer).cpu()
    return results


# ----------------------------------------------------------------------------------------- one call
def _prepare_pair(model: HookedLlama, clean: Any, corrupted: Any, prepend_bos: bool | None):
    clean_tokens, clean_mask = model.prepare_tokens(clean, prepend_bos=prepend_bos)
    corrupted_tokens, corrupted_mask = model.prepare_tokens(corrupted, prepend_bos=prepend_bos)
    if clean_tokens.shape != corrupted_tokens.shape:
        raise ValueError(
            f"clean and corrupted prompts must have the same shape [batch, pos] to patch position by position, got "
            f"{tuple(clean_tokens.shape)} and {tuple(corrupted_tokens.shape)}; choose prompts of equal token length"
        )
    return clean_tokens, clean_mask, corrupted_tokens, corrupted_mask


def _sites_list(sites: str | Sequence[str]) -> list[str]:
    sites = [sites] if isinstance(sites, str) else list(sites)
    for site in sites:
        _check_site(site)
    return sites


def activation_patching(
    model: HookedLlama,
    clean: str | Sequence[str] | torch.Tensor,
    corrupted: str | Sequence[str] | torch.Tensor,
    metric: Metric,
    sites: str | Sequence[str] = "resid_pre",
    *,
    by_pos: bool = True,
    layers: Sequence[int] | None = None,
    prepend_bos: bool | None = None,
    max_batch: int = 64,
    progress: bool = True,
) -> PatchingResult:
    """Patches each clean activation of `sites` into the corrupted run, one at a time, and scores the output.

    Args:
        clean, corrupted: texts or ids [batch, pos] of the same shape (prompt i of one pairs with prompt i of
            the other); texts are left-padded, so `position=-1` metrics read each prompt's last token.
        metric: metric(logits [batch, pos, d_vocab]) -> [], e.g. `logit_diff_metric(...)`.
        sites: names from SITES (see the module docstring).
        by_pos: patch per position; head sites with False patch a head at every position at once.
        layers: the layers to patch (default: all loaded).
        prepend_bos: for texts: add BOS (True), not (False), or the tokenizer's own default (None).
        max_batch: the most runs (prompts x patches) per forward pass.
        progress: show a tqdm progress bar.

    Returns:
        PatchingResult (`.scores`, `.to_frame()`, `.plot()`).
    """
    sites = _sites_list(sites)
    clean_tokens, clean_mask, corrupted_tokens, corrupted_mask = _prepare_pair(model, clean, corrupted, prepend_bos)
    suffixes = tuple(SITES[site][0] for site in sites)
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(
            clean_tokens, attention_mask=clean_mask, names_filter=lambda n: n.endswith(suffixes)
        )
        _, corrupted_cache = model.run_with_cache(
            corrupted_tokens, attention_mask=corrupted_mask, names_filter=lambda n: n.endswith("hook_resid_pre")
        )
    scores, axes = {}, {}
    for site in sites:
        scores[site], axes[site] = patch_sweep(
            model,
            corrupted_tokens,
            clean_cache,
            metric,
            site,
            by_pos=by_pos,
            layers=layers,
            attention_mask=corrupted_mask,
            corrupted_cache=corrupted_cache,
            max_batch=max_batch,
            progress=progress,
        )
    labels = _labels(model, clean_tokens)
    return PatchingResult(scores, axes, check_loaded_layers(layers, model.layer_indices), labels)


def attribution_patching(
    model: HookedLlama,
    clean: str | Sequence[str] | torch.Tensor,
    corrupted: str | Sequence[str] | torch.Tensor,
    metric: Metric,
    sites: str | Sequence[str] = "resid_pre",
    *,
    by_pos: bool = True,
    layers: Sequence[int] | None = None,
    prepend_bos: bool | None = None,
) -> PatchingResult:
    """The linear estimate of `activation_patching` for every site at once: one clean forward pass, one
    corrupted forward + backward pass. Same arguments (the metric must be differentiable) and result layout."""
    sites = _sites_list(sites)
    clean_tokens, clean_mask, corrupted_tokens, corrupted_mask = _prepare_pair(model, clean, corrupted, prepend_bos)
    suffixes = tuple(SITES[site][0] for site in sites)
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(
            clean_tokens, attention_mask=clean_mask, names_filter=lambda n: n.endswith(suffixes)
        )
    scores = attribution_sweep(
        model, clean_cache, corrupted_tokens, metric, sites, by_pos=by_pos, layers=layers, attention_mask=corrupted_mask
    )
    pos = clean_tokens.shape[1]
    axes = {site: _site_indices(site, model, pos, by_pos)[1] for site in sites}
    layer_list = check_loaded_layers(layers, model.layer_indices)
    return PatchingResult(scores, axes, layer_list, _labels(model, clean_tokens), method="attribution")


def _labels(model: HookedLlama, tokens: torch.Tensor) -> list[str]:
    if model.tokenizer is None:
        return [str(i) for i in tokens[0].tolist()]
    return model.to_str_tokens(tokens[0])


# ----------------------------------------------------------------------------------------- TransformerLens' names
def _tl(site: str, by_pos: bool, doc: str):
    def patch(
        model: HookedLlama,
        corrupted_tokens: torch.Tensor,
        clean_cache: ActivationCache,
        patching_metric: Metric,
        *,
        progress: bool = True,
        max_batch: int = 64,
    ) -> torch.Tensor:
        return patch_sweep(
            model,
            corrupted_tokens,
            clean_cache,
            patching_metric,
            site,
            by_pos=by_pos,
            max_batch=max_batch,
            progress=progress,
        )[0]

    patch.__doc__ = (
        f"TransformerLens' name: patches clean `{SITES[site][0]}` into the corrupted run {doc}.\n\n"
        "Args: model, corrupted_tokens [batch, pos], clean_cache (run_with_cache of the clean tokens), "
        "patching_metric(logits) -> [].\n"
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
    "pattern", True, "per (layer, query position, head): [n_layers, pos, n_heads]"
)


def get_act_patch_block_every(
    model: HookedLlama, corrupted_tokens: torch.Tensor, clean_cache: ActivationCache, metric: Metric
) -> torch.Tensor:
    """TransformerLens' name: resid_pre, attn_out and mlp_out patched per (layer, position): [3, n_layers, pos]."""
    return torch.stack(
        [
            patch_sweep(model, corrupted_tokens, clean_cache, metric, site)[0]
            for site in ("resid_pre", "attn_out", "mlp_out")
        ]
    )
