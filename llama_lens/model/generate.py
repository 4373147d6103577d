"""Sampling continuations with a KV cache, as Meta's Llama reference code does (temperature, top-p)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch

from ..errors import ArgumentError
from ..validate import as_index, check_count
from .hooks import HookFn, NameFilter
from .kv_cache import KVCache
from .limits import check_generation_fits
from .protocols import LanguageModel


def _progress(steps: range, verbose: bool):
    if not verbose:
        return steps
    from tqdm.auto import tqdm

    return tqdm(steps, desc="generating", unit="token")


@dataclass(frozen=True)
class DecodingStep:
    """Where `generate`'s current forward pass sits in the sequence, for hooks that act on some positions only
    (steering the generated tokens alone, say): columns of the left-padded batch, so every prompt's last token
    is at column `prompt_pos - 1` and its first generated token at `prompt_pos`."""

    prompt_pos: int  # columns of the prompt batch
    start: int  # the column of this pass's first position: 0 without a KV cache, the new token's with one


# The step of the `generate` call the calling thread (or task) is inside; None outside `generate`.
_DECODING_STEP: ContextVar[DecodingStep | None] = ContextVar("llama_lens_decoding_step", default=None)


def decoding_step() -> DecodingStep | None:
    """The `DecodingStep` of the forward pass running now inside `generate`, or None outside it."""
    return _DECODING_STEP.get()


@contextmanager
def _at_step(prompt_pos: int, start: int) -> Iterator[None]:
    token = _DECODING_STEP.set(DecodingStep(prompt_pos, start))
    try:
        yield
    finally:
        _DECODING_STEP.reset(token)


@dataclass
class Generation:
    """What `generate` returns: per prompt, the new token ids and their text (stopped before EOS)."""

    tokens: list[list[int]]
    texts: list[str]

    @property
    def text(self) -> str:
        """The continuation of a single prompt."""
        if len(self.texts) != 1:
            raise ArgumentError(f"{len(self.texts)} prompts were given; read .texts")
        return self.texts[0]


def sample_top_p(probs: torch.Tensor, top_p: float, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Nucleus sampling: draws from the smallest set of tokens whose probability adds up to `top_p`.

    Args:
        probs: [batch, d_vocab]
    Returns:
        [batch] token ids
    """
    probs_sorted, order = probs.sort(dim=-1, descending=True)
    # Drop a token when the tokens ranked above it already cover top_p.
    probs_sorted[probs_sorted.cumsum(dim=-1) - probs_sorted > top_p] = 0.0
    probs_sorted /= probs_sorted.sum(dim=-1, keepdim=True)
    picked = torch.multinomial(probs_sorted, num_samples=1, generator=generator)
    return order.gather(-1, picked).squeeze(-1)


