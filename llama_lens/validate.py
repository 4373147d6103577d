"""Checks of the arguments users pass: one place, one message style.

Each check takes the value as the user gave it and returns it normalised, or raises a ValueError that names
the argument, says what was expected and what was found, and suggests a fix.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable

import torch

# The dtypes a model can be loaded in: every op of the forward pass has CPU and CUDA kernels for these (float8
# and other floating types do not).
DTYPE_NAMES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


def check_layers(layers: Iterable[int] | None, n_layers: int) -> list[int]:
    """Sorted, de-duplicated layer indices; all layers for None.

    Raises:
        ValueError: for an index that is not an int in [0, n_layers), naming the valid range.
    """
    if layers is None:
        return list(range(n_layers))
    if isinstance(layers, (int, str)):
        raise ValueError(f"layers must be a range or a list of ints, got {layers!r}; e.g. layers=range(0, 3)")
    checked = []
    for layer in layers:
        try:
            if isinstance(layer, bool):
                raise TypeError
            layer = operator.index(layer)
        except TypeError:
            raise ValueError(f"layers must hold ints, got {layer!r}") from None
        if not 0 <= layer < n_layers:
            raise ValueError(
                f"layer {layer} is outside the model: this checkpoint has {n_layers} layers, "
                f"so layers must lie within range(0, {n_layers})"
            )
        checked.append(layer)
    return sorted(set(checked))


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """float32, bfloat16, float16 or float64, as a torch dtype or its name (None stays None).

    Raises:
        ValueError: for anything else, listing the accepted names.
    """
    if dtype is None or dtype in DTYPE_NAMES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPE_NAMES:
        return DTYPE_NAMES[dtype.removeprefix("torch.")]
    raise ValueError(f"dtype {dtype!r} is not supported; use one of {list(DTYPE_NAMES)} (or the torch dtypes)")


def resolve_device(device: torch.device | str) -> torch.device:
    """A torch device, checked to exist on this machine.

    Raises:
        ValueError: for a malformed device, or a CUDA/MPS device this machine does not have.
    """
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a torch device ({err}); try 'cpu' or 'cuda'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} asked for, but CUDA is not available here; use device='cpu'")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {str(device)!r} asked for, but this machine has {count} CUDA device(s)")
    if device.type == "meta":
        raise ValueError("device 'meta' holds no data; load to 'cpu' or 'cuda' (the model is built on meta anyway)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' asked for, but MPS is not available here; use device='cpu'")
    return device
