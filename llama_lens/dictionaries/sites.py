"""Where a dictionary reads and writes, in our hook names: each format's own site names mapped to the hook
point with the same meaning, and anything else refused by name.

Our names are TransformerLens' (model/hook_names.py), plus `blocks.{i}.mlp.hook_in`: the MLP's input after
ln2 and its weight, where transcoders read.
"""

from __future__ import annotations

import re

from ..errors import ConfigError

# The block hook points a dictionary can read or write, with the width each holds ("d_model" unless noted).
BLOCK_SITES = {
    "hook_resid_pre": "d_model",
    "hook_resid_mid": "d_model",
    "hook_resid_post": "d_model",
    "hook_attn_out": "d_model",
    "hook_mlp_out": "d_model",
    "ln1.hook_normalized": "d_model",
    "ln2.hook_normalized": "d_model",
    "mlp.hook_in": "d_model",
    "attn.hook_z": "n_heads * d_head",
    "mlp.hook_post": "d_mlp",
    "mlp.hook_pre": "d_mlp",
    "mlp.hook_pre_linear": "d_mlp",
}
GLOBAL_SITES = {"hook_embed": "d_model", "ln_final.hook_normalized": "d_model"}

# TransformerLens names that hold the same tensor as one of ours under another name.
_TL_ALIASES = {"hook_mlp_in": "hook_resid_mid", "hook_attn_in": "hook_resid_pre"}


def our_hook(name: str, *, where: str) -> str:
    """A TransformerLens-style hook name checked against the sites we have ("blocks.3.hook_mlp_in" ->
    "blocks.3.hook_resid_mid"); `where` names the file and key it came from, for the error.

    Raises:
        ConfigError: a site this model has no hook point for, naming `where` and the sites we have.
    """
    if name in GLOBAL_SITES:
        return name
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", str(name))
    if match:
        layer, point = match.groups()
        point = _TL_ALIASES.get(point, point)
        if point in BLOCK_SITES:
            return f"blocks.{layer}.{point}"
    raise ConfigError(
        f"{where}: hook {name!r} is no site llama_lens can read or write; dictionaries map to "
        f"blocks.{{i}}.{{{', '.join(BLOCK_SITES)}}} or {', '.join(GLOBAL_SITES)}"
    )


def sparsify_sites(hookpoint: str, transcode: bool, *, where: str) -> tuple[str, str]:
    """(hook_in, hook_out) for a sparsify hookpoint, a transformers module name whose output an SAE
    reconstructs and whose input a transcoder reads ("layers.3.mlp", "model.layers.3", "embed_tokens").

    Raises:
        ConfigError: a module we cannot map, naming `where`.
    """
    name = re.sub(r"^(model\.|base_model\.model\.model\.)", "", hookpoint)
    match = re.fullmatch(r"layers\.(\d+)(\.mlp|\.self_attn)?", name)
    if name == "embed_tokens" and not transcode:
        return "hook_embed", "hook_embed"
    if match:
        layer, part = match.group(1), match.group(2) or ""
        outputs = {"": "hook_resid_post", ".mlp": "hook_mlp_out", ".self_attn": "hook_attn_out"}
        # A transcoder reads the module's input: the residual stream entering the block, or the MLP's input
        # after its norm. The attention's normalized input has no hook point of its own (ln1 applies its
        # weight after ln1.hook_normalized), so a self_attn transcoder is refused below.
        inputs = {"": "hook_resid_pre", ".mlp": "mlp.hook_in"}
        hook_out = f"blocks.{layer}.{outputs[part]}"
        if not transcode:
            return hook_out, hook_out
        if part in inputs:
            return f"blocks.{layer}.{inputs[part]}", hook_out
    kind = "transcoder" if transcode else "SAE"
    raise ConfigError(
        f"{where}: sparsify hookpoint {hookpoint!r} ({kind}) has no llama_lens site; llama_lens maps "
        "layers.N, layers.N.mlp, layers.N.self_attn (SAEs) and embed_tokens (SAEs), and transcoders at "
        "layers.N and layers.N.mlp"
    )


def circuit_tracer_site(name: str, layer: int, *, where: str) -> str:
    """Our hook for circuit-tracer's feature_input_hook / feature_output_hook at `layer` ("hook_resid_mid",
    "mlp.hook_in", "ln2.hook_normalized", "hook_mlp_out"; its nnsight names "mlp.input" / "mlp.output"; and
    "mlp.hook_out", the hook its replacement MLP puts on the MLP's output, which its CLT configs name)."""
    aliases = {"mlp.input": "mlp.hook_in", "mlp.output": "hook_mlp_out", "mlp.hook_out": "hook_mlp_out"}
    return our_hook(f"blocks.{layer}.{aliases.get(name, name)}", where=where)
