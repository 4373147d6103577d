"""Hugging Face tokenizers: a `tokenizer.json` run by the `tokenizers` package, or a transformers tokenizer object.

Defaults are transformers' (`AutoTokenizer`): added tokens in the text are parsed (`split_special_tokens=False`),
decode keeps special tokens (`skip_special_tokens=False`) and does not clean up spaces, BOS as the post-processor
or tokenizer_config.json's `add_bos_token` says.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from ..errors import CheckpointError, OutOfRangeError
from .base import Tokenizer, byte_piece_for, byte_piece_text, bytes_to_text


def _json_types(state: bytes | None) -> set[str]:
    """Every "type" named in a serialized decoder / pre-tokenizer (Sequences included)."""
    return set(re.findall(r'"type"\s*:\s*"(\w+)"', state.decode("utf-8"))) if state else set()


def gpt2_byte_to_unicode() -> dict[int, str]:
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


class HFTokenText:
    """Maps a `tokenizers.Tokenizer` vocabulary entry to the text it stands for, and text back to entries.

    Byte-level BPE (Llama 3, SmolLM2) spells bytes with GPT-2's printable table ("ĠParis"); sentencepiece-style
    tokenizers (Llama 2) spell spaces as "▁" and unknown bytes as "<0xE2>". Other models go through `decode`.
    """

    def __init__(self, backend: Any):
        self.backend = backend
        added = backend.get_added_tokens_decoder()
        self.added = {i: t.content for i, t in added.items()}
        self.special = {t.content: i for i, t in added.items() if t.special}
        types = _json_types(backend.decoder.__getstate__() if backend.decoder is not None else None)
        if backend.pre_tokenizer is not None:
            types |= _json_types(backend.pre_tokenizer.__getstate__())
        if "ByteLevel" in types:
            self.style = "byte_level"
            self.byte_to_char = gpt2_byte_to_unicode()
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
            byte_text = byte_piece_text(raw)
            return byte_text if byte_text is not None else raw.replace("▁", " ")
        return self.backend.decode([token_id], skip_special_tokens=False)

    def candidates(self, text: str) -> list[str]:
        found = [text]
        if self.style == "byte_level":
            found.append("".join(self.byte_to_char[b] for b in text.encode("utf-8")))
        elif self.style == "metaspace":
            found += [text.replace(" ", "▁"), byte_piece_for(text)]
        return [c for c in found if c is not None]


def template_bos(state: bytes | None) -> str | None:
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


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json`, run by the `tokenizers` package.

    Args:
        path: the tokenizer.json file (or pass `backend`, an already built `tokenizers.Tokenizer`).
        backend: a `tokenizers.Tokenizer` to wrap instead of reading `path`.
    """

    parse_special = True  # tokenizers and transformers match added tokens in the text
    skip_special = False  # transformers' decode keeps special tokens
    backend_checks_ids = True

    def __init__(self, path: str | os.PathLike | None = None, *, backend: Any = None):
        if backend is None:
            from tokenizers import Tokenizer as BackendTokenizer

            try:
                backend = BackendTokenizer.from_file(str(path))
            except Exception as error:  # the Rust side raises a bare Exception for malformed JSON
                raise CheckpointError(f"cannot read {path} as a Hugging Face tokenizer.json: {error}") from error
        self.backend = backend
        self._as_text_backend = None  # a copy with encode_special_tokens set, built on first use
        self.source = str(path) if path is not None else "tokenizers.Tokenizer"
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._text = HFTokenText(backend)
        self.pad_id = backend.padding["pad_id"] if backend.padding else None
        # A TemplateProcessing post-processor that starts with a special token is how tokenizer.json adds BOS
        # (Llama 2/3); we add it ourselves (so that `bos=` can override it) and record which token it is.
        self.add_bos = False
        bos_token = template_bos(backend.post_processor.__getstate__() if backend.post_processor else None)
        if bos_token is not None:
            self.bos_id, self.add_bos = self._raw_to_id(bos_token), True
        self.special_tokens_map = {}
        self.guess_specials()

    def _encode_text(self, text: str, parse_special: bool) -> list[int]:
        backend = self.backend if parse_special else self._special_as_text()
        return backend.encode(text, add_special_tokens=False).ids

    def _special_as_text(self) -> Any:
        # `encode_special_tokens` is a setting of the backend object, so a second copy keeps the first untouched
        # (transformers' split_special_tokens=True sets the same flag).
        if self._as_text_backend is None:
            from tokenizers import Tokenizer as BackendTokenizer

            self._as_text_backend = BackendTokenizer.from_str(self.backend.to_str())
            self._as_text_backend.encode_special_tokens = True
        return self._as_text_backend

    def _decode_ids(self, ids: list[int], skip_special: bool) -> str:
        if ids and max(ids) >= self.vocab_size:  # tokenizers drops such ids silently (negative ones raise)
            raise OutOfRangeError("token id out of range")
        return self.backend.decode(ids, skip_special_tokens=skip_special)

    def _token_text(self, token_id: int) -> str:
        return self._text.text(token_id)

    def _lookup_candidates(self, text: str) -> list[str]:
        return self._text.candidates(text)

    def _raw_to_id(self, raw: str) -> int | None:
        return self.backend.token_to_id(raw)

    def special_id(self, token: str) -> int | None:
        return self._text.special.get(token)


