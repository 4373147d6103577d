"""Sampling continuations with a KV cache, as Meta's Llama reference code does (temperature, top-p)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from ..validate import check_count
from .hooks import HookFn, NameFilter
from .kv_cache import KVCache
from .protocols import LanguageModel


def _progress(steps: range, verbose: bool):
    if not verbose:
        return steps
    from tqdm.auto import tqdm

    return tqdm(steps, desc="generating", unit="token")


@dataclass
class Generation:
    """What `generate` returns: per prompt, the new token ids and their text (stopped before EOS)."""

    tokens: list[list[int]]
    texts: list[str]

    @property
    def text(self) -> str:
        """The continuation of a single prompt."""
        if len(self.texts) != 1:
            raise ValueError(f"{len(self.texts)} prompts were given; read .texts")
        return self.texts[0]


def sample_top_p(probs: torch.Tensor, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
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

    Returns:
        The new tokens and their text. Ids past the tokenizer's vocabulary (a model whose d_vocab is padded
        beyond it) are kept in `.tokens` and written as "<id>" in `.texts`, with a warning.
    """
    max_new_tokens = check_count("max_new_tokens", max_new_tokens, 0)
    if not temperature >= 0 or not 0 < top_p <= 1:  # written so that NaN fails too
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    with model.hooks(fwd_hooks):
        return _generate(
            model,
            prompts,
            max_new_tokens,
            temperature,
            top_p,
            top_k,
            stop_at_eos,
            prepend_bos,
            use_kv_cache,
            seed,
            verbose,
            on_token,
        )


def _generate(
    model,
    prompts,
    max_new_tokens,
    temperature,
    top_p,
    top_k,
    stop_at_eos,
    prepend_bos,
    use_kv_cache,
    seed,
    verbose,
    on_token,
) -> Generation:
    device = model.embed.weight.device
    tokens, mask = model.prepare_tokens(prompts, prepend_bos=prepend_bos)
    if mask is None:
        mask = torch.ones_like(tokens)
    eos_ids = sorted(set(model.cfg.eos_token_ids) | set(getattr(model.tokenizer, "eos_ids", ()) or ()))
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None

    batch = tokens.shape[0]
    kv_cache = KVCache() if use_kv_cache else None
    logits = model(tokens, attention_mask=mask, kv_cache=kv_cache)
    new_tokens = torch.empty(batch, 0, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    for step in _progress(range(max_new_tokens), verbose):
        last = logits[:, -1].float()  # [batch, d_vocab]
        if temperature == 0:
            next_token = last.argmax(dim=-1)
        else:
            if top_k is not None and top_k < last.shape[-1]:
                kth = last.topk(top_k, dim=-1).values[:, -1:]  # [batch, 1]
                last = last.masked_fill(last < kth, float("-inf"))
            next_token = sample_top_p((last / temperature).softmax(dim=-1), top_p, generator)
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
            logits = model(next_token[:, None], attention_mask=step_mask, kv_cache=kv_cache)
        else:
            tokens, mask = torch.cat([tokens, next_token[:, None]], dim=1), torch.cat([mask, step_mask], dim=1)
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
