"""Checks of the arguments users pass: one place, one message style.

Each check takes the value as the user gave it and returns it normalised, or raises an ArgumentError (a
ValueError; ArgumentTypeError, a TypeError, for a keyword given twice) that names the argument and the value,
says what was expected, and suggests a fix. A value outside its range reads

    <arg>=<value> is out of range: <what there is> (<first>..<last>)

and an unknown name reads "unknown <what> <value>: <arg>= takes one of [...]".

The words the lens, the attribution and the plots share (docs/logit_lens.md, "Arguments"):
- `prompt` / `prompt_or_tokens`: text or token ids to run; `batch_index=`: which prompt of a batch a figure shows.
- `target`: a token (its text or id) to follow; `target_index=`: which of a result's targets a figure shows.
- `layers`: any iterable of layer indices (a range, a list, a tuple, a set, a numpy array); None for all.
- `positions`: indices into the pos axis, an int or an iterable of ints, negative counting from the end;
  None for all. `position` (one of them) likewise.
Old spellings of renamed keywords keep working for one release with a DeprecationWarning (`renamed_keywords`).
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from .errors import ArgumentError, ArgumentTypeError, did_you_mean

# The dtypes a model can be loaded in: every op of the forward pass has CPU and CUDA kernels for these (float8
# and other floating types do not).
DTYPE_NAMES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


# ----------------------------------------------------------------------------------------------- integers
def as_index(value: Any) -> int | None:
    """`value` as an int when it is one: a Python int, a numpy integer or a 0-d integer tensor (not a bool, not
    a float that happens to be whole); else None."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        return None
    if getattr(value, "ndim", 0) != 0:  # a one-element tensor or array is a list of one, not a number
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_index(name: str, value: Any, size: int, what: str) -> int:
    """`value` as an index in 0..size - 1, negative counting from the end (as Python's sequences do).

    Args:
        name: the argument, for the message ("batch_index", "head", ...).
        value: any integer type (a numpy int from a DataFrame too).
        size: how many there are.
        what: what they are, plural, for the message ("prompts in the batch").

    Raises:
        ArgumentError (a ValueError): for a non-integer, or an index outside -size..size - 1.
    """
    index = as_index(value)
    if index is None:
        raise ArgumentError(f"{name} must be an integer, got {value!r}")
    if not -size <= index < size:
        raise ArgumentError(f"{name}={value!r} is out of range: there are {size} {what} (0..{size - 1})")
    return index % size


def check_count(name: str, value: Any, low: int = 1, high: int | None = None, what: str = "") -> int:
    """`value` as an int in low..high (high None: no upper bound), e.g. top_k or chunk_size.

    Args:
        what: where `high` comes from, for the message ("the vocabulary has 128 ids").

    Raises:
        ArgumentError (a ValueError): for a non-integer or a value out of range.
    """
    count = as_index(value)
    if count is None:
        raise ArgumentError(f"{name} must be an integer, got {value!r}")
    if high is None and count < low:
        raise ArgumentError(f"{name}={value!r} is out of range: it must be at least {low}")
    if high is not None and not low <= count <= high:
        raise ArgumentError(f"{name}={value!r} is out of range: {what or 'it must lie in'} ({low}..{high})")
    return count


def check_choice(name: str, value: Any, choices: Sequence[str], what: str | None = None) -> str:
    """`value` if it is one of `choices` (metric names, read-outs, table kinds, ...).

    Raises:
        ArgumentError (a ValueError): "unknown <what> <value>: <name>= takes one of [...]".
    """
    if isinstance(value, str) and value in choices:
        return value
    raise ArgumentError(f"unknown {what or name} {value!r}: {name}= takes one of {list(choices)}")


# ----------------------------------------------------------------------------------------------- layers
def _layer_list(layers: Iterable[int]) -> list[int]:
    if isinstance(layers, (int, str)) or as_index(layers) is not None or not isinstance(layers, Iterable):
        raise ArgumentError(f"layers must be a range or a list of ints, got {layers!r}; e.g. layers=range(0, 3)")
    items = layers.flatten().tolist() if isinstance(layers, torch.Tensor) else list(layers)
    checked = []
    for layer in items:
        index = as_index(layer)
        if index is None:
            raise ArgumentError(f"layers must hold ints, got {layer!r}")
        checked.append(index)
    return checked


def check_layers(layers: Iterable[int] | None, n_layers: int) -> list[int]:
    """Sorted, de-duplicated layer indices; all layers for None.

    Raises:
        ArgumentError (a ValueError): for an index that is not an int in [0, n_layers), naming the valid range.
    """
    if layers is None:
        return list(range(n_layers))
    checked = _layer_list(layers)
    for layer in checked:
        if not 0 <= layer < n_layers:
            raise ArgumentError(
                f"layers={_shown(layers, checked)} is out of range: layer {layer} is outside the model, which has "
                f"{n_layers} layers (0..{n_layers - 1}); use layers within range(0, {n_layers})"
            )
    return sorted(set(checked))


