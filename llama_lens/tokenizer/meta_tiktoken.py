"""Meta's tiktoken `tokenizer.model` files (Llama 3 and Llama 4), read as Meta's reference code reads them.

A tiktoken file holds only the BPE ranks ("<base64 token> <rank>" lines); the split pattern and the special tokens
live in Meta's code (`llama_models/llama3/tokenizer.py`, `llama_models/llama4/tokenizer.py` in the `llama-models`
package). The number of ranks tells the two layouts apart: 128,000 (Llama 3, 256 specials) and 200,000 (Llama 4,
2,048 specials). A file of any other size is refused rather than read with the wrong pattern and specials.

Defaults are Meta's `Tokenizer.encode(s, bos=True, eos=False)`: special-token text in the input stays text
(`allowed_special=set(), disallowed_special=()`); `parse_special=True` is `allowed_special="all"`. Long texts are
cut as Meta cuts them (400k-character chunks, runs of whitespace or non-whitespace at most 25k characters).
"""

from __future__ import annotations

import base64
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ArgumentError, CheckpointError
from .base import Tokenizer, bytes_to_text

# tiktoken panics past this many characters (Meta's TIKTOKEN_MAX_ENCODE_CHARS) ...
MAX_ENCODE_CHARS = 400_000
# ... and is quadratic in long runs of one character class (Meta's MAX_NO_WHITESPACES_CHARS, tiktoken issue 195).
MAX_RUN_CHARS = 25_000
# Runs longer than MAX_RUN_CHARS. Each match is tried only from a run's first character (the lookbehind), so the
# scan is linear; the leading character class lets the regex engine skip the other class quickly.
_LONG_SPACE_RUN = re.compile(rf"\s(?<!\s\s)\s{{{MAX_RUN_CHARS},}}")
_LONG_WORD_RUN = re.compile(rf"\S(?<!\S\S)\S{{{MAX_RUN_CHARS},}}")

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA4_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def llama3_special_tokens() -> list[str]:
    """Meta's 256 Llama 3 special tokens, in id order (their ids follow the 128,000 ranks)."""
    named = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|step_id|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",  # end of message
        "<|eot_id|>",  # end of turn
        "<|python_tag|>",
        "<|image|>",
    ]
    return named + [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(named))]


