"""`ll.evaluate_dataset`: a dictionary's evaluation (`ll.evaluate_dictionary`'s metrics) over a dataset of prompts,
locally or on Ray, with a loaded, a loaded-from-path or a streamed model (`load_kwargs={"stream": True}`).

Each shard writes one row per prompt holding that prompt's sums (`EvaluationSums.to_row`: counts, float sums, the
activations' sum and the features that fired); the summary adds every row up and computes the metrics once, so
the result is the same however the prompts were cut into batches, shards and workers, and a killed run resumes
from its finished shards like any dataset run.

    run = ll.evaluate_dataset("path/to/checkpoint", "prompts.jsonl", dictionary="saes/layer6", out="runs/eval")
    run.summary()          # one row: hook, l0, explained_variance, ce_loss_score, kl_div_score, ...
    run.to_frame()         # the per-prompt sums
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..dictionaries.dictionary import Dictionary
from ..dictionaries.load import load_dictionary
from ..errors import ArgumentError, ArgumentTypeError
from ..features.evaluate import batch_sums, check_fits, special_token_ids
from ..features.evaluate_sums import CE_SUMS, KL_SUMS, TOKEN_SUMS, EvaluationSums, merge
from ..model.llama import HookedLlama
from ..model.protocols import LanguageModel
from .options import RunOptions
from .prompts import PromptRecord
from .result import DatasetResult
from .runner import run_dataset
from .tasks import _check_padding

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

ROW_COLUMNS = ("n_tokens", "n_ce", "n_kl", *TOKEN_SUMS, *CE_SUMS, *KL_SUMS, "sum_x", "feature_ids", "feature_counts")


@lru_cache(maxsize=4)
def _open(path: str, hook_out: str | None) -> Dictionary:
    """The dictionary a worker evaluates, opened once per process (and path)."""
    found = load_dictionary(path)
    if isinstance(found, Dictionary):
        return found
    for dictionary in found:
        if dictionary.hook_out == hook_out:
            return dictionary
    raise ArgumentError(
        f"{path} holds dictionaries for {[d.hook_out for d in found]}; choose one with hook={found[0].hook_out!r}"
    )


@dataclass(frozen=True)
class EvaluateTask:
    """Per batch, each prompt's evaluation sums of one dictionary (plain data: it travels to Ray actors, which
    open the dictionary from its folder)."""

    dictionary: str
    hook: str | None = None
    exclude_special_tokens: bool | tuple[int, ...] = True
    kind: str = field(default="evaluate", init=False)
    summary_columns = ("prompt", *ROW_COLUMNS)

    def params(self) -> dict[str, Any]:
        # The folder's files and sizes: a rerun with a dictionary rewritten in place (another size) is refused
        # rather than resumed with shards of the old one. Hashing the weights would cost a read of them all.
        folder = Path(self.dictionary)
        files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
        exclude = self.exclude_special_tokens
        return {"dictionary": self.dictionary, "files": files, "hook": self.hook, "exclude_special_tokens": exclude}

    def run_batch(self, model: LanguageModel, records: Sequence[PromptRecord], *, n_tokens: Sequence[int]) -> pa.Table:
        import pyarrow as pa

        tokens, mask = model.prepare_tokens([r.text for r in records])
        if mask is not None:
            _check_padding(mask, n_tokens)
        dictionary = _open(self.dictionary, self.hook)
        check_fits(model, dictionary)
        ignore = special_token_ids(model.tokenizer, self.exclude_special_tokens)
        rows = [s.to_row() for s in batch_sums(model, dictionary, tokens, mask, ignore_ids=ignore)]
        columns: dict[str, Any] = {"prompt": pa.array([r.index for r in records], pa.int64())}
        for name in ROW_COLUMNS:
            values = [row[name] for row in rows]
            if name == "sum_x":
                columns[name] = pa.array(values, pa.list_(pa.float64()))
            elif name in ("feature_ids", "feature_counts"):
                columns[name] = pa.array(values, pa.list_(pa.int64()))
            else:
                columns[name] = pa.array(values, pa.int64() if name.startswith("n_") else pa.float64())
        return pa.table(columns)

    def summarize(self, frame: pd.DataFrame) -> pd.DataFrame:
        return evaluation_frame(frame, d_sae=_open(self.dictionary, self.hook).d_sae, hook=self.hook_out)

    @property
    def hook_out(self) -> str:
        return _open(self.dictionary, self.hook).hook_out


def sums_of(frame: pd.DataFrame, *, d_sae: int) -> EvaluationSums:
    """The merged sums of a run's rows (`run.to_frame()`): exact, whatever the batches and shards were."""
    return merge(EvaluationSums.from_row(row, d_sae=d_sae) for row in frame.to_dict("records"))


