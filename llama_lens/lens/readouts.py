"""The read-out vocabulary, once: which residual streams a lens reads out, their labels and their hook points.

    kind          label       hook point
    "embed"       "embed"     hook_embed                  the token embedding (layer 0's resid_pre)
    "resid_pre"   "{i}_pre"   blocks.{i}.hook_resid_pre   (the same vector as "{i-1}_post", or "embed")
    "resid_mid"   "{i}_mid"   blocks.{i}.hook_resid_mid
    "resid_post"  "{i}_post"  blocks.{i}.hook_resid_post

The logit lens, the tuned lens, its trainer and prompt-dataset runs all read these names from here.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import ArgumentError
from ..validate import check_choice

READOUTS = ("embed", "resid_pre", "resid_mid", "resid_post")
DEFAULT_READOUT = ("embed", "resid_post")


def readout_kinds(readout: str | Sequence[str]) -> list[str]:
    """`readout=` as a checked list of kinds.

    Raises:
        ArgumentError: an empty list or an unknown read-out.
    """
    kinds = [readout] if isinstance(readout, str) else list(readout)
    if not kinds:
        raise ArgumentError(f"readout= is empty: choose from {list(READOUTS)} (or a list of them)")
    for kind in kinds:
        check_choice("readout", kind, READOUTS, "read-out")
    return kinds


def readout_label(layer: int, kind: str) -> str:
    """The label of layer `layer`'s `kind` read-out: "embed", "3_pre", "3_mid" or "3_post"."""
    return "embed" if kind == "embed" else f"{layer}_{kind.removeprefix('resid_')}"


def readout_hook(layer: int, kind: str) -> str:
    """The hook point of layer `layer`'s `kind` read-out: "hook_embed" or "blocks.3.hook_resid_post"."""
    return "hook_embed" if kind == "embed" else f"blocks.{layer}.hook_{kind}"


def stream_label(layer: int, readout: str) -> str:
    """The label of the residual stream a (layer, read-out) names, each stream by one label: resid_pre of
    layer i is "{i-1}_post", and layer 0's is "embed"."""
    check_choice("readout", readout, READOUTS, "read-out")
    if readout == "resid_pre":
        return "embed" if layer == 0 else f"{layer - 1}_post"
    return readout_label(layer, readout)


def label_readout(label: str) -> tuple[int, str]:
    """(layer, kind) of a label: "embed" -> (0, "embed"), "3_post" -> (3, "resid_post")."""
    if label == "embed":
        return 0, "embed"
    layer, _, suffix = label.partition("_")
    if not layer.isdigit() or f"resid_{suffix}" not in READOUTS:
        raise ArgumentError(f"{label!r} is not a read-out label ('embed', '{{i}}_pre', '{{i}}_mid' or '{{i}}_post')")
    return int(layer), f"resid_{suffix}"


def stream_hook(label: str) -> str:
    """The hook point a labelled residual stream is taken from: "embed" -> "hook_embed", "3_post" ->
    "blocks.3.hook_resid_post"."""
    return readout_hook(*label_readout(label))


def hook_readout(hook_name: str) -> tuple[int, str]:
    """(layer, kind) of a residual-stream hook point: "hook_embed" -> (0, "embed"), "blocks.3.hook_resid_post"
    -> (3, "resid_post").

    Raises:
        ArgumentError: a hook point that is not a residual stream.
    """
    if hook_name == "hook_embed":
        return 0, "embed"
    parts = hook_name.split(".")
    if len(parts) != 3 or parts[0] != "blocks" or not parts[1].isdigit() or parts[2][5:] not in READOUTS[1:]:
        raise ArgumentError(f"{hook_name!r} is not a residual stream hook ('hook_embed' or 'blocks.i.hook_resid_*')")
    return int(parts[1]), parts[2].removeprefix("hook_")