@dataclass(frozen=True)
class Sampling:
    """How `generate` picks each new token, checked when made (arguments as in `generate`).

    Raises:
        ArgumentError (a ValueError): a negative max_new_tokens or temperature, top_p outside (0, 1], a top_k
            that is not a positive integer.
    """

    max_new_tokens: int = 32
    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int | None = None
    seed: int | None = None
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_new_tokens", check_count("max_new_tokens", self.max_new_tokens, 0))
        if not self.temperature >= 0 or not 0 < self.top_p <= 1:  # written so that NaN fails too
            raise ArgumentError(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature} and {self.top_p}")
        if self.top_k is not None:
            top_k = as_index(self.top_k)
            if top_k is None or top_k < 1:
                raise ArgumentError(f"top_k must be a positive integer or None, got {self.top_k!r}")
            object.__setattr__(self, "top_k", top_k)

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The sampler's random generator, seeded (None without a seed: torch's global one)."""
        return None if self.seed is None else torch.Generator(device=device).manual_seed(self.seed)

    def pick(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """The next token of each prompt: logits [batch, d_vocab] -> ids [batch]."""
        if self.temperature == 0:
            return logits.argmax(dim=-1)
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[:, -1:]  # [batch, 1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        # Shifted so the largest logit is 0 before dividing: a tiny temperature (1e-45) then sends the others to
        # -inf (greedy in the limit) instead of every logit to +-inf and the probabilities to NaN.
        logits = logits.float()
        scaled = (logits - logits.amax(dim=-1, keepdim=True)) / self.temperature
        return sample_top_p(scaled.softmax(dim=-1), self.top_p, generator=generator)


@torch.no_grad()
def generate(
    model: LanguageModel,
    prompts: str | Sequence[str] | torch.Tensor | Sequence[int],
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.6,
    top_p: float = 0.9,
    top_k: int | None = None,
    stop_at_eos: bool = True,
    prepend_bos: bool | None = None,
    use_kv_cache: bool = True,
    seed: int | None = None,
    fwd_hooks: Iterable[tuple[NameFilter, HookFn]] = (),
    verbose: bool = False,
    on_token: Callable[[list[int | None]], None] | None = None,
) -> Generation:
    """Continues each prompt; hooks in `fwd_hooks` (or added with `model.hooks(...)`) fire at every step.

    TransformerLens' `generate(input, max_new_tokens, ..., top_k=, top_p=, verbose=)` returns tokens or text;
    this returns a `Generation` with both (`.tokens`, `.texts`, `.text`), and takes `fwd_hooks=` directly.

    Args:
        prompts: text, a list of texts (left-padded into one batch) or token ids [pos] / [batch, pos].
        max_new_tokens: how many tokens to add at most.
        temperature: 0 for greedy decoding; otherwise logits are divided by it before sampling.
        top_p: nucleus sampling threshold (ignored when greedy).
        top_k: sample among the `top_k` most likely tokens only (applied before `top_p`; ignored when greedy).
        stop_at_eos: stop a prompt at its first end-of-sequence token (not included in the output).
        prepend_bos: for texts: add BOS (True), not (False), or the tokenizer's own default (None).
        use_kv_cache: reuse keys/values of earlier positions (the default) instead of re-running the prefix.
        seed: seeds the sampler for reproducible draws.
        fwd_hooks: (hook name or filter, fn) pairs active for every step, removed at the end.
        verbose: show a progress bar over the new tokens.
        on_token: called after each step with the token chosen for each prompt [batch] (None for a prompt
            that has stopped at EOS), e.g. to print the text as it comes; `decode_generated` turns ids into text.

    Raises:
        ArgumentError: the prompt plus `max_new_tokens` is past the model's context length (see
            `model.allow_past_context`).
        NotEnoughMemoryError: the prompt's forward pass and the KV cache would not fit in the memory available.

    Returns:
        The new tokens and their text. Ids past the tokenizer's vocabulary (a model whose d_vocab is padded
        beyond it) are kept in `.tokens` and written as "<id>" in `.texts`, with a warning.
    """
    sampling = Sampling(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
        stop_at_eos=stop_at_eos,
    )  # fmt: skip
    with model.hooks(fwd_hooks):
        return _generate(
            model, prompts, sampling, prepend_bos=prepend_bos, use_kv_cache=use_kv_cache, verbose=verbose,
            on_token=on_token,
        )  # fmt: skip


def _generate(
    model: LanguageModel,
    prompts: str | Sequence[str] | torch.Tensor | Sequence[int],
    sampling: Sampling,
    *,
    prepend_bos: bool | None,
    use_kv_cache: bool,
    verbose: bool,
    on_token: Callable[[list[int | None]], None] | None,
) -> Generation:
    device = model.embed.weight.device
    tokens, mask = model.prepare_tokens(prompts, prepend_bos=prepend_bos)
    check_generation_fits(model, tokens, sampling.max_new_tokens, use_kv_cache=use_kv_cache)
    if mask is None:
        mask = torch.ones_like(tokens)
    eos_ids = sorted(set(model.cfg.eos_token_ids) | set(getattr(model.tokenizer, "eos_ids", ()) or ()))
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    generator = sampling.generator(device)
    max_new_tokens, stop_at_eos = sampling.max_new_tokens, sampling.stop_at_eos

    batch, prompt_pos = tokens.shape
    kv_cache = KVCache() if use_kv_cache else None
    with _at_step(prompt_pos, 0):
        logits = model(tokens, attention_mask=mask, kv_cache=kv_cache)
    new_tokens = torch.empty(batch, 0, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    for step in _progress(range(max_new_tokens), verbose):
        next_token = sampling.pick(logits[:, -1].float(), generator)  # [batch]
        new_tokens = torch.cat([new_tokens, next_token[:, None]], dim=1)
        if on_token is not None:
            stopped = finished | torch.isin(next_token, eos) if stop_at_eos else finished
            on_token([None if done else token for token, done in zip(next_token.tolist(), stopped.tolist())])
        if stop_at_eos:
            finished |= torch.isin(next_token, eos)
            if bool(finished.all()):
                break
        if step == max_new_tokens - 1:
            break  # the last token is chosen: no forward pass for a token that will not be sampled
        step_mask = torch.ones(batch, 1, dtype=torch.long, device=device)
        if kv_cache is not None:
            with _at_step(prompt_pos, prompt_pos + step):  # the new token's column
                logits = model(next_token[:, None], attention_mask=step_mask, kv_cache=kv_cache)
        else:
            tokens, mask = torch.cat([tokens, next_token[:, None]], dim=1), torch.cat([mask, step_mask], dim=1)
            with _at_step(prompt_pos, 0):
                logits = model(tokens, attention_mask=mask)

    out_tokens = []
    for row in new_tokens.tolist():
        if stop_at_eos:
            cut = next((j for j, t in enumerate(row) if t in eos_ids), len(row))
            row = row[:cut]
        out_tokens.append(row)
    texts = [decode_generated(model, row) for row in out_tokens]
    return Generation(tokens=out_tokens, texts=texts)


def decode_generated(model: LanguageModel, ids: Sequence[int], *, warn: bool = True) -> str:
    """The text of generated ids [pos]; "" without a tokenizer.

    A model's d_vocab may be padded past its tokenizer's vocabulary, and a sampler can pick those rows: such ids
    are written as "<id>" (with a warning, unless `warn=False`) rather than failing after the work is done.
    """
    tokenizer = model.tokenizer
    if tokenizer is None:
        return ""
    ids = list(ids)
    size = getattr(tokenizer, "vocab_size", None)
    if not size or all(0 <= i < size for i in ids):
        return model.to_string(ids)
    unknown = sorted({i for i in ids if not 0 <= i < size})
    if warn:
        warnings.warn(
            f"generated ids {unknown[:5]} are past the tokenizer's vocabulary (vocab_size {size}; the model's "
            f"d_vocab is {model.cfg.d_vocab}): written as '<id>' in the text, kept as they are in .tokens",
            RuntimeWarning,
            stacklevel=3,
        )
    # Runs of known ids decode together (multi-byte characters span tokens); each unknown id stands alone.
    parts, run = [], []
    for i in ids:
        if 0 <= i < size:
            run.append(i)
            continue
        if run:
            parts.append(model.to_string(run))
            run = []
        parts.append(f"<{i}>")
    if run:
        parts.append(model.to_string(run))
    return "".join(parts)
