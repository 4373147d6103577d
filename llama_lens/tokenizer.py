"""Tokenizers for Llama checkpoints, behind one small interface.

Three on-disk forms are read without importing transformers (which costs seconds):

- Hugging Face `tokenizer.json`, through the `tokenizers` package;
- Meta Llama 2 `tokenizer.model`, a sentencepiece model, through `sentencepiece`;
- Meta Llama 3 `tokenizer.model`, a tiktoken BPE ranks file ("<base64 token> <rank>" lines), through `tiktoken`
  with Meta's split pattern and 256 special tokens.

A transformers tokenizer (or any object with `encode` and `convert_ids_to_tokens`) can be wrapped with
`as_tokenizer`. Every backend leaves BOS to us: `encode(text, bos=True)` prepends `bos_id` itself, so the
answer does not depend on whether a tokenizer.json post-processor would have added one.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# Meta's Llama 3 tokenizer (llama-models, llama3/tokenizer.py): split pattern and special tokens.
LLAMA3_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_SPECIAL_TOKENS = 256
LLAMA3_NAMED_SPECIAL_TOKENS = (
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
)

# Used only when neither tokenizer_config.json nor a post-processor names the BOS/EOS tokens.
_BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>")
_EOS_CANDIDATES = ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>", "</s>", "<eos>")

_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} \d+\r?\n?")
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def llama3_special_tokens() -> list[str]:
    """Meta's 256 Llama 3 special tokens, in id order (their ids follow the base vocabulary)."""
    n_reserved = LLAMA3_NUM_SPECIAL_TOKENS - len(LLAMA3_NAMED_SPECIAL_TOKENS)
    return list(LLAMA3_NAMED_SPECIAL_TOKENS) + [f"<|reserved_special_token_{2 + i}|>" for i in range(n_reserved)]


# ---------------------------------------------------------------------------------------------- shared helpers
def bytes_to_text(data: bytes) -> str:
    """UTF-8 text of `data`; bytes that are not valid UTF-8 on their own (a piece of a split character) are
    written as "<0xE2>" so a label still says what the token holds."""
    parts = []
    while data:
        try:
            parts.append(data.decode("utf-8"))
            break
        except UnicodeDecodeError as error:
            parts.append(data[: error.start].decode("utf-8"))
            parts.extend(f"<0x{byte:02X}>" for byte in data[error.start : error.end])
            data = data[error.end :]
    return "".join(parts)


def _byte_piece_text(piece: str) -> str | None:
    """Text of a sentencepiece byte-fallback piece like "<0x0A>" ("\\n"); non-ASCII bytes stay "<0xE2>"."""
    match = _BYTE_PIECE.fullmatch(piece)
    if match is None:
        return None
    byte = int(match.group(1), 16)
    return chr(byte) if byte < 0x80 else f"<0x{byte:02X}>"


def _byte_piece_for(text: str) -> str | None:
    """The byte-fallback piece that spells a one-byte text ("\\n" -> "<0x0A>"), else None."""
    data = text.encode("utf-8")
    return f"<0x{data[0]:02X}>" if len(data) == 1 else None


def _gpt2_byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE ("Ġ" is the space byte)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


