"""The errors llama_lens raises, under one base class: `except ll.LlamaLensError` catches every one of them.

Each also derives from the builtin a caller would expect (ValueError for bad input, KeyError for an unknown
name, MemoryError for a load that cannot fit), so code written against the builtins keeps working.

    LlamaLensError
    ├── ArgumentError          (ValueError)   an argument with a value the function cannot take
    ├── ArgumentTypeError      (TypeError)    an argument of a type the function cannot take
    ├── MissingFileError       (FileNotFoundError)   a file or folder that is not there
    ├── UsageError             (RuntimeError) a call the object's state does not allow (e.g. no tokenizer loaded)
    ├── ConfigError            (ValueError)   config.json / params.json / arguments describing the model
    ├── CheckpointError        (ValueError)   a weight file is corrupt, incomplete or does not match its config
    ├── NotEnoughMemoryError   (MemoryError, ValueError)   a load or cache that would not fit
    ├── DemoModelError         (RuntimeError) the embedded default model cannot be fetched or built
    ├── UnknownNameError       (KeyError)     a hook, activation, tensor or parameter name that does not exist
    ├── LensFileError          (ValueError)   a saved tuned lens that cannot be read
    ├── ManifestMismatchError  (ValueError)   a dataset run's folder holds a run with other parameters
    ├── GroupedHeadsError      (IndexError)   a hook indexed key/value heads of grouped-query attention by query head
    ├── OutOfRangeError        (IndexError)   an index (token id, row, item) past the end of what it indexes
    ├── UnknownAttributeError  (AttributeError)   a misspelt setting assigned on an object that refuses new ones
    └── WeightOnDiskError      (TypeError)    the whole matrix asked of a weight a streamed model reads by rows
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LlamaLensError(Exception):
    """Base class of every error llama_lens raises on purpose; `str(err)` is the whole message."""

    @property
    def message(self) -> str:
        return str(self)


class ArgumentError(LlamaLensError, ValueError):
    """An argument whose value the function cannot take (the argument is named, with what it accepts)."""


class ArgumentTypeError(LlamaLensError, TypeError):
    """An argument of a type the function cannot take (the argument is named, with the types it accepts)."""


class MissingFileError(LlamaLensError, FileNotFoundError):
    """A file or folder that is not there (the path is named, with what was expected in it)."""


class UsageError(LlamaLensError, RuntimeError):
    """A call that the object's state does not allow, e.g. text asked of a model loaded without a tokenizer."""


class ConfigError(LlamaLensError, ValueError):
    """A config file or config value that llama_lens cannot run (the file and key are named)."""


class CheckpointError(LlamaLensError, ValueError):
    """A checkpoint file is corrupt, incomplete, or does not match its config."""


class NotEnoughMemoryError(LlamaLensError, MemoryError, ValueError):
    """The weights (or activations) asked for would not fit in the memory available."""


class DemoModelError(LlamaLensError, RuntimeError):
    """The embedded default model could not be fetched or built."""


class UnknownNameError(LlamaLensError, KeyError):
    """A name (hook, activation, tensor, parameter) that does not exist, with the closest valid names."""

    def __str__(self) -> str:
        # KeyError's str() is the repr of its argument (quotes and escapes); the message reads better as is.
        return str(self.args[0]) if self.args else ""


class LensFileError(LlamaLensError, ValueError):
    """A saved tuned lens (config.json and its params file) that is not one, naming the file and key."""


class ManifestMismatchError(LlamaLensError, ValueError):
    """A dataset run's `out` folder holds results of a run with other parameters."""


class GroupedHeadsError(LlamaLensError, IndexError):
    """A hook indexed a key/value activation of grouped-query attention as if it had one head per query head."""


class OutOfRangeError(LlamaLensError, IndexError):
    """An index (a token id, a row, an item) outside what it indexes; the message gives the valid range."""


class UnknownAttributeError(LlamaLensError, AttributeError):
    """An attribute set (or read) that the object does not have, e.g. a misspelt explorer setting, with the
    closest names. Still an AttributeError, so `hasattr` and `getattr(obj, name, default)` work as before."""


class WeightOnDiskError(LlamaLensError, TypeError):
    """A tensor operation asked of a weight that a streamed model keeps on disk and reads by rows (`OnDiskWeight`).

    A TypeError, not an AttributeError: raised inside a property (`model.W_U`), an AttributeError would be taken
    for a missing attribute and its message lost."""


def did_you_mean(name: str, valid: Iterable[str], *, hint: str = "") -> str:
    """ "; did you mean 'a', 'b'?" with the closest valid names (difflib), else `hint` (never the whole list)."""
    close = difflib.get_close_matches(name, list(valid), n=3, cutoff=0.6)
    if close:
        return f"; did you mean {', '.join(repr(c) for c in close)}?"
    return f"; {hint}" if hint else ""
