"""Sizes the planner adds up: one decoder layer's parameters and its largest tensors, and the memory of the
dictionaries spliced into a pass."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from ..config import LlamaConfig
from ..errors import ArgumentError
from ..model import cpu_matmul


def dictionary_bytes(dictionaries: Iterable[Any], rows: int, active_features: int | None) -> int:
    """What spliced dictionaries add: each one's held weights, and the largest one's working tensors."""
    if hasattr(dictionaries, "splice_memory"):
        dictionaries = [dictionaries]
    held, working = 0, 0
    for dictionary in dictionaries:
        if not hasattr(dictionary, "splice_memory"):
            raise ArgumentError(
                f"dictionaries= takes dictionaries opened with ll.load_dictionary (it reads only their headers), "
                f"got {type(dictionary).__name__}"
            )
        kept, used = dictionary.splice_memory(rows, active_features)
        held, working = held + kept, max(working, used)
    return held + working


def layer_param_count(cfg: LlamaConfig) -> int:
    """Parameters of one decoder layer."""
    from ..io.names import block_param_shapes

    return sum(math.prod(shape) for shape in block_param_shapes(cfg, 0).values())


def largest_layer_tensor(cfg: LlamaConfig) -> int:
    """Values in the largest parameter of a decoder layer."""
    from ..io.names import block_param_shapes

    return max(math.prod(shape) for shape in block_param_shapes(cfg, 0).values())


def largest_cast_elements(cfg: LlamaConfig) -> int:
    """Elements of the largest float32 copy of a layer weight that cpu_matmul.linear makes at a time."""
    q_width = cfg.n_heads * cfg.d_head
    matrices = [(q_width, cfg.d_model), (cfg.d_model, q_width), (cfg.d_mlp, cfg.d_model), (cfg.d_model, cfg.d_mlp)]
    return max(cpu_matmul.cast_elements(d_out, d_in) for d_out, d_in in matrices)
