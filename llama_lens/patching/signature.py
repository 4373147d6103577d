"""Signature changes that keep old calls working for one release, with a DeprecationWarning: arguments that became
keyword-only, and the sweeps' argument order, now TransformerLens' (model, corrupted_tokens, clean_cache, metric)."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

from ..errors import ArgumentTypeError
from ..model.activation_cache import ActivationCache


def keyword_only_after(count: int, *names: str) -> Callable[[Callable], Callable]:
    """Arguments past the first `count` are keyword-only (`names`, in their old positional order); passed by
    position, they still work for one release, with a DeprecationWarning."""

    def decorate(function: Callable) -> Callable:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if len(args) > count:
                extra = args[count:]
                if len(extra) > len(names):
                    raise ArgumentTypeError(
                        f"{function.__name__}() takes {count} positional arguments, then keywords "
                        f"({', '.join(names)}, ...); got {len(args)} positional"
                    )
                for name, value in zip(names, extra):
                    if name in kwargs:
                        raise ArgumentTypeError(f"{function.__name__}() got multiple values for argument {name!r}")
                    kwargs[name] = value
                warnings.warn(
                    f"passing {', '.join(names[: len(extra)])} to {function.__name__}() by position is deprecated and "
                    f"will stop working in the next release; pass {', '.join(f'{n}=' for n in names[: len(extra)])}",
                    DeprecationWarning,
                    stacklevel=2,
                )
                args = args[:count]
            return function(*args, **kwargs)

        return wrapper

    return decorate


def corrupted_tokens_first(function: Callable) -> Callable:
    """For a sweep that took (model, clean_cache, corrupted_tokens, ...): a call in that old order still works for
    one release, with a DeprecationWarning (the cache is told from the tokens by its type)."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if len(args) >= 3 and isinstance(args[1], ActivationCache) and not isinstance(args[2], ActivationCache):
            warnings.warn(
                f"{function.__name__}(model, clean_cache, corrupted_tokens, ...) is deprecated and will stop working "
                f"in the next release; pass (model, corrupted_tokens, clean_cache, ...), TransformerLens' order",
                DeprecationWarning,
                stacklevel=2,
            )
            args = (args[0], args[2], args[1], *args[3:])
        return function(*args, **kwargs)

    return wrapper