# ---------------------------------------------------------------------------------------------- interface
class Tokenizer:
    """What the model, the lens and the plots need from a tokenizer.

    Attributes:
        bos_id: the beginning-of-text id `encode` prepends (None when the tokenizer has none).
        eos_ids: every id that ends a generation.
        eos_id: the main end-of-text id (the first one the checkpoint names), or None.
        pad_id: the padding id the tokenizer declares, or None.
        vocab_size: number of ids the tokenizer can produce (the model's d_vocab may be larger).
        add_bos: whether the checkpoint's own tokenizer adds BOS by default (informational: `encode` follows
            its `bos` argument).
    """

    bos_id: int | None = None
    eos_id: int | None = None
    eos_ids: frozenset[int] = frozenset()
    pad_id: int | None = None
    vocab_size: int = 0
    add_bos: bool = True
    source: str = ""

    @property
    def padding_id(self) -> int:
        """The id left padding uses: the declared pad id, else the EOS id, else 0."""
        return next((i for i in (self.pad_id, self.eos_id) if i is not None), 0)

    def encode(self, text: str, *, bos: bool = True) -> list[int]:
        """Token ids of `text`, with `bos_id` first when `bos` is true and the tokenizer has a BOS."""
        ids = self._encode(text)
        return [self.bos_id, *ids] if bos and self.bos_id is not None else ids

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids` [pos]; special tokens are kept as their text (e.g. "<|eot_id|>")."""
        return self._decode(self._checked(ids))

    def token_strs(self, ids: Sequence[int]) -> list[str]:
        """The text each id stands for, e.g. " Paris" (not "ĠParis" or "▁Paris"); labels for tables and plots."""
        return [self._token_text(i) for i in self._checked(ids)]

    def _checked(self, ids: Sequence[int]) -> list[int]:
        # Backends skip, garble or raise without the id on out-of-range ids; say which id and why instead.
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(
                f"token ids {bad[:5]} are out of range for this tokenizer (vocab_size {self.vocab_size}, "
                f"{self.source}); a model's d_vocab may hold unused rows past the tokenizer's vocabulary"
            )
        return ids

    def id_of(self, token: str) -> int:
        """The id of the single token whose text is `token` (e.g. " Paris" with its leading space).

        Raises:
            ValueError: `token` is not one token; the message lists the pieces it encodes to.
        """
        if not isinstance(token, str):
            raise ValueError(f"id_of takes the text of a token, got {type(token).__name__}; pass an id directly")
        for raw in self._lookup_candidates(token):
            token_id = self._raw_to_id(raw)
            if token_id is not None and self._token_text(token_id) == token:
                return token_id
        ids = self._encode(token)
        pieces = ", ".join(f"{text!r} (id {i})" for text, i in zip(self.token_strs(ids), ids))
        hint = f"pass the first piece ({self.token_strs(ids[:1])[0]!r}) or an id instead" if ids else "pass an id"
        raise ValueError(f"{token!r} is not a single token: it encodes to [{pieces}]; {hint}")

    def batch_encode(
        self, texts: Sequence[str], *, bos: bool = True, pad_id: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encodes several texts into one left-padded batch.

        Left padding keeps every prompt's last token in the last position, where the next-token logits are read.

        Args:
            texts: the prompts.
            bos: prepend `bos_id` to each prompt.
            pad_id: the id to pad with; defaults to `padding_id`.

        Returns:
            tokens [batch, pos] (int64) and attention_mask [batch, pos] (1 for real tokens, 0 for padding).
        """
        import torch

        if isinstance(texts, str):
            texts = [texts]
        if len(texts) == 0:
            raise ValueError("batch_encode needs at least one text")
        rows = [self.encode(text, bos=bos) for text in texts]
        if pad_id is None:
            pad_id = self.padding_id
        pos = max(len(row) for row in rows)
        tokens = torch.full((len(rows), pos), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), pos), dtype=torch.long)
        for b, row in enumerate(rows):
            if row:
                tokens[b, pos - len(row) :] = torch.tensor(row, dtype=torch.long)
                attention_mask[b, pos - len(row) :] = 1
        return tokens, attention_mask

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_ids={sorted(self.eos_ids)}, pad_id={self.pad_id}, source={self.source!r})"
        )

    # Each backend supplies these.
    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def _decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def _token_text(self, token_id: int) -> str:
        raise NotImplementedError

    def _lookup_candidates(self, text: str) -> list[str]:
        """Vocabulary entries that might spell `text` as one token; `id_of` checks each against `_token_text`."""
        return [text]

    def _raw_to_id(self, raw: str) -> int | None:
        raise NotImplementedError

    # Special tokens named by tokenizer_config.json.
    def _set_specials(
        self,
        *,
        bos: str | None,
        eos: Sequence[str],
        pad: str | None,
        where: str,
    ) -> None:
        def resolve(token: str, key: str) -> int:
            token_id = self._raw_to_id(token)
            if token_id is None:
                raise ValueError(f"{where}: {key} {token!r} is not in the vocabulary; fix or remove the entry")
            return token_id

        if bos is not None:
            self.bos_id = resolve(bos, "bos_token")
        if eos:
            eos_ids = [resolve(token, "eos_token") for token in eos]
            self.eos_id, self.eos_ids = eos_ids[0], frozenset(eos_ids)
        if pad is not None:
            self.pad_id = resolve(pad, "pad_token")

    def _guess_specials(self) -> None:
        """Falls back on the usual Llama names when nothing named the BOS/EOS tokens."""
        if self.bos_id is None:
            self.bos_id = next((i for t in _BOS_CANDIDATES if (i := self._raw_to_id(t)) is not None), None)
        if not self.eos_ids:
            eos_ids = [i for t in _EOS_CANDIDATES if (i := self._raw_to_id(t)) is not None]
            if eos_ids:
                self.eos_id, self.eos_ids = eos_ids[0], frozenset(eos_ids)


# ---------------------------------------------------------------------------------------------- tokenizer.json
def _json_types(state: bytes | None) -> set[str]:
    """Every "type" named in a serialized decoder / pre-tokenizer (Sequences included)."""
    return set(re.findall(r'"type"\s*:\s*"(\w+)"', state.decode("utf-8"))) if state else set()


class _HFTokenText:
    """Maps a `tokenizers.Tokenizer` vocabulary entry to the text it stands for, and text back to entries.

    Byte-level BPE (Llama 3, SmolLM2) spells bytes with GPT-2's printable table ("ĠParis"); sentencepiece-style
    tokenizers (Llama 2) spell spaces as "▁" and unknown bytes as "<0xE2>". Other models go through `decode`.
    """

    def __init__(self, backend: Any):
        self.backend = backend
        self.added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}
        types = _json_types(backend.decoder.__getstate__() if backend.decoder is not None else None)
        if backend.pre_tokenizer is not None:
            types |= _json_types(backend.pre_tokenizer.__getstate__())
        if "ByteLevel" in types:
            self.style = "byte_level"
            self.byte_to_char = _gpt2_byte_to_unicode()
            self.char_to_byte = {c: b for b, c in self.byte_to_char.items()}
        elif "Metaspace" in types or "ByteFallback" in types or "Replace" in types:
            self.style = "metaspace"
        else:
            self.style = "decode"

    def text(self, token_id: int) -> str:
        if token_id in self.added:
            return self.added[token_id]
        raw = self.backend.id_to_token(token_id)
        if self.style == "byte_level":
            if all(c in self.char_to_byte for c in raw):
                return bytes_to_text(bytes(self.char_to_byte[c] for c in raw))
            return raw
        if self.style == "metaspace":
            byte_text = _byte_piece_text(raw)
            return byte_text if byte_text is not None else raw.replace("▁", " ")
        return self.backend.decode([token_id], skip_special_tokens=False)

    def candidates(self, text: str) -> list[str]:
        found = [text]
        if self.style == "byte_level":
            found.append("".join(self.byte_to_char[b] for b in text.encode("utf-8")))
        elif self.style == "metaspace":
            found += [text.replace(" ", "▁"), _byte_piece_for(text)]
        return [c for c in found if c is not None]


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json`, run by the `tokenizers` package.

    Args:
        path: the tokenizer.json file (or pass `backend`, an already built `tokenizers.Tokenizer`).
        backend: a `tokenizers.Tokenizer` to wrap instead of reading `path`.
    """

    def __init__(self, path: str | os.PathLike | None = None, *, backend: Any = None):
        if backend is None:
            from tokenizers import Tokenizer as BackendTokenizer

            try:
                backend = BackendTokenizer.from_file(str(path))
            except Exception as error:  # the Rust side raises a bare Exception for malformed JSON
                raise ValueError(f"cannot read {path} as a Hugging Face tokenizer.json: {error}") from error
        self.backend = backend
        self.source = str(path) if path is not None else "tokenizers.Tokenizer"
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._text = _HFTokenText(backend)
        self.pad_id = backend.padding["pad_id"] if backend.padding else None
        # A TemplateProcessing post-processor that starts with a special token is how tokenizer.json adds BOS
        # (Llama 2/3); we add it ourselves, so only record which token it is.
        self.add_bos = False
        template_bos = _template_bos(backend.post_processor.__getstate__() if backend.post_processor else None)
        if template_bos is not None:
            self.bos_id, self.add_bos = self._raw_to_id(template_bos), True
        self._guess_specials()

    def _encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def _decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=False)

    def _token_text(self, token_id: int) -> str:
        return self._text.text(token_id)

    def _lookup_candidates(self, text: str) -> list[str]:
        return self._text.candidates(text)

    def _raw_to_id(self, raw: str) -> int | None:
        return self.backend.token_to_id(raw)


def _template_bos(state: bytes | None) -> str | None:
    """The special token a TemplateProcessing post-processor puts before a single sequence, if any."""
    if not state:
        return None
    config = json.loads(state)
    processors = config.get("processors", [config]) if config.get("type") == "Sequence" else [config]
    for processor in processors:
        if processor.get("type") == "TemplateProcessing" and processor.get("single"):
            first = processor["single"][0]
            if "SpecialToken" in first:
                return first["SpecialToken"]["id"]
    return None


# ---------------------------------------------------------------------------------------------- sentencepiece
class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece `tokenizer.model` (Meta's Llama 1/2 releases).

    Args:
        path: the tokenizer.model file.
        model_proto: the serialized model, instead of `path`.
    """

    def __init__(self, path: str | os.PathLike | None = None, *, model_proto: bytes | None = None):
        import sentencepiece

        if model_proto is None:
            model_proto = Path(path).read_bytes()
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
        except (RuntimeError, OSError) as error:
            raise ValueError(f"cannot read {path} as a sentencepiece model: {error}") from error
        self.source = str(path) if path is not None else "sentencepiece model"
        self.vocab_size = self.sp.vocab_size()
        # sentencepiece says -1 for "none"
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        eos = self.sp.eos_id()
        self.eos_id, self.eos_ids = (eos, frozenset([eos])) if eos >= 0 else (None, frozenset())
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else None

    def _encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def _decode(self, ids: list[int]) -> str:
        # sp.decode drops control tokens (<s>, </s>); keep them visible like the other backends do.
        parts, run = [], []
        for token_id in ids:
            if self.sp.is_control(token_id):
                parts += [self.sp.decode(run), self.sp.id_to_piece(token_id)]
                run = []
            else:
                run.append(token_id)
        return "".join(parts + [self.sp.decode(run)])

    def _token_text(self, token_id: int) -> str:
        piece = self.sp.id_to_piece(token_id)
        if self.sp.is_byte(token_id):
            return _byte_piece_text(piece) or piece
        if self.sp.is_control(token_id) or self.sp.is_unknown(token_id):
            return piece
        return piece.replace("▁", " ")

    def _lookup_candidates(self, text: str) -> list[str]:
        return [c for c in (text.replace(" ", "▁"), text, _byte_piece_for(text)) if c is not None]

    def _raw_to_id(self, raw: str) -> int | None:
        token_id = self.sp.piece_to_id(raw)
        # piece_to_id answers unk_id for unknown pieces
        return token_id if self.sp.id_to_piece(token_id) == raw else None


