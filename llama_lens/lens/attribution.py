"""Direct logit attribution: how much each component writes the target's logit straight into the output.

With the final norm's scale s frozen at its value on the full residual stream (RMSNorm has no mean-centering,
so it is linear in x once s is fixed), the target's logit splits exactly into one term per component that
wrote into the residual stream:

    logit(t) = sum_c  c · (W_U[t] * ln_final.weight) / s            c in embed, attn_out_i, mlp_out_i

and each attention output splits further into its heads (`hook_result`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ArgumentError
from ..validate import check_choice, renamed_keywords
from ..viz.bars import LayerBars, draw_bars
from ..viz.tokens import visible_token
from .inputs import InputsView, LensInputs, Prompt, Target, index_grid, make_frame, on_cpu, prepare_inputs

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from ..model.llama import HookedLlama

TABLE_KINDS = ("components", "heads")


@dataclass(repr=False)
class AttributionResult(InputsView):
    """Each component's direct contribution to the target's logit, under the frozen final-norm scale.

    Attributes:
        inputs: the prompts, positions and targets (`LensInputs`); `tokens`, `attention_mask`, `str_tokens`,
            `positions`, `target_ids` and `target_strs` read as the result's own, as in `LensResult`.
        labels: [n_components] "embed", then "{i}_attn" and "{i}_mlp" for each loaded layer.
        layers: [n_components] the layer of each component ("embed" is layer 0's input).
        kinds: [n_components] "embed", "attn" or "mlp".
        components: [batch, n_components, n_pos, n_targets]; they sum to `final_logits`.
        heads: [batch, n_layers, n_heads, n_pos, n_targets] each head's share of its layer's "attn" component
            (the heads sum to it, plus the o_proj bias term for models with `attention_bias`), or None.
        head_layers: [n_layers] the layers of `heads`.
        final_logits: [batch, n_pos, n_targets] the model's logits for the targets, from the run the components
            come from. With `heads=True` attention sums its heads' outputs one by one, which in bfloat16 can
            round a logit one step away from a plain forward's.
        scale: [batch, n_pos] the final norm's scale sqrt(mean(x²) + eps) of the full residual stream, which
            every component is divided by.
    """

    inputs: LensInputs
    labels: list[str]
    layers: list[int]
    kinds: list[str]
    components: torch.Tensor
    heads: torch.Tensor | None
    head_layers: list[int]
    final_logits: torch.Tensor
    scale: torch.Tensor

    def __repr__(self) -> str:
        return (
            f"AttributionResult(batch={self.batch}, components={len(self.labels)}, "
            f"positions={self.positions}, targets={self.target_strs})"
        )

    def to_frame(self, kind: str = "components") -> pd.DataFrame:
        """A tidy pandas DataFrame.

        Args:
            kind: "components": one row per prompt × component × position × target, columns batch_index,
                label, layer, component ("embed" / "attn" / "mlp"), position, token, target, target_id,
                contribution, final_logit. "heads": one row per prompt × layer × head × position × target,
                columns batch_index, layer, head, position, token, target, target_id, contribution, final_logit.
        """
        import pandas as pd

        check_choice("kind", kind, TABLE_KINDS, "table kind")
        if kind == "components":
            values = self.components
            b, c, p, t = index_grid(*values.shape)
            c = c.tolist()
            columns: dict[str, Any] = {
                "batch_index": b,
                "label": pd.Categorical([self.labels[i] for i in c], categories=self.labels, ordered=True),
                "layer": [self.layers[i] for i in c],
                "component": [self.kinds[i] for i in c],
            }
        else:
            if self.heads is None:
                raise ArgumentError("this result has no per-head contributions; run with heads=True")
            values = self.heads
            b, layer_index, head, p, t = index_grid(*values.shape)
            columns = {"batch_index": b, "layer": torch.tensor(self.head_layers)[layer_index], "head": head}
        columns |= self.inputs.position_columns(b, p)
        columns |= self.inputs.target_columns(b, t)
        columns["contribution"] = values.reshape(-1)
        columns["final_logit"] = self.final_logits[b, p, t]
        return make_frame(columns)

    def plot(self, **kwargs: Any) -> Figure:
        """Bars per layer (attention, MLP) and a layer × head heatmap; see `logit_attribution`
        (`ll.plot.logit_attribution`)."""
        return logit_attribution(self, **kwargs)


def direct_logit_attribution(
    model: HookedLlama,
    prompt_or_tokens: Prompt,
    *,
    target: Target,
    positions: int | Iterable[int] | None = -1,
    heads: bool = True,
    prepend_bos: bool | None = None,
) -> AttributionResult:
    """Splits the target's logit into the direct contributions of the embedding, each layer's attention and MLP
    output, and each attention head.

    The final norm's scale s = sqrt(mean(x²) + eps) is taken from the real forward pass
    (`ln_final.hook_scale` on the full residual stream) and held fixed; every component c then contributes
    c · (W_U[target] * ln_final.weight) / s, and these sum to the model's logit for the target (up to float
    rounding). A component's term is what it adds to the logit directly, not through later layers.

    Args:
        model: a HookedLlama (a partial model attributes over its loaded layers; its output is the sum).
        prompt_or_tokens: as in `logit_lens`.
        target: as in `logit_lens`; required.
        positions: where to attribute, as in `logit_lens` (None: all). The default is -1, the last position,
            where the next token is predicted: an attribution explains one prediction, its figure shows one
            position, and per-head terms cost [batch, n_layers, n_heads, n_pos, n_targets].
        heads: also split attention outputs per head (computes `hook_result`, [batch, pos, n_heads, d_model]
            per layer, and keeps only its projection).
        prepend_bos: as in `logit_lens`.

    Returns:
        An AttributionResult.
    """
    if target is None:
        raise ArgumentError("direct_logit_attribution needs a target, e.g. target=' Paris'")
    inputs = prepare_inputs(
        model,
        prompt_or_tokens,
        target=target,
        positions=positions,
        prepend_bos=prepend_bos,
        what="direct_logit_attribution",
    )
    tokens, target_ids = inputs.tokens, inputs.target_ids
    layers = model.layer_indices
    device = model.unembed.weight.device
    index = torch.tensor(inputs.positions, dtype=torch.long, device=device)
    # no_grad rather than inference_mode: the results are handed to users, who may scale or patch them in
    # place, which inference tensors refuse outside inference_mode.
    with torch.no_grad():
        # [batch, n_targets, d_model]: the target's unembedding row times the final norm's weight, multiplied in
        # float32 (a bfloat16 product would round every element to 8 bits before the sum).
        directions = model.unembed.weight[target_ids.to(device)].float() * model.ln_final.weight.float()
    projected: dict[str, torch.Tensor] = {}

    def project(tensor: torch.Tensor, *, hook) -> None:
        picked = tensor[:, index].float()  # [batch, n_pos, d_model] or [batch, n_pos, n_heads, d_model]
        if picked.dim() == 4:
            projected[hook.name] = torch.einsum("bphd,btd->bhpt", picked, directions)
        else:
            projected[hook.name] = torch.einsum("bpd,btd->bpt", picked, directions)

    def keep_scale(tensor: torch.Tensor, *, hook) -> None:
        projected[hook.name] = tensor[:, index, 0].float()  # [batch, n_pos]

    names = ["hook_embed"] + [f"blocks.{i}.hook_{part}_out" for i in layers for part in ("attn", "mlp")]
    if heads:
        names += [f"blocks.{i}.attn.hook_result" for i in layers]
    with torch.no_grad():
        logits = model.run_with_hooks(
            tokens,
            attention_mask=inputs.attention_mask,
            fwd_hooks=[(names, project), ("ln_final.hook_scale", keep_scale)],
        )
        scale = projected["ln_final.hook_scale"]  # [batch, n_pos]
        divide = scale[:, :, None]
        labels, comp_layers, kinds = ["embed"], [0], ["embed"]
        parts = [projected["hook_embed"] / divide]
        for i in layers:
            for part in ("attn", "mlp"):
                labels.append(f"{i}_{part}")
                comp_layers.append(i)
                kinds.append(part)
                parts.append(projected[f"blocks.{i}.hook_{part}_out"] / divide)
        components = torch.stack(parts, dim=1)  # [batch, n_components, n_pos, n_targets]
        head_values = None
        if heads and layers:
            # [batch, n_layers, n_heads, n_pos, n_targets]
            head_values = torch.stack([projected[f"blocks.{i}.attn.hook_result"] for i in layers], dim=1)
            head_values = head_values / scale[:, None, None, :, None]
        target_index = target_ids.to(device)[:, None, :].expand(-1, len(index), -1)  # [batch, n_pos, n_targets]
        final_logits = logits[:, index].float().gather(-1, target_index)

    return AttributionResult(
        inputs=on_cpu(inputs),
        labels=labels,
        layers=comp_layers,
        kinds=kinds,
        components=components.cpu(),
        heads=None if head_values is None else head_values.cpu(),
        head_layers=list(layers) if heads else [],
        final_logits=final_logits.cpu(),
        scale=scale.cpu(),
    )


@renamed_keywords(prompt="batch_index", target="target_index")
def logit_attribution(
    result: AttributionResult,
    *,
    batch_index: int = 0,
    position: int | None = None,
    target_index: int = 0,
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """Direct logit attribution at one position: bars for the embedding and each layer's attention and MLP
    output, and (when the result has them) a layer × head heatmap, all in logits of the target.

    Args:
        result: an AttributionResult from `direct_logit_attribution`.
        batch_index: which prompt of the batch (negative counts from the end); formerly `prompt=`.
        position: the token position (must be among those attributed; default the last of them).
        target_index: which of the prompt's targets; formerly `target=`.
        figsize: (width, height) in inches.

    Returns:
        The Figure: axes 0 the bars, axes 1 the head heatmap (if any), plus its colour bar.

    Raises:
        ArgumentError: a batch index, position or target index out of range.
    """
    return draw_bars(attribution_bars(result, batch_index=batch_index, position=position, target_index=target_index),
                     figsize=figsize)  # fmt: skip


def attribution_bars(
    result: AttributionResult, *, batch_index: int = 0, position: int | None = None, target_index: int = 0
) -> LayerBars:
    """What `logit_attribution` draws: one group of bars for the embedding and one per layer (attention, MLP),
    and the per-head terms at the same position."""
    prompt = result.inputs.check_batch_index(batch_index)
    target = result.inputs.check_target_index(target_index)
    column = result.inputs.column_of(position, prompt)
    values = result.components[prompt, :, column, target].tolist()  # [n_components]
    layer_list = sorted({layer for layer, kind in zip(result.layers, result.kinds) if kind != "embed"})
    has_embed = "embed" in result.kinds
    group_of = {layer: i + has_embed for i, layer in enumerate(layer_list)}
    series: dict[str, dict[int, float]] = {"attn": {}, "mlp": {}}
    for value, layer, kind in zip(values, result.layers, result.kinds):
        series.setdefault(kind, {})[0 if kind == "embed" else group_of[layer]] = value
    has_heads = result.heads is not None and len(result.head_layers) > 0
    p = result.positions[column]
    total = float(result.final_logits[prompt, column, target])
    target_text = visible_token(result.target_strs[prompt][target], 16)
    token = visible_token(result.str_tokens[prompt][p], 16)
    return LayerBars(
        groups=(["embed"] if has_embed else []) + [str(layer) for layer in layer_list],
        series=series,
        colours={"attn": "tab:blue", "mlp": "tab:orange", "embed": "tab:gray"},
        title=f"logit of {target_text} at position {p} ({token}): {total:.2f}",
        xlabel="layer",
        ylabel="direct contribution to the logit",
        heads=result.heads[prompt, :, :, column, target] if has_heads else None,  # [n_layers, n_heads]
        head_rows=[str(layer) for layer in result.head_layers],
        heads_title="per head",
        heads_xlabel="head",
        heads_ylabel="layer",
    )
