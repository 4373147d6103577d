"""The lens (and attribution, and an activation store) over a dataset of prompts, written to disk as it goes.

    run = ll.lens_dataset("path/to/checkpoint", "questions.jsonl", out="runs/lens", target_column="answer")
    run.frame()        # one row per prompt × read-out × position (× target), from out/shards/*.parquet
    run.summary()      # means over prompts per read-out, from out/summary.parquet

The driver (this module) reads the prompts, tokenizes them to count their tokens, sorts them by length and
cuts them into shards of `shard_size` prompts (a shard's batches need little padding). The plan depends only
on the prompts and the parameters, so every executor and every rerun makes the same shards. An executor
(`llama_lens.runs.executors`: in this process, or Ray actors) processes the shards not yet finished; each shard's
files are written to a temporary name and renamed when whole, so a killed run loses at most the shards in
flight (one per worker), and a rerun into the same folder skips the finished ones. `manifest.json` records
the parameters; a rerun with other parameters into the same folder is refused.

    out/manifest.json                     the run's parameters (what a rerun must match)
    out/shards/shard-00000.parquet ...    rows, one file per shard
    out/summary.parquet                   per read-out (component) means, written at the end
    out/activations/                      the activation store, when asked for (`llama_lens.data.store`)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..data.store import STORE_FOLDER, ActivationDataset, check_hook_names, temporary_name, write_index
from ..errors import ManifestMismatchError
from .tasks import (
    SHARD_FOLDER,
    AttributionTask,
    ForwardTask,
    LensTask,
    Positions,
    PromptRecord,
    Shard,
    ShardJob,
    check_positions,
    shard_path,
)

if TYPE_CHECKING:
    import pandas as pd

    from ..model.llama import HookedLlama

MANIFEST_FILE = "manifest.json"
SUMMARY_FILE = "summary.parquet"
MANIFEST_FORMAT = 1
EXECUTORS = ("local", "ray")


# ------------------------------------------------------------------------------------------------ prompts
def read_prompts(
    prompts: str | os.PathLike | Sequence[str], *, column: str = "text", target_column: str | None = None
) -> tuple[list[str], list[Any] | None]:
    """Prompt texts (and targets) from a list, a text file, a JSONL file or a Parquet file.

    Args:
        prompts: a list of texts; a `.txt` file (one prompt per line, blank lines skipped); a `.jsonl` file
            (one JSON object per line, the prompt in field `column`); a `.parquet` file (column `column`).
        column: the field or column holding the prompt (JSONL, Parquet).
        target_column: the field or column holding each prompt's target (a token's text or id, or a list of
            them); JSONL and Parquet only.

    Returns:
        The texts and the targets (None without `target_column`).

    Raises:
        FileNotFoundError: a file that does not exist.
        ValueError: an unknown file type, a missing field or column (named, with its line), a prompt that is
            not text.
    """
    if isinstance(prompts, (str, os.PathLike)):
        path = Path(prompts)
        if not path.is_file():
            raise FileNotFoundError(
                f"prompts file {str(path)!r} does not exist; pass a list of texts, or a .txt, .jsonl or .parquet file"
            )
        suffix = path.suffix.lower()
        if suffix == ".txt":
            if target_column is not None:
                raise ValueError(f"{path} is a text file (one prompt per line): it has no column {target_column!r}")
            texts = [line for line in path.read_text().splitlines() if line.strip()]
            return _checked_texts(texts, str(path)), None
        if suffix in (".jsonl", ".ndjson"):
            return _read_jsonl(path, column, target_column)
        if suffix == ".parquet":
            return _read_parquet(path, column, target_column)
        raise ValueError(f"prompts file {path} has an unknown type {suffix!r}; use .txt, .jsonl or .parquet")
    if target_column is not None:
        raise ValueError("target_column names a field of a JSONL or Parquet file; with a list of prompts use target=")
    if isinstance(prompts, torch.Tensor) or not isinstance(prompts, Sequence):
        raise ValueError(f"prompts must be a list of texts or a file path, got {type(prompts).__name__}")
    return _checked_texts(list(prompts), "prompts"), None


def _checked_texts(texts: list[Any], source: str) -> list[str]:
    if not texts:
        raise ValueError(f"{source} holds no prompts")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"{source}: prompt {i} is {type(text).__name__} {text!r}, not text")
    return texts


def _read_jsonl(path: Path, column: str, target_column: str | None) -> tuple[list[str], list[Any] | None]:
    texts, targets = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {number}: not JSON ({err.msg})") from None
        for key in (column, target_column):
            if key is not None and (not isinstance(row, dict) or key not in row):
                found = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise ValueError(
                    f"{path}, line {number}: no field {key!r} (found {found}); pass column=/target_column="
                )
        texts.append(row[column])
        if target_column is not None:
            targets.append(row[target_column])
    return _checked_texts(texts, str(path)), (targets if target_column is not None else None)


def _read_parquet(path: Path, column: str, target_column: str | None) -> tuple[list[str], list[Any] | None]:
    import pyarrow.parquet as pq

    names = pq.read_schema(path).names
    for key in (column, target_column):
        if key is not None and key not in names:
            raise ValueError(f"{path} has no column {key!r} (its columns: {names}); pass column=/target_column=")
    table = pq.read_table(path, columns=[c for c in (column, target_column) if c is not None])
    texts = table.column(column).to_pylist()
    targets = table.column(target_column).to_pylist() if target_column is not None else None
    return _checked_texts(texts, str(path)), targets


def make_records(texts: list[str], target: Any = None, targets: list[Any] | None = None) -> list[PromptRecord]:
    """Prompt records; `target` is one target for every prompt or a list with one per prompt, `targets` the
    per-prompt values of a target column. Every prompt needs the same number of targets."""
    if target is not None and targets is not None:
        raise ValueError("pass target= or target_column=, not both")
    if target is not None:
        if isinstance(target, (str, int)) and not isinstance(target, bool):
            targets = [target] * len(texts)
        else:
            targets = list(target)
            if len(targets) != len(texts):
                raise ValueError(
                    f"got {len(targets)} targets for {len(texts)} prompts: pass one target for all, or one per prompt"
                )
    if targets is None:
        return [PromptRecord(i, text) for i, text in enumerate(texts)]
    records = []
    for i, (text, value) in enumerate(zip(texts, targets)):
        items = (value,) if isinstance(value, (str, int)) else tuple(value) if value is not None else ()
        if not items or any(isinstance(t, bool) or not isinstance(t, (str, int)) for t in items):
            raise ValueError(f"prompt {i}: a target is a token's text or id (or a list of them), got {value!r}")
        if records and len(items) != len(records[0].target):
            raise ValueError(
                f"prompt {i} has {len(items)} targets, prompt 0 has {len(records[0].target)}: every prompt needs the "
                "same number"
            )
        records.append(PromptRecord(i, text, items))
    return records


# --------------------------------------------------------------------------------------------------- plan
def plan_shards(records: Sequence[PromptRecord], n_tokens: Sequence[int], shard_size: int) -> list[Shard]:
    """Shards of `shard_size` prompts, sorted by token count (ties by index): deterministic, so every executor and
    every rerun cuts the same shards."""
    order = sorted(range(len(records)), key=lambda i: (n_tokens[i], records[i].index))
    return [
        Shard(k, tuple(records[i] for i in order[start : start + shard_size]))
        for k, start in enumerate(range(0, len(order), shard_size))
    ]


def _count_tokens(tokenizer, records: Sequence[PromptRecord], d_vocab: int) -> list[int]:
    """Token counts (BOS included, as the lens tokenizes), after checking every prompt and target."""
    counts = []
    for record in records:
        n = len(tokenizer.encode(record.text))
        if n == 0:
            raise ValueError(f"prompt {record.index} ({record.text!r}) has no tokens")
        counts.append(n)
    checked: set[Any] = set()
    for record in records:
        for t in record.target or ():
            if t in checked:
                continue
            try:
                token_id = tokenizer.id_of(t) if isinstance(t, str) else t
            except ValueError as err:
                raise ValueError(f"prompt {record.index}: target {err}") from None
            if not 0 <= token_id < d_vocab:
                raise ValueError(f"prompt {record.index}: target id {token_id} is out of range [0, d_vocab={d_vocab})")
            checked.add(t)
    return counts


# ----------------------------------------------------------------------------------------------- manifest
def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _describe_tokenizer(tokenizer: Any) -> str | None:
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        return None if tokenizer is None else str(Path(tokenizer).resolve())
    kind = type(tokenizer)
    return f"{kind.__module__}.{kind.__qualname__}({getattr(tokenizer, 'source', '')})"


def check_manifest(out: Path, manifest: dict[str, Any]) -> None:
    """Writes out/manifest.json, or checks that the one there matches (a rerun resumes only the same run).

    Raises:
        ManifestMismatchError: the folder holds a run with other parameters; the differences are named.
    """
    path = out / MANIFEST_FILE
    manifest = _jsonable(manifest)
    if path.exists():
        found, wanted = _flat(json.loads(path.read_text())), _flat(manifest)
        differ = [k for k in sorted(set(found) | set(wanted)) if found.get(k) != wanted.get(k)]
        if differ:
            details = "; ".join(f"{k}: {_short(found.get(k))} there, {_short(wanted.get(k))} now" for k in differ[:5])
            raise ManifestMismatchError(
                f"{out} holds a run with other parameters ({path.name}: {details}); a rerun into the same folder "
                "must repeat the run's parameters to resume it: choose another out= folder, or delete this one"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    temporary = temporary_name(path)
    temporary.write_text(json.dumps(manifest, indent=2))
    os.replace(temporary, path)


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as {"task_params.top_k": 5, ...}, so a mismatch names the very key."""
    if not isinstance(value, dict) or not value:
        return {prefix: value}
    flat = {}
    for key, item in value.items():
        flat |= _flat(item, f"{prefix}.{key}" if prefix else key)
    return flat


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _remove_partial_files(out: Path) -> None:
    # Temporary files of a killed run (never read: only renamed files count).
    for folder in (out / SHARD_FOLDER, out / STORE_FOLDER):
        if folder.is_dir():
            for path in folder.glob(".*.tmp-*"):
                path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------ results
