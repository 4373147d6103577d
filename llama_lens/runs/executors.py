"""Where the dataset runner's shards are processed: in this process, or on Ray actors.

Both executors call `shards.process_shard` on the same shards (planned by the driver, the same whatever
the executor), so they write the same rows. A shard's files are written by whoever processes it, straight into
the run's folder: on a cluster that folder must be on a filesystem every node sees.

- `run_local`: one model in this process; torch uses the threads it is set to (`torch.set_num_threads`).
- `run_ray`: one Ray actor per worker, each loading the model from its path (a model object would have to be
  pickled to every actor, and a GPU model cannot be); shards go to whichever actor is free next.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..loading.load import load
from ..model.protocols import LanguageModel
from .prompts import Shard
from .shards import ShardJob, process_shard


@dataclass(frozen=True)
class ModelSpec:
    """How a worker loads the model: `ll.load(path, **load_kwargs)`."""

    path: str
    load_kwargs: dict[str, Any] = field(default_factory=dict)

    def load(self):
        return load(self.path, progress=False, **self.load_kwargs)


def run_local(
    model: LanguageModel,
    job: ShardJob,
    *,
    shards: Sequence[Shard],
    on_batch: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Processes the shards one after the other in this process."""
    return [process_shard(model, job, shard=shard, on_batch=on_batch) for shard in shards]


class ShardWorker:
    """A Ray actor (see `run_ray`): holds one model and processes the shards it is sent."""

    def __init__(self, spec: ModelSpec, job: ShardJob, *, num_threads: int | None) -> None:
        if num_threads:
            torch.set_num_threads(num_threads)
        self.model = spec.load()
        self.job = job

    def run(self, shard: Shard) -> dict[str, Any]:
        return process_shard(self.model, self.job, shard=shard) | {"worker": os.getpid()}


def import_ray():
    try:
        import ray
    except ImportError:
        raise ImportError(
            "executor='ray' needs Ray: pip install 'llama_lens[ray]' (or pip install ray), then rerun"
        ) from None
    return ray


def run_ray(
    spec: ModelSpec,
    job: ShardJob,
    *,
    shards: Sequence[Shard],
    num_workers: int | None = None,
    ray_address: str | None = None,
    num_cpus: float = 1,
    num_gpus: float = 0,
    on_shard: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Processes the shards on Ray actors, one model per actor.

    Args:
        spec: how each actor loads the model.
        job: what to compute and where to write it.
        shards: the shards to process (finished ones already left out).
        num_workers: actors to start; default as many as the cluster's CPUs (or GPUs, with `num_gpus`) allow at
            `num_cpus` (`num_gpus`) each, at most one per shard.
        ray_address: the cluster to connect to ("ray://host:10001", "auto", ...) when Ray is not initialized yet;
            None starts a local one (or joins the one RAY_ADDRESS names). This call disconnects at the end
            when it connected (which stops a local cluster it started); an existing connection is left open.
        num_cpus: CPUs per actor; each actor's torch uses that many threads.
        num_gpus: GPUs per actor (Ray sets each actor's CUDA_VISIBLE_DEVICES; load with device="cuda").
        on_shard: called with each finished shard's stats (a progress bar).

    Returns:
        Each shard's stats, in the order they finished.
    """
    ray = import_ray()
    started = False
    if not ray.is_initialized():
        # A cluster started here reports no usage statistics unless the user asked for them.
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(address=ray_address, log_to_driver=True)
        started = True
    actors = []
    try:
        if num_workers is None:
            resources = ray.cluster_resources()
            if num_gpus:
                num_workers = int(resources.get("GPU", 0) // num_gpus)
            else:
                num_workers = int(resources.get("CPU", 1) // num_cpus)
            num_workers = max(num_workers, 1)
        num_workers = max(1, min(num_workers, len(shards)))
        if not shards:
            return []
        actor_class = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(ShardWorker)
        threads = max(int(num_cpus), 1)
        actors = [actor_class.remote(spec, job, num_threads=threads) for _ in range(num_workers)]
        queue = list(reversed(shards))  # popped from the end: shards go out in order
        pending = {}
        for actor in actors:
            if queue:
                pending[actor.run.remote(queue.pop())] = actor
        finished = []
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            actor = pending.pop(ref)
            stats = _get(ray, ref)
            finished.append(stats)
            if on_shard is not None:
                on_shard(stats)
            if queue:
                pending[actor.run.remote(queue.pop())] = actor
        return finished
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()


def _get(ray, ref) -> Any:
    """ray.get, raising the worker's own exception (a ValueError naming the culprit, say), not Ray's wrapper."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, Exception):
            raise cause from None
        raise