def evaluation_frame(frame: pd.DataFrame, *, d_sae: int, hook: str) -> pd.DataFrame:
    """One row: the hook, the number of prompts and the metrics of the merged sums."""
    import pandas as pd

    metrics = sums_of(frame, d_sae=d_sae).metrics()
    return pd.DataFrame([{"hook": hook, "n_prompts": len(frame), **metrics}])


def evaluate_dataset(
    path_or_model: str | os.PathLike | HookedLlama,
    prompts: str | os.PathLike | Sequence[str],
    *,
    dictionary: str | os.PathLike | Dictionary,
    out: str | os.PathLike,
    hook: str | None = None,
    column: str = "text",
    exclude_special_tokens: bool | Iterable[int] = True,
    options: RunOptions | None = None,
    **runner: Any,
) -> DatasetResult:
    """Evaluates a dictionary over many prompts (`ll.evaluate_dictionary`'s metrics), written as `lens_dataset` does.

    Args:
        path_or_model: a checkpoint path (loaded with `ll.load(path, **load_kwargs)`: pass
            `load_kwargs={"stream": True}` for a streamed model; needed for Ray), or a loaded model.
        prompts: a list of texts, or a .txt / .jsonl / .parquet file (see `ll.read_prompts`).
        dictionary: the dictionary's folder (or a Dictionary loaded from one: workers reopen it from its folder).
        out: the folder to write; a rerun into it resumes (same parameters only).
        hook: which dictionary of a folder holding several (a circuit-tracer set): the hook it writes.
        column: the JSONL field / Parquet column holding the prompts.
        exclude_special_tokens: as in `ll.evaluate_dictionary`.
        options, **runner: how to run (`ll.RunOptions` and its fields as keywords: batch_size, shard_size, executor,
            num_workers, load_kwargs, progress, ...).

    Returns:
        A DatasetResult: `.summary()` is one row (hook, n_prompts and the metrics under sae-lens' names);
        `.to_frame()` the per-prompt sums (`llama_lens.runs.evaluate.sums_of(frame, d_sae=...)` merges any subset).

    Raises:
        ArgumentTypeError: `dictionary` is neither a folder nor a Dictionary.
        ArgumentError, UnknownNameError: as `ll.evaluate_dictionary` (checked before any shard runs).
    """
    if isinstance(dictionary, Dictionary):
        hook = hook or dictionary.hook_out
        dictionary = dictionary.path
    if not isinstance(dictionary, (str, os.PathLike)):
        raise ArgumentTypeError(f"dictionary= takes a folder or a Dictionary, got {type(dictionary).__name__}")
    folder = str(Path(dictionary).expanduser().resolve())
    opened = _open(folder, hook)
    exclude = exclude_special_tokens if isinstance(exclude_special_tokens, bool) else tuple(exclude_special_tokens)
    task = EvaluateTask(folder, opened.hook_out, exclude)
    if not isinstance(path_or_model, (str, os.PathLike)):
        check_fits(path_or_model, opened)  # a checkpoint's workers check it at their first batch
    return run_dataset(path_or_model, prompts, task=task, out=out, column=column, options=options, **runner)
