"""Named hook points, the hook context manager, and `run_with_cache`.

A `HookPoint` is an identity step in the forward pass with a name (its module path, e.g.
"blocks.3.attn.hook_pattern"). Hook functions look like `fn(tensor, *, hook) -> tensor | None`: returning a
tensor replaces the activation, returning None leaves it as it was. Names and shapes follow TransformerLens.

Backward hooks (`bwd_hooks=`, `HookPoint.add_hook(fn, dir="bwd")`) receive the gradient of whatever is
backpropagated (e.g. a loss) with respect to the hook point's output, [same shape as the activation], and may
return a replacement gradient, as TransformerLens' do. They fire during `.backward()`, so keep them on (with
`model.hooks(...)`) until the backward pass has run; `run_with_cache(incl_bwd=True)` does both for you.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .cache import ActivationCache
from .errors import GroupedHeadsError, UnknownNameError, did_you_mean
from .utils import PosSlice, apply_pos_slice

HookFn = Callable[..., torch.Tensor | None]
NameFilter = str | Sequence[str] | Callable[[str], bool] | None
HookList = Iterable[tuple[NameFilter, HookFn]]

__all__ = ["ActivationCache", "HookFn", "HookPoint", "HookedModule", "NameFilter"]

# Activations whose position dimension is third from last ([batch, pos, heads, d_head]); the rest have it second.
_HEAD_POS_HOOKS = ("hook_q", "hook_k", "hook_v", "hook_rot_q", "hook_rot_k", "hook_z", "hook_result")


class HookPoint(nn.Module):
    """An identity step that hook functions can read or replace.

    `__call__` is overridden so that an unhooked point costs one attribute check, not nn.Module's call
    machinery: the forward pass has ~20 of them per layer.

    Attributes:
        name: the module path, e.g. "blocks.3.attn.hook_pattern".
        fns, bwd_fns: the forward and backward hook functions, in the order they run.
        ctx: a dict hook functions may keep state in (TransformerLens' `hook.ctx`); emptied by
            `clear_context()` and by `model.reset_hooks(clear_contexts=True)`.
        kv_grouping: (n_heads, n_kv_heads) on key/value hook points of grouped-query attention, else None.
    """

    def __init__(self) -> None:
        super().__init__()
        self.name: str = ""
        self.fns: list[HookFn] = []
        self.bwd_fns: list[HookFn] = []
        self.ctx: dict[Any, Any] = {}
        self.kv_grouping: tuple[int, int] | None = None

    @property
    def has_hooks(self) -> bool:
        return bool(self.fns) or bool(self.bwd_fns)

    def layer(self) -> int:
        """The block index in the name ("blocks.3.attn.hook_q" -> 3), as TransformerLens' `hook.layer()`."""
        parts = self.name.split(".")
        if len(parts) < 2 or parts[0] != "blocks" or not parts[1].isdigit():
            raise ValueError(f"hook point {self.name!r} is not inside a block, so it has no layer")
        return int(parts[1])

    def add_hook(self, fn: HookFn, dir: str = "fwd") -> None:  # noqa: A002 - TransformerLens' argument name
        """Adds `fn` to run on the activation (`dir="fwd"`) or on its gradient (`dir="bwd"`) until removed with
        `remove_hooks` (prefer `with model.hooks(...)`, which removes them for you)."""
        self._fn_list(dir).append(fn)

    def remove_hooks(self, dir: str = "fwd") -> None:  # noqa: A002 - TransformerLens' argument name
        """Removes the forward (`"fwd"`), backward (`"bwd"`) or all (`"both"`) hook functions."""
        if dir == "both":
            self.fns.clear()
            self.bwd_fns.clear()
        else:
            self._fn_list(dir).clear()

    def clear_context(self) -> None:
        self.ctx = {}

    def _fn_list(self, direction: str) -> list[HookFn]:
        if direction == "fwd":
            return self.fns
        if direction == "bwd":
            return self.bwd_fns
        raise ValueError(f"dir must be 'fwd' or 'bwd' (or 'both' to remove), got {direction!r}")

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        for fn in self.fns:
            replaced = self._run(fn, tensor)
            if replaced is not None:
                tensor = self._checked(replaced, tensor, "returned")
        if self.bwd_fns and torch.is_grad_enabled():
            if not tensor.requires_grad:
                # Nothing before this point needs a gradient (else this tensor would), so making it a leaf cuts
                # no path: it only lets the gradient reach this point (e.g. in a model with frozen weights).
                tensor = tensor.detach().requires_grad_(True)
            tensor.register_hook(self._run_backward)
        return tensor

    def _run(self, fn: HookFn, tensor: torch.Tensor) -> torch.Tensor | None:
        if self.kv_grouping is None:
            return fn(tensor, hook=self)
        try:
            return fn(tensor, hook=self)
        except IndexError as err:
            n_heads, n_kv_heads = self.kv_grouping
            raise GroupedHeadsError(
                f"hook on {self.name!r} raised IndexError ({err}). This activation is [batch, pos, "
                f"n_kv_heads={n_kv_heads}, d_head], not per query head: with grouped-query attention the "
                f"{n_heads} query heads share {n_kv_heads} key/value heads, query head h reading key/value head "
                f"h // {n_heads // n_kv_heads}. Index the key/value head, knowing it feeds {n_heads // n_kv_heads} "
                "query heads; to change one query head alone, hook 'attn.hook_z' or 'attn.hook_pattern' (per query "
                "head); ll.utils.ungroup_kv(tensor, n_heads) views this tensor per query head."
            ) from err

    def _run_backward(self, grad: torch.Tensor) -> torch.Tensor:
        for fn in list(self.bwd_fns):
            replaced = self._run(fn, grad)
            if replaced is not None:
                grad = self._checked(replaced, grad, "returned the gradient")
        return grad

    def _checked(self, replaced: Any, tensor: torch.Tensor, verb: str) -> torch.Tensor:
        if not isinstance(replaced, torch.Tensor):
            raise TypeError(f"hook on {self.name!r} {verb} {type(replaced).__name__}; return a tensor or None")
        if (replaced.shape, replaced.dtype, replaced.device) != (tensor.shape, tensor.dtype, tensor.device):
            # Caught here, where the hook can be named, rather than later deep inside a matmul.
            raise ValueError(
                f"hook on {self.name!r} {verb} {_describe(replaced)}, expected {_describe(tensor)}; "
                "return a tensor like the one the hook received (e.g. `new.to(tensor)`)"
            )
        return replaced

    def extra_repr(self) -> str:
        return f"name={self.name!r}, hooks={len(self.fns)}, bwd_hooks={len(self.bwd_fns)}"


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
    def hooks(
        self,
        fwd_hooks: HookList = (),
        bwd_hooks: HookList = (),
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
    ) -> Iterator[HookedModule]:
        """Adds hook functions for the duration of a `with` block; they come off even when the block raises.

        Args:
            fwd_hooks: pairs of (hook name, list of names or predicate on names; hook function
                `fn(tensor, *, hook) -> tensor | None`).
            bwd_hooks: the same for gradients: `fn(grad, *, hook) -> grad | None`, run during `.backward()`
                inside the block.
            reset_hooks_end: remove the hooks at the end (TransformerLens' flag; False leaves them on).
            clear_contexts: also empty every `hook.ctx` at the end.
        """
        added: list[tuple[list[HookFn], HookFn]] = []
        try:
            for direction, pairs in (("fwd", fwd_hooks), ("bwd", bwd_hooks)):
                for names, fn in pairs:
                    for name in self.resolve_hook_names(names):
                        fns = self.hook_dict[name]._fn_list(direction)
                        fns.append(fn)
                        added.append((fns, fn))
            yield self
        finally:
            if reset_hooks_end:
                for fns, fn in reversed(added):
                    fns.remove(fn)
            if clear_contexts:
                for point in self.hook_dict.values():
                    point.clear_context()

    def add_hook(self, name: NameFilter, fn: HookFn, dir: str = "fwd") -> None:  # noqa: A002 - TL's name
        """Adds `fn` to the hook points `name` selects until `reset_hooks()` (prefer `with model.hooks(...)`)."""
        for hook_name in self.resolve_hook_names(name):
            self.hook_dict[hook_name].add_hook(fn, dir=dir)

    def reset_hooks(self, clear_contexts: bool = True, direction: str = "both") -> None:
        """Removes every hook function (for hooks left behind by code that did not use `hooks()`), and empties
        every `hook.ctx` unless `clear_contexts=False`."""
        for point in self.hook_dict.values():
            point.remove_hooks(direction)
            if clear_contexts:
                point.clear_context()

    def run_with_hooks(
        self,
        *args,
        fwd_hooks: HookList = (),
        bwd_hooks: HookList = (),
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
        **kwargs,
    ):
        """Runs the forward pass with `fwd_hooks` (and `bwd_hooks`) added, then removes them.

        Backward hooks only fire if `.backward()` runs while they are on: pass `reset_hooks_end=False`, call
        `.backward()` on the output, then `model.reset_hooks()` (TransformerLens' recipe), or use
        `with model.hooks(bwd_hooks=...)` around both.
        """
        with self.hooks(fwd_hooks, bwd_hooks, reset_hooks_end=reset_hooks_end, clear_contexts=clear_contexts):
            return self(*args, **kwargs)

    def run_with_cache(
        self,
        *args,
        names_filter: NameFilter = None,
        device: str | torch.device | None = None,
        detach: bool = True,
        remove_batch_dim: bool = False,
        incl_bwd: bool = False,
        pos_slice: PosSlice = None,
        fwd_hooks: HookList = (),
        bwd_hooks: HookList = (),
        **kwargs,
    ) -> tuple[torch.Tensor, ActivationCache]:
        """Runs the forward pass and saves the activations that `names_filter` selects.

        Args:
            names_filter: None (every hook point), a name, a list of names or a predicate on names.
            device: where to keep cached tensors (default: where they were computed).
            detach: cache detached tensors (the default) or keep them in the autograd graph.
            remove_batch_dim: drop the batch dimension (a batch of one prompt only), as TransformerLens.
            incl_bwd: also run `.backward()` on the output (which must be one number: pass
                `return_type="loss"` or a metric-returning forward) and save each selected activation's gradient
                under "<hook name>_grad".
            pos_slice: keep only these positions of each activation (an int drops the pos dimension; the
                query positions for patterns and scores).
            fwd_hooks, bwd_hooks: more hooks to run during the same pass; the cache sees what they return.

        Returns:
            The forward's output (logits [batch, pos, d_vocab] by default) and the ActivationCache.
        """
        activations: dict[str, torch.Tensor] = {}

        def save(tensor: torch.Tensor, *, hook: HookPoint, suffix: str = "") -> None:
            saved = tensor.detach() if detach or suffix else tensor
            if remove_batch_dim:
                if saved.shape[0] != 1:
                    raise ValueError(f"remove_batch_dim=True needs a batch of one prompt, got {saved.shape[0]}")
                saved = saved[0]
            if pos_slice is not None:
                pos_dim = -3 if hook.name.endswith(_HEAD_POS_HOOKS) else -2
                if saved.dim() >= -pos_dim:
                    saved = apply_pos_slice(saved, pos_slice, dim=pos_dim)
            activations[hook.name + suffix] = saved.to(device) if device is not None else saved

        def save_grad(grad: torch.Tensor, *, hook: HookPoint) -> None:
            save(grad, hook=hook, suffix="_grad")

        names = self.resolve_hook_names(names_filter)
        bwd = list(bwd_hooks) + ([(names, save_grad)] if incl_bwd else [])
        with self.hooks(list(fwd_hooks) + [(names, save)], bwd):
            if incl_bwd:
                with torch.enable_grad():
                    output = self(*args, **kwargs)
                    if not isinstance(output, torch.Tensor) or output.numel() != 1:
                        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
                        raise ValueError(
                            f"incl_bwd=True backpropagates from the output, which must be one number, got {shape}; "
                            "pass return_type='loss' (or run the backward pass yourself inside `model.hooks`)"
                        )
                    output.backward()
            else:
                output = self(*args, **kwargs)
        # Forward order, not the order the filter listed them in; gradients after the activations.
        ordered = {name: activations[name] for name in self.hook_dict if name in activations}
        ordered |= {f"{n}_grad": activations[f"{n}_grad"] for n in self.hook_dict if f"{n}_grad" in activations}
        cache = ActivationCache(ordered, getattr(self, "layer_indices", []), self, has_batch_dim=not remove_batch_dim)
        return output, cache


def _describe(tensor: torch.Tensor) -> str:
    return f"shape {tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')} on {tensor.device}"


def _unknown_name_message(name: str, valid: Iterable[str], *, what: str) -> str:
    return f"no {what} {name!r}{did_you_mean(name, valid, hint='see model.hook_names')}"
