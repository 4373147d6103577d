"""The feature lens: at each dictionary's site and each position, the features that fired most, what each one
says in the vocabulary, and how much it writes the target's logit directly.

The model runs once, unchanged (no dictionary is spliced in): each dictionary encodes the activation the model
computed at its `hook_in`. For the top `top_k` active features there (ranked by activation), with a_f their
activation and d_f their decoder row mapped into the residual stream (lens_sites.py):

    write_f  = a_f · g · c_f · d_f      c_f = 1 / output_scale (and 1 / |W_dec row| under SAELens' TopK rescale);
                                        g undoes an SAE's run-time normalization at that position (1 without one)
    read-out = top tokens of (d_f ⊙ ln_final.weight) @ W_Uᵀ
    DLA      = write_f · (W_U[target] ⊙ ln_final.weight) / s

The read-out applies the final RMSNorm's weight and not its per-position scale s: a direction has no position,
and dividing by any positive s leaves the ranking of tokens unchanged (the values are logits per unit of
activation along d_f, before that division). The DLA is `ll.direct_logit_attribution`'s convention: s is the
final norm's scale on the full residual stream at that position, frozen, so the features' terms add up with
the rest of the stream's to the model's logit.

Only the decoder rows of the features reported are read (`Dictionary.W_dec_rows`); the encoder is read whole.

Shapes: S sites (one per dictionary, in forward order), P positions, k = top_k, n_readout read-out tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..dictionaries.dictionary import Dictionary
from ..errors import ArgumentError, ArgumentTypeError
from ..lens.inputs import Prompt, Target, on_cpu, prepare_inputs, token_texts
from ..validate import check_count
from .lens_result import FeatureLensResult, SiteReadout
from .lens_sites import FeatureSite, site_of, to_residual

if TYPE_CHECKING:
    from ..model.llama import HookedLlama

# Elements of one [features, vocabulary block] tile of read-out logits (float32: 16 MiB).
READOUT_TILE = 2**22


def feature_lens(
    model: HookedLlama,
    prompt: Prompt,
    dictionaries: Dictionary | Iterable[Dictionary],
    *,
    target: Target = None,
    top_k: int = 10,
    positions: int | Iterable[int] | None = None,
    n_readout: int = 5,
    prepend_bos: bool | None = None,
) -> FeatureLensResult:
    """The top active features of each dictionary at each position, with their vocabulary read-out and their
    direct logit attribution to `target` (see the module docstring for the definitions).

    Args:
        model: a HookedLlama (whole, or holding layers 0..k covering every dictionary's site).
        prompt: one text, or token ids [pos] / [1, pos].
        dictionaries: a Dictionary or several (`ll.load_dictionary`), at any sites; two may share a site.
        target: the token whose logit the features are attributed to: its text (" Paris") or id; None for no
            attribution.
        top_k: features kept per site and position (fewer where fewer are active).
        positions: token positions to read (negative counts from the end); None for all.
        n_readout: tokens kept in each feature's vocabulary read-out.
        prepend_bos: as in `ll.logit_lens`.

    Returns:
        A FeatureLensResult (`.to_frame()`, `.plot()`; `ll.widgets.FeatureExplorer(result)` explores it).

    Raises:
        ArgumentTypeError: `dictionaries` holds something that is not a Dictionary.
        ArgumentError: a batch of prompts, several targets, a bad top_k / n_readout / position, or a dictionary
            whose widths do not fit the model (naming its folder and hook).
        UnknownNameError: a dictionary at a hook the model does not have (a layer not loaded).
    """
    dictionaries = _as_list(dictionaries)
    top_k = check_count("top_k", top_k, 1)
    n_readout = check_count("n_readout", n_readout, 1, model.cfg.d_vocab, f"the vocabulary has {model.cfg.d_vocab} ids")
    labels = _labels(dictionaries)
    sites = [site_of(model, d, label) for d, label in zip(dictionaries, labels)]
    order = sorted(range(len(sites)), key=lambda i: sites[i].sort_key())
    dictionaries, sites = [dictionaries[i] for i in order], [sites[i] for i in order]
    inputs = prepare_inputs(
        model, prompt, target=target, positions=positions, prepend_bos=prepend_bos, what="feature_lens"
    )
    if inputs.batch != 1:
        raise ArgumentError(f"feature_lens reads one prompt, got a batch of {inputs.batch}; call it once per prompt")
    if inputs.n_targets > 1:
        raise ArgumentError(f"feature_lens attributes to one target, got {inputs.n_targets}; call it once per target")
    pos_index = torch.tensor(inputs.positions, dtype=torch.long)
    # [d_model]: the target's unembedding row times the final norm's weight, in float32 (as attribution.py).
    weight, norm_weight = model.unembed.weight, model.ln_final.weight.float()
    target_dir = None
    if inputs.target_ids is not None:
        target_dir = weight[inputs.target_ids[0].to(weight.device)].float()[0].to(norm_weight.device) * norm_weight

    found: dict[int, _SiteFound] = {}
    scale: list[torch.Tensor] = []

    def encode(index: int):
        dictionary, site = dictionaries[index], sites[index]

        def hook(x: torch.Tensor, *, hook) -> None:
            found[index] = _top_features(model, dictionary, site, x[0, pos_index.to(x.device)], top_k, target_dir)

        return hook

    def keep_scale(x: torch.Tensor, *, hook) -> None:
        scale[:] = [x[0, pos_index.to(x.device), 0].float()]

    fwd_hooks = [(d.hook_in, encode(i)) for i, d in enumerate(dictionaries)] + [("ln_final.hook_scale", keep_scale)]
    stop = model.layer_indices[-1] + 1 if model.layer_indices else 0
    with torch.no_grad(), model.hooks(fwd_hooks):
        # The forward stops at the final residual stream: the logits over the vocabulary are not needed, only
        # the final norm's scale (and its hook_normalized, where a dictionary may read).
        final_resid = model(inputs.tokens, attention_mask=inputs.attention_mask, stop_at_layer=stop)
        model.ln_final(final_resid.to(norm_weight.device))
    s = scale[0].cpu()  # [P]

    readouts = _readouts(weight, norm_weight, [found[i] for i in range(len(sites))], n_readout)
    texts = token_texts(model, torch.cat([r.top_ids.reshape(-1) for r in readouts]).unique().tolist())
    for r in readouts:
        r.top_strs = [[texts[i] for i in row] for row in r.top_ids.tolist()]
    feature_ids = torch.stack([found[i].feature_ids for i in range(len(sites))])  # [S, P, k]
    activations = torch.stack([found[i].activations for i in range(len(sites))])
    dla = None
    if target_dir is not None:
        # [S, P, k]: a_f · g · (c_f d_f · u), divided by the frozen scale except after the final norm.
        dla = torch.stack([found[i].dla for i in range(len(sites))])
        after_norm = torch.tensor([site.written == "normed" for site in sites])[:, None, None]
        dla = torch.where(after_norm, dla, dla / s[None, :, None])
    return FeatureLensResult(
        inputs=on_cpu(inputs),
        sites=sites,
        feature_ids=feature_ids,
        activations=activations,
        dla=dla,
        n_active=torch.stack([found[i].n_active for i in range(len(sites))]),
        readouts=readouts,
        scale=s,
    )


def _as_list(dictionaries) -> list[Dictionary]:
    items = [dictionaries] if isinstance(dictionaries, Dictionary) else list(dictionaries)
    if not items:
        raise ArgumentError("feature_lens needs at least one dictionary (ll.load_dictionary(path))")
    for item in items:
        if not isinstance(item, Dictionary):
            raise ArgumentTypeError(
                f"dictionaries must be Dictionary objects from ll.load_dictionary(path), got {type(item).__name__}"
            )
    return items


def _labels(dictionaries: list[Dictionary]) -> list[str]:
    """Row labels: the hook a dictionary writes, with its folder's name where two write the same hook."""
    hooks = [d.hook_out for d in dictionaries]
    return [h if hooks.count(h) == 1 else f"{h} ({d.path.name})" for h, d in zip(hooks, dictionaries)]


@dataclass
class _SiteFound:
    """What the hook at one site kept (on the CPU)."""

    feature_ids: torch.Tensor  # [P, k], -1 where no feature is
    activations: torch.Tensor  # [P, k], NaN where no feature is
    n_active: torch.Tensor  # [P]
    unique: torch.Tensor  # [n_u] the reported features, ascending
    directions: torch.Tensor | None  # [n_u, d_model] in the residual stream; None where the site writes nothing
    dla: torch.Tensor | None  # [P, k] with a target, before the division by the final norm's scale


def _top_features(model, dictionary: Dictionary, site: FeatureSite, x: torch.Tensor, top_k: int, target_dir):
    """Runs inside the forward pass, at the dictionary's hook_in (so a streamed block's weights are present)."""
    acts = dictionary.encode(x).float()  # [P, d_sae]
    n_active = (acts != 0).sum(-1).cpu()
    # Ranked by activation among the active ones: a zero never outranks a (negative) active value.
    ranked = torch.where(acts != 0, acts, torch.full_like(acts, -torch.inf))
    values, ids = ranked.topk(min(top_k, dictionary.d_sae), dim=-1)  # [P, k]
    valid = torch.isfinite(values)
    if values.shape[-1] < top_k:  # a dictionary with fewer features than top_k: pad to k columns
        pad = top_k - values.shape[-1]
        values = torch.nn.functional.pad(values, (0, pad), value=-torch.inf)
        ids = torch.nn.functional.pad(ids, (0, pad))
        valid = torch.nn.functional.pad(valid, (0, pad), value=False)
    feature_ids = torch.where(valid, ids, torch.full_like(ids, -1))
    activations = torch.where(valid, values, torch.full_like(values, torch.nan))
    unique = feature_ids[valid].unique()  # sorted
    rows = dictionary.W_dec_rows(unique).float()  # [n_u, d_out]: only these rows are read
    coeff = torch.full((len(unique),), 1.0 / dictionary.output_scale, device=rows.device)
    if dictionary.rescale_acts_by_decoder_norm:
        coeff = coeff / dictionary.W_dec[unique.to(dictionary.device)].float().norm(dim=-1)
    directions = to_residual(model, site, rows * coeff[:, None])  # [n_u, d_model] or None
    gain = _output_gain(dictionary, x).cpu()  # [P]
    dla = None
    if target_dir is not None:
        activations = activations.cpu()
        if len(unique) == 0:
            dla = activations.clone()  # nothing active anywhere: NaN throughout
        else:
            # [n_u] each feature's write per unit activation onto the target direction (NaN: not written).
            per_feature = torch.full((len(unique),), torch.nan)
            if directions is not None:
                per_feature = (directions @ target_dir.to(directions.device)).cpu()
            lookup = torch.searchsorted(unique.cpu(), feature_ids.clamp(min=0).cpu()).clamp(max=len(unique) - 1)
            dla = activations * gain[:, None] * per_feature[lookup]  # NaN where no feature is
    return _SiteFound(
        feature_ids.cpu(), activations.cpu(), n_active, unique.cpu(),
        None if directions is None else directions.cpu(), dla,
    )  # fmt: skip


def _output_gain(dictionary: Dictionary, x: torch.Tensor) -> torch.Tensor:
    """[P] the factor an SAE's run-time normalization puts on its decoder output at each position (the
    feature's part of `Dictionary._denormalize`): |x| / sqrt(d_in) under constant_norm_rescale, the std of x
    under layer_norm, 1 otherwise (and always for a transcoder, whose output SAELens does not denormalize)."""
    flat = x.float().reshape(x.shape[0], -1)
    if dictionary.is_transcoder or dictionary.normalize_activations == "none":
        return torch.ones(flat.shape[0])
    if dictionary.normalize_activations == "constant_norm_rescale":
        return flat.norm(dim=-1) / dictionary.d_in**0.5
    return (flat - flat.mean(-1, keepdim=True)).std(-1)


def readout_tokens(
    model: HookedLlama, directions: torch.Tensor, n_readout: int = 5
) -> tuple[torch.Tensor, torch.Tensor]:
    """The vocabulary read-out of residual-stream directions [N, d_model], as the feature lens reads a feature's
    decoder row: the top `n_readout` tokens of (d ⊙ ln_final.weight) @ W_Uᵀ.

    Returns:
        (token ids [N, n_readout], their logits per unit of d [N, n_readout]), on the CPU.
    """
    norm_weight = model.ln_final.weight.float()
    return _top_tokens(model.unembed.weight, directions.float().to(norm_weight.device) * norm_weight, n_readout)


def _top_tokens(weight, normed: torch.Tensor, n_readout: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top tokens of normed @ weightᵀ, a block of ids at a time (the unembedding may be streamed from disk:
    `weight[v0:v1]` reads a block)."""
    d_vocab, n = weight.shape[0], normed.shape[0]
    block = max(256, min(d_vocab, READOUT_TILE // max(n, 1)))
    best = torch.full((n, 0), -torch.inf, device=normed.device)
    best_ids = torch.zeros((n, 0), dtype=torch.long, device=normed.device)
    for start in range(0, d_vocab, block):
        logits = normed @ weight[start : start + block].float().to(normed.device).T  # [N, block]
        # The block's own top tokens first, then merged with the best so far: [N, 2 * n_readout] at most.
        values, ids = logits.topk(min(n_readout, logits.shape[1]), dim=-1)
        merged, merged_ids = torch.cat([best, values], 1), torch.cat([best_ids, ids + start], 1)
        best, pick = merged.topk(min(n_readout, merged.shape[1]), dim=-1)
        best_ids = merged_ids.gather(1, pick)
    return best_ids.cpu(), best.cpu()


def _readouts(weight, norm_weight: torch.Tensor, found: list[_SiteFound], n_readout: int) -> list[SiteReadout]:
    """Each site's unique features' read-out: the top `n_readout` tokens of (d ⊙ ln_final.weight) @ W_Uᵀ, in one
    sweep over the vocabulary for every site's features at once."""
    parts = [f.directions for f in found if f.directions is not None]
    out = []
    if parts:
        normed = torch.cat(parts).to(norm_weight.device) * norm_weight  # [N, d_model]
        all_ids, all_logits = _top_tokens(weight, normed, n_readout)
    start = 0
    for f in found:
        if f.directions is None:
            n_u = len(f.unique)
            out.append(SiteReadout(f.unique, torch.zeros(n_u, 0, dtype=torch.long), torch.zeros(n_u, 0)))
            continue
        stop = start + len(f.unique)
        out.append(SiteReadout(f.unique, all_ids[start:stop], all_logits[start:stop]))
        start = stop
    return out
