"""Reading config files: typed values whose errors name the file and key, the JSON object of a config file,
and the rules by which transformers and Meta derive a value from others (sliding-window layers, Meta's d_mlp).

`config.LlamaConfig.from_hf` / `from_meta` read through these; the names are importable from `llama_lens.config`.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .files import read_json_file

LAYER_TYPES = ("full_attention", "sliding_attention")

_REQUIRED = object()


class ConfigValues:
    """Typed reads of a config dict, each error naming the file and the key."""

    def __init__(self, values: dict[str, Any], source: str) -> None:
        self.values, self.source = values, source

    def _get(self, key: str, default: Any) -> Any:
        value = self.values.get(key)
        if value is None:
            if default is _REQUIRED:
                raise ConfigError(f"{self.source}: required key {key!r} is missing")
            return default
        return value

    def _wrong(self, key: str, what: str) -> ConfigError:
        return ConfigError(f"{self.source}: {key} must be {what}, got {self.values[key]!r}")

    def int(self, key: str, default: Any = _REQUIRED, *, positive: bool = False) -> Any:
        value = self._get(key, default)
        # inf and NaN are floats too: int() of them raises OverflowError/ValueError, so they are refused first.
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (isinstance(value, float) and not math.isfinite(value))
            or value != int(value)
        ):
            if value is default:
                return value
            raise self._wrong(key, "an integer")
        if positive and value <= 0:
            raise self._wrong(key, "a positive integer")
        return int(value)

    def float(self, key: str, default: Any = _REQUIRED, *, positive: bool = False, minimum: float | None = None) -> Any:
        """A number; `positive`: above 0; `minimum`: at least that."""
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:  # NaN != NaN
            if value is default:
                return value
            raise self._wrong(key, "a number")
        if isinstance(value, int) and abs(value) > sys.float_info.max:  # float() of it: OverflowError
            raise self._wrong(key, "a number within float range")
        if positive and not value > 0:
            raise self._wrong(key, "a positive number")
        if minimum is not None and value < minimum:
            raise self._wrong(key, f"at least {minimum:g}")
        return float(value)

    def bool(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):  # "false" as a string would read as True
            raise self._wrong(key, "true or false")
        return value


def token_ids(values: list, source: str) -> tuple[int, ...]:
    """eos_token_id's values as a tuple of token ids, checked."""
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ConfigError(f"{source}: eos_token_id must be a token id or a list of them, got {values!r}")
    return tuple(values)


def read_json_object(path: Path) -> dict[str, Any]:
    """A config file's JSON object; ConfigError (a ValueError) naming the file when it is not valid JSON or not
    an object."""
    data = read_json_file(path, ConfigError)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object of config keys, got {type(data).__name__}")
    return data


def meta_d_mlp(d_model: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The SwiGLU hidden size exactly as Meta's FeedForward computes it."""
    hidden = int(2 * (4 * d_model) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def hf_sliding_window(hf: dict[str, Any], model_type: str, n_layers: int, source: str) -> dict[str, Any]:
    """sliding_window and layer_types as transformers 5 derives them for this architecture."""
    read = ConfigValues(hf, source)
    if model_type == "llama":
        return {}
    if model_type == "mistral":  # every layer slides, unless sliding_window is null
        return {"sliding_window": read.int("sliding_window", None, positive=True)}
    # Qwen2/3: the window is on only with use_sliding_window, and then (unless layer_types says otherwise) for
    # the layers from max_window_layers on.
    window = read.int("sliding_window", None, positive=True) if read.bool("use_sliding_window", False) else None
    layer_types = hf.get("layer_types")
    if layer_types is None:
        first_sliding = read.int("max_window_layers", 28)
        layer_types = [
            "sliding_attention" if window is not None and i >= first_sliding else "full_attention"
            for i in range(n_layers)
        ]
    elif not isinstance(layer_types, list) or len(layer_types) != n_layers or not set(layer_types) <= set(LAYER_TYPES):
        raise ConfigError(
            f"{source}: layer_types must list one of {list(LAYER_TYPES)} for each of the {n_layers} layers, "
            f"got {layer_types!r}"
        )
    if window is None and "sliding_attention" in layer_types:
        raise ConfigError(
            f"{source}: layer_types names sliding_attention layers but there is no window (use_sliding_window is "
            "false or sliding_window is null); transformers cannot run this config either"
        )
    if window is None:
        return {"sliding_window": None, "layer_types": None}
    return {"sliding_window": window, "layer_types": tuple(layer_types)}