class TransformersTokenizer(Tokenizer):
    """Wraps a transformers tokenizer (anything with `encode` and `convert_ids_to_tokens`).

    Encoding and decoding go through the wrapped object, so ids match what transformers gives; BOS follows its
    `add_bos_token` (or what its own `encode` adds), its chat template is used by `apply_chat_template`.

    Args:
        tokenizer: e.g. `AutoTokenizer.from_pretrained(...)` or a `PreTrainedTokenizerFast`.
    """

    parse_special = True
    skip_special = False

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.source = type(tokenizer).__name__
        self.vocab_size = len(tokenizer)
        self.bos_id = getattr(tokenizer, "bos_token_id", None)
        self.eos_id = getattr(tokenizer, "eos_token_id", None)
        self.eos_ids = frozenset([self.eos_id]) if self.eos_id is not None else frozenset()
        self.pad_id = getattr(tokenizer, "pad_token_id", None)
        add_bos = getattr(tokenizer, "add_bos_token", None)
        if not isinstance(add_bos, bool):  # ask the tokenizer itself: does its encode put BOS first?
            probe = list(tokenizer.encode("a"))
            add_bos = bool(probe) and self.bos_id is not None and probe[0] == self.bos_id
        self.add_bos = add_bos
        self.parse_special = not getattr(tokenizer, "split_special_tokens", False)
        self.chat_template = getattr(tokenizer, "chat_template", None)
        self.special_tokens_map = dict(getattr(tokenizer, "special_tokens_map", {}) or {})
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._text = HFTokenText(backend) if backend is not None else None
        self.guess_specials()

    def _encode_text(self, text: str, parse_special: bool) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=not parse_special))

    def _decode_ids(self, ids: list[int], skip_special: bool) -> str:
        # No clean-up: the text should say exactly what the tokens say (" ." stays " .").
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special, clean_up_tokenization_spaces=False)

    def _token_text(self, token_id: int) -> str:
        if self._text is not None:
            return self._text.text(token_id)
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        return byte_piece_text(piece) or piece.replace("▁", " ")

    def _lookup_candidates(self, text: str) -> list[str]:
        if self._text is not None:
            return self._text.candidates(text)
        return [c for c in (text, text.replace(" ", "▁"), byte_piece_for(text)) if c is not None]

    def _raw_to_id(self, raw: str) -> int | None:
        if self._text is not None:
            return self._text.backend.token_to_id(raw)
        token_id = self.tokenizer.convert_tokens_to_ids(raw)
        return None if token_id is None or token_id == getattr(self.tokenizer, "unk_token_id", None) else token_id

    def special_id(self, token: str) -> int | None:
        if self._text is not None:
            return self._text.special.get(token)
        return self._raw_to_id(token) if token in getattr(self.tokenizer, "all_special_tokens", ()) else None