# ---------------------------------------------------------------------------------------------- tiktoken
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
                raise ValueError(
                    f"{path}, line {line_number}: expected '<base64 token> <rank>', got {line[:60]!r}"
                ) from error
    return ranks


class TiktokenTokenizer(Tokenizer):
    """A tiktoken BPE ranks `tokenizer.model` (Meta's Llama 3 releases), with Meta's split pattern and special
    tokens. Special-token text in a prompt (e.g. "<|eot_id|>") encodes to the special token, as it does with
    Hugging Face's Llama 3 tokenizer.json.

    Args:
        path: the tokenizer.model file.
    """

    def __init__(self, path: str | os.PathLike):
        import tiktoken

        ranks = read_tiktoken_ranks(path)
        n_base = len(ranks)
        self.special_tokens = {token: n_base + i for i, token in enumerate(llama3_special_tokens())}
        self.encoding = tiktoken.Encoding(
            name=Path(path).name, pat_str=LLAMA3_PAT_STR, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )
        self.source = str(path)
        self.vocab_size = n_base + len(self.special_tokens)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.eos_ids = frozenset(self.special_tokens[t] for t in ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>"))
        self.pad_id = self.special_tokens["<|finetune_right_pad_id|>"]

    def _encode(self, text: str) -> list[int]:
        return self.encoding.encode(text, allowed_special="all")

    def _decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids, errors="replace")

    def _token_text(self, token_id: int) -> str:
        return bytes_to_text(self.encoding.decode_single_token_bytes(token_id))

    def _raw_to_id(self, raw: str) -> int | None:
        try:
            return self.encoding.encode_single_token(raw)
        except KeyError:
            return None