def llama4_special_tokens() -> list[str]:
    """Meta's 2,048 Llama 4 special tokens, in id order (their ids follow the 200,000 ranks)."""

    def reserved(name: str, count: int, start: int = 0) -> list[str]:
        return [f"<|{name}_reserved_special_token_{i}|>" for i in range(start, start + count)]

    text_post_train = [
        "<|header_start|>",
        "<|header_end|>",
        "<|eom|>",
        "<|eot|>",
        "<|step|>",
        *reserved("text_post_train", 6),
        "<|python_start|>",
        "<|python_end|>",
        "<|finetune_right_pad|>",
        *reserved("text_post_train", 61, 8),
    ]
    vision = [
        "<|image_start|>",
        "<|image_end|>",
        *reserved("vision", 2),
        "<|tile_x_separator|>",
        "<|tile_y_separator|>",
        *reserved("vision", 4, 2),
        "<|image|>",
        *reserved("vision", 1, 6),
        "<|patch|>",
        *reserved("vision", 1041, 7),
    ]
    reasoning = [*reserved("reasoning", 8), "<|reasoning_thinking_start|>", "<|reasoning_thinking_end|>"]
    basic = ["<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
    named = basic + text_post_train + vision + reasoning
    return named + [f"<|reserved_special_token_{i}|>" for i in range(2048 - len(named))]


@dataclass(frozen=True)
class TiktokenLayout:
    """What Meta's code adds to a ranks file: the split pattern, the special tokens and which ones do what."""

    name: str
    n_ranks: int
    pattern: str
    special_tokens: tuple[str, ...]
    bos: str
    eos: str
    pad: str
    stop: tuple[str, ...]
    chat_format: str


LAYOUTS = {
    "llama3": TiktokenLayout(
        name="Llama 3",
        n_ranks=128_000,
        pattern=LLAMA3_PATTERN,
        special_tokens=tuple(llama3_special_tokens()),
        bos="<|begin_of_text|>",
        eos="<|end_of_text|>",
        pad="<|finetune_right_pad_id|>",
        stop=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"),
        chat_format="llama3",
    ),
    "llama4": TiktokenLayout(
        name="Llama 4",
        n_ranks=200_000,
        pattern=LLAMA4_PATTERN,
        special_tokens=tuple(llama4_special_tokens()),
        bos="<|begin_of_text|>",
        eos="<|end_of_text|>",
        pad="<|finetune_right_pad|>",
        stop=("<|end_of_text|>", "<|eom|>", "<|eot|>"),
        chat_format="llama4",
    ),
}


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Reads a tiktoken BPE ranks file: one "<base64 token> <rank>" line per token."""
    ranks = {}
    with open(path, "rb") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as error:
                raise CheckpointError(
                    f"{path}, line {line_number}: expected '<base64 token> <rank>', got {line[:60]!r}"
                ) from error
    return ranks


def layout_for(path: str | os.PathLike, n_ranks: int) -> TiktokenLayout:
    """The layout whose rank count is `n_ranks`; any other size is refused with what was found."""
    for layout in LAYOUTS.values():
        if layout.n_ranks == n_ranks:
            return layout
    known = ", ".join(f"{layout.name} ({layout.n_ranks:,})" for layout in LAYOUTS.values())
    raise CheckpointError(
        f"{path} is a tiktoken ranks file with {n_ranks:,} tokens, a size no known Llama tokenizer has (known: "
        f"{known}); its split pattern and special tokens cannot be told. Pass tokenizer= to ll.load (e.g. the "
        "checkpoint's tokenizer.json), or TiktokenTokenizer(path, layout='llama3') if it is Llama 3's layout"
    )


def meta_chunks(text: str) -> list[str]:
    """`text` cut as Meta's `encode` cuts it before tiktoken: 400k-character chunks, then each run of whitespace
    or non-whitespace cut every 25k characters from the run's start (`_split_whitespaces_or_nonwhitespaces`)."""
    if len(text) <= MAX_RUN_CHARS:
        return [text]  # no run can be longer than the text: nothing to cut
    pieces = []
    for chunk_start in range(0, len(text), MAX_ENCODE_CHARS):
        chunk = text[chunk_start : chunk_start + MAX_ENCODE_CHARS]
        runs = [match.span() for match in _LONG_SPACE_RUN.finditer(chunk)]
        # str.split() splits where str.isspace() (Meta's test) is true: its longest piece is the longest word run
        if max(map(len, chunk.split()), default=0) > MAX_RUN_CHARS:
            runs += [match.span() for match in _LONG_WORD_RUN.finditer(chunk)]
        cuts = [0]
        for start, end in sorted(runs):
            cuts += range(start + MAX_RUN_CHARS, end, MAX_RUN_CHARS)
        cuts.append(len(chunk))
        pieces += [chunk[a:b] for a, b in zip(cuts, cuts[1:])]
    return pieces


class TiktokenTokenizer(Tokenizer):
    """A Meta tiktoken `tokenizer.model` (Llama 3 or Llama 4), with Meta's pattern and special tokens.

    Args:
        path: the tokenizer.model file.
        layout: "llama3" or "llama4" to read a file of another size with that layout; by default the layout is
            told from the number of ranks and any other size is refused.
    """

    add_bos = True
    parse_special = False  # Meta's encode: disallowed_special=(), allowed_special=set()
    skip_special = False  # tiktoken's decode writes special tokens as their text
    backend_checks_ids = True

    def __init__(self, path: str | os.PathLike, *, layout: str | None = None):
        import tiktoken

        ranks = read_tiktoken_ranks(path)
        n_ranks = len(ranks)
        if layout is None:
            self.layout = layout_for(path, n_ranks)
        elif layout in LAYOUTS:
            self.layout = LAYOUTS[layout]
        else:
            raise ArgumentError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
        self.special_tokens = {token: n_ranks + i for i, token in enumerate(self.layout.special_tokens)}
        self.special_ids = frozenset(self.special_tokens.values())
        self.encoding = tiktoken.Encoding(
            name=Path(path).name,
            pat_str=self.layout.pattern,
            mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )
        self.source = str(path)
        self.vocab_size = n_ranks + len(self.special_tokens)
        self.chat_format = self.layout.chat_format
        self.bos_id = self.special_tokens[self.layout.bos]
        self.eos_id = self.special_tokens[self.layout.eos]
        self.eos_ids = frozenset(self.special_tokens[t] for t in self.layout.stop)
        self.pad_id = self.special_tokens[self.layout.pad]
        self.special_tokens_map = {"bos_token": self.layout.bos, "eos_token": self.layout.eos}

    def _encode_text(self, text: str, parse_special: bool) -> list[int]:
        # Meta's call; in tiktoken 0.14 it is also faster than encode_ordinary on long texts.
        allowed = "all" if parse_special else set()
        encode = self.encoding.encode
        pieces = meta_chunks(text)
        if len(pieces) == 1:
            return encode(text, allowed_special=allowed, disallowed_special=())
        return [i for piece in pieces for i in encode(piece, allowed_special=allowed, disallowed_special=())]

    def _decode_ids(self, ids: list[int], skip_special: bool) -> str:
        if skip_special:
            ids = [i for i in ids if i not in self.special_ids]
        return self.encoding.decode(ids, errors="replace")

    def _token_text(self, token_id: int) -> str:
        return bytes_to_text(self.encoding.decode_single_token_bytes(token_id))

    def _raw_to_id(self, raw: str) -> int | None:
        try:
            return self.encoding.encode_single_token(raw)
        except KeyError:
            return None

    def special_id(self, token: str) -> int | None:
        return self.special_tokens.get(token)
