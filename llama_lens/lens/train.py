"""Training a tuned lens: the translators learn to make each layer's read-out match the model's output.

The loss at a position is KL(final || read-out): the model's own next-token distribution there against the
translated read-out of one residual stream (the package's default, shift 0: the same position, not the next
token). Summed over translators and averaged over the step's tokens, it is minimised with the recipe of the
tuned-lens package (see tuned.py): SGD, Nesterov momentum 0.9, lr * (1 - momentum), weight decay 1e-3,
gradients clipped to norm 1, linear decay to zero.

How a step runs, and why memory stays bounded on a streamed model (`ll.load(path, stream=True)`):
- the step's tokens are split into micro-batches of about `batch_tokens` tokens (rows of `seq_len` tokens);
- each micro-batch runs the model once, under no_grad, with hooks that keep every translated stream's
  residual [batch, pos, d_model] (detached: the model is frozen, and a streamed model's layers leave memory
  after they run). One forward per micro-batch rather than one per layer, because every translator's
  target is the model's final output, known only at the end of the forward: caching one layer at a time
  would run the model (re-reading every streamed layer) once per translator;
- the residuals are then read out `chunk_size` positions at a time, each translator's chunk with its own
  backward pass, so the vocabulary-sized tensors are [chunk_size, d_vocab], never [tokens, d_vocab].
So the peak is about batch_tokens * (n_translators * d_model + d_vocab) floats for the micro-batch (its
residuals and the model's logits), plus a few [chunk_size, d_vocab] blocks, plus what the model itself needs
(two layers at a time when streamed): independent of the number of steps and of tokens_per_step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
from torch import nn

from ..data.texts import read_texts
from ..data.token_rows import token_rows
from ..errors import ArgumentError
from ..model.protocols import LanguageModel
from ..validate import check_option_names
from .readouts import DEFAULT_READOUT, label_readout, readout_kinds, stream_hook


class Translating(Protocol):
    """What the trainer needs of a lens (`ll.TunedLens` has it): its translators and where to note results."""

    translators: nn.ModuleDict
    info: dict[str, Any]
    losses: list[float]

    @property
    def labels(self) -> list[str]: ...

    def parameters(self) -> Iterator[nn.Parameter]: ...

    def to(self, device: str | torch.device) -> Any: ...

    def translate(self, resid: torch.Tensor, layer: int, *, readout: str = "resid_post") -> torch.Tensor: ...


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How a tuned lens is trained; the defaults are the tuned-lens package's recipe (SGD for a CPU budget).

    Attributes:
        max_steps: optimiser steps; the learning rate decays linearly to zero at the last.
        readout: which residual streams get translators ("embed", "resid_post" by default; add "resid_mid").
        tokens_per_step: tokens per optimiser step (rounded to whole rows of `seq_len`). The package uses 2**18
            on GPUs; on a CPU, fewer tokens and more steps go further in the same time.
        seq_len: tokens per row (each row starts with BOS).
        batch_tokens: tokens per forward pass (rounded down to whole rows, at least one): bounds memory.
        lr: learning rate before the (1 - momentum) factor; 1.0 is the package's default for SGD.
        momentum: Nesterov momentum, in [0, 1).
        weight_decay: SGD weight decay (pulls the translators towards the identity).
        warmup_steps: linear warm-up steps (0 for SGD, as in the package).
        max_grad_norm: gradients are clipped to this total norm.
        chunk_size: positions read out at once in the loss ([chunk_size, d_vocab] blocks).
        column: the Parquet column when the texts are a Parquet file.
        seed: seed of the order in which rows are drawn (the texts are cycled through again if they run out).
        shuffle: draw rows in a random order (False: in the order of the texts).
        progress: show a tqdm bar with the running loss (mean KL per translator and token, in nats).

    Raises:
        ArgumentError: a setting out of range, named with what it accepts.
    """

    max_steps: int = 250
    readout: str | Sequence[str] = DEFAULT_READOUT
    tokens_per_step: int = 4096
    seq_len: int = 256
    batch_tokens: int = 1024
    lr: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 1e-3
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    chunk_size: int = 256
    column: str = "text"
    seed: int = 0
    shuffle: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        readout_kinds(self.readout)
        for name in ("max_steps", "tokens_per_step", "batch_tokens", "chunk_size"):
            _positive(name, getattr(self, name))
        _positive("warmup_steps", self.warmup_steps, zero=True)
        _positive("lr", self.lr, integer=False)
        _positive("weight_decay", self.weight_decay, integer=False, zero=True)
        _positive("max_grad_norm", self.max_grad_norm, integer=False)
        if not isinstance(self.seq_len, int) or isinstance(self.seq_len, bool) or self.seq_len < 2:
            raise ArgumentError(f"seq_len must be an integer >= 2, got {self.seq_len!r}")
        if not isinstance(self.momentum, (int, float)) or not 0 <= self.momentum < 1:
            raise ArgumentError(f"momentum must lie in [0, 1), got {self.momentum!r}")

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> TrainConfig:
        """A config from keyword options, naming any option it does not have (with the nearest that it has)."""
        check_option_names(options, cls, "training")
        return cls(**options)

    def info(self) -> dict[str, Any]:
        """The settings as JSON-serialisable values, for `lens.info`."""
        values = asdict(self)
        values["readout"] = readout_kinds(self.readout)
        return values