# ---------------------------------------------------------------------------------------------- transformers
class TransformersTokenizer(Tokenizer):
    """Wraps a transformers tokenizer (anything with `encode` and `convert_ids_to_tokens`).

    Encoding and decoding go through the wrapped object (without its own special tokens: BOS is ours to add),
    so ids match what transformers gives.

    Args:
        tokenizer: e.g. `AutoTokenizer.from_pretrained(...)` or a `PreTrainedTokenizerFast`.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.source = type(tokenizer).__name__
        self.vocab_size = len(tokenizer)
        self.bos_id = getattr(tokenizer, "bos_token_id", None)
        self.eos_id = getattr(tokenizer, "eos_token_id", None)
        self.eos_ids = frozenset([self.eos_id]) if self.eos_id is not None else frozenset()
        self.pad_id = getattr(tokenizer, "pad_token_id", None)
        self.add_bos = bool(getattr(tokenizer, "add_bos_token", True))
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._text = _HFTokenText(backend) if backend is not None else None

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _decode(self, ids: list[int]) -> str:
        # No clean-up: the text should say exactly what the tokens say (" ." stays " .").
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _token_text(self, token_id: int) -> str:
        if self._text is not None:
            return self._text.text(token_id)
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        return _byte_piece_text(piece) or piece.replace("▁", " ")

    def _lookup_candidates(self, text: str) -> list[str]:
        if self._text is not None:
            return self._text.candidates(text)
        return [c for c in (text, text.replace(" ", "▁"), _byte_piece_for(text)) if c is not None]

    def _raw_to_id(self, raw: str) -> int | None:
        if self._text is not None:
            return self._text.backend.token_to_id(raw)
        token_id = self.tokenizer.convert_tokens_to_ids(raw)
        return None if token_id is None or token_id == getattr(self.tokenizer, "unk_token_id", None) else token_id


# ---------------------------------------------------------------------------------------------- loading
def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Opens the tokenizer of a checkpoint.

    Args:
        path: a tokenizer.json or tokenizer.model file, or a checkpoint folder holding one (tokenizer.json is
            preferred). A tokenizer_config.json beside it may name the bos/eos/pad tokens.

    Returns:
        A `Tokenizer`: `HFTokenizer`, `SentencePieceTokenizer` or `TiktokenTokenizer`.

    Raises:
        FileNotFoundError: no such file, or the folder holds neither tokenizer.json nor tokenizer.model.
        ValueError: the file is in none of the known formats, or tokenizer_config.json names unknown tokens.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        found = next((path / name for name in ("tokenizer.json", "tokenizer.model") if (path / name).is_file()), None)
        if found is None:
            raise FileNotFoundError(
                f"no tokenizer.json or tokenizer.model in {path}; copy the checkpoint's tokenizer there or pass "
                "tokenizer= to load()"
            )
        path = found
    elif not path.is_file():
        raise FileNotFoundError(f"no tokenizer file at {path}")

    tokenizer = _open_tokenizer_file(path)
    config_path = path.parent / "tokenizer_config.json"
    if config_path.is_file():
        _apply_tokenizer_config(tokenizer, config_path)
    return tokenizer


def _open_tokenizer_file(path: Path) -> Tokenizer:
    if path.suffix == ".json":
        return HFTokenizer(path)
    with open(path, "rb") as file:
        head = file.read(4096)
    # A tiktoken ranks file is ASCII lines "<base64> <rank>"; a sentencepiece model is a binary protobuf.
    first_line = head.split(b"\n", 1)[0] + b"\n"
    if _TIKTOKEN_LINE.fullmatch(first_line):
        return TiktokenTokenizer(path)
    if head.lstrip().startswith(b"{"):
        return HFTokenizer(path)
    try:
        return SentencePieceTokenizer(path)
    except ValueError as error:
        raise ValueError(
            f"{path} is not a tokenizer.json, a sentencepiece model or a tiktoken ranks file ({error})"
        ) from None


def _config_token(value: Any) -> str | None:
    """tokenizer_config.json writes tokens as a string, as {"content": ...} (an AddedToken), or null."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _apply_tokenizer_config(tokenizer: Tokenizer, config_path: Path) -> None:
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}") from None
    eos = config.get("eos_token")
    eos_tokens = [_config_token(t) for t in eos] if isinstance(eos, list) else [_config_token(eos)]
    tokenizer._set_specials(
        bos=_config_token(config.get("bos_token")),
        eos=[t for t in eos_tokens if t is not None],
        pad=_config_token(config.get("pad_token")),
        where=str(config_path),
    )
    if isinstance(config.get("add_bos_token"), bool):
        tokenizer.add_bos = config["add_bos_token"]


