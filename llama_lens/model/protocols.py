"""What every hooked model offers, as a Protocol: `HookedLlama`, `StreamedLlama` and anything built like them.

Code that only runs a model (generation, `test_prompt`, the tuned-lens trainer, the widgets, the metrics) types its
argument with `LanguageModel` instead of importing the model class, so it depends on what it uses, not on where
the class lives.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

import torch

from ..config import LlamaConfig


@runtime_checkable
class LanguageModel(Protocol):
    """A hooked causal language model: a config, a tokenizer, token helpers, hooks and a forward pass."""

    cfg: LlamaConfig
    tokenizer: Any

    def __call__(self, input: Any, *args: Any, **kwargs: Any) -> torch.Tensor: ...

    def to_tokens(self, input: Any, prepend_bos: bool | None = None, **kwargs: Any) -> torch.Tensor: ...

    def to_str_tokens(self, input: Any, prepend_bos: bool | None = None, **kwargs: Any) -> Any: ...

    def to_string(self, tokens: int | torch.Tensor | Sequence[int]) -> str | list[str]: ...

    def prepare_tokens(
        self, prompts: Any, *, prepend_bos: bool | None = None, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def hooks(self, fwd_hooks: Any = (), bwd_hooks: Any = (), **kwargs: Any) -> AbstractContextManager[Any]: ...

    def run_with_cache(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]: ...
