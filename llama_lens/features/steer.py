"""Steering: add a direction to the model's activations at chosen hook points, during any forward pass and
`generate` (with or without the KV cache, chat prompts included).

    with ll.steer(model, (sae, 1234), scale=8.0):                  # a feature's decoder direction, at its site
        model.generate("Tell me about your day", temperature=0)
    with ll.steer(model, vector, layers=[6, 7], positions="generated"):   # any [d_model] vector
        ...
    model.generate(prompt, fwd_hooks=ll.steer(model, vector, layers=[6]).hooks)   # the same as a hook set

A steering vector is added, times its scale, to the activation at every steered position:
    act[:, p] += scale * vector          act [batch, pos, width] (hook_z: [batch, pos, n_heads, d_head])

`positions` picks the positions, as columns of the left-padded batch:
    "all"         every position of every pass (the prompt's and the generated tokens')
    "generated"   inside `generate`, the positions whose next token is sampled: the prompt's last token and
                  every generated token (the prompt's earlier tokens run unsteered); outside `generate`, the
                  last position of each forward pass
    ints          these columns only (outside `generate` a pass's first position is column 0)
The KV cache keeps the steered keys and values of earlier positions, so a cached step sees what an uncached
pass recomputes: greedy generations agree with and without it (model/generate.py's DecodingStep tells the
hooks where each pass sits).

Contrastive vectors from two prompt sets: steer_vector.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..dictionaries.dictionary import Dictionary
from ..dictionaries.sites import BLOCK_SITES, GLOBAL_SITES
from ..errors import ArgumentError, ArgumentTypeError, UnknownNameError, did_you_mean
from ..model.generate import decoding_step
from ..model.hooks import HookedModule
from ..validate import as_index, check_index, check_layers

if TYPE_CHECKING:
    from ..model.llama import HookedLlama

POSITIONS = ("all", "generated")


@dataclass
class SteeringVector:
    """A direction to add at one hook point: `scale * vector` [width] at `hook` (its activation's last
    dimension; n_heads * d_head at attn.hook_z)."""

    hook: str
    vector: torch.Tensor
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.vector, torch.Tensor) or self.vector.dim() != 1 or not self.vector.is_floating_point():
            shown = tuple(self.vector.shape) if isinstance(self.vector, torch.Tensor) else type(self.vector).__name__
            raise ArgumentError(f"a steering vector is a float tensor [width], got {shown} for {self.hook!r}")
        self.scale = _check_scale(self.scale)

    @classmethod
    def from_feature(cls, dictionary: Dictionary, feature: int, scale: float = 1.0) -> SteeringVector:
        """A feature's decoder direction at the hook its dictionary writes: what one unit of the feature's
        activation adds to the reconstruction (its W_dec row, with the dictionary's output scaling; for a
        dictionary that normalizes its input per token, in the normalized units)."""
        if not isinstance(dictionary, Dictionary):
            raise ArgumentTypeError(f"a feature is (Dictionary, feature id), got {type(dictionary).__name__}")
        feature = check_index("feature", feature, dictionary.d_sae, f"features in {dictionary.path}")
        row = dictionary.W_dec_rows([feature])[0].detach()
        if dictionary.rescale_acts_by_decoder_norm:  # decode divides the activation by the row's norm
            row = row / row.norm()
        return cls(dictionary.hook_out, row / dictionary.output_scale, scale)


Steerable = torch.Tensor | SteeringVector | tuple[Dictionary, int]


class Steering:
    """The hooks of `steer`: a context manager (`with`), or a hook set (`.hooks`, for `fwd_hooks=`)."""

    def __init__(self, model: HookedModule, vectors: list[SteeringVector], positions: str | list[int]) -> None:
        self.model, self.vectors, self.positions = model, vectors, positions
        self.hooks = [(hook, _add_hook(total, positions)) for hook, total in _summed(vectors).items()]
        self._open: list = []

    def __enter__(self) -> HookedModule:
        context = self.model.hooks(self.hooks)
        context.__enter__()
        self._open.append(context)
        return self.model

    def __exit__(self, *exc_info) -> None:
        self._open.pop().__exit__(*exc_info)

    def __repr__(self) -> str:
        where = ", ".join(sorted({v.hook for v in self.vectors}))
        return f"Steering({len(self.vectors)} vector(s) at {where}, positions={self.positions!r})"


def steer(
    model: HookedLlama,
    vectors: Steerable | Iterable[Steerable],
    *,
    hooks: str | Sequence[str] | None = None,
    layers: int | Iterable[int] | None = None,
    scale: float = 1.0,
    positions: str | int | Iterable[int] = "all",
) -> Steering:
    """Adds steering vectors to the model's activations while the returned `Steering` is open (`with`), or
    through its hook set (`fwd_hooks=steering.hooks`); see the module docstring.

    Args:
        vectors: one or a list of: a tensor [width] (placed by `hooks=` or `layers=`), a `SteeringVector`
            (from `steering_vector`, or made by hand), or `(dictionary, feature_id)`: the feature's decoder
            direction at the hook its dictionary writes.
        hooks: hook point(s) to add every vector at (overrides a SteeringVector's or feature's own): residual
            stream, attention/MLP outputs, norms' outputs, attn.hook_z, the MLP's hidden activations.
        layers: shorthand for hooks=["blocks.{layer}.hook_resid_post" for each layer].
        scale: multiplies every vector (on top of a SteeringVector's own scale).
        positions: "all", "generated" or column(s); see the module docstring.

    Raises:
        UnknownNameError (a KeyError): a hook the model does not have (with the closest names).
        ArgumentError (a ValueError): a hook steering cannot write, a vector whose width is not the hook's, a
            tensor with no hook or layer to go to, hooks= and layers= together, a bad scale or positions.
    """
    scale = _check_scale(scale)
    positions = _check_positions(positions)
    if hooks is not None and layers is not None:
        raise ArgumentError("pass hooks= or layers= (shorthand for blocks.{layer}.hook_resid_post), not both")
    targets = None
    if layers is not None:
        layers = [layers] if as_index(layers) is not None else layers
        targets = [f"blocks.{layer}.hook_resid_post" for layer in check_layers(layers, model.cfg.n_layers)]
    elif hooks is not None:
        targets = [hooks] if isinstance(hooks, str) else list(hooks)
        if not targets:
            raise ArgumentError("hooks= is empty: name at least one hook point to steer at")
    placed = []
    for item in _items(vectors):
        vector = _as_steering_vector(item, targets)
        for hook in [vector.hook] if targets is None else targets:
            placed.append(SteeringVector(hook, vector.vector, vector.scale * scale))
    for vector in placed:
        _check_fits(model, vector)
    return Steering(model, placed, positions)


# ------------------------------------------------------------------------------------------------ checks
def _check_scale(scale: float) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ArgumentError(f"scale must be a finite number, got {scale!r}")
    return float(scale)


def _check_positions(positions: str | int | Iterable[int]) -> str | list[int]:
    if isinstance(positions, str):
        if positions not in POSITIONS:
            raise ArgumentError(f"positions= takes 'all', 'generated' or column numbers, got {positions!r}")
        return positions
    items = [positions] if as_index(positions) is not None else positions
    if not isinstance(items, Iterable):
        raise ArgumentError(f"positions= takes 'all', 'generated' or column numbers, got {positions!r}")
    columns = [as_index(p) for p in items]
    if not columns or any(c is None or c < 0 for c in columns):
        raise ArgumentError(f"positions= needs column numbers >= 0 (of the left-padded batch), got {positions!r}")
    return sorted(set(columns))


def _items(vectors) -> list:
    if isinstance(vectors, (torch.Tensor, SteeringVector)) or _is_feature(vectors):
        return [vectors]
    if not isinstance(vectors, Iterable) or isinstance(vectors, str):
        raise ArgumentTypeError(
            f"vectors must be a tensor [width], a SteeringVector, (dictionary, feature) or a list of these, got "
            f"{type(vectors).__name__}"
        )
    items = list(vectors)
    if not items:
        raise ArgumentError("no steering vectors given")
    return items


def _is_feature(item) -> bool:
    return isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], Dictionary)


def _as_steering_vector(item, targets: list[str] | None) -> SteeringVector:
    if isinstance(item, SteeringVector):
        return item
    if _is_feature(item):
        return SteeringVector.from_feature(*item)
    if isinstance(item, torch.Tensor):
        if targets is None:
            raise ArgumentError("a bare tensor needs a place: pass layers=[...] or hooks=[...] to steer()")
        return SteeringVector(targets[0], item.detach())
    raise ArgumentTypeError(
        f"a steering vector is a tensor [width], a SteeringVector or (dictionary, feature), got {type(item).__name__}"
    )


def hook_width(model: HookedLlama, hook: str) -> int:
    """The width a vector added at `hook` must have; an error naming the hook for one steering cannot write.

    Raises:
        UnknownNameError: no such hook point. ArgumentError: a hook point steering does not write at.
    """
    if hook not in model.hook_dict:
        raise UnknownNameError(f"no hook point {hook!r} to steer at{did_you_mean(hook, model.hook_dict)}")
    site = hook.split(".", 2)[2] if hook.startswith("blocks.") else hook
    width = BLOCK_SITES.get(site) or GLOBAL_SITES.get(site)
    if width is None:
        raise ArgumentError(
            f"cannot steer at {hook!r}: steering adds to blocks.{{i}}.{{{', '.join(BLOCK_SITES)}}} or "
            f"{', '.join(GLOBAL_SITES)}"
        )
    cfg = model.cfg
    return {"d_model": cfg.d_model, "d_mlp": cfg.d_mlp, "n_heads * d_head": cfg.n_heads * cfg.d_head}[width]


def _check_fits(model: HookedLlama, vector: SteeringVector) -> None:
    width = hook_width(model, vector.hook)
    if vector.vector.shape[0] != width:
        raise ArgumentError(
            f"the steering vector for {vector.hook!r} has width {vector.vector.shape[0]}; that hook holds {width} "
            "(a d_model vector goes to the residual stream, attention or MLP outputs)"
        )


# ------------------------------------------------------------------------------------------------- hooks
def _summed(vectors: list[SteeringVector]) -> dict[str, torch.Tensor]:
    """hook -> the sum of scale * vector of every vector placed there, in float64 (rounded once, when added)."""
    totals: dict[str, torch.Tensor] = {}
    for v in vectors:
        step = v.vector.detach().to(torch.float64) * v.scale
        totals[v.hook] = totals[v.hook] + step.to(totals[v.hook].device) if v.hook in totals else step
    return totals


def _add_hook(total: torch.Tensor, positions: str | list[int]):
    converted: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def add(act: torch.Tensor, *, hook) -> torch.Tensor:
        key = (act.dtype, act.device)
        if key not in converted:  # once per dtype and device, not once per step
            converted[key] = total.to(dtype=act.dtype).to(act.device)  # cast first: not every device has float64
        delta = converted[key].view(act.shape[2:])  # [width] or, at hook_z, [n_heads, d_head]
        where = steered_columns(positions, act.shape[1], act.device)
        if where is None:
            return act + delta
        return act + where.view(1, -1, *[1] * (act.dim() - 2)).to(act.dtype) * delta

    return add


def steered_columns(positions: str | list[int], pos: int, device: torch.device) -> torch.Tensor | None:
    """Which of a forward pass's `pos` positions are steered: [pos] bool, or None for all of them."""
    if positions == "all":
        return None
    step = decoding_step()
    start = 0 if step is None else step.start
    columns = torch.arange(start, start + pos, device=device)
    if positions == "generated":
        # In generate: from the prompt's last column (its logits pick the first new token). Outside: the last.
        first = start + pos - 1 if step is None else step.prompt_pos - 1
        return columns >= first
    return torch.isin(columns, torch.tensor(positions, device=device))
