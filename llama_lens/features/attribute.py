"""Feature attribution: gradient x activation for every active feature (and every error term) of the
dictionaries spliced into a batch of prompts' runs, from one forward and one backward pass; then the exact ablation
of the top nodes, batched (attribute_ablate.py), to set beside the estimate.

    result = ll.feature_attribution(model, "The Eiffel Tower is in", [sae_6, sae_12], metric, top_n=20)
    result.to_frame()      # prompt, site, layer, position, token, feature, kind, activation, attribution, effect
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

from ..patching.metrics import Metric
from ..validate import check_count
from .attribute_ablate import prompt_tokens, run_ablations, score_runs
from .attribute_result import ERROR, FeatureAttribution
from .attribute_splice import AnyDictionary, SiteRecord, check_dictionaries, splice_recording


def feature_attribution(
    model,
    prompt: str | Sequence[str] | torch.Tensor | Sequence[int],
    dictionaries: AnyDictionary | Iterable[AnyDictionary],
    metric: Metric,
    *,
    top_n: int = 20,
    ablate_errors: bool = False,
    max_batch: int = 64,
    prepend_bos: bool | None = None,
) -> FeatureAttribution:
    """Gradient x activation for every active feature and error term, then the exact effect of ablating the
    `top_n` nodes with the largest |attribution| of each prompt (see the module docstring).

    Args:
        prompt: a text or a list of texts (left-padded to one length), or token ids [pos] or [batch, pos].
            A batch runs in one forward and one backward pass and gives each prompt what it would alone (to
            rounding): its metric, its nodes (positions counted within the prompt, padding left out) and its
            ablations.
        dictionaries: a Dictionary, a CrossLayerTranscoder (one site per layer: its features' gradients sum
            over every layer they write to), or a list of them, from `ll.load_dictionary`.
        metric: metric(logits [1, pos, d_vocab]) -> [], differentiable, as in `ll.patching` (e.g.
            `ll.patching.logit_diff_metric`, or `lambda logits: logits[0, -1, a] - logits[0, -1, b]`), called on
            each prompt's logits; with left padding, positions counted from the end read the same tokens.
        top_n: how many nodes of each prompt to ablate (0: attribution only, one forward and one backward pass).
        ablate_errors: rank the error terms with the features for ablation (by default only features are
            ablated; every error term's attribution is reported either way).
        max_batch: the most rows (the clean run and ablations) per forward pass of the ablation.
        prepend_bos: for a text: add BOS (True), not (False), or the tokenizer's default (None).

    Returns:
        A FeatureAttribution: every node's attribution, the ablated nodes' effects; `to_frame()` has a
        `prompt` column.

    Raises:
        ArgumentError: a metric that is not one number, no dictionaries, two at one site, a dictionary whose
            width does not fit its site (the folder is named), a bad top_n or max_batch.
        ArgumentTypeError: dictionaries that are not Dictionary or CrossLayerTranscoder objects.
        UnknownNameError: a dictionary site the model has no hook point for.
    """
    top_n = check_count("top_n", top_n, 0)
    check_count("max_batch", max_batch)
    dictionaries = check_dictionaries(model, dictionaries)
    tokens, mask = prompt_tokens(model, prompt, prepend_bos, batch=True)
    records: dict[str, SiteRecord] = {}
    resid_in: dict[int, torch.Tensor] = {}
    n_layers = model.cfg.n_layers
    with torch.enable_grad(), model.hooks(splice_recording(model, dictionaries, records, resid_in)):
        # To the final residual stream, then the final norm over every position (a dictionary may sit on its
        # output), then the logits where the metric reads them.
        final = model(tokens, attention_mask=mask, stop_at_layer=n_layers)
        values = score_runs(model, metric, model.ln_final(final))  # [batch]: each prompt's metric
        leaves = [leaf for record in records.values() for leaf in (record.acts, record.error)]
        # The one backward pass: prompts do not see each other, so the sum's gradient is each one's own.
        grads = torch.autograd.grad(values.sum(), leaves, allow_unused=True)
    resid_in[n_layers] = final.detach()

    real = torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask.bool()
    nodes = _nodes(records, grads, real.cpu())
    sites = list(records)
    within = (real.long().cumsum(-1) - 1).cpu()  # [batch, pos]: each position counted within its prompt
    result = FeatureAttribution(
        sites=sites,
        site_index=nodes["site_index"],
        positions=within[nodes["prompts"], nodes["positions"]],
        features=nodes["features"],
        activations=nodes["activations"],
        attributions=nodes["attributions"],
        effects=torch.full_like(nodes["attributions"], float("nan")),
        metrics=values.detach().double().cpu(),
        n_layers=n_layers,
        prompts=nodes["prompts"],
        prompt_tokens=[_labels(model, ids[keep]) for ids, keep in zip(tokens.cpu(), real.cpu())],
    )
    candidates = torch.ones(len(result), dtype=torch.bool) if ablate_errors else result.features != ERROR
    for index in range(tokens.shape[0]):
        ranked = (candidates & (result.prompts == index)).nonzero().squeeze(-1)
        ranked = ranked[result.attributions[ranked].abs().argsort(descending=True, stable=True)][:top_n]
        if len(ranked):
            padded = nodes["positions"]  # positions in the padded batch, where the runs read them
            chosen = [(sites[int(result.site_index[i])], int(padded[i]), int(result.features[i])) for i in ranked]
            _, effects = run_ablations(model, tokens, mask, records, resid_in, chosen, metric, max_batch, index)
            result.effects[ranked] = effects.to(result.effects.dtype)
    return result


def _nodes(
    records: dict[str, SiteRecord], grads: Sequence[torch.Tensor | None], real: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Every active feature and every error term of every site at every real (unpadded) position, with
    activation and attribution in float64; positions as in the padded batch."""
    columns: dict[str, list[torch.Tensor]] = {k: [] for k in ("site_index", "prompts", "positions", "features")}
    values: dict[str, list[torch.Tensor]] = {"activations": [], "attributions": []}
    for index, record in enumerate(records.values()):
        acts, error = record.acts.detach(), record.error.detach()
        acts_grad = grads[2 * index] if grads[2 * index] is not None else torch.zeros_like(acts)
        error_grad = grads[2 * index + 1] if grads[2 * index + 1] is not None else torch.zeros_like(error)
        prompts, positions, features = acts.nonzero(as_tuple=True)  # the active features
        prompts, positions, features = prompts.cpu(), positions.cpu(), features.cpu()
        keep = real[prompts, positions]
        prompts, positions, features = prompts[keep], positions[keep], features[keep]
        active = acts.cpu()[prompts, positions, features].double()
        feature_attr = active * acts_grad.cpu()[prompts, positions, features].double()
        error_prompts, error_pos = real.nonzero(as_tuple=True)
        error = error.double().cpu()[error_prompts, error_pos]  # [n, d_out]
        error_attr = (error * error_grad.double().cpu()[error_prompts, error_pos]).sum(-1)
        count = len(positions) + len(error_pos)
        columns["site_index"].append(torch.full((count,), index, dtype=torch.long))
        columns["prompts"].append(torch.cat([prompts, error_prompts]))
        columns["positions"].append(torch.cat([positions, error_pos]))
        columns["features"].append(torch.cat([features, torch.full_like(error_pos, ERROR)]))
        values["activations"].append(torch.cat([active, error.norm(dim=-1)]))
        values["attributions"].append(torch.cat([feature_attr, error_attr]))
    return {name: torch.cat(parts) for name, parts in (columns | values).items()}


def _labels(model, ids: torch.Tensor) -> list[str]:
    if model.tokenizer is None:
        return [str(i) for i in ids.tolist()]
    return model.to_str_tokens(ids)
