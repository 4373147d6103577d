"""Hook names and the small tensor helpers TransformerLens users know: `get_act_name`, position slices, and
`ungroup_kv` for grouped-query attention.

Shapes use the glossary of model/llama.py (batch, pos, n_heads, n_kv_heads, d_head, ...).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from ..errors import ArgumentError

# A position slice as TransformerLens' `Slice` takes it: None (everything), an int (that position, dimension
# dropped), a (start, stop[, step]) tuple, a Python slice, or a list / tensor of positions.
PosSlice = int | slice | tuple[int, ...] | Sequence[int] | torch.Tensor | None

_LAYER_TYPE_ALIASES = {"a": "attn", "m": "mlp", "b": "", "block": "", "blocks": "", "attention": "attn"}
_ACT_NAME_ALIASES = {
    "attn": "pattern",
    "attn_logits": "attn_scores",
    "key": "k",
    "query": "q",
    "value": "v",
    "mlp_pre": "pre",
    "mlp_mid": "mid",
    "mlp_post": "post",
}
_ATTN_NAMES = {"k", "v", "q", "z", "rot_k", "rot_q", "result", "pattern", "attn_scores"}
_MLP_NAMES = {"pre", "post", "mid", "pre_linear"}


def get_act_name(name: str, layer: int | str | None = None, layer_type: str | None = None) -> str:
    """The full hook name for a short one, by TransformerLens' rules.

    Examples: `get_act_name("pattern", 0)` -> "blocks.0.attn.hook_pattern"; `get_act_name("resid_post", 3)` ->
    "blocks.3.hook_resid_post"; `get_act_name("q", 3, "attn")` -> "blocks.3.attn.hook_q"; `get_act_name("k6")` ->
    "blocks.6.attn.hook_k"; `get_act_name("scale", 4, "ln1")` -> "blocks.4.ln1.hook_scale";
    `get_act_name("normalized")` -> "ln_final.hook_normalized"; a full name comes back unchanged.

    Negative layers are not resolved here (this function does not know the model): `cache["resid_post", -1]`
    and `ll.patching` resolve them against `cfg.n_layers` first.

    Args:
        name: a short activation name ("resid_pre", "pattern", "k", ...) or a full hook name.
        layer: the block index, if the activation lives in a block.
        layer_type: "attn"/"a", "mlp"/"m", "ln1", "ln2"; inferred for attention and MLP activations.
    """
    if ("." in name or name.startswith("hook_")) and layer is None and layer_type is None:
        return name
    # "k6" / "scale4ln1": the first run of digits is the layer, what follows is the layer type.
    match = re.fullmatch(r"([a-z_]+?)(\d+)([a-z]\w*)?", name)
    if match is not None and layer is None:
        name, layer, layer_type = match.group(1), int(match.group(2)), match.group(3) or layer_type
    name = _ACT_NAME_ALIASES.get(name, name)
    if name in _ATTN_NAMES:
        layer_type = "attn"
    elif name in _MLP_NAMES:
        layer_type = "mlp"
    elif layer_type in _LAYER_TYPE_ALIASES:
        layer_type = _LAYER_TYPE_ALIASES[layer_type]
    full = f"blocks.{layer}." if layer is not None else ""
    full += f"{layer_type}." if layer_type else ""
    full += f"hook_{name}"
    if name in ("scale", "normalized") and layer is None:
        full = f"ln_final.{full}"
    return full


def apply_pos_slice(tensor: torch.Tensor, pos_slice: PosSlice, dim: int) -> torch.Tensor:
    """Selects positions along `dim` as TransformerLens' `Slice.apply` does (an int drops the dimension)."""
    if pos_slice is None:
        return tensor
    if isinstance(pos_slice, bool):
        raise ArgumentError(f"pos_slice must be an int, a slice, a tuple or a list of positions, got {pos_slice!r}")
    if isinstance(pos_slice, int):
        return tensor.select(dim, pos_slice)
    if isinstance(pos_slice, tuple):
        pos_slice = slice(*pos_slice)
    if isinstance(pos_slice, slice):
        index = [slice(None)] * tensor.dim()
        index[dim] = pos_slice
        return tensor[tuple(index)]
    positions = torch.as_tensor(pos_slice, dtype=torch.long, device=tensor.device)
    return tensor.index_select(dim, positions % tensor.shape[dim])


def ungroup_kv(kv: torch.Tensor, n_heads: int, *, dim: int = -2) -> torch.Tensor:
    """Repeats each key/value head for the query heads that read it (grouped-query attention).

    Query head `h` reads key/value head `h // n_rep`, with `n_rep = n_heads // n_kv_heads`; this is the same
    `repeat_interleave` the attention applies, so `ungroup_kv(cache["v", 0], n_heads)[:, :, h]` is what query
    head `h` reads.

    Args:
        kv: [batch, pos, n_kv_heads, d_head] (hook_k, hook_v, hook_rot_k) or any tensor with heads at `dim`.
        n_heads: the number of query heads.

    Returns:
        [batch, pos, n_heads, d_head] (heads at `dim`).
    """
    n_kv_heads = kv.shape[dim]
    if n_heads % n_kv_heads:
        raise ArgumentError(f"n_heads ({n_heads}) must be a multiple of the {n_kv_heads} key/value heads at dim {dim}")
    return kv.repeat_interleave(n_heads // n_kv_heads, dim=dim)
