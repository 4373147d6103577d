"""The tokenizer a GGUF file's metadata describe (`tokenizer.ggml.*`), built as a `tokenizers.Tokenizer`.

A GGUF has no tokenizer.json: it stores the vocabulary, merges or scores, token types and special-token ids
under llama.cpp's keys. Two models are read, the ones Llama-family files use:

- "gpt2": byte-level BPE (Llama 3, SmolLM2, Qwen2/2.5/3): tokens and merges; the text is split first by the regex
  llama.cpp names in `tokenizer.ggml.pre`;
- "llama": sentencepiece-style BPE (Llama 1/2, TinyLlama, Mistral 7B): tokens and scores, unknown bytes spelled
  as `<0xNN>` tokens; the merges are the pairs of the vocabulary ranked by the score of what they make, as
  transformers' sentencepiece conversion ranks them.

`gguf_backend_tokenizer` builds the backend, `gguf_tokenizer_config` the tokenizer_config.json the file implies
(BOS/EOS/pad tokens, add_bos_token, chat template); `llama_lens.tokenizer.load_tokenizer` puts them together.
"""

from __future__ import annotations

from typing import Any

from ..errors import CheckpointError
from .meta_tiktoken import LLAMA3_PATTERN

# llama.cpp's token types (llama_token_type): 3 CONTROL (special tokens such as <|im_end|>), 4 USER_DEFINED
# (added tokens matched whole in the text, not special), 6 BYTE (<0x0A>).
CONTROL, USER_DEFINED = 3, 4

# The pre-tokenizers llama.cpp names in `tokenizer.ggml.pre` (llama-vocab.cpp) for the byte-level vocabularies of
# Llama-family models: "default"/"gpt2" is GPT-2's own split (ByteLevel's regex), "smollm" splits every digit off
# first, the Llama 3 names split by Meta's Llama 3 pattern (as Llama 3's tokenizer.json does), the Qwen names by
# Qwen2's pattern (Qwen2/2.5/3 and the DeepSeek-R1 models distilled onto Qwen2.5 share one tokenizer.json).
GPT2_PRE = ("default", "gpt2")
DIGITS_THEN_GPT2_PRE = ("smollm",)
LLAMA3_PRE = ("llama3", "llama-v3", "llama-bpe", "smaug-bpe")
QWEN2_PRE = ("qwen2", "deepseek-r1-qwen")

# The Split regex of Qwen2's tokenizer.json: Llama 3's pattern with single digits (`\p{N}`, not `\p{N}{1,3}`).
# llama.cpp spells the contractions out case by case ('[sS]) because its regex engine has no (?i:); this is the
# tokenizer.json original, which `tokenizers` runs.
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _typed(meta: dict[str, Any], key: str, source: str, check: Any, expected: str, default: Any = None) -> Any:
    """`meta[key]` (or `default` when absent), checked: a CheckpointError naming the file, the key and the type
    expected where a damaged or hand-made file holds another (the tokenizers backend would fail on it with a
    TypeError of its own, or silently build another tokenizer). For "an array of ..." `check` is each item's."""
    value = meta.get(key, default)
    if value is None:
        return None
    if expected.startswith("an array"):
        if not isinstance(value, list):
            shown = f"{value!r:.60} (a {type(value).__name__})"
        else:
            index = next((i for i, item in enumerate(value) if not check(item)), None)
            if index is None:
                return value
            shown = f"an array whose item {index} is {value[index]!r:.60} (a {type(value[index]).__name__})"
    elif check(value):
        return value
    else:
        shown = f"{value!r:.60} (a {type(value).__name__})"
    raise CheckpointError(f"{source}: metadata key {key!r} is {shown}, expected {expected}; the file is corrupt")


_STRS = (lambda item: isinstance(item, str), "an array of strings")
_INTS = (_is_int, "an array of integers")
_NUMBERS = (lambda item: isinstance(item, (int, float)) and not isinstance(item, bool), "an array of numbers")
_MERGES = (lambda item: isinstance(item, str) and " " in item, "an array of 'left right' strings")
_STR = (lambda value: isinstance(value, str), "a string")
_BOOL = (lambda value: isinstance(value, bool), "a bool")


def gguf_backend_tokenizer(meta: dict[str, Any], source: str) -> Any:
    """The `tokenizers.Tokenizer` of a GGUF's vocabulary.

    Args:
        meta: the file's metadata (`gguf_io.read_gguf_header(path).metadata`).
        source: the file, for errors.

    Raises:
        CheckpointError: naming the file and key, for a tokenizer model or pre-tokenizer llama_lens does not
            build, metadata of the wrong type (naming the type expected), or metadata that do not fit together.
    """
    kind = _typed(meta, "tokenizer.ggml.model", source, *_STR)
    tokens = _typed(meta, "tokenizer.ggml.tokens", source, *_STRS)
    if not tokens:
        raise CheckpointError(f"{source}: no tokenizer.ggml.tokens in its metadata; pass tokenizer= to load()")
    token_types = _typed(meta, "tokenizer.ggml.token_type", source, *_INTS, default=[1] * len(tokens))
    if len(token_types) != len(tokens):
        raise CheckpointError(
            f"{source}: tokenizer.ggml.token_type has {len(token_types)} entries for {len(tokens)} tokens"
        )
    if kind == "gpt2":
        tokenizer = _byte_level_bpe(meta, tokens, source)
    elif kind == "llama":
        tokenizer = _sentencepiece_bpe(meta, tokens, source)
    else:
        raise CheckpointError(
            f"{source}: tokenizer.ggml.model is {kind!r}; llama_lens builds 'gpt2' (byte-level BPE) and 'llama' "
            "(sentencepiece) tokenizers from GGUF files; pass tokenizer= (a tokenizer.json) to load()"
        )
    from tokenizers import AddedToken

    control = [t for t, kind in zip(tokens, token_types) if kind == CONTROL]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    user_defined = [t for t, kind in zip(tokens, token_types) if kind == USER_DEFINED]
    if user_defined:
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in user_defined])
    return tokenizer


