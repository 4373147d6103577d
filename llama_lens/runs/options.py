"""How a dataset run is carried out, as one value: `RunOptions`.

`ll.lens_dataset`, `ll.attribution_dataset`, `ll.store_activations` and `run_dataset` take `options=RunOptions(...)`
and, as before, the same settings as keywords (`batch_size=8, progress=False`); keywords are folded into the
options (`RunOptions.merged`), overriding a field of `options=` when both are given. The options say how to run,
not what to compute: a run's results depend on none of them but `batch_size` and `shard_size` (padding and the
unit of resume), which the manifest records.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import ArgumentError, ArgumentTypeError
from ..validate import check_count

EXECUTORS = ("local", "ray")


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How a dataset run is carried out, checked when made.

    Attributes:
        batch_size: prompts per forward pass (batches are of similar length, left-padded).
        shard_size: prompts per shard, the unit of work and of resume.
        executor: "local" (this process) or "ray" (one actor per worker, each loading the model from its path).
        num_workers: Ray actors (default: as many as the cluster's CPUs or GPUs allow); "local" runs one.
        ray_address: the Ray cluster to join when Ray is not initialized yet (None: start a local one).
        num_cpus_per_worker, num_gpus_per_worker: Ray resources per actor (torch threads = CPUs); with GPUs pass
            load_kwargs={"device": "cuda"}.
        load_kwargs: arguments of `ll.load` (dtype, device, tokenizer, stream, layers) for a checkpoint path.
        progress: show a progress bar (prompts/s, tokens/s).

    Raises:
        ArgumentError (a ValueError): a value out of range, an unknown executor, workers for the local executor.
    """

    batch_size: int = 16
    shard_size: int = 128
    executor: str = "local"
    num_workers: int | None = None
    ray_address: str | None = None
    num_cpus_per_worker: float = 1
    num_gpus_per_worker: float = 0
    load_kwargs: dict[str, Any] | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise ArgumentError(f"executor must be one of {list(EXECUTORS)}, got {self.executor!r}")
        for name in ("batch_size", "shard_size", "num_workers"):
            if name != "num_workers" or self.num_workers is not None:  # normalised: a numpy int becomes an int
                object.__setattr__(self, name, check_count(name, getattr(self, name), 1))
        if self.executor == "local" and self.num_workers not in (None, 1):
            raise ArgumentError(
                f"executor='local' runs one model in this process; num_workers={self.num_workers} needs "
                "executor='ray' (for more threads here, torch.set_num_threads)"
            )
        for name in ("num_cpus_per_worker", "num_gpus_per_worker"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ArgumentError(f"{name} must be a number >= 0, got {value!r}")
        if self.load_kwargs is not None and not isinstance(self.load_kwargs, dict):
            raise ArgumentError(f"load_kwargs must be a dict of ll.load arguments, got {self.load_kwargs!r}")

    @classmethod
    def merged(cls, options: RunOptions | None, runner: dict[str, Any]) -> RunOptions:
        """`options` (or the defaults) with the keyword settings `runner` put in (they win over `options`).

        Raises:
            ArgumentTypeError (a TypeError): a keyword that is no option, as Python's own message for a call.
        """
        if options is not None and not isinstance(options, RunOptions):
            raise ArgumentTypeError(f"options must be a RunOptions, got {type(options).__name__}")
        fields = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(runner) - fields)
        if unknown:
            raise ArgumentTypeError(f"unexpected keyword argument {unknown[0]!r}; the run options are {sorted(fields)}")
        return dataclasses.replace(options or cls(), **runner)
