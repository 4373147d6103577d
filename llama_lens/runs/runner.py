"""The lens (and attribution, and an activation store) over a dataset of prompts, written to disk as it goes.

    run = ll.lens_dataset("path/to/checkpoint", "questions.jsonl", out="runs/lens", target_column="answer")
    run.to_frame()     # one row per prompt × read-out × position (× target), from out/shards/*.parquet
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

The pieces: `RunOptions` (how to run, `options.py`), prompt records, positions and the shard plan
(`prompts.py`), the manifest (`manifest.py`), what each batch computes (`tasks.py`), one shard's processing
(`shards.py`), the executors (`executors.py`) and what a run returns (`result.py`). This module holds the entry
points and the driver that joins them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..data.store import STORE_FOLDER, ActivationDataset, check_hook_names, write_index
from ..data.texts import read_prompts
from ..errors import ArgumentError, ArgumentTypeError
from ..io.checkpoint import Checkpoint
from ..lens.logit import READOUTS
from ..model.llama import HookedLlama
from ..model.protocols import LanguageModel
from ..tokenizer.load import as_tokenizer, load_tokenizer
from ..validate import check_count, check_layers, resolve_dtype
from .executors import ModelSpec, run_local, run_ray
from .manifest import (
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    check_manifest,
    describe_tokenizer,
    load_info,
    read_manifest,
    remove_partial_files,
)
from .options import EXECUTORS, RunOptions
from .prompts import (
    Positions,
    count_tokens,
    drop_prompts_without_positions,
    make_records,
    parse_positions,
    plan_shards,
)
from .result import SUMMARY_FILE, DatasetResult, write_summary
from .shards import ShardJob
from .tasks import AttributionTask, ForwardTask, LensTask

# Names that lived here before the runner was split, for code that imports them from this module.
__all__ = [
    "EXECUTORS", "MANIFEST_FILE", "SUMMARY_FILE", "DatasetResult", "RunOptions", "attribution_dataset",
    "lens_dataset", "make_records", "plan_shards", "read_prompts", "run_dataset", "store_activations",
]  # fmt: skip


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
    options: RunOptions | None = None,
    **runner: Any,
) -> DatasetResult:
    """The logit lens over many prompts, written to `out` as Parquet shards plus a per-read-out summary.

    Args:
        path_or_model: a checkpoint path (loaded with `ll.load(path, **load_kwargs)`; needed for Ray), or a
            loaded HookedLlama (local executor only).
        prompts: a list of texts, or a .txt / .jsonl / .parquet file (one prompt per line; see `ll.read_prompts`).
        out: the folder to write (created); a rerun into it resumes the run (same parameters only).
        target: one target for every prompt (a token's text, e.g. " Paris", or id), or a list with one per prompt
            (each a target or a list of them).
        column: the JSONL field / Parquet column holding the prompts.
        target_column: the JSONL field / Parquet column holding each prompt's target(s).
        readout, top_k, layers: as in `ll.logit_lens`.
        positions: which token positions of each prompt to read out: "last" (the last real token, where the next
            token is predicted), "all", an int or a list of ints (0 = the prompt's first token, BOS included;
            negative counts from its end). Positions past a prompt's length are left out for that prompt; a
            prompt with none of them is left out of the run (no rows, no stored activations) and listed in
            `result.prompts_without_positions`.
        activations: hook names to store per token for probes or SAEs (`llama_lens.data.store`), or None.
        activation_positions: which positions to store ("all" by default; as `positions`).
        activation_dtype: the stored dtype (default the model's).
        options: how to run: batch and shard sizes, executor, workers, Ray resources, load_kwargs, progress
            (`ll.RunOptions`; the defaults without it).
        **runner: the same settings as keywords (`batch_size=8, executor="ray", progress=False`), as before
            `RunOptions` existed; each overrides its field of `options`.

    Returns:
        A DatasetResult: `.to_frame()` holds one row per prompt × read-out × position (× target) with columns
        prompt (its index in the input), label, layer, readout, position, token, top_token, top_id, top_prob,
        entropy, kl_to_final, top_ids, top_probs, top_tokens (lists of top_k), and with targets target,
        target_id, target_prob, target_logit, target_rank. `.summary()`: their means per read-out.

    Raises:
        ManifestMismatchError (a ValueError): `out` holds a run with other parameters.
        ArgumentError (a ValueError): bad arguments, a prompt with no tokens, a target that is not one token.
        ArgumentTypeError (a TypeError): a keyword that is neither an argument nor a run option.
    """
    kinds = (readout,) if isinstance(readout, str) else tuple(readout)
    unknown = [k for k in kinds if k not in READOUTS]
    if unknown or not kinds:
        raise ArgumentError(f"unknown read-out {unknown or list(kinds)!r}; choose from {list(READOUTS)} (or a list)")
    top_k = check_count("top_k", top_k, 1)
    layers = None if layers is None else tuple(sorted({int(i) for i in layers}))
    task = LensTask(kinds, parse_positions(positions), top_k, layers)
    return run_dataset(
        path_or_model, prompts, task=task, out=out, target=target, column=column, target_column=target_column,
        activations=activations, activation_positions=activation_positions, activation_dtype=activation_dtype,
        options=options, **runner,
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
    options: RunOptions | None = None,
    **runner: Any,
) -> DatasetResult:
    """Direct logit attribution (`ll.direct_logit_attribution`) over many prompts, written as `lens_dataset` does.

    Args:
        path_or_model, prompts, out, target, target_column, positions, options: as in `lens_dataset`; a target is
            required.
        heads: also write each attention component's per-head shares (column head_contributions, [n_heads]).
        **runner: column, activations, activation_positions, activation_dtype (as in `lens_dataset`), and the
            run options as keywords (`RunOptions`'s fields).

    Returns:
        A DatasetResult: one row per prompt × component × position × target with columns prompt, label, layer,
        component ("embed" / "attn" / "mlp"), position, token, target, target_id, contribution, final_logit
        (and head_contributions); `.summary()`: mean and mean absolute contribution per component.
    """
    if target is None and target_column is None:
        raise ArgumentError("attribution_dataset needs targets: target=' Paris' (or one per prompt) or target_column=")
    task = AttributionTask(parse_positions(positions), bool(heads))
    return run_dataset(
        path_or_model, prompts, task=task, out=out, target=target, target_column=target_column, options=options,
        **runner,
    )  # fmt: skip


def store_activations(
    path_or_model: str | os.PathLike | HookedLlama,
    prompts: str | os.PathLike | Sequence[str],
    *legacy: Sequence[str],
    hook_names: str | Sequence[str] | None = None,
    out: str | os.PathLike,
    positions: Positions = "all",
    dtype: torch.dtype | str | None = None,
    options: RunOptions | None = None,
    **runner: Any,
) -> ActivationDataset:
    """Runs the model over the prompts and stores the chosen hook points per token, nothing else.

    The forward pass stops after the last layer the hooks need. See `llama_lens.data.store` for the files.

    Args:
        path_or_model, prompts, out, options: as in `lens_dataset`.
        hook_names: e.g. ["blocks.3.hook_resid_post"] (the attention pattern and scores are refused). Passing it
            third by position still works for one release, with a DeprecationWarning.
        positions: which positions of each prompt to store ("all", "last", ints; as in `lens_dataset`).
        dtype: the stored dtype (default the model's).
        **runner: column, and the run options as keywords (`RunOptions`'s fields).

    Returns:
        The store as an ActivationDataset (one item per token; `ActivationDataset(out, unit="prompt")` for one per
        prompt).
    """
    if legacy:
        if len(legacy) > 1 or hook_names is not None:
            raise ArgumentTypeError("store_activations takes hook_names= once, by keyword")
        warnings.warn(
            "store_activations(model, prompts, hook_names) is deprecated and will be removed in the next release; "
            "pass hook_names= by keyword",
            DeprecationWarning,
            stacklevel=2,
        )
        hook_names = legacy[0]
    if hook_names is None:
        raise ArgumentTypeError("store_activations needs hook_names=, e.g. ['blocks.3.hook_resid_post']")
    names = [hook_names] if isinstance(hook_names, str) else list(hook_names)
    needs_logits = any(not name.startswith("blocks.") and name != "hook_embed" for name in names)
    last = max((int(name.split(".")[1]) for name in names if name.startswith("blocks.")), default=-1)
    task = ForwardTask(None if needs_logits else last + 1)
    result = run_dataset(
        path_or_model, prompts, task=task, out=out, activations=names, activation_positions=positions,
        activation_dtype=dtype, options=options, **runner,
    )  # fmt: skip
    return result.activations()


def run_dataset(
    path_or_model: str | os.PathLike | HookedLlama,
    prompts: str | os.PathLike | Sequence[str],
    *,
    task: Any,
    out: str | os.PathLike,
    target: Any = None,
    column: str = "text",
    target_column: str | None = None,
    activations: Sequence[str] | None = None,
    activation_positions: Positions = "all",
    activation_dtype: torch.dtype | str | None = None,
    options: RunOptions | None = None,
    **runner: Any,
) -> DatasetResult:
    """The runner behind `lens_dataset`, `attribution_dataset` and `store_activations` (arguments as there;
    `task` is a `LensTask`, `AttributionTask` or `ForwardTask`)."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise ImportError(
            "the dataset runner writes Parquet with pyarrow: pip install pyarrow (or 'llama_lens[datasets]')"
        ) from None

    options = RunOptions.merged(options, runner)
    out = Path(out)
    activation_positions = parse_positions(activation_positions)
    activation_dtype = resolve_dtype(activation_dtype)
    texts, column_targets = read_prompts(prompts, column=column, target_column=target_column)
    records = make_records(texts, target, targets=column_targets)
    source = _ModelSource.of(path_or_model, options)
    if activations is not None:
        activations = tuple(check_hook_names(activations, source.hook_names))
    n_tokens = count_tokens(source.tokenizer, records, d_vocab=source.cfg.d_vocab)
    fingerprint = hashlib.sha256(json.dumps([(r.text, r.target) for r in records]).encode()).hexdigest()
    records, n_tokens, without = drop_prompts_without_positions(records, n_tokens, getattr(task, "positions", None))
    shards = plan_shards(records, n_tokens, shard_size=options.shard_size)

    stored = None
    if activations is not None:
        dtype_name = None if activation_dtype is None else str(activation_dtype)
        stored = {"hook_names": list(activations), "positions": activation_positions, "dtype": dtype_name}
    manifest = {
        "format": MANIFEST_FORMAT,
        "task": task.kind,
        "task_params": task.params(),
        "model": source.info,
        "prompts": {"count": len(records) + len(without), "sha256": fingerprint, "without_positions": without},
        "batch_size": options.batch_size,
        "shard_size": options.shard_size,
        "activations": stored,
    }
    check_manifest(out, manifest)
    remove_partial_files(out)
    job = ShardJob(
        out=str(out.resolve()),
        task=task,
        batch_size=options.batch_size,
        activations=activations,
        activation_positions=activation_positions,
        activation_dtype=None if activation_dtype is None else str(activation_dtype).removeprefix("torch."),
    )
    todo = [shard for shard in shards if not job.is_done(shard.index)]
    done = len(records) - sum(len(shard.records) for shard in todo)
    start = time.perf_counter()
    stats = _execute(source, job, todo, options=options, progress=(len(records), done))
    seconds = time.perf_counter() - start
    if job.writes_rows:
        write_summary(out, task, n_shards=len(shards))
    if activations is not None:
        write_index(out / STORE_FOLDER, len(shards), hook_names=activations, positions=activation_positions)
    return DatasetResult(out, read_manifest(out / MANIFEST_FILE), len(shards), len(shards) - len(todo),
                         stats, seconds)  # fmt: skip


@dataclasses.dataclass
class _ModelSource:
    """The model a run uses, as the driver sees it: a loaded model (local runs) or how to load one (`spec`),
    with the config, tokenizer and hook names the driver needs to plan, and what the manifest records."""

    model: LanguageModel | None
    spec: Any
    cfg: Any
    tokenizer: Any
    hook_names: list[str]
    info: dict[str, Any]

    @classmethod
    def of(cls, path_or_model: Any, options: RunOptions) -> _ModelSource:
        if isinstance(path_or_model, (str, os.PathLike)):
            load_kwargs = dict(options.load_kwargs or {})
            if isinstance(load_kwargs.get("tokenizer"), (str, os.PathLike)):
                # Workers run elsewhere (another folder, another node): paths travel absolute.
                load_kwargs["tokenizer"] = str(Path(load_kwargs["tokenizer"]).resolve())
            spec = ModelSpec(str(Path(path_or_model).resolve()), load_kwargs)
            cfg, tokenizer, hook_names = _describe_checkpoint(spec)
            info = {"path": spec.path, "config": dataclasses.asdict(cfg), "load": load_info(spec.load_kwargs)}
            source = cls(None, spec, cfg, tokenizer, hook_names, info)
        else:
            model = path_or_model
            if not hasattr(model, "cfg") or not hasattr(model, "hook_names"):
                raise ArgumentError(
                    f"path_or_model must be a checkpoint path or a HookedLlama, got {type(model).__name__}"
                )
            if options.executor == "ray":
                raise ArgumentError(
                    "executor='ray' loads the model in every worker from its checkpoint: pass the checkpoint's path "
                    "(and load_kwargs=, e.g. {'dtype': 'bfloat16'}) instead of a loaded model"
                )
            if options.load_kwargs:
                raise ArgumentError("load_kwargs are for a checkpoint path; this model is loaded already")
            info = {
                "object": type(model).__name__,
                "config": dataclasses.asdict(model.cfg),
                "dtype": str(model.unembed.weight.dtype),
                "layers": list(model.layer_indices),
                "tokenizer": describe_tokenizer(model.tokenizer),
            }
            source = cls(model, None, model.cfg, model.tokenizer, model.hook_names, info)
        if source.tokenizer is None:
            raise ArgumentError(
                "the dataset runner tokenizes texts, and this checkpoint has no tokenizer: pass tokenizer="
            )
        return source


def _execute(source: _ModelSource, job: ShardJob, todo: list, *, options: RunOptions, progress: tuple[int, int]):
    """Processes the shards not yet done with the chosen executor, behind a progress bar; their stats."""
    if not todo:
        return []
    bar = _ProgressBar(*progress, enabled=options.progress)
    try:
        if options.executor == "local":
            model = source.model if source.model is not None else source.spec.load()
            return run_local(model, job, shards=todo, on_batch=bar.update)
        return run_ray(
            source.spec, job, shards=todo, num_workers=options.num_workers, ray_address=options.ray_address,
            num_cpus=options.num_cpus_per_worker, num_gpus=options.num_gpus_per_worker,
            on_shard=lambda s: bar.update(s["n_prompts"], s["n_tokens"]),
        )  # fmt: skip
    finally:
        bar.close()


def _describe_checkpoint(spec) -> tuple[Any, Any, list[str]]:
    """(config, tokenizer, hook names) of a checkpoint, without reading its weights: the driver of a Ray run
    tokenizes (to sort prompts by length) and checks names, while the workers load the model."""
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


class _ProgressBar:
    """tqdm over prompts (its rate is prompts/s), with tokens/s beside it."""

    def __init__(self, total: int, done: int, *, enabled: bool) -> None:
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
