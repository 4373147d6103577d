"""The stored tensors checked against the config: every name known, every shape the config implies, none missing.

`match_names` gives the canonical name -> stored name table a `Checkpoint` reads through, or one error that
lists every tensor at fault (at most five named), so a checkpoint that does not match its config fails at
opening with its files and the config key to correct in the message, never half-way through a load.
"""

from __future__ import annotations

from ..config import LlamaConfig
from ..errors import CheckpointError, ConfigError
from .index import RawIndex, StoredTensor
from .names import inverse, layer_template, param_shapes, rename
from .reader import CheckpointReader


def check_n_layers(raw: RawIndex, cfg: LlamaConfig, reader: CheckpointReader) -> None:
    """Refuses a config with more layers than the weights hold, before anything is built per layer (a table
    of 10**9 layers' names would grow until the process is killed). Fewer layers than stored is reported,
    tensor by tensor, as unexpected tensors by `match_names`.

    Raises:
        ConfigError: naming the config key and how many layers the weights hold.
    """
    stored_layers = {layer for layer in (layer_template(name)[1] for name in raw) if layer is not None}
    n_stored = max(stored_layers) + 1 if stored_layers else 0
    if cfg.n_layers > n_stored:
        key = reader.n_layers_key
        raise ConfigError(
            f"{reader.folder / reader.config_name}: {key} is {cfg.n_layers}, but the weights in "
            f"{reader.files_text()} hold {n_stored} layer(s); correct {key}, or add the missing shards"
        )


def match_names(stored: dict[str, StoredTensor], cfg: LlamaConfig, reader: CheckpointReader) -> dict[str, str]:
    """Canonical name -> stored name of every parameter the config describes.

    Raises:
        CheckpointError: unexpected, misshapen (or model-parallel shards missing), unreadable or missing tensors.
    """
    config_name, table = reader.config_name, reader.to_canonical
    expected = param_shapes(cfg)
    source, unexpected, misshapen, fractions = {}, [], [], set()
    for name, tensor in stored.items():
        if layer_template(name)[0] in reader.ignored:
            continue
        canonical = rename(name, table)
        if canonical == "unembed.weight" and cfg.tie_embeddings:
            continue  # tied: like transformers, use the embedding and skip a stored lm_head
        if canonical not in expected:
            unexpected.append(f"{name!r} in {reader.where(tensor)}{_unexpected_hint(name, cfg, config_name)}")
            continue
        if tensor.shape != expected[canonical]:
            misshapen.append(
                f"tensor {name!r} in {reader.where(tensor)} has shape {list(tensor.shape)}, but {config_name} "
                f"implies {list(expected[canonical])}"
            )
            fractions.add(reader.split_fraction(name, tensor.shape, expected[canonical]))
        reader.check_dtype(tensor)
        source[canonical] = name
    if unexpected:
        why = f"not a weight of the model {config_name} describes"
        raise CheckpointError(_listing("unexpected tensor", unexpected, why))
    if misshapen and len(fractions) == 1 and None not in fractions:
        # Every model-parallel weight is the same fraction of its size: shards are missing at the end.
        (parts,) = fractions
        n_found, n_expected = len(reader.files), len(reader.files) * parts
        missing = f"consolidated.{n_found:02d}.pth" + (
            f" to consolidated.{n_expected - 1:02d}.pth are" if n_expected - n_found > 1 else " is"
        )
        raise CheckpointError(
            f"{reader.folder}: every model-parallel weight is 1/{parts} of the size {config_name} implies, so "
            f"{n_expected} shards are expected but only {n_found} found; {missing} missing: download again"
        )
    if misshapen:
        raise CheckpointError(_listing("wrong shape", misshapen, "the weights do not match the config"))
    if cfg.tie_embeddings and "embed.weight" in source:
        source["unembed.weight"] = source["embed.weight"]
    inverse_table = inverse(table)
    missing = [
        f"{rename(name, inverse_table)!r} (for {name}){reader.missing_hint(name)}"
        for name in expected
        if name not in source
    ]
    if missing:
        raise CheckpointError(_listing("missing tensor", missing, f"not found in {reader.files_text()}"))
    return source


def _unexpected_hint(name: str, cfg: LlamaConfig, config_name: str) -> str:
    layer = layer_template(name)[1]
    if layer is not None and layer >= cfg.n_layers:
        return f" (layer {layer}, but {config_name} says n_layers={cfg.n_layers})"
    if name.endswith(".bias") and cfg.model_type != "llama":
        return f" (a {cfg.architecture} has no such bias)"
    if name.endswith(".bias"):
        flag = "attention_bias" if "attn" in name else "mlp_bias"
        return f" ({config_name} sets {flag}=false)"
    return ""


def _listing(what: str, items: list[str], why: str) -> str:
    """ "2 unexpected tensors: 'a' in f, 'b' in f (why)", listing at most five."""
    shown = "; ".join(items[:5]) + (f"; and {len(items) - 5} more" if len(items) > 5 else "")
    plural = f"{len(items)} {what}s" if len(items) > 1 else what
    return f"{plural}: {shown} ({why})"