def check_layer_bound(name: str, value: Any, n_layers: int) -> int:
    """A layer boundary (`start_at_layer`, `stop_at_layer`) in 0..n_layers, negative counting from the end as a
    slice of the layers does (-1: all but the last layer).

    Raises:
        ArgumentError (a ValueError): for a non-integer, or a value outside -n_layers..n_layers.
    """
    index = as_index(value)
    if index is None:
        raise ArgumentError(f"{name} must be an integer layer, got {value!r}")
    if not -n_layers <= index <= n_layers:
        raise ArgumentError(
            f"{name}={value!r} is out of range: the model has {n_layers} layers, so it must lie in "
            f"{-n_layers}..{n_layers} (negative counts from the end)"
        )
    return index + n_layers if index < 0 else index


def check_loaded_layers(layers: Iterable[int] | None, loaded: Sequence[int]) -> list[int]:
    """Sorted, de-duplicated indices of layers a (possibly partial) model holds; all of them for None.

    Raises:
        ArgumentError (a ValueError): for a non-integer, or a layer the model does not hold.
    """
    if layers is None:
        return list(loaded)
    given = _layer_list(layers)
    checked = sorted(set(given))
    missing = [layer for layer in checked if layer not in loaded]
    if missing:
        loaded = list(loaded)
        if not loaded:
            held = "none"
        elif loaded == list(range(loaded[0], loaded[-1] + 1)):
            held = f"{loaded[0]}..{loaded[-1]}"
        else:
            held = ", ".join(map(str, loaded))
        raise ArgumentError(
            f"layers={_shown(layers, given)} is out of range: layers {missing} are not loaded; this model holds "
            f"layers ({held})"
        )
    return checked


# ----------------------------------------------------------------------------------------------- positions
def check_positions(positions: int | Iterable[int] | None, n_tokens: int) -> list[int]:
    """Non-negative indices into a pos axis of `n_tokens`, in the order given; all of them for None.

    Args:
        positions: an int, an iterable of ints (a list, a range, a tensor, ...), negative counting from the
            end; None for every position.

    Raises:
        ArgumentError (a ValueError): for an empty list, a non-integer, or a position outside -n_tokens..n_tokens - 1.
    """
    if positions is None:
        return list(range(n_tokens))
    if as_index(positions) is not None:
        items = [positions]
    elif isinstance(positions, torch.Tensor):
        items = positions.flatten().tolist()
    elif isinstance(positions, Iterable) and not isinstance(positions, str):
        items = list(positions)
    else:
        raise ArgumentError(f"positions must be an int or a list of ints, got {positions!r}")
    if not items:
        raise ArgumentError("positions is empty; pass None for all positions")
    checked = []
    for item in items:
        position = as_index(item)
        if position is None:
            raise ArgumentError(f"positions must be ints, got {item!r}")
        checked.append(check_position(position, n_tokens, name="positions"))
    return checked


def check_position(position: Any, n_tokens: int, *, name: str = "position") -> int:
    """One position in 0..n_tokens - 1 (negative counting from the end).

    Raises:
        ArgumentError (a ValueError): "<name>=<value> is out of range: the prompt has <n> tokens (0..n-1; ...)".
    """
    index = as_index(position)
    if index is None:
        raise ArgumentError(f"{name} must be an integer, got {position!r}")
    if not -n_tokens <= index < n_tokens:
        raise ArgumentError(
            f"{name}={position!r} is out of range: the prompt has {n_tokens} tokens (0..{n_tokens - 1}, or "
            f"-{n_tokens}..-1 counting from the end)"
        )
    return index % n_tokens


# ----------------------------------------------------------------------------------------------- targets
def check_targets(target: Any, batch: int, d_vocab: int, id_of: Callable[[str], int] | None) -> list[list[int]]:
    """Target token ids, one row per prompt: [batch][n_targets].

    Args:
        target: a token's text or id (shared by every prompt); a list with one per prompt; or a list of lists,
            several per prompt (the same number for each). Ids may be numpy or 0-d tensor integers, a row of
            ids a tensor.
        batch: the number of prompts.
        d_vocab: ids must lie in 0..d_vocab - 1.
        id_of: text -> id (the tokenizer's `id_of`, which refuses text that is not one token), or None when
            there is no tokenizer.

    Raises:
        ArgumentError (a ValueError): for a count of targets that does not match the batch, a ragged list, text
            without a tokenizer, an id out of range or anything that is neither text nor an id.
    """
    if _single_target(target):  # one target shared by every prompt
        rows = [[target]] * batch
    else:
        items = target.tolist() if isinstance(target, torch.Tensor) else list(target)
        if len(items) != batch:
            raise ArgumentError(
                f"got {len(items)} targets for {batch} prompt(s): pass one target shared by all prompts, one per "
                f"prompt, or one list of targets per prompt (e.g. [[' Paris', ' London']])"
            )
        rows = [[item] if _single_target(item) else list(item) for item in items]
        if len({len(row) for row in rows}) != 1 or not rows[0]:
            raise ArgumentError("every prompt needs the same (non-zero) number of targets")
    return [[check_token_id(t, d_vocab, id_of) for t in row] for row in rows]


