"""Where a dictionary's features sit, for the feature lens: the forward order of its site, the width the model
holds there, and how a decoder row written at that site reaches the residual stream (and so the logits).

A feature's decoder row lives in the basis of the hook point its dictionary writes (`hook_out`):

    residual basis      hook_embed, hook_resid_pre/mid/post, hook_attn_out, hook_mlp_out: the row is a d_model
                        direction added to the residual stream as it is
    attn.hook_z         [n_heads * d_head]: the attention's output projection W_O takes it to d_model
    mlp.hook_post       [d_mlp]: the MLP's output projection W_out (down_proj) takes it to d_model
    after the norm      ln_final.hook_normalized: already divided by the final norm's scale, so the read-out
                        and the logit attribution skip that division
    not written         mlp.hook_in, ln1/ln2.hook_normalized, mlp.hook_pre, mlp.hook_pre_linear: the MLP's or
                        attention's inputs, which nothing adds to the residual stream; these features get no
                        read-out and no logit attribution (NaN), only their activations

Biases (b_O, the MLP's output bias) are not a feature's: only the linear part of each map is applied.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ArgumentError, UnknownNameError, UsageError, did_you_mean

# The order hook points fire in within a block, for sorting sites into the forward order.
BLOCK_ORDER = (
    "hook_resid_pre", "ln1.hook_normalized", "attn.hook_z", "hook_attn_out", "hook_resid_mid",
    "ln2.hook_normalized", "mlp.hook_in", "mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post",
    "hook_mlp_out", "hook_resid_post",
)  # fmt: skip
RESIDUAL = {"hook_embed", "hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out"}
_MLP_WIDE = {"mlp.hook_post", "mlp.hook_pre", "mlp.hook_pre_linear"}


@dataclass(frozen=True)
class FeatureSite:
    """One dictionary's place in the feature lens.

    Attributes:
        label: the row label: the hook it writes, with the dictionary's folder name when two share a hook.
        hook: the hook point the dictionary writes (hook_out), where its features' logit attribution applies.
        hook_in: the hook point it reads (the same as `hook` for an SAE).
        layer: the block of `hook` (0 for hook_embed, n_layers for ln_final.hook_normalized).
        path: the dictionary's folder.
        d_sae: its number of features.
        written: "residual", "W_O", "W_out", "normed" or "" (not written to the residual stream; see the module
            docstring).
    """

    label: str
    hook: str
    hook_in: str
    layer: int
    path: Path
    d_sae: int
    written: str

    def sort_key(self) -> tuple[int, int]:
        if self.hook == "hook_embed":
            return (-1, 0)
        if self.hook.startswith("ln_final"):
            return (self.layer + 1, 0)
        point = self.hook.split(".", 2)[2]
        return (self.layer, BLOCK_ORDER.index(point) if point in BLOCK_ORDER else len(BLOCK_ORDER))


def _split(hook: str) -> tuple[int | None, str]:
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", hook)
    return (int(match.group(1)), match.group(2)) if match else (None, hook)


def _width(cfg, point: str) -> tuple[int, str]:
    if point == "attn.hook_z":
        return cfg.n_heads * cfg.d_head, "n_heads * d_head"
    if point in _MLP_WIDE:
        return cfg.d_mlp, "d_mlp"
    return cfg.d_model, "d_model"


def site_of(model, dictionary, label: str) -> FeatureSite:
    """The FeatureSite of `dictionary` in `model`, checked: both hooks exist (the layer is loaded) and the widths
    fit the model.

    Raises:
        UnknownNameError: a hook the model does not have (a layer not loaded, a misspelt name).
        ArgumentError: a dictionary whose input width is not the model's at that hook.
    """
    for name in (dictionary.hook_in, dictionary.hook_out):
        if name not in model.hook_dict:
            raise UnknownNameError(
                f"{dictionary.path}: the model has no hook point {name!r}{did_you_mean(name, model.hook_dict)}; "
                "load the layer it sits at, or use a dictionary made for this model"
            )
    ends = ((dictionary.hook_in, dictionary.d_in, "reads"), (dictionary.hook_out, dictionary.d_out, "writes"))
    for hook, d, what in ends:
        width, fields = _width(model.cfg, _split(hook)[1])
        if d != width:
            raise ArgumentError(
                f"{dictionary.path}: this dictionary {what} {d} numbers at {hook}, where the model holds {width} "
                f"({fields}); it was made for another model"
            )
    layer, point = _split(dictionary.hook_out)
    if point in RESIDUAL:
        written = "residual"
    elif point == "attn.hook_z":
        written = "W_O"
    elif point == "mlp.hook_post":
        written = "W_out"
    elif point == "ln_final.hook_normalized":
        written = "normed"
    else:
        written = ""
    if layer is None:
        layer = model.cfg.n_layers if point.startswith("ln_final") else 0
    return FeatureSite(label, dictionary.hook_out, dictionary.hook_in, layer, Path(dictionary.path),
                       dictionary.d_sae, written)  # fmt: skip


def to_residual(model, site: FeatureSite, rows: torch.Tensor) -> torch.Tensor | None:
    """Decoder rows [n, d_out] written at `site` as residual-stream directions [n, d_model] (float32), or None
    for a site that writes nothing to the residual stream.

    For attn.hook_z and mlp.hook_post this reads the block's output projection, so on a streamed model it must
    run while that block's weights are in memory (inside a hook of the block).
    """
    if site.written in ("residual", "normed"):
        return rows.float()
    if not site.written:
        return None
    module = model.blocks[site.layer]
    weight = module.attn.o_proj.weight if site.written == "W_O" else module.mlp.down_proj.weight  # [d_model, d_out]
    if weight.is_meta:
        raise UsageError(
            f"the weights of layer {site.layer} are not in memory (a streamed model) where the feature lens reads "
            f"{site.hook}; load the model without stream=True to read features there"
        )
    return rows.float().to(weight.device) @ weight.float().T
