"""Texts cut into rows of token ids for training on a model's activations (the tuned lens, dictionaries)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..errors import ArgumentError


def token_rows(tokenizer: Any, texts: Iterable[str], *, seq_len: int, max_rows: int | None = None) -> torch.Tensor:
    """The texts as rows of `seq_len` token ids, each starting with BOS (where the tokenizer has one).

    The texts are tokenized one after another (each with its BOS) into one stream, cut into consecutive rows:
    a row that begins inside a text gets a BOS in front, as the model never sees a text without one.
    Tokenizing stops after `max_rows` rows; a last partial row is dropped.

    Returns:
        [n_rows, seq_len] token ids.

    Raises:
        ArgumentError: when the texts hold fewer than `seq_len` tokens.
    """
    bos = tokenizer.bos_id
    stream: list[int] = []
    start = 0
    rows: list[list[int]] = []
    n_tokens = 0
    for text in texts:
        ids = tokenizer.encode(text, bos=True)
        stream.extend(ids)
        n_tokens += len(ids)
        while start < len(stream):
            prefix = [bos] if bos is not None and stream[start] != bos else []
            end = start + seq_len - len(prefix)
            if end > len(stream):
                break
            rows.append(prefix + stream[start:end])
            start = end
        del stream[:start]
        start = 0
        if max_rows is not None and len(rows) >= max_rows:
            break
    if not rows:
        raise ArgumentError(
            f"the texts hold {n_tokens} tokens, fewer than seq_len={seq_len}: pass more text or a smaller seq_len"
        )
    return torch.tensor(rows[:max_rows], dtype=torch.long)