def _byte_level_bpe(meta: dict[str, Any], tokens: list[str], source: str) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    merges = _typed(meta, "tokenizer.ggml.merges", source, *_MERGES)
    if merges is None:
        raise CheckpointError(f"{source}: a 'gpt2' tokenizer needs tokenizer.ggml.merges, which is missing")
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=pairs, fuse_unk=False))
    pre = _typed(meta, "tokenizer.ggml.pre", source, *_STR, default="default")
    if pre in GPT2_PRE:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    elif pre in DIGITS_THEN_GPT2_PRE:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ]
        )
    elif pre in LLAMA3_PRE or pre in QWEN2_PRE:
        pattern = LLAMA3_PATTERN if pre in LLAMA3_PRE else QWEN2_PATTERN
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
            ]
        )
        if pre in QWEN2_PRE:
            # Qwen2's tokenizer.json composes the text to NFC first (llama.cpp does not; "e" + U+0301 then
            # tokenizes as "é" would, as in transformers).
            tokenizer.normalizer = normalizers.NFC()
    else:
        known = sorted(GPT2_PRE + DIGITS_THEN_GPT2_PRE + LLAMA3_PRE + QWEN2_PRE)
        raise CheckpointError(
            f"{source}: tokenizer.ggml.pre is {pre!r}, a text split llama_lens does not know (it knows {known}); "
            "pass tokenizer= (the model's tokenizer.json) to load()"
        )
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_bpe(meta: dict[str, Any], tokens: list[str], source: str) -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = _typed(meta, "tokenizer.ggml.scores", source, *_NUMBERS)
    if scores is None or len(scores) != len(tokens):
        raise CheckpointError(f"{source}: a 'llama' tokenizer needs one tokenizer.ggml.scores entry per token")
    vocab = {token: index for index, token in enumerate(tokens)}
    unk_id = _typed(meta, "tokenizer.ggml.unknown_token_id", source, _is_int, "a token id", default=0)
    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=sentencepiece_merges(vocab, dict(zip(tokens, scores))),
            unk_token=tokens[unk_id] if isinstance(unk_id, int) and 0 <= unk_id < len(tokens) else None,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    # Llama 2's tokenizer.json: a space before the text (sentencepiece's dummy prefix) unless the file says not,
    # spaces spelled "▁"; decoding undoes both.
    add_prefix = _typed(meta, "tokenizer.ggml.add_space_prefix", source, *_BOOL, default=True)
    steps = [normalizers.Prepend("▁")] if add_prefix else []
    tokenizer.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    strip = [decoders.Strip(" ", 1, 0)] if add_prefix else []
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
    )
    return tokenizer


def sentencepiece_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges of a sentencepiece vocabulary: every split of a token into two tokens, best score first.

    Sentencepiece's BPE merges the adjacent pair whose union has the highest score; ranking the pairs by that
    score (ties: longer left piece, then longer right piece) makes the `tokenizers` BPE do the same, as
    transformers' conversion of Llama's tokenizer.model does.
    """
    merges = []
    for token, score in scores.items():
        splits = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab]
        splits.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        merges += [(left, right, score) for left, right in splits]
    merges.sort(key=lambda merge: (merge[2], len(merge[0]), len(merge[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def gguf_tokenizer_config(meta: dict[str, Any], source: str = "the GGUF file") -> dict[str, Any]:
    """The tokenizer_config.json a GGUF's metadata imply: special tokens (as strings), add_bos_token, chat template.

    llama.cpp adds BOS to a sentencepiece ("llama") vocabulary whose file does not say otherwise, and not to a
    byte-level one.

    Raises:
        CheckpointError: naming the file and key, for a special token id that is not a token of the vocabulary
            (a BOS id past the end would make `prepend_bos=True` add nothing) or a flag that is not a bool.
    """
    tokens = _typed(meta, "tokenizer.ggml.tokens", source, *_STRS) or []

    def token(key: str) -> str | None:
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if token_id is None:
            return None
        if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < len(tokens):
            raise CheckpointError(
                f"{source}: metadata key 'tokenizer.ggml.{key}' is {token_id!r}, not the id of one of its "
                f"{len(tokens)} tokens; the file is corrupt"
            )
        return tokens[token_id]

    add_bos = meta.get("tokenizer.ggml.add_bos_token", meta.get("tokenizer.ggml.model") == "llama")
    if not isinstance(add_bos, bool | int):
        raise CheckpointError(f"{source}: metadata key 'tokenizer.ggml.add_bos_token' is {add_bos!r}, expected a bool")
    config = {
        "add_bos_token": bool(add_bos),
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "pad_token": token("padding_token_id"),
        "unk_token": token("unknown_token_id"),
    }
    template = _typed(meta, "tokenizer.chat_template", source, *_STR)
    if template is not None:
        config["chat_template"] = template
    return config
