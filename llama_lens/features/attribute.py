"""Feature attribution: gradient x activation for every active feature (and every error term) of the
dictionaries spliced into one prompt's run, from one forward and one backward pass; then the exact ablation
of the top nodes, batched (attribute_ablate.py), to set beside the estimate.

    result = ll.feature_attribution(model, "The Eiffel Tower is in", [sae_6, sae_12], metric, top_n=20)
    result.to_frame()      # site, layer, position, token, feature, kind, activation, attribution, effect
    result.plot()          # attribution against the measured effect of the ablated nodes

Attribution of a node n with activation a_n: a_n . d(metric)/d(a_n), the first-order estimate of
metric(clean) - metric(n ablated) (Syed et al. 2023, arXiv:2310.10348, attribution patching; Marks et al.
2024, arXiv:2403.19647, sparse feature circuits). It is exact when the metric is linear in the site's
activation (a dictionary at ln_final.hook_normalized with a logit difference, say); elsewhere the ablation
says how far the estimate is off. The splice keeps every error term, so the run is the model's own (to
rounding) and the gradients are the model's (attribute_splice.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from ..dictionaries.dictionary import Dictionary
from ..patching.metrics import Metric
from ..validate import check_count
from .attribute_ablate import prompt_tokens, run_ablations, score_runs
from .attribute_result import ERROR, FeatureAttribution
from .attribute_splice import SiteRecord, check_dictionaries, splice_recording


def feature_attribution(
    model,
    prompt: str | torch.Tensor | Sequence[int],
    dictionaries: Dictionary | Iterable[Dictionary],
    metric: Metric,
    *,
    top_n: int = 20,
    ablate_errors: bool = False,
    max_batch: int = 64,
    prepend_bos: bool | None = None,
) -> FeatureAttribution:
    """Gradient x activation for every active feature and error term, then the exact effect of ablating the
    `top_n` nodes with the largest |attribution| (see the module docstring).

    Args:
        prompt: one text or token ids [pos].
        dictionaries: a Dictionary or a list (one per site), from `ll.load_dictionary`.
        metric: metric(logits [1, pos, d_vocab]) -> [], differentiable, as in `ll.patching` (e.g.
            `ll.patching.logit_diff_metric`, or `lambda logits: logits[0, -1, a] - logits[0, -1, b]`).
        top_n: how many nodes to ablate (0: attribution only, one forward and one backward pass).
        ablate_errors: rank the error terms with the features for ablation (by default only features are
            ablated; every error term's attribution is reported either way).
        max_batch: the most rows (the clean run and ablations) per forward pass of the ablation.
        prepend_bos: for a text: add BOS (True), not (False), or the tokenizer's default (None).

    Returns:
        A FeatureAttribution: every node's attribution, the ablated nodes' effects.

    Raises:
        ArgumentError: more than one prompt, a metric that is not one number, no dictionaries, two at one site,
            a dictionary whose width does not fit its site (the folder is named).
        UnknownNameError: a dictionary site the model has no hook point for.
    """
    top_n = check_count("top_n", top_n, 0)
    dictionaries = check_dictionaries(model, dictionaries)
    tokens, mask = prompt_tokens(model, prompt, prepend_bos)
    records: dict[str, SiteRecord] = {}
    resid_in: dict[int, torch.Tensor] = {}
    n_layers = model.cfg.n_layers
    with torch.enable_grad(), model.hooks(splice_recording(model, dictionaries, records, resid_in)):
        # To the final residual stream, then the final norm over every position (a dictionary may sit on its
        # output), then the logits where the metric reads them.
        final = model(tokens, attention_mask=mask, stop_at_layer=n_layers)
        value = score_runs(model, metric, model.ln_final(final))[0]
        leaves = [leaf for record in records.values() for leaf in (record.acts, record.error)]
        grads = torch.autograd.grad(value, leaves, allow_unused=True)  # the one backward pass
    resid_in[n_layers] = final.detach()

    nodes = _nodes(records, grads)
    sites = list(records)
    result = FeatureAttribution(
        sites=sites,
        site_index=nodes["site_index"],
        positions=nodes["positions"],
        features=nodes["features"],
        activations=nodes["activations"],
        attributions=nodes["attributions"],
        effects=torch.full_like(nodes["attributions"], float("nan")),
        metric=float(value.detach()),
        n_layers=n_layers,
        tokens=_labels(model, tokens[0]),
    )
    candidates = torch.ones(len(result), dtype=torch.bool) if ablate_errors else result.features != ERROR
    ranked = candidates.nonzero().squeeze(-1)
    ranked = ranked[result.attributions[ranked].abs().argsort(descending=True, stable=True)][:top_n]
    if len(ranked):
        chosen = [(sites[int(result.site_index[i])], int(result.positions[i]), int(result.features[i])) for i in ranked]
        _, effects = run_ablations(model, tokens, mask, records, resid_in, chosen, metric, max_batch)
        result.effects[ranked] = effects.to(result.effects.dtype)
    return result


def _nodes(records: dict[str, SiteRecord], grads: Sequence[torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """Every active feature and every error term of every site, with activation and attribution, in float64."""
    columns: dict[str, list[torch.Tensor]] = {k: [] for k in ("site_index", "positions", "features")}
    values: dict[str, list[torch.Tensor]] = {"activations": [], "attributions": []}
    for index, record in enumerate(records.values()):
        acts, error = record.acts.detach(), record.error.detach()
        acts_grad = grads[2 * index] if grads[2 * index] is not None else torch.zeros_like(acts)
        error_grad = grads[2 * index + 1] if grads[2 * index + 1] is not None else torch.zeros_like(error)
        positions, features = acts.nonzero(as_tuple=True)  # the active features
        active = acts[positions, features].double().cpu()
        feature_attr = active * acts_grad[positions, features].double().cpu()
        error_pos = torch.arange(error.shape[0])
        error_attr = (error.double() * error_grad.double()).sum(-1).cpu()  # [pos]
        count = len(positions) + len(error_pos)
        columns["site_index"].append(torch.full((count,), index, dtype=torch.long))
        columns["positions"].append(torch.cat([positions.cpu(), error_pos]))
        columns["features"].append(torch.cat([features.cpu(), torch.full_like(error_pos, ERROR)]))
        values["activations"].append(torch.cat([active, error.double().norm(dim=-1).cpu()]))
        values["attributions"].append(torch.cat([feature_attr, error_attr]))
    return {name: torch.cat(parts) for name, parts in (columns | values).items()}


def _labels(model, ids: torch.Tensor) -> list[str]:
    if model.tokenizer is None:
        return [str(i) for i in ids.tolist()]
    return model.to_str_tokens(ids)
