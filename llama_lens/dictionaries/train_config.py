"""How a sparse dictionary is trained: `TrainDictionaryConfig`, checked field by field when it is made.

Three kinds, each with the recipe of the package that made it popular:

    architecture="topk", no hook_out            TopK SAE (eai-sparsify's recipe): FVU loss, decoder rows kept at
                                                unit norm, Signum (sign of the gradient) under a schedule-free
                                                average, lr 5e-3 / sqrt(d_sae / 2**14)
    architecture="topk", hook_out="blocks.{i}.hook_mlp_out", hook_in="blocks.{i}.mlp.hook_in"
                                                TopK transcoder (sparsify's transcode=True): the same, the decoder
                                                starting at zero and the encoder bias centring the input
    architecture="standard" (hook_out optional) ReLU SAE (or transcoder) with an L1 penalty on the activations
                                                weighted by the decoder rows' norms (SAELens 6's "standard"
                                                recipe): mean squared error summed over d_model, Adam, lr 3e-4
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import ArgumentError, ArgumentTypeError, did_you_mean
from ..validate import check_option_names
from .sites import our_hook

ARCHITECTURES = ("topk", "standard")
# Settings that change how a run goes but not what it computes: a resumed run may change them.
RUN_ONLY = ("progress", "threads", "checkpoint_every")


@dataclass(frozen=True, kw_only=True)
class TrainDictionaryConfig:
    """What to train and how.

    Attributes:
        hook_in: the hook point the dictionary reads ("blocks.6.hook_resid_post", "blocks.15.mlp.hook_in").
        hook_out: the hook point it reconstructs; None (the default) for an SAE (hook_in itself), another hook
            for a transcoder (for the MLP: hook_in "blocks.{i}.mlp.hook_in", hook_out "blocks.{i}.hook_mlp_out").
        architecture: "topk" or "standard" (ReLU with an L1 penalty).
        d_sae: number of latents (features).
        k: active latents per token (topk).
        l1_coefficient: weight of the L1 penalty (standard).
        batch_tokens: tokens per optimiser step.
        max_tokens: tokens to train on (rounded down to whole steps); None: the store once through. More tokens
            than the store holds cycle through it again.
        lr: learning rate; None picks the recipe's (see the module docstring).
        momentum: the schedule-free average's momentum (topk; sparsify's 0.95).
        auxk_alpha: weight of the AuxK loss that teaches dead latents to predict the residual (topk; 0: off, as in
            sparsify's default). Like sparsify, it trains the decoder only.
        dead_tokens: a latent that has not fired for this many tokens counts as dead (for AuxK and `info`).
        shuffle: draw each step's tokens at random from a buffer of `buffer_tokens` (False: in stored order).
        buffer_tokens: tokens per shuffle buffer (rounded to whole steps); bounds the memory of reading the store.
        seed: the initial weights and the shuffle order.
        checkpoint_every: steps between checkpoints (a killed run resumes from the last one).
        threads: torch threads while training (None: every core this process may use).
        progress: show a tqdm bar with the running FVU.

    Raises:
        ArgumentError: a field out of range or an unknown architecture or hook, named with what it accepts.
    """

    hook_in: str
    hook_out: str | None = None
    architecture: str = "topk"
    d_sae: int = 4096
    k: int = 32
    l1_coefficient: float = 1.0
    batch_tokens: int = 4096
    max_tokens: int | None = None
    lr: float | None = None
    momentum: float = 0.95
    auxk_alpha: float = 0.0
    dead_tokens: int = 10_000_000
    shuffle: bool = True
    buffer_tokens: int = 65536
    seed: int = 0
    checkpoint_every: int = 100
    threads: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ArgumentError(
                f"architecture {self.architecture!r} is not one llama_lens trains; choose from {list(ARCHITECTURES)}"
                f"{did_you_mean(self.architecture, ARCHITECTURES)}"
            )
        for name in ("hook_in", "hook_out"):
            value = getattr(self, name)
            if value is None and name == "hook_out":
                continue
            if not isinstance(value, str):
                raise ArgumentTypeError(f"{name} must be a hook name (str), got {type(value).__name__}")
            if our_hook(value, where=f"TrainDictionaryConfig.{name}") != value:
                raise ArgumentError(
                    f"{name} {value!r} is another name for {our_hook(value, where=name)!r}; pass that name"
                )
        for name in ("d_sae", "k", "batch_tokens", "buffer_tokens", "checkpoint_every", "dead_tokens"):
            _count(name, getattr(self, name))
        if self.max_tokens is not None:
            _count("max_tokens", self.max_tokens)
            if self.max_tokens < self.batch_tokens:
                raise ArgumentError(
                    f"max_tokens={self.max_tokens} is less than one step of batch_tokens={self.batch_tokens}"
                )
        if self.threads is not None:
            _count("threads", self.threads)
        if self.k > self.d_sae:
            raise ArgumentError(f"k={self.k} is more than d_sae={self.d_sae} latents; k must be at most d_sae")
        if self.lr is not None:
            _number("lr", self.lr)
        _number("l1_coefficient", self.l1_coefficient, zero=True)
        _number("auxk_alpha", self.auxk_alpha, zero=True)
        if not isinstance(self.momentum, (int, float)) or isinstance(self.momentum, bool) or not 0 < self.momentum < 1:
            raise ArgumentError(f"momentum must lie in (0, 1), got {self.momentum!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ArgumentTypeError(f"seed must be an int, got {self.seed!r}")

    @property
    def is_transcoder(self) -> bool:
        return self.hook_out is not None and self.hook_out != self.hook_in

    @property
    def target_hook(self) -> str:
        """The hook the dictionary reconstructs."""
        return self.hook_out or self.hook_in

    def learning_rate(self) -> float:
        """`lr`, or the recipe's: sparsify's 5e-3 / sqrt(d_sae / 2**14) for topk, SAELens' 3e-4 for standard."""
        if self.lr is not None:
            return float(self.lr)
        return 5e-3 / (self.d_sae / 2**14) ** 0.5 if self.architecture == "topk" else 3e-4

    def shuffle_buffer(self) -> int:
        """Tokens per shuffle buffer, in whole steps."""
        return max(1, self.buffer_tokens // self.batch_tokens) * self.batch_tokens

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> TrainDictionaryConfig:
        """A config from keyword options, naming any option it does not have (with the nearest that it has)."""
        check_option_names(options, cls, "training")
        return cls(**options)

    def info(self) -> dict[str, Any]:
        """The settings as JSON values, with the learning rate the run uses."""
        return asdict(self) | {"lr": self.learning_rate()}

    def resolved_threads(self) -> int:
        if self.threads is not None:
            return self.threads
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            return os.cpu_count() or 1


def _count(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ArgumentError(f"{name} must be an integer >= 1, got {value!r}")


def _number(name: str, value: Any, *, zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    if not ok or not (value >= 0 if zero else value > 0) or value == float("inf"):
        raise ArgumentError(f"{name} must be a finite number {'>= 0' if zero else '> 0'}, got {value!r}")