def check_token_id(token: Any, d_vocab: int, id_of: Callable[[str], int] | None, *, name: str = "target") -> int:
    """A token id from its text (through `id_of`) or its id.

    Raises:
        ArgumentError (a ValueError): text without a tokenizer, an id outside 0..d_vocab - 1, or neither text nor an id.
    """
    if isinstance(token, str):
        if id_of is None:
            raise ArgumentError(f"{name}={token!r} is text but this model has no tokenizer; pass a token id")
        return int(id_of(token))
    token_id = as_index(token)
    if token_id is None:
        raise ArgumentError(f"a {name} is a token's text or id, got {type(token).__name__} {token!r}")
    if not 0 <= token_id < d_vocab:
        raise ArgumentError(f"{name}={token_id} is out of range: the vocabulary has {d_vocab} ids (0..{d_vocab - 1})")
    return token_id


def _single_target(target: Any) -> bool:
    """One target, not a list of them: text, a number (refused later unless an id) or a 0-d tensor."""
    return isinstance(target, str) or not hasattr(target, "__len__") or (torch.is_tensor(target) and target.dim() == 0)


# ----------------------------------------------------------------------------------------------- masks
def check_attention_mask(attention_mask: torch.Tensor, batch: int, n_pos: int) -> torch.Tensor:
    """The mask [batch, pos] (1 = real token, 0 = padding) as a CPU bool tensor.

    Raises:
        ArgumentError (a ValueError): for a mask of another shape.
    """
    if tuple(attention_mask.shape) != (batch, n_pos):
        raise ArgumentError(
            f"attention_mask must be [batch={batch}, pos={n_pos}] like the cached pattern, got "
            f"{tuple(attention_mask.shape)}"
        )
    return attention_mask.detach().cpu().bool()


# ----------------------------------------------------------------------------------------------- renamed keywords
def check_option_names(options: Iterable[str], config_class: type, what: str) -> None:
    """Refuses an option that is not a field of the dataclass `config_class`, naming the nearest that is (the
    trainers' `**options`)."""
    known = [f.name for f in dataclasses.fields(config_class)]
    for name in options:
        if name not in known:
            hint = f"the options are {config_class.__name__}'s fields"
            raise ArgumentTypeError(f"unknown {what} option {name!r}{did_you_mean(name, known, hint=hint)}")


def renamed_keywords(**old_to_new: str) -> Callable[[Callable], Callable]:
    """Keeps the old spelling of renamed keyword arguments working, with a DeprecationWarning naming the new
    one, for one release. Passing both spellings is an ArgumentTypeError (a TypeError), as a repeated keyword would be.

        @renamed_keywords(prompt="batch_index")
        def lens_heatmap(result, metric="prob", *, batch_index=0): ...
    """

    def decorate(function: Callable) -> Callable:
        # A class's __init__ is named by its class: AttentionExplorer(prompt_index=...).
        is_init = function.__name__ == "__init__"
        name = function.__qualname__.removesuffix(".__init__") if is_init else function.__name__

        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in old_to_new.items():
                if old not in kwargs:
                    continue
                if new in kwargs:
                    raise ArgumentTypeError(f"{function.__name__}() got both {old}= and {new}=; pass {new}= only")
                meaning = f" (`{old}` now always means {_MEANING[old]})" if old in _MEANING else ""
                warnings.warn(
                    f"{name}({old}=...) is deprecated and will be removed in the next release; use {new}={meaning}",
                    DeprecationWarning,
                    stacklevel=2,
                )
                kwargs[new] = kwargs.pop(old)
            return function(*args, **kwargs)

        return wrapper

    return decorate


_MEANING = {"prompt": "the text or tokens to run", "target": "a token's text or id"}


# ----------------------------------------------------------------------------------------------- dtype, device
def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """float32, bfloat16, float16 or float64, as a torch dtype or its name (None stays None).

    Raises:
        ArgumentError (a ValueError): for anything else, listing the accepted names.
    """
    if dtype is None or dtype in DTYPE_NAMES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPE_NAMES:
        return DTYPE_NAMES[dtype.removeprefix("torch.")]
    raise ArgumentError(f"dtype {dtype!r} is not supported; use one of {list(DTYPE_NAMES)} (or the torch dtypes)")


def resolve_device(device: torch.device | str) -> torch.device:
    """A torch device, checked to exist on this machine.

    Raises:
        ArgumentError (a ValueError): for a malformed device, or a CUDA/MPS device this machine does not have.
    """
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ArgumentError(f"device {device!r} is not a torch device ({err}); try 'cpu' or 'cuda'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ArgumentError(f"device {str(device)!r} asked for, but CUDA is not available here; use device='cpu'")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ArgumentError(f"device {str(device)!r} asked for, but this machine has {count} CUDA device(s)")
    if device.type == "meta":
        raise ArgumentError("device 'meta' holds no data; load to 'cpu' or 'cuda' (the model is built on meta anyway)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ArgumentError("device 'mps' asked for, but MPS is not available here; use device='cpu'")
    return device


def _shown(layers: Any, items: list[int]) -> str:
    """A layers argument for a message: a range as range(a, b), a list as it is, anything else as its items."""
    return repr(layers) if isinstance(layers, (range, list)) else repr(items)
