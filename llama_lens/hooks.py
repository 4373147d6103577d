"""Named hook points, the hook context manager, and the activation cache.

A `HookPoint` is an identity step in the forward pass with a name (its module path, e.g.
"blocks.3.attn.hook_pattern"). Hook functions look like `fn(tensor, *, hook) -> tensor | None`: returning a
tensor replaces the activation, returning None leaves it as it was. Names and shapes follow TransformerLens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .errors import UnknownNameError, did_you_mean

HookFn = Callable[..., torch.Tensor | None]
NameFilter = str | Sequence[str] | Callable[[str], bool] | None


class HookPoint(nn.Module):
    """An identity step that hook functions can read or replace.

    `__call__` is overridden so that an unhooked point costs one attribute check, not nn.Module's call
    machinery: the forward pass has ~20 of them per layer.
    """

    def __init__(self) -> None:
        super().__init__()
        self.name: str = ""
        self.fns: list[HookFn] = []

    @property
    def has_hooks(self) -> bool:
        return bool(self.fns)

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        for fn in self.fns:
            replaced = fn(tensor, hook=self)
            if replaced is not None:
                if not isinstance(replaced, torch.Tensor):
                    raise TypeError(
                        f"hook on {self.name!r} returned {type(replaced).__name__}; return a tensor or None"
                    )
                if (replaced.shape, replaced.dtype, replaced.device) != (tensor.shape, tensor.dtype, tensor.device):
                    # Caught here, where the hook can be named, rather than later deep inside a matmul.
                    raise ValueError(
                        f"hook on {self.name!r} returned {_describe(replaced)}, expected {_describe(tensor)}; "
                        "return a tensor like the one the hook received (e.g. `new.to(tensor)`)"
                    )
                tensor = replaced
        return tensor

    def extra_repr(self) -> str:
        return f"name={self.name!r}, hooks={len(self.fns)}"


class ActivationCache:
    """Activations saved by `run_with_cache`, keyed by hook name.

    Dict-like (`cache["blocks.3.hook_resid_post"]`, `.keys()`, `in`, `len`) with helpers that stack a hook
    over layers.
    """

    def __init__(self, activations: dict[str, torch.Tensor], layer_indices: Sequence[int]) -> None:
        self._acts = activations
        self.layer_indices = list(layer_indices)

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self._acts[name]
        except KeyError:
            raise UnknownNameError(_unknown_name_message(name, self._acts, what="activation in this cache")) from None

    def __contains__(self, name: object) -> bool:
        return name in self._acts

    def __iter__(self) -> Iterator[str]:
        return iter(self._acts)

    def __len__(self) -> int:
        return len(self._acts)

    def keys(self):
        return self._acts.keys()

    def values(self):
        return self._acts.values()

    def items(self):
        return self._acts.items()

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} activations, layers {self.layer_indices})"

    def to(self, device: str | torch.device) -> ActivationCache:
        """A copy of the cache with every tensor moved to `device`."""
        return ActivationCache({k: v.to(device) for k, v in self._acts.items()}, self.layer_indices)

    def stack(self, hook: str, layers: Iterable[int] | None = None) -> torch.Tensor:
        """Stacks `blocks.{i}.{hook}` over layers, e.g. `cache.stack("attn.hook_pattern")`.

        Returns:
            [n_layers_stacked, *activation_shape]
        """
        layers = self.layer_indices if layers is None else list(layers)
        return torch.stack([self[f"blocks.{i}.{hook}"] for i in layers])

    def accumulated_resid(
        self,
        layer: int | None = None,
        *,
        incl_mid: bool = False,
        mlp_input: bool = False,
        return_labels: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
        """The residual stream as it grows, with TransformerLens' semantics: resid_pre of every loaded layer up
        to and including `layer` (and resid_mid of the layers before `layer` with `incl_mid`), then the last
        layer's resid_post ("final_post") when `layer` is None or past the last loaded layer.

        Args:
            layer: the last layer whose resid_pre is included; None for the whole model.
            incl_mid: add each layer's resid_mid after its resid_pre (layers before `layer`).
            mlp_input: add `layer`'s own resid_mid (the input of its MLP) at the end.

        Returns:
            [n_components, batch, pos, d_model], and labels such as "3_pre", "3_mid", "final_post".
        """
        last = self.layer_indices[-1]
        end = last + 1 if layer is None else layer
        tensors, labels = [], []
        for i in (i for i in self.layer_indices if i <= end):
            tensors.append(self[f"blocks.{i}.hook_resid_pre"])
            labels.append(f"{i}_pre")
            if (incl_mid and i < end) or (mlp_input and i == end):
                tensors.append(self[f"blocks.{i}.hook_resid_mid"])
                labels.append(f"{i}_mid")
        if end > last:
            tensors.append(self[f"blocks.{last}.hook_resid_post"])
            labels.append("final_post")
        stacked = torch.stack(tensors)
        return (stacked, labels) if return_labels else stacked

    def decompose_resid(self, *, return_labels: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
        """The residual stream as the sum of its parts: the embedding (or the first loaded layer's resid_pre),
        then each layer's attn_out and mlp_out.

        Returns:
            [n_components, batch, pos, d_model]; the parts sum to the last resid_post.
        """
        first = self.layer_indices[0]
        embed = "hook_embed" in self and first == 0
        tensors = [self["hook_embed"] if embed else self[f"blocks.{first}.hook_resid_pre"]]
        labels = ["embed" if first == 0 else f"{first}_pre"]
        for i in self.layer_indices:
            tensors += [self[f"blocks.{i}.hook_attn_out"], self[f"blocks.{i}.hook_mlp_out"]]
            labels += [f"{i}_attn_out", f"{i}_mlp_out"]
        stacked = torch.stack(tensors)
        return (stacked, labels) if return_labels else stacked


class HookedModule(nn.Module):
    """Base class that finds its HookPoints by module path and runs hooks and caches on them."""

    def setup_hook_points(self) -> None:
        """Names every HookPoint after its module path; call at the end of `__init__`."""
        self.hook_dict: dict[str, HookPoint] = {}
        for name, module in self.named_modules():
            if isinstance(module, HookPoint):
                module.name = name
                self.hook_dict[name] = module

    @property
    def hook_names(self) -> list[str]:
        return list(self.hook_dict)

    def resolve_hook_names(self, names: NameFilter) -> list[str]:
        """The hook names a filter selects: None (all), a name, a list of names, or a predicate on names.

        Raises:
            KeyError: for a name that is not a hook point, with the closest valid names.
        """
        if names is None:
            return list(self.hook_dict)
        if callable(names):
            return [n for n in self.hook_dict if names(n)]
        if isinstance(names, str):
            names = [names]
        for name in names:
            if name not in self.hook_dict:
                raise UnknownNameError(_unknown_name_message(name, self.hook_dict, what="hook"))
        return list(names)

    @contextmanager
    def hooks(self, fwd_hooks: Iterable[tuple[NameFilter, HookFn]] = ()) -> Iterator[HookedModule]:
        """Adds hook functions for the duration of a `with` block; they come off even when the block raises.

        Args:
            fwd_hooks: pairs of (hook name, list of names or predicate on names; hook function
                `fn(tensor, *, hook) -> tensor | None`).
        """
        added: list[tuple[HookPoint, HookFn]] = []
        try:
            for names, fn in fwd_hooks:
                for name in self.resolve_hook_names(names):
                    point = self.hook_dict[name]
                    point.fns.append(fn)
                    added.append((point, fn))
            yield self
        finally:
            for point, fn in reversed(added):
                point.fns.remove(fn)

    def reset_hooks(self) -> None:
        """Removes every hook function (for hooks left behind by code that did not use `hooks()`)."""
        for point in self.hook_dict.values():
            point.fns.clear()

    def run_with_hooks(self, *args, fwd_hooks: Iterable[tuple[NameFilter, HookFn]] = (), **kwargs):
        """Runs the forward pass with `fwd_hooks` added, then removes them."""
        with self.hooks(fwd_hooks):
            return self(*args, **kwargs)

    def run_with_cache(
        self,
        *args,
        names_filter: NameFilter = None,
        device: str | torch.device | None = None,
        detach: bool = True,
        fwd_hooks: Iterable[tuple[NameFilter, HookFn]] = (),
        **kwargs,
    ) -> tuple[torch.Tensor, ActivationCache]:
        """Runs the forward pass and saves the activations that `names_filter` selects.

        Args:
            names_filter: None (every hook point), a name, a list of names or a predicate on names.
            device: where to keep cached tensors (default: where they were computed).
            detach: cache detached tensors (the default) or keep them in the autograd graph.
            fwd_hooks: more hooks to run during the same pass; the cache sees what they return.

        Returns:
            The forward's output (logits [batch, pos, d_vocab]) and the ActivationCache.
        """
        activations: dict[str, torch.Tensor] = {}

        def save(tensor: torch.Tensor, *, hook: HookPoint) -> None:
            saved = tensor.detach() if detach else tensor
            activations[hook.name] = saved.to(device) if device is not None else saved

        names = self.resolve_hook_names(names_filter)
        with self.hooks(list(fwd_hooks) + [(names, save)]):
            output = self(*args, **kwargs)
        # Forward order, not the order the filter listed them in.
        ordered = {name: activations[name] for name in self.hook_dict if name in activations}
        return output, ActivationCache(ordered, getattr(self, "layer_indices", []))


def _describe(tensor: torch.Tensor) -> str:
    return f"shape {tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')} on {tensor.device}"


def _unknown_name_message(name: str, valid: Iterable[str], *, what: str) -> str:
    return f"no {what} {name!r}{did_you_mean(name, valid, hint='see model.hook_names')}"
