"""Exact ablation of nodes (a feature, or a dictionary's error term, at one position of one site), batched: one
forward pass runs the clean prompt and every ablation as rows of one batch, as `ll.patching` batches its
patched runs.

Ablating a node changes its site's activation at its position by what the node writes there:
    feature f:   decode(acts with f set to 0) - decode(acts)      (= -acts[f] * W_dec[f] for a plain decoder)
    error term:  -error
    a cross-layer transcoder's feature f of layer i:  -acts[f] * W_dec_i[f, j - i] at the output of every
                 layer j >= i (all it writes, so ablating it zeroes its writes everywhere)
with the site's other features and its error held, which is the spliced model with that node removed (the
other dictionaries, spliced with their error terms, are the identity and are left out). Every row starts at
the lowest layer any node sits in, from the clean run's residual stream there; row 0 is the clean run, so
each effect, metric(clean) - metric(ablated), compares runs computed alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from ..dictionaries.cross_layer import CrossLayerTranscoder
from ..errors import ArgumentError
from ..patching.lazy_logits import LogitSource
from ..patching.metrics import BatchedMetric, Metric, PositionMetric
from ..validate import check_count, check_index
from .attribute_result import ERROR, site_layer
from .attribute_splice import AnyDictionary, SiteRecord, check_dictionaries, splice_recording

Node = tuple[str, int, int]  # (site: the dictionary's hook_out, position, feature id or -1 for the error term)


def ablate_features(
    model,
    prompt: str | torch.Tensor | Sequence[int],
    dictionaries: AnyDictionary | Iterable[AnyDictionary],
    nodes: Sequence[Node],
    metric: Metric,
    *,
    max_batch: int = 64,
    prepend_bos: bool | None = None,
) -> torch.Tensor:
    """The effect of ablating each node on its own, from one clean spliced pass and then batched runs (see the
    module docstring).

    Args:
        prompt: one text or token ids [pos].
        dictionaries: the dictionaries the nodes belong to.
        nodes: (site, position, feature) each: a dictionary's hook_out (a CLT feature's: its layer's output
            hook, hooks_out[layer]), a position of the prompt (negative counts
            from the end), a feature id, or -1 for the dictionary's error term there.
        metric: metric(logits [1, pos, d_vocab]) -> [] as in `ll.patching`; a `PositionMetric` unembeds its
            position only, a `BatchedMetric` scores all rows of a batch in one call.
        max_batch: the most rows (the clean run and ablations) per forward pass.

    Returns:
        [len(nodes)] metric(clean) - metric(node ablated), in float64.

    Raises:
        ArgumentError: a site no dictionary writes, a position or feature out of range, more than one prompt.
    """
    dictionaries = check_dictionaries(model, dictionaries)
    tokens, mask = prompt_tokens(model, prompt, prepend_bos)
    records: dict[str, SiteRecord] = {}
    resid_in: dict[int, torch.Tensor] = {}
    with torch.no_grad(), model.hooks(splice_recording(model, dictionaries, records, resid_in)):
        resid_in[model.cfg.n_layers] = model(tokens, attention_mask=mask, stop_at_layer=model.cfg.n_layers)
    checked = [check_node(node, records, tokens.shape[1]) for node in nodes]
    _, effects = run_ablations(model, tokens, mask, records, resid_in, checked, metric, max_batch)
    return effects


def prompt_tokens(
    model, prompt, prepend_bos: bool | None, *, batch: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The prompts' ids [batch, pos] and mask (None when nothing is padded); one prompt unless `batch`."""
    tokens, mask = model.prepare_tokens(prompt, prepend_bos=prepend_bos)
    if tokens.shape[0] != 1 and not batch:
        raise ArgumentError(
            f"prompt: ablate_features takes one prompt, got a batch of {tokens.shape[0]} "
            "(ll.feature_attribution takes a batch)"
        )
    return tokens, None if mask is None or bool(mask.all()) else mask


def check_node(node: Node, records: dict[str, SiteRecord], pos: int) -> Node:
    if not isinstance(node, (tuple, list)) or len(node) != 3:
        raise ArgumentError(f"nodes: a node is (site, position, feature), got {node!r}")
    site, position, feature = node
    if site not in records:
        raise ArgumentError(f"nodes: no dictionary writes {site!r}; the dictionaries' sites are {sorted(records)}")
    position = check_index("position", position, pos, "positions in the prompt")
    d_sae = records[site].d_sae
    if feature != ERROR:
        feature = check_index("feature", feature, d_sae, f"features in the dictionary at {site} (-1: its error)")
    return site, position, feature


def node_deltas(
    records: dict[str, SiteRecord], prompt: int, site: str, positions: torch.Tensor, features: torch.Tensor
) -> list[dict[str, torch.Tensor]]:
    """Per node of prompt `prompt` at `site`: what removing it adds to each site it writes, at its position
    ({site: [d_out]}; a CLT feature writes to its layer's output and every later one)."""
    record = records[site]
    error = record.error.detach()[prompt]  # [pos, d_out]
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(len(positions))]
    is_error = features == ERROR
    for i in is_error.nonzero().squeeze(-1).tolist():
        out[i][site] = -error[positions[i]]
    chosen = (~is_error).nonzero().squeeze(-1)
    if not len(chosen):
        return out
    dictionary = record.dictionary
    device = record.acts.device  # the dictionary's, which may not be the model's
    rows, picked = positions[chosen].to(device), features[chosen].to(device)
    acts = record.acts.detach()[prompt][rows]  # [m, d_sae]
    if isinstance(dictionary, CrossLayerTranscoder):
        # A CLT feature writes acts * W_dec[f, j - layer] to each layer j >= its own; removing it takes all back.
        values = acts[torch.arange(len(acts), device=device), picked]  # [m]
        directions = dictionary.W_dec_rows(record.layer, picked)  # [m, n_layers - layer, d_out]
        written = -values[:, None, None] * directions
        for k, i in enumerate(chosen.tolist()):
            for offset, target in enumerate(dictionary.hooks_out[record.layer :]):
                out[i][target] = written[k, offset]
        return out
    zeroed = acts.clone()
    zeroed[torch.arange(len(acts), device=device), picked] = 0
    source = record.source[prompt][rows]
    deltas = dictionary.decode(zeroed, source) - dictionary.decode(acts, source)
    for k, i in enumerate(chosen.tolist()):
        out[i][site] = deltas[k]
    return out