@dataclasses.dataclass
class DatasetResult:
    """What a dataset run wrote, and ways to read it.

    Attributes:
        out: the run's folder.
        manifest: the run's parameters (out/manifest.json).
        n_shards: shards in the plan.
        n_skipped: shards already finished by an earlier run, not recomputed.
        stats: per shard computed by this call: shard, n_prompts, n_tokens, seconds (and worker, with Ray).
        seconds: wall time of this call's processing (after the plan, before the summary).
    """

    out: Path
    manifest: dict[str, Any]
    n_shards: int
    n_skipped: int
    stats: list[dict[str, Any]]
    seconds: float

    @property
    def prompts_per_second(self) -> float:
        return sum(s["n_prompts"] for s in self.stats) / self.seconds if self.seconds else 0.0

    def frame(self, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """Every shard's rows as one DataFrame, ordered by prompt (each prompt's rows in forward order)."""
        import pandas as pd
        import pyarrow.parquet as pq

        tables = [pq.read_table(shard_path(self.out, k), columns=columns) for k in range(self.n_shards)]
        frame = pd.concat([t.to_pandas() for t in tables], ignore_index=True)
        if "prompt" in frame:
            frame = frame.sort_values("prompt", kind="stable").reset_index(drop=True)
        return frame

    def summary(self) -> pd.DataFrame:
        """out/summary.parquet: per read-out (or component) means over prompts."""
        import pandas as pd

        return pd.read_parquet(self.out / SUMMARY_FILE)

    def activations(self, hook_names: Sequence[str] | None = None, *, unit: str = "token") -> ActivationDataset:
        """The activation store as a torch Dataset (see `ActivationDataset`)."""
        return ActivationDataset(self.out, hook_names, unit=unit)

    def __repr__(self) -> str:
        return (
            f"DatasetResult(out={str(self.out)!r}, task={self.manifest['task']!r}, shards={self.n_shards}, "
            f"skipped={self.n_skipped}, prompts/s={self.prompts_per_second:.1f})"
        )


def write_summary(out: Path, task: Any, n_shards: int) -> None:
    """Reads the shards' metric columns and writes out/summary.parquet (atomically)."""
    import pandas as pd
    import pyarrow.parquet as pq

    present = set(pq.read_schema(shard_path(out, 0)).names)
    columns = [c for c in task.summary_columns if c in present]
    frame = pd.concat(
        [pq.read_table(shard_path(out, k), columns=columns).to_pandas() for k in range(n_shards)], ignore_index=True
    )
    summary = task.summarize(frame)
    temporary = temporary_name(out / SUMMARY_FILE)
    summary.to_parquet(temporary, index=False)
    os.replace(temporary, out / SUMMARY_FILE)


# ------------------------------------------------------------------------------------------------ runners
def lens_dataset(
    path_or_model: str | os.PathLike | HookedLlama,
    prompts: str | os.PathLike | Sequence[str],
    *,
    out: str | os.PathLike,
    target: Any = None,
    column: str = "text",
    target_column: str | None = None,
    readout: str | Sequence[str] = ("embed", "resid_post"),
    positions: Positions = "last",
    top_k: int = 5,
    layers: Sequence[int] | None = None,
    activations: Sequence[str] | None = None,
    activation_positions: Positions = "all",
    activation_dtype: torch.dtype | str | None = None,
    batch_size: int = 16,
    shard_size: int = 128,
    executor: str = "local",
    num_workers: int | None = None,
    ray_address: str | None = None,
    num_cpus_per_worker: float = 1,
    num_gpus_per_worker: float = 0,
    load_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
) -> DatasetResult:
    """The logit lens over many prompts, written to `out` as Parquet shards plus a per-read-out summary.

    Args:
        path_or_model: a checkpoint path (loaded with `ll.load(path, **load_kwargs)`; needed for Ray), or a
            loaded HookedLlama (local executor only).
        prompts: a list of texts, or a .txt / .jsonl / .parquet file (see `read_prompts`).
        out: the folder to write (created); a rerun into it resumes the run (same parameters only).
        target: one target for every prompt (a token's text, e.g. " Paris", or id), or a list with one per prompt
            (each a target or a list of them).
        column: the JSONL field / Parquet column holding the prompts.
        target_column: the JSONL field / Parquet column holding each prompt's target(s).
        readout, top_k, layers: as in `ll.logit_lens`.
        positions: which token positions of each prompt to read out: "last" (the last real token, where the next
            token is predicted), "all", an int or a list of ints (0 = the prompt's first token, BOS included;
            negative counts from its end). Positions past a prompt's length are left out for that prompt.
        activations: hook names to store per token for probes or SAEs (`llama_lens.data.store`), or None.
        activation_positions: which positions to store ("all" by default; as `positions`).
        activation_dtype: the stored dtype (default the model's).
        batch_size: prompts per forward pass (batches are of similar length, left-padded).
        shard_size: prompts per shard, the unit of work and of resume.
        executor: "local" (this process) or "ray" (one actor per worker, each loading the model from its path).
        num_workers: Ray actors (default: as many as the cluster's CPUs or GPUs allow); "local" runs one.
        ray_address: the Ray cluster to join when Ray is not initialized yet (None: start a local one).
        num_cpus_per_worker, num_gpus_per_worker: Ray resources per actor (torch threads = CPUs); with GPUs pass
            load_kwargs={"device": "cuda"}.
        load_kwargs: arguments of `ll.load` (dtype, device, tokenizer, stream, layers) for a path.
        progress: show a progress bar (prompts/s, tokens/s).

    Returns:
        A DatasetResult: `.frame()` holds one row per prompt × read-out × position (× target) with columns
        prompt (its index in the input), label, layer, readout, position, token, top_token, top_id, top_prob,
        entropy, kl_to_final, top_ids, top_probs, top_tokens (lists of top_k), and with targets target,
        target_id, target_prob, target_logit, target_rank. `.summary()`: their means per read-out.

    Raises:
        ManifestMismatchError (a ValueError): `out` holds a run with other parameters.
        ValueError: bad arguments, a prompt with no tokens, a target that is not one token.
    """
    positions = check_positions(positions)
    kinds = (readout,) if isinstance(readout, str) else tuple(readout)
    from ..lens.logit import READOUTS

    unknown = [k for k in kinds if k not in READOUTS]
    if unknown or not kinds:
        raise ValueError(f"unknown read-out {unknown or list(kinds)!r}; choose from {list(READOUTS)} (or a list)")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    task = LensTask(kinds, positions, top_k, None if layers is None else tuple(sorted({int(i) for i in layers})))
    return run_dataset(
        path_or_model, prompts, task, out=out, target=target, column=column, target_column=target_column,
        activations=activations, activation_positions=activation_positions, activation_dtype=activation_dtype,
        batch_size=batch_size, shard_size=shard_size, executor=executor, num_workers=num_workers,
        ray_address=ray_address, num_cpus_per_worker=num_cpus_per_worker, num_gpus_per_worker=num_gpus_per_worker,
        load_kwargs=load_kwargs, progress=progress,
    )  # fmt: skip


def attribution_dataset(
    path_or_model: str | os.PathLike | HookedLlama,
    prompts: str | os.PathLike | Sequence[str],
    *,
    out: str | os.PathLike,
    target: Any = None,
    target_column: str | None = None,
    positions: Positions = "last",
    heads: bool = False,
    **runner: Any,
) -> DatasetResult:
    """Direct logit attribution (`ll.direct_logit_attribution`) over many prompts, written as `lens_dataset` does.

    Args:
        path_or_model, prompts, out, target, target_column, positions: as in `lens_dataset`; a target is required.
        heads: also write each attention component's per-head shares (column head_contributions, [n_heads]).
        **runner: column, activations, activation_positions, activation_dtype, batch_size, shard_size, executor,
            num_workers, ray_address, num_cpus_per_worker, num_gpus_per_worker, load_kwargs, progress (see
            `lens_dataset`).

    Returns:
        A DatasetResult: one row per prompt × component × position × target with columns prompt, label, layer,
        component ("embed" / "attn" / "mlp"), position, token, target, target_id, contribution, final_logit
        (and head_contributions); `.summary()`: mean and mean absolute contribution per component.
    """
    if target is None and target_column is None:
        raise ValueError("attribution_dataset needs targets: target=' Paris' (or one per prompt) or target_column=")
    task = AttributionTask(check_positions(positions), bool(heads))
    return run_dataset(path_or_model, prompts, task, out=out, target=target, target_column=target_column, **runner)


def store_activations(
    path_or_model: str | os.PathLike | HookedLlama,
    prompts: str | os.PathLike | Sequence[str],
    hook_names: Sequence[str],
    *,
    out: str | os.PathLike,
    positions: Positions = "all",
    dtype: torch.dtype | str | None = None,
    **runner: Any,
) -> ActivationDataset:
    """Runs the model over the prompts and stores the chosen hook points per token, nothing else.

    The forward pass stops after the last layer the hooks need. See `llama_lens.data.store` for the files.

    Args:
        hook_names: e.g. ["blocks.3.hook_resid_post"] (the attention pattern and scores are refused).
        positions: which positions of each prompt to store ("all", "last", ints; as in `lens_dataset`).
        dtype: the stored dtype (default the model's).
        **runner: column, batch_size, shard_size, executor, num_workers, ray_address, num_cpus_per_worker,
            num_gpus_per_worker, load_kwargs, progress (see `lens_dataset`).

    Returns:
        The store as an ActivationDataset (one item per token; `ActivationDataset(out, unit="prompt")` for one per
        prompt).
    """
    names = [hook_names] if isinstance(hook_names, str) else list(hook_names)
    needs_logits = any(not name.startswith("blocks.") and name != "hook_embed" for name in names)
    last = max((int(name.split(".")[1]) for name in names if name.startswith("blocks.")), default=-1)
    task = ForwardTask(None if needs_logits else last + 1)
    result = run_dataset(
        path_or_model, prompts, task, out=out, activations=names, activation_positions=positions,
        activation_dtype=dtype, **runner,
    )  # fmt: skip
    return result.activations()


def run_dataset(
    path_or_model: str | os.PathLike | HookedLlama,
    prompts: str | os.PathLike | Sequence[str],
    task: Any,
    *,
    out: str | os.PathLike,
    target: Any = None,
    column: str = "text",
    target_column: str | None = None,
    activations: Sequence[str] | None = None,
    activation_positions: Positions = "all",
    activation_dtype: torch.dtype | str | None = None,
    batch_size: int = 16,
    shard_size: int = 128,
    executor: str = "local",
    num_workers: int | None = None,
    ray_address: str | None = None,
    num_cpus_per_worker: float = 1,
    num_gpus_per_worker: float = 0,
    load_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
) -> DatasetResult:
    """The runner behind `lens_dataset`, `attribution_dataset` and `store_activations` (arguments as there)."""
    from ..validate import resolve_dtype
    from .executors import ModelSpec, run_local, run_ray

    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise ImportError(
            "the dataset runner writes Parquet with pyarrow: pip install pyarrow (or 'llama_lens[datasets]')"
        ) from None

    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {list(EXECUTORS)}, got {executor!r}")
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if executor == "local" and num_workers not in (None, 1):
        raise ValueError(
            f"executor='local' runs one model in this process; num_workers={num_workers} needs executor='ray' "
            "(for more threads here, torch.set_num_threads)"
        )
    out = Path(out)
    activation_positions = check_positions(activation_positions)
    activation_dtype = resolve_dtype(activation_dtype)
    texts, column_targets = read_prompts(prompts, column=column, target_column=target_column)
    records = make_records(texts, target, column_targets)

    model, spec = None, None
    if isinstance(path_or_model, (str, os.PathLike)):
        load_kwargs = dict(load_kwargs or {})
        if isinstance(load_kwargs.get("tokenizer"), (str, os.PathLike)):
            # Workers run elsewhere (another folder, another node): paths travel absolute.
            load_kwargs["tokenizer"] = str(Path(load_kwargs["tokenizer"]).resolve())
        spec = ModelSpec(str(Path(path_or_model).resolve()), load_kwargs)
        cfg, tokenizer, hook_names = _describe_checkpoint(spec)
        model_info = {"path": spec.path, "config": dataclasses.asdict(cfg), "load": _load_info(spec.load_kwargs)}
    else:
        model = path_or_model
        if not hasattr(model, "cfg") or not hasattr(model, "hook_names"):
            raise ValueError(f"path_or_model must be a checkpoint path or a HookedLlama, got {type(model).__name__}")
        if executor == "ray":
            raise ValueError(
                "executor='ray' loads the model in every worker from its checkpoint: pass the checkpoint's path "
                "(and load_kwargs=, e.g. {'dtype': 'bfloat16'}) instead of a loaded model"
            )
        if load_kwargs:
            raise ValueError("load_kwargs are for a checkpoint path; this model is loaded already")
        cfg, tokenizer, hook_names = model.cfg, model.tokenizer, model.hook_names
        model_info = {
            "object": type(model).__name__,
            "config": dataclasses.asdict(cfg),
            "dtype": str(model.unembed.weight.dtype),
            "layers": list(model.layer_indices),
            "tokenizer": _describe_tokenizer(tokenizer),
        }
    if tokenizer is None:
        raise ValueError("the dataset runner tokenizes texts, and this checkpoint has no tokenizer: pass tokenizer=")
    if activations is not None:
        activations = tuple(check_hook_names(activations, hook_names))
    n_tokens = _count_tokens(tokenizer, records, cfg.d_vocab)
    shards = plan_shards(records, n_tokens, shard_size)

    fingerprint = hashlib.sha256(json.dumps([(r.text, r.target) for r in records]).encode()).hexdigest()
    manifest = {
        "format": MANIFEST_FORMAT,
        "task": task.kind,
        "task_params": task.params(),
        "model": model_info,
        "prompts": {"count": len(records), "sha256": fingerprint},
        "batch_size": batch_size,
        "shard_size": shard_size,
        "activations": None
        if activations is None
        else {
            "hook_names": list(activations),
            "positions": activation_positions,
            "dtype": None if activation_dtype is None else str(activation_dtype),
        },
    }
    check_manifest(out, manifest)
    _remove_partial_files(out)
    job = ShardJob(
        out=str(out.resolve()),
        task=task,
        batch_size=batch_size,
        activations=activations,
        activation_positions=activation_positions,
        activation_dtype=None if activation_dtype is None else str(activation_dtype).removeprefix("torch."),
    )
    todo = [shard for shard in shards if not job.is_done(shard.index)]
    done = len(records) - sum(len(shard.records) for shard in todo)
    bar = _ProgressBar(len(records), done, progress)
    start = time.perf_counter()
    try:
        if not todo:
            stats = []
        elif executor == "local":
            if model is None:
                model = spec.load()
            stats = run_local(model, job, todo, on_batch=bar.update)
        else:
            stats = run_ray(
                spec, job, todo, num_workers=num_workers, ray_address=ray_address, num_cpus=num_cpus_per_worker,
                num_gpus=num_gpus_per_worker, on_shard=lambda s: bar.update(s["n_prompts"], s["n_tokens"]),
            )  # fmt: skip
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    if job.writes_rows:
        write_summary(out, task, len(shards))
    if activations is not None:
        write_index(out / STORE_FOLDER, len(shards), hook_names=activations, positions=activation_positions)
    return DatasetResult(out, json.loads((out / MANIFEST_FILE).read_text()), len(shards), len(shards) - len(todo),
                         stats, seconds)  # fmt: skip


def _describe_checkpoint(spec) -> tuple[Any, Any, list[str]]:
    """(config, tokenizer, hook names) of a checkpoint, without reading its weights: the driver of a Ray run
    tokenizes (to sort prompts by length) and checks names, while the workers load the model."""
    from ..io.checkpoint import Checkpoint
    from ..model.llama import HookedLlama
    from ..tokenizer.load import as_tokenizer, load_tokenizer
    from ..validate import check_layers

    ckpt = Checkpoint(spec.path)
    tokenizer = spec.load_kwargs.get("tokenizer")
    if tokenizer is None:
        tokenizer = None if ckpt.tokenizer_path is None else load_tokenizer(ckpt.tokenizer_path)
    elif isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    else:
        tokenizer = as_tokenizer(tokenizer)
    with torch.device("meta"):  # for its hook names only: no weights
        skeleton = HookedLlama(ckpt.config, layers=check_layers(spec.load_kwargs.get("layers"), ckpt.config.n_layers))
    return ckpt.config, tokenizer, skeleton.hook_names


def _load_info(load_kwargs: dict[str, Any]) -> dict[str, Any]:
    info = {k: (list(v) if k == "layers" and v is not None else v) for k, v in load_kwargs.items() if k != "tokenizer"}
    if "tokenizer" in load_kwargs:
        info["tokenizer"] = _describe_tokenizer(load_kwargs["tokenizer"])
    return _jsonable(info)


class _ProgressBar:
    """tqdm over prompts (its rate is prompts/s), with tokens/s beside it."""

    def __init__(self, total: int, done: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=done, unit="prompt", disable=not enabled, smoothing=0.1)
        self.tokens, self.start = 0, time.perf_counter()

    def update(self, n_prompts: int, n_tokens: int) -> None:
        self.tokens += n_tokens
        self.bar.update(n_prompts)
        elapsed = time.perf_counter() - self.start
        if elapsed > 0:
            self.bar.set_postfix_str(f"{self.tokens / elapsed:.0f} tokens/s", refresh=False)

    def close(self) -> None:
        self.bar.close()