@contextlib.contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Sets requires_grad False on the modules' parameters for the block, restoring each flag after, so that a
    backward pass through them leaves no gradient on the model."""
    params = [p for module in modules for p in module.parameters()]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def linear_decay(step: int, *, max_steps: int, warmup_steps: int) -> float:
    """The learning-rate factor at `step`: linear warm-up from 0 over `warmup_steps`, then linear decay to 0 at
    `max_steps` (transformers' get_linear_schedule_with_warmup, which the package uses)."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    return max(0.0, (max_steps - step) / max(1, max_steps - warmup_steps))


def kl_sums(
    lens: Translating,
    model: LanguageModel,
    *,
    resid: dict[str, torch.Tensor],
    final_logits: torch.Tensor,
    chunk_size: int,
    scale: float | None = None,
) -> dict[str, float]:
    """Sum over positions of KL(final || translated read-out), per translator; with `scale`, also backpropagates
    scale * that sum into the translators' gradients.

    Args:
        resid: translator label -> [n_pos, d_model] its residual stream (detached).
        final_logits: [n_pos, d_vocab] the model's logits at the same positions.
        chunk_size: positions per read-out (the [chunk_size, d_vocab] blocks bound the memory).
        scale: the factor of the loss whose gradient is accumulated (1 / tokens in the step), or None for no
            backward (evaluation).

    Returns:
        label -> the summed KL in nats.
    """
    weight = model.unembed.weight.detach()  # [d_vocab, d_model]; the model is not trained
    sums = dict.fromkeys(resid, 0.0)
    n_pos = final_logits.shape[0]
    grad = torch.enable_grad() if scale is not None else torch.no_grad()
    with frozen(model.ln_final), grad:
        for start in range(0, n_pos, chunk_size):
            rows = slice(start, min(start + chunk_size, n_pos))
            final_logprobs = final_logits[rows].float().log_softmax(dim=-1)  # [chunk, d_vocab]
            final_probs = final_logprobs.exp()
            neg_entropy = (final_probs * final_logprobs).sum()  # sum_v p log p, summed over the chunk
            for label, stream in resid.items():
                layer, kind = label_readout(label)
                translated = lens.translate(stream[rows].float(), layer, readout=kind)
                logits = torch.nn.functional.linear(model.ln_final(translated).to(weight.dtype), weight).float()
                # KL(p || q) = sum_v p log p - sum_v p logits_q + logsumexp(logits_q), summed over the chunk
                kl = neg_entropy - (final_probs * logits).sum() + logits.logsumexp(dim=-1).sum()
                if scale is not None:
                    (kl * scale).backward()
                sums[label] += float(kl.detach())
    return sums


def collect_streams(
    model: LanguageModel, tokens: torch.Tensor, *, labels: Sequence[str]
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One forward pass: each label's residual stream [batch * pos, d_model] (detached) and the model's logits
    [batch * pos, d_vocab]."""
    resid: dict[str, torch.Tensor] = {}
    hook_to_label = {stream_hook(label): label for label in labels}

    def keep(tensor: torch.Tensor, *, hook) -> None:
        resid[hook_to_label[hook.name]] = tensor.detach().flatten(0, 1)

    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=[(list(hook_to_label), keep)])
    return {label: resid[label] for label in labels}, logits.flatten(0, 1)


def _positive(name: str, value: Any, *, integer: bool = True, zero: bool = False) -> Any:
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not (value >= 0 if zero else value > 0) or value != value:
        kind = "an integer" if integer else "a number"
        raise ArgumentError(f"{name} must be {kind} {'>= 0' if zero else '> 0'}, got {value!r}")
    return value


def fit(lens: Translating, model: LanguageModel, *, texts: Any, config: TrainConfig) -> Translating:
    """Trains `lens` (in place) on `model`'s own predictions over `texts`; `TunedLens.train` is the entry point.

    Args:
        lens: the lens to train, made for `model` (an identity lens to start afresh).
        model: a HookedLlama holding every layer (streamed or not); it is not changed.
        texts: a list of strings, a text file (paragraphs) or a Parquet file (its `config.column`), see
            `read_texts`; or token ids [n_rows, seq_len] (a LongTensor, e.g. from `token_rows`), used as they are.
        config: the settings.

    Returns:
        The lens; `lens.losses` holds each step's loss and `lens.info` the settings (`config.info()`, plus
        what the run found: steps, tokens per step, rows available, the model's shape).

    Raises:
        ArgumentError: for a partial model, a model without tokenizer or too little text.
    """
    from tqdm.auto import tqdm

    cfg = model.cfg
    if list(model.layer_indices) != list(range(cfg.n_layers)):
        raise ArgumentError(
            f"training a tuned lens needs every layer's output (the final distribution is the target); this model "
            f"holds layers {model.layer_indices[:1]}..{model.layer_indices[-1:]} of {cfg.n_layers}: load it whole "
            "(stream=True keeps memory low)"
        )
    if model.tokenizer is None and not isinstance(texts, torch.Tensor):
        raise ArgumentError("this model has no tokenizer, which training needs to tokenize the texts")
    max_steps, seq_len, momentum = config.max_steps, config.seq_len, config.momentum
    labels = lens.labels
    device = model.embed.weight.device
    lens.to(device)

    rows_per_step = max(1, round(config.tokens_per_step / seq_len))
    rows_per_batch = max(1, min(rows_per_step, config.batch_tokens // seq_len))
    if isinstance(texts, torch.Tensor):
        if texts.dim() != 2 or texts.dtype != torch.long or texts.shape[1] != seq_len:
            raise ArgumentError(
                f"token rows must be a LongTensor [n_rows, seq_len={seq_len}], got {texts.dtype} {tuple(texts.shape)}"
            )
        rows = texts
    else:
        rows = token_rows(
            model.tokenizer,
            read_texts(texts, column=config.column),
            seq_len=seq_len,
            max_rows=rows_per_step * max_steps,
        )
    generator = torch.Generator().manual_seed(config.seed)
    order: list[int] = []

    def next_rows(n: int) -> torch.Tensor:
        while len(order) < n:  # cycle through the rows again, in a new order, when they run out
            order.extend(
                torch.randperm(len(rows), generator=generator).tolist() if config.shuffle else range(len(rows))
            )
        picked = order[:n]
        del order[:n]
        return rows[picked]

    params = list(lens.parameters())
    optimizer = torch.optim.SGD(
        params,
        lr=config.lr * (1 - momentum),  # PyTorch's momentum scales the step by 1 / (1 - momentum): undone here
        momentum=momentum,
        nesterov=momentum > 0,
        weight_decay=config.weight_decay,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: linear_decay(step, max_steps=max_steps, warmup_steps=config.warmup_steps)
    )
    n_step_tokens = rows_per_step * seq_len
    bar = tqdm(range(max_steps), desc="tuned lens", disable=not config.progress, unit="step")
    lens.translators.requires_grad_(True)
    try:
        for _ in bar:
            optimizer.zero_grad(set_to_none=False)
            step_rows = next_rows(rows_per_step)
            totals = dict.fromkeys(labels, 0.0)
            for start in range(0, rows_per_step, rows_per_batch):
                tokens = step_rows[start : start + rows_per_batch].to(device)
                resid, final_logits = collect_streams(model, tokens, labels=labels)
                sums = kl_sums(
                    lens,
                    model,
                    resid=resid,
                    final_logits=final_logits,
                    chunk_size=config.chunk_size,
                    scale=1.0 / n_step_tokens,
                )
                del resid, final_logits
                for label, value in sums.items():
                    totals[label] += value
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            schedule.step()
            loss = sum(totals.values()) / n_step_tokens / len(labels)
            lens.losses.append(loss)
            bar.set_postfix(loss=f"{loss:.3f}")
    finally:
        lens.translators.requires_grad_(False)
        bar.close()
    lens.info.update(
        config.info(),
        steps=len(lens.losses),
        tokens_per_step=n_step_tokens,
        rows_available=len(rows),
        model={"d_model": cfg.d_model, "n_layers": cfg.n_layers, "d_vocab": cfg.d_vocab},
    )
    return lens


def mean_kl(
    lens: Translating, model: LanguageModel, *, texts: Any, seq_len: int = 256, max_rows: int = 8, chunk_size: int = 256
) -> dict[str, float]:
    """Mean KL(final || translated read-out) per token, per translator, over held-out texts or token rows
    [n_rows, pos] (no training).

    An identity lens (`TunedLens.for_model(model)`) gives the logit lens's KL, so the two compare directly.

    Returns:
        label -> mean KL in nats.
    """
    if isinstance(texts, torch.Tensor):
        rows = texts[:max_rows]  # token rows [n_rows, pos]
    else:
        rows = token_rows(model.tokenizer, read_texts(texts), seq_len=seq_len, max_rows=max_rows)
    totals = dict.fromkeys(lens.labels, 0.0)
    device = model.embed.weight.device
    for row in rows:
        resid, final_logits = collect_streams(model, row[None].to(device), labels=lens.labels)
        for label, value in kl_sums(lens, model, resid=resid, final_logits=final_logits, chunk_size=chunk_size).items():
            totals[label] += value
    return {label: value / rows.numel() for label, value in totals.items()}