def run_ablations(
    model,
    tokens: torch.Tensor,
    mask: torch.Tensor | None,
    records: dict[str, SiteRecord],
    resid_in: dict[int, torch.Tensor],
    nodes: list[Node],
    metric: Metric,
    max_batch: int,
    prompt: int = 0,
) -> tuple[float, torch.Tensor]:
    """(the clean run's metric, [len(nodes)] metric(clean) - metric(ablated)) for prompt `prompt` of the
    recorded batch, from batched rows: the clean row, then one row per node, at most `max_batch` rows a
    forward pass."""
    max_batch = check_count("max_batch", max_batch)
    n_layers, pos = model.cfg.n_layers, tokens.shape[1]
    tokens = tokens[prompt : prompt + 1]
    mask = None if mask is None else mask[prompt : prompt + 1]
    resid_in = {layer: resid[prompt : prompt + 1] for layer, resid in resid_in.items()}
    deltas: list[dict[str, torch.Tensor]] = [{} for _ in nodes]
    for site in records:
        picked = [i for i, node in enumerate(nodes) if node[0] == site]
        if picked:
            positions = torch.tensor([nodes[i][1] for i in picked])
            features = torch.tensor([nodes[i][2] for i in picked])
            for i, delta in zip(picked, node_deltas(records, prompt, site, positions, features)):
                deltas[i] = delta
    # Where every row starts: the lowest layer a node sits in (hook_embed: from the tokens).
    start = min((site_layer(site, n_layers) for site, _, _ in nodes), default=n_layers)
    scores: list[torch.Tensor] = []
    rows = [None, *range(len(nodes))]  # None: the clean row
    with torch.no_grad():
        for first in range(0, len(rows), max_batch):
            chunk = rows[first : first + max_batch]
            hooks = _delta_hooks(chunk, nodes, deltas, pos)
            with model.hooks(hooks):
                final = _run_rows(model, tokens, mask, resid_in, start, len(chunk))
                scores.append(score_runs(model, metric, model.ln_final(final)))
    scores_all = torch.cat(scores).double()
    return float(scores_all[0]), scores_all[0] - scores_all[1:]


def _delta_hooks(chunk: list[int | None], nodes: list[Node], deltas: list[dict[str, torch.Tensor]], pos: int):
    per_site: dict[str, torch.Tensor] = {}
    for row, index in enumerate(chunk):
        if index is None:
            continue
        position = nodes[index][1]
        for site, delta in deltas[index].items():
            if site not in per_site:
                shape = (len(chunk), pos, delta.shape[-1])
                per_site[site] = torch.zeros(shape, dtype=delta.dtype, device=delta.device)
            per_site[site][row, position] += delta

    def adder(added: torch.Tensor):
        def add(act: torch.Tensor, *, hook) -> torch.Tensor:
            return act + added.to(device=act.device, dtype=act.dtype).view(act.shape)

        return add

    return [(site, adder(added)) for site, added in per_site.items()]


def _run_rows(model, tokens, mask, resid_in, start: int, rows: int) -> torch.Tensor:
    """The final residual stream [rows, pos, d_model] of `rows` copies of the prompt, run from layer `start`."""
    n_layers = model.cfg.n_layers
    row_mask = None if mask is None else mask.expand(rows, -1)
    if start < 0:
        return model(tokens.expand(rows, -1), attention_mask=row_mask, stop_at_layer=n_layers)
    resid = resid_in[start].expand(rows, -1, -1).contiguous()
    if start == n_layers:
        return resid
    return model(resid, attention_mask=row_mask, start_at_layer=start, stop_at_layer=n_layers)


def score_runs(model, metric: Metric, normed: torch.Tensor) -> torch.Tensor:
    """[runs] the metric of each run (a copy of one prompt) from its final norm's output [runs, pos, d_model],
    unembedding only the positions the metric reads; differentiable."""
    runs, pos = normed.shape[:2]
    if isinstance(metric, PositionMetric):
        position = int(metric.positions(1, pos, normed.device)[0])
        logits = model.unembed(normed[:, position])  # [runs, d_vocab]
        scores = [metric.at_position(logits[r : r + 1]) for r in range(runs)]
    else:
        source = LogitSource(model.unembed, normed[:, None])  # [runs, batch 1, pos, d_model]
        if isinstance(metric, BatchedMetric):
            return metric.runs(source.logits(None)).reshape(runs)
        scores = [metric(source.logits(r)) for r in range(runs)]
    for score in scores:
        if not isinstance(score, torch.Tensor) or score.numel() != 1:
            shown = tuple(score.shape) if isinstance(score, torch.Tensor) else type(score).__name__
            raise ArgumentError(f"the metric must return one number (a tensor []), got {shown}")
    return torch.stack([score.reshape(()) for score in scores])
