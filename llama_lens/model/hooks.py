"""Named hook points, the hook context manager, and `run_with_cache`.

A `HookPoint` is an identity step in the forward pass with a name (its module path, e.g.
"blocks.3.attn.hook_pattern"). Hook functions look like `fn(tensor, *, hook) -> tensor | None`: returning a
tensor replaces the activation, returning None leaves it as it was. Names and shapes follow TransformerLens.

Backward hooks (`bwd_hooks=`, `HookPoint.add_hook(fn, dir="bwd")`) receive the gradient of whatever is
backpropagated (e.g. a loss) with respect to the hook point's output, [same shape as the activation], and may
return a replacement gradient, as TransformerLens' do. They fire during `.backward()`, so keep them on (with
`model.hooks(...)`) until the backward pass has run; `run_with_cache(incl_bwd=True)` does both for you.

Threads: hooks added by `with model.hooks(...)` (and so by `run_with_hooks`, `run_with_cache` and `generate`'s
`fwd_hooks=`) belong to the thread (or asyncio task) that added them: they live in a context variable, not on
the model, so two threads can ablate, patch and cache on one model at once, each seeing only its own hooks and
activations. Hooks added with `add_hook` (or `reset_hooks_end=False`) are persistent: they are on the model, for
every thread, until `reset_hooks()`, as in TransformerLens. `hook.ctx` is on the hook point, shared too. A
streamed model (`stream=True`) holds one layer at a time and runs one forward pass at a time: a second thread's
pass raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from ..config import LlamaConfig
from ..errors import (
    ArgumentError,
    ArgumentTypeError,
    GroupedHeadsError,
    NotEnoughMemoryError,
    UnknownNameError,
    did_you_mean,
)
from . import memory  # by module: what is available is read (and patched in tests) at call time
from .activation_cache import ActivationCache
from .hook_names import PosSlice, apply_pos_slice
from .memory import GIB, forward_working_nbytes, hook_point_nbytes

HookFn = Callable[..., torch.Tensor | None]
NameFilter = str | Sequence[str] | Callable[[str], bool] | None
HookList = Iterable[tuple[NameFilter, HookFn]]

__all__ = ["ActivationCache", "HookFn", "HookPoint", "HookedModule", "NameFilter"]

# The hooks of the `model.hooks(...)` blocks the calling thread (or task) is inside, outermost first: for each
# block, hook point -> (forward fns, backward fns). Empty outside any block, which is the fast path.
_SCOPED_HOOKS: ContextVar[tuple[dict[HookPoint, tuple[list[HookFn], list[HookFn]]], ...]] = ContextVar(
    "llama_lens_scoped_hooks", default=()
)

# Activations whose position dimension is third from last ([batch, pos, heads, d_head]); the rest have it second.
_HEAD_POS_HOOKS = ("hook_q", "hook_k", "hook_v", "hook_rot_q", "hook_rot_k", "hook_z", "hook_result")


class HookPoint(nn.Module):
    """An identity step that hook functions can read or replace.

    `__call__` is overridden so that an unhooked point costs one attribute check, not nn.Module's call
    machinery: the forward pass has ~20 of them per layer.

    Attributes:
        name: the module path, e.g. "blocks.3.attn.hook_pattern".
        fns, bwd_fns: the persistent forward and backward hook functions (`add_hook`), for every thread; the
            calling thread's `model.hooks(...)` functions run after them (see `hook_fns`).
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
        """Whether any hook function runs here for the calling thread (persistent or its own)."""
        return bool(self.hook_fns("fwd")) or bool(self.hook_fns("bwd"))

    def hook_fns(self, dir: str = "fwd") -> list[HookFn]:  # noqa: A002 - TransformerLens' argument name
        """The forward (`"fwd"`) or backward (`"bwd"`) hook functions that run here for the calling thread, in
        order: the persistent ones, then those of its `model.hooks(...)` blocks, outermost first."""
        self._fn_list(dir)  # raises for a bad direction
        return [fn for fns in self._fn_lists()[0 if dir == "fwd" else 1] for fn in fns]

    def _fn_lists(self) -> tuple[list[list[HookFn]], list[list[HookFn]]]:
        """The forward and the backward lists of hook functions that apply for the calling thread."""
        fwd, bwd = [self.fns], [self.bwd_fns]
        for scope in _SCOPED_HOOKS.get():
            entry = scope.get(self)
            if entry is not None:
                fwd.append(entry[0])
                bwd.append(entry[1])
        return fwd, bwd

    def layer(self) -> int:
        """The block index in the name ("blocks.3.attn.hook_q" -> 3), as TransformerLens' `hook.layer()`."""
        parts = self.name.split(".")
        if len(parts) < 2 or parts[0] != "blocks" or not parts[1].isdigit():
            raise ArgumentError(f"hook point {self.name!r} is not inside a block, so it has no layer")
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
        raise ArgumentError(f"dir must be 'fwd' or 'bwd' (or 'both' to remove), got {direction!r}")

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        scopes = _SCOPED_HOOKS.get()
        if not scopes and not self.fns and not self.bwd_fns:
            return tensor
        fwd_lists, bwd_lists = self._fn_lists()
        for fn in [fn for fns in fwd_lists for fn in fns]:
            replaced = self._run(fn, tensor)
            if replaced is not None:
                tensor = self._checked(replaced, tensor, "returned")
        if any(bwd_lists) and torch.is_grad_enabled():
            if not tensor.requires_grad:
                # Nothing before this point needs a gradient (else this tensor would), so making it a leaf cuts
                # no path: it only lets the gradient reach this point (e.g. in a model with frozen weights).
                tensor = tensor.detach().requires_grad_(True)
            # The lists themselves, not their functions now: the backward pass may run on another thread (CUDA's
            # autograd threads), where this thread's scope is not visible, and a `hooks()` block that ends before
            # `.backward()` empties its lists, so its functions no longer fire, as before.
            tensor.register_hook(lambda grad: self._run_backward(grad, bwd_lists))
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

    def _run_backward(self, grad: torch.Tensor, bwd_lists: list[list[HookFn]]) -> torch.Tensor:
        for fn in [fn for fns in bwd_lists for fn in fns]:
            replaced = self._run(fn, grad)
            if replaced is not None:
                grad = self._checked(replaced, grad, "returned the gradient")
        return grad

    def _checked(self, replaced: Any, tensor: torch.Tensor, verb: str) -> torch.Tensor:
        if not isinstance(replaced, torch.Tensor):
            raise ArgumentTypeError(f"hook on {self.name!r} {verb} {type(replaced).__name__}; return a tensor or None")
        if (replaced.shape, replaced.dtype, replaced.device) != (tensor.shape, tensor.dtype, tensor.device):
            # Caught here, where the hook can be named, rather than later deep inside a matmul.
            raise ArgumentError(
                f"hook on {self.name!r} {verb} {_describe(replaced)}, expected {_describe(tensor)}; "
                "return a tensor like the one the hook received (e.g. `new.to(tensor)`)"
            )
        return replaced

    def extra_repr(self) -> str:
        return f"name={self.name!r}, hooks={len(self.hook_fns('fwd'))}, bwd_hooks={len(self.hook_fns('bwd'))}"


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
        """The hook names a filter selects: None (all), a name, an iterable of names, or a predicate on names.

        An iterable is read once, so a generator works as well as a list.

        Raises:
            KeyError: for a name that is not a hook point, with the closest valid names.
            ValueError: for a filter of another kind.
        """
        if names is None:
            return list(self.hook_dict)
        if callable(names):
            return [n for n in self.hook_dict if names(n)]
        if isinstance(names, str):
            names = [names]
        if not isinstance(names, Iterable):
            raise ArgumentError(
                f"names_filter must be None, a hook name, a list of names or a predicate on names, got "
                f"{type(names).__name__}"
            )
        names = list(names)  # once: a generator read twice (checked, then used) would select nothing
        for name in names:
            if not isinstance(name, str) or name not in self.hook_dict:
                raise UnknownNameError(_unknown_name_message(str(name), self.hook_dict, what="hook"))
        return names

    @contextmanager
    def hooks(
        self,
        fwd_hooks: HookList = (),
        bwd_hooks: HookList = (),
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
    ) -> Iterator[HookedModule]:
        """Adds hook functions for the duration of a `with` block; they come off even when the block raises.

        The hooks run for the calling thread (or asyncio task) only: another thread using the model at the same
        time runs without them (see the module docstring).

        Args:
            fwd_hooks: pairs of (hook name, iterable of names or predicate on names; hook function
                `fn(tensor, *, hook) -> tensor | None`).
            bwd_hooks: the same for gradients: `fn(grad, *, hook) -> grad | None`, run during `.backward()`
                inside the block.
            reset_hooks_end: remove the hooks at the end (TransformerLens' flag). False adds them as persistent
                hooks instead, on the model for every thread until `reset_hooks()`.
            clear_contexts: also empty every `hook.ctx` at the end.
        """
        if not reset_hooks_end:
            try:
                for direction, pairs in (("fwd", fwd_hooks), ("bwd", bwd_hooks)):
                    for names, fn in pairs:
                        self.add_hook(names, fn, dir=direction)
                yield self
            finally:
                if clear_contexts:
                    for point in self.hook_dict.values():
                        point.clear_context()
            return
        scope: dict[HookPoint, tuple[list[HookFn], list[HookFn]]] = {}
        for index, pairs in enumerate((fwd_hooks, bwd_hooks)):
            for names, fn in pairs:
                for name in self.resolve_hook_names(names):
                    scope.setdefault(self.hook_dict[name], ([], []))[index].append(fn)
        token = _SCOPED_HOOKS.set((*_SCOPED_HOOKS.get(), scope))
        try:
            yield self
        finally:
            _SCOPED_HOOKS.reset(token)
            # Emptied, not only dropped: a backward pass run after the block holds these lists (see
            # HookPoint.__call__) and must not call hooks that have come off.
            for fwd, bwd in scope.values():
                fwd.clear()
                bwd.clear()
            if clear_contexts:
                for point in self.hook_dict.values():
                    point.clear_context()

    def add_hook(self, name: NameFilter, fn: HookFn, dir: str = "fwd") -> None:  # noqa: A002 - TL's name
        """Adds `fn` to the hook points `name` selects until `reset_hooks()` (prefer `with model.hooks(...)`).

        Persistent: the hook is on the model, and runs for every thread that uses it."""
        for hook_name in self.resolve_hook_names(name):
            self.hook_dict[hook_name].add_hook(fn, dir=dir)

    def reset_hooks(self, clear_contexts: bool = True, direction: str = "both") -> None:
        """Removes every persistent hook function (for hooks left behind by code that did not use `hooks()`)
        and those the calling thread's `model.hooks(...)` blocks added here, and empties every `hook.ctx` unless
        `clear_contexts=False`."""
        for scope in _SCOPED_HOOKS.get():
            for point, (fwd, bwd) in scope.items():
                if self.hook_dict.get(point.name) is point:
                    if direction in ("fwd", "both"):
                        fwd.clear()
                    if direction in ("bwd", "both"):
                        bwd.clear()
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
        check_memory: bool = True,
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
            check_memory: before any layer runs, estimate the cache's size and raise NotEnoughMemoryError when it
                exceeds the memory available where it is kept (False skips the check).

        Returns:
            The forward's output (logits [batch, pos, d_vocab] by default) and the ActivationCache.

        Raises:
            NotEnoughMemoryError: the selected activations would not fit (the message has the size, the memory
                available and a `names_filter=` that fits).
        """
        activations: dict[str, torch.Tensor] = {}  # this call's own: other threads' hooks never write here
        names = self.resolve_hook_names(names_filter)
        checked: list[bool] = []

        def check_size(tensor: torch.Tensor, *, hook: HookPoint) -> None:
            # At the first hook point that fires (the embedding, before any layer has run) the batch and
            # positions are known: refuse a cache that cannot fit before the work is spent.
            if not checked:
                checked.append(True)
                if check_memory:
                    self.check_cache_fits(names, tensor, device=device, pos_slice=pos_slice, incl_bwd=incl_bwd)

        def save(tensor: torch.Tensor, *, hook: HookPoint, suffix: str = "") -> None:
            if not checked:
                check_size(tensor, hook=hook)
            saved = tensor.detach() if detach or suffix else tensor
            if remove_batch_dim:
                if saved.shape[0] != 1:
                    raise ArgumentError(f"remove_batch_dim=True needs a batch of one prompt, got {saved.shape[0]}")
                saved = saved[0]
            if pos_slice is not None:
                pos_dim = -3 if hook.name.endswith(_HEAD_POS_HOOKS) else -2
                if saved.dim() >= -pos_dim:
                    saved = apply_pos_slice(saved, pos_slice, dim=pos_dim)
            activations[hook.name + suffix] = saved.to(device) if device is not None else saved

        def save_grad(grad: torch.Tensor, *, hook: HookPoint) -> None:
            save(grad, hook=hook, suffix="_grad")

        first = [("hook_embed", check_size)] if "hook_embed" in self.hook_dict and "hook_embed" not in names else []
        bwd = list(bwd_hooks) + ([(names, save_grad)] if incl_bwd else [])
        try:
            with self.hooks(first + list(fwd_hooks) + [(names, save)], bwd):
                if incl_bwd:
                    with torch.enable_grad():
                        output = self(*args, **kwargs)
                        if not isinstance(output, torch.Tensor) or output.numel() != 1:
                            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
                            raise ArgumentError(
                                f"incl_bwd=True backpropagates from the output, which must be one number, got "
                                f"{shape}; pass return_type='loss' (or run the backward pass yourself inside "
                                "`model.hooks`)"
                            )
                        output.backward()
                else:
                    output = self(*args, **kwargs)
        except BaseException:
            # The traceback keeps this frame alive as long as the exception is (in a notebook: until the next
            # error), and with it whatever was cached so far: let that go now.
            activations.clear()
            raise
        # Forward order, not the order the filter listed them in; gradients after the activations.
        ordered = {name: activations[name] for name in self.hook_dict if name in activations}
        ordered |= {f"{n}_grad": activations[f"{n}_grad"] for n in self.hook_dict if f"{n}_grad" in activations}
        cache = ActivationCache(ordered, getattr(self, "layer_indices", []), self, has_batch_dim=not remove_batch_dim)
        return output, cache

    def check_cache_fits(
        self,
        names: list[str],
        first_activation: torch.Tensor,
        *,
        device: str | torch.device | None = None,
        pos_slice: PosSlice = None,
        incl_bwd: bool = False,
    ) -> None:
        """Raises NotEnoughMemoryError when caching the hook points `names` for the batch that
        `first_activation` [batch, pos, ...] starts, plus the forward pass's working memory, would not fit in the
        memory available where the cache goes. Models without a `cfg` (a LlamaConfig) are not checked."""
        cfg = getattr(self, "cfg", None)
        if not isinstance(cfg, LlamaConfig) or first_activation.dim() < 2:
            return
        batch, pos = first_activation.shape[:2]
        itemsize = first_activation.element_size()
        kept = pos if pos_slice is None else apply_pos_slice(torch.arange(pos), pos_slice, dim=0).numel()
        factor = (2 if incl_bwd else 1) * kept / max(pos, 1)  # every activation is linear in query positions

        def nbytes(selected: Iterable[str]) -> int:
            return int(
                sum(hook_point_nbytes(cfg, name, batch=batch, pos=pos, itemsize=itemsize) for name in selected) * factor
            )

        cached = nbytes(names)
        written_out = any(name.endswith(("hook_pattern", "hook_attn_scores")) for name in names)
        working = forward_working_nbytes(cfg, batch=batch, pos=pos, itemsize=itemsize, written_out=written_out)
        target = torch.device(device) if device is not None else first_activation.device
        available = memory.available_memory(target)
        if available is None or cached + working <= available:
            return
        resid = nbytes(n for n in self.hook_dict if n.endswith("hook_resid_post"))
        elsewhere = "" if target.type == "cpu" else ", device='cpu' (keep the cache in CPU memory)"
        raise NotEnoughMemoryError(
            f"run_with_cache would keep about {cached / GIB:.2f} GiB of activations ({len(names)} hook points, "
            f"batch {batch} x {pos} positions, {str(first_activation.dtype).removeprefix('torch.')}) and work in "
            f"{working / GIB:.2f} GiB more, but only {available / GIB:.2f} GiB is available on {target}. Cache "
            f"only what you need: e.g. names_filter=lambda name: name.endswith('hook_resid_post') keeps about "
            f"{resid / GIB:.2f} GiB; or a shorter prompt, pos_slice={elsewhere}; or check_memory=False to try anyway."
        )


def _describe(tensor: torch.Tensor) -> str:
    return f"shape {tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')} on {tensor.device}"


def _unknown_name_message(name: str, valid: Iterable[str], *, what: str) -> str:
    return f"no {what} {name!r}{did_you_mean(name, valid, hint='see model.hook_names')}"