_INTERFACE = ("encode", "decode", "token_strs", "id_of", "batch_encode", "bos_id", "eos_ids", "pad_id", "vocab_size")


def as_tokenizer(tokenizer: Any) -> Tokenizer:
    """Accepts what a user may pass as `tokenizer=`: a path, one of our tokenizers (or any object with the same
    interface), a transformers tokenizer, or a `tokenizers.Tokenizer`.

    Raises:
        ValueError: the object is none of these.
    """
    if isinstance(tokenizer, (str, os.PathLike)):
        return load_tokenizer(tokenizer)
    if isinstance(tokenizer, Tokenizer) or all(hasattr(tokenizer, name) for name in _INTERFACE):
        return tokenizer
    if hasattr(tokenizer, "encode") and hasattr(tokenizer, "convert_ids_to_tokens"):
        return TransformersTokenizer(tokenizer)
    if hasattr(tokenizer, "id_to_token") and hasattr(tokenizer, "get_added_tokens_decoder"):
        return HFTokenizer(backend=tokenizer)
    missing = [name for name in _INTERFACE if not hasattr(tokenizer, name)]
    raise ValueError(
        f"cannot use a {type(tokenizer).__name__} as a tokenizer: it lacks {missing}; pass a path, a transformers "
        "tokenizer, a tokenizers.Tokenizer or an object with the llama_lens Tokenizer interface"
    )


__all__ = [
    "HFTokenizer",
    "SentencePieceTokenizer",
    "TiktokenTokenizer",
    "Tokenizer",
    "TransformersTokenizer",
    "as_tokenizer",
    "load_tokenizer",
]
