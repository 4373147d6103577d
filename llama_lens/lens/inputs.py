"""What a lens or an attribution was run on: the prompts as tokens, the positions read out and the targets.

`LensInputs` is the part that `LensResult` and `AttributionResult` share, with the indexing they share: which
column of a result a token position is, and the columns their tables have in common (prompt, position, token,
target). `prepare_inputs` makes one from a model and the user's arguments, checked in one place.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ArgumentError
from ..validate import check_index, check_position, check_positions, check_targets

if TYPE_CHECKING:
    import pandas as pd

    from ..model.llama import HookedLlama

Prompt = str | Sequence[str] | torch.Tensor | Sequence[int]
Target = str | int | Sequence[str | int] | Sequence[Sequence[str | int]] | None


@dataclass(repr=False)
class LensInputs:
    """The prompts a result was computed from, and what was asked of them.

    Attributes:
        tokens: [batch, pos] input ids (left-padded for a batch of texts).
        attention_mask: [batch, pos] 1 for real tokens, 0 for padding.
        str_tokens: the text of each input token, per prompt.
        positions: [n_pos] indices into the pos axis of `tokens` (the result's position columns, in order).
        target_ids: [batch, n_targets] or None.
        target_strs: the text of `target_ids` per prompt, or None.
    """

    tokens: torch.Tensor
    attention_mask: torch.Tensor
    str_tokens: list[list[str]]
    positions: list[int]
    target_ids: torch.Tensor | None = None
    target_strs: list[list[str]] | None = None

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    @property
    def n_targets(self) -> int:
        return 0 if self.target_ids is None else self.target_ids.shape[1]

    def __repr__(self) -> str:
        return f"LensInputs(batch={self.batch}, pos={self.tokens.shape[1]}, positions={self.positions})"

    def column_of(self, position: int | None = None, batch_index: int | None = None) -> int:
        """The column of `positions` that holds a token position.

        Args:
            position: a token position (negative counts from the end of the pos axis); None for the last one
                read out.
            batch_index: with it, a padding position of that prompt is refused.

        Raises:
            ArgumentError: for a position out of range, not read out, or padding.
        """
        n_tokens = self.tokens.shape[1]
        position = max(self.positions) if position is None else check_position(position, n_tokens)
        if position not in self.positions:
            raise ArgumentError(f"position {position} was not read out; this result holds positions {self.positions}")
        if batch_index is not None and not self.attention_mask[batch_index, position]:
            raise ArgumentError(f"position {position} of prompt {batch_index} is padding (the batch is left-padded)")
        return self.positions.index(position)

    def check_batch_index(self, batch_index: Any) -> int:
        """`batch_index` as an index into the batch (negative counts from the end)."""
        return check_index("batch_index", batch_index, self.batch, "prompts in the batch")

    def check_target_index(self, target_index: Any) -> int:
        """`target_index` as an index into each prompt's targets (negative counts from the end)."""
        if self.target_ids is None:
            raise ArgumentError("this result has no target: pass target=' Paris' when computing it")
        return check_index("target_index", target_index, self.n_targets, "targets")

    # -------------------------------------------------------------------------------------- table columns
    def position_columns(self, batch_index: torch.Tensor, column: torch.Tensor) -> dict[str, Any]:
        """ "position" and "token" for table rows given by their prompt and position column (both [rows])."""
        position = torch.tensor(self.positions, dtype=torch.long)[column]
        tokens = [self.str_tokens[b][p] for b, p in zip(batch_index.tolist(), position.tolist())]
        return {"position": position, "token": tokens}

    def target_columns(self, batch_index: torch.Tensor, target_index: torch.Tensor) -> dict[str, Any]:
        """ "target" and "target_id" for table rows given by their prompt and target index (both [rows])."""
        texts = [self.target_strs[b][t] for b, t in zip(batch_index.tolist(), target_index.tolist())]
        return {"target": texts, "target_id": self.target_ids[batch_index, target_index]}

    def is_real(self, batch_index: torch.Tensor, column: torch.Tensor) -> torch.Tensor:
        """[rows] whether each row's token is a real one (not left padding)."""
        return self.attention_mask[batch_index, torch.tensor(self.positions, dtype=torch.long)[column]].bool()


class InputsView:
    """Attribute access to a result's `inputs`, so `result.tokens`, `result.positions`, ... read as before."""

    inputs: LensInputs

    @property
    def tokens(self) -> torch.Tensor:
        return self.inputs.tokens

    @property
    def attention_mask(self) -> torch.Tensor:
        return self.inputs.attention_mask

    @property
    def str_tokens(self) -> list[list[str]]:
        return self.inputs.str_tokens

    @property
    def positions(self) -> list[int]:
        return self.inputs.positions

    @property
    def target_ids(self) -> torch.Tensor | None:
        return self.inputs.target_ids

    @property
    def target_strs(self) -> list[list[str]] | None:
        return self.inputs.target_strs

    @property
    def batch(self) -> int:
        return self.inputs.batch

    @property
    def n_targets(self) -> int:
        return self.inputs.n_targets


# ----------------------------------------------------------------------------------------------- from a model
def prepare_inputs(
    model: HookedLlama,
    prompt_or_tokens: Prompt,
    *,
    target: Target,
    positions: int | Iterable[int] | None,
    prepend_bos: bool | None,
    what: str,
) -> LensInputs:
    """Tokenizes the prompt, checks positions and targets, and writes out the tokens' texts.

    Tensors stay on the model's device (the caller moves what it keeps to the CPU with `on_cpu`).

    Args:
        prepend_bos: passed on to `model.prepare_tokens` when not None.
        what: the calling function's name, for messages.

    Raises:
        ArgumentError: for a model that cannot run from tokens, a position out of range or a bad target.
    """
    check_runs_from_tokens(model, what)
    options = {} if prepend_bos is None else {"prepend_bos": prepend_bos}
    tokens, mask = model.prepare_tokens(prompt_or_tokens, **options)
    attention_mask = torch.ones_like(tokens) if mask is None else mask.long()
    batch, n_tokens = tokens.shape
    pos_index = check_positions(positions, n_tokens)
    target_ids = None
    if target is not None:
        id_of = None if model.tokenizer is None else model.tokenizer.id_of
        target_ids = torch.tensor(check_targets(target, batch, model.cfg.d_vocab, id_of), dtype=torch.long)
    texts = token_texts(model, tokens.unique().tolist() + ([] if target_ids is None else target_ids.unique().tolist()))
    return LensInputs(
        tokens=tokens,
        attention_mask=attention_mask,
        str_tokens=[[texts[i] for i in row] for row in tokens.tolist()],
        positions=pos_index,
        target_ids=target_ids,
        target_strs=None if target_ids is None else [[texts[i] for i in row] for row in target_ids.tolist()],
    )


def on_cpu(inputs: LensInputs) -> LensInputs:
    """The same inputs with their tensors on the CPU, as results hold them."""
    return LensInputs(
        tokens=inputs.tokens.cpu(),
        attention_mask=inputs.attention_mask.cpu(),
        str_tokens=inputs.str_tokens,
        positions=inputs.positions,
        target_ids=None if inputs.target_ids is None else inputs.target_ids.cpu(),
        target_strs=inputs.target_strs,
    )


def check_runs_from_tokens(model: HookedLlama, what: str) -> None:
    """Refuses a model loaded from a later layer on: it runs only from a residual stream (forward's resid=),
    which the lens does not take. Said here rather than in forward's advice about arguments the lens has not got.
    """
    loaded = model.layer_indices
    if loaded and loaded[0] != 0:
        raise ArgumentError(
            f"this model holds layers {loaded[0]}..{loaded[-1]} only; {what} runs the model from the tokens, which "
            f"needs every layer from 0: load it with layers=range(0, {loaded[-1] + 1})"
        )


def token_texts(model: HookedLlama, ids: Iterable[int]) -> dict[int, str]:
    """id -> the text of that token; "<id>" where there is no tokenizer or the id is past its vocabulary."""
    ids = sorted(set(int(i) for i in ids))
    tokenizer = model.tokenizer
    known = [i for i in ids if tokenizer is not None and i < getattr(tokenizer, "vocab_size", 0)]
    texts = dict(zip(known, tokenizer.token_strs(known))) if known else {}
    return {i: texts.get(i, f"<{i}>") for i in ids}


# ----------------------------------------------------------------------------------------------- tables
def index_grid(*sizes: int) -> list[torch.Tensor]:
    """One flat index tensor per axis of a [*sizes] array, in its row-major order (the last varies fastest)."""
    grids = torch.meshgrid(*(torch.arange(n) for n in sizes), indexing="ij")
    return [g.reshape(-1) for g in grids]


def repeat_rows(values: Any, times: int) -> Any:
    """Each value `times` times in a row (values: tensor, list or pandas Categorical)."""
    if times == 1:
        return values
    if isinstance(values, torch.Tensor):
        return values.repeat_interleave(times)
    if hasattr(values, "categories"):
        import pandas as pd

        codes = values.codes.repeat(times)  # numpy's repeat: each code `times` times in a row
        return pd.Categorical.from_codes(codes, categories=values.categories, ordered=values.ordered)
    return [v for v in values for _ in range(times)]


def make_frame(columns: dict[str, Any], keep: torch.Tensor | None = None) -> pd.DataFrame:
    """A DataFrame of `columns` (tensors, lists or Categoricals), with only the rows where `keep` is True."""
    import pandas as pd

    frame = pd.DataFrame({k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in columns.items()})
    if keep is not None and not bool(keep.all()):
        frame = frame[keep.tolist()].reset_index(drop=True)
    return frame
