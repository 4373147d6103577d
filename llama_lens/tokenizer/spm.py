"""A sentencepiece `tokenizer.model` (Meta's Llama 1/2 releases), run by the `sentencepiece` package.

Defaults are Meta's Llama 2 code (`Tokenizer.encode(s, bos=True, eos=False)`, `Tokenizer.decode(ids)`): BOS first,
special-token text such as "</s>" in the input stays text, decode is `sentencepiece`'s (control tokens dropped).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import CheckpointError
from .base import Tokenizer, byte_piece_for, byte_piece_text


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model with Llama 2's conventions.

    With `parse_special=True`, the text of a control token ("<s>", "</s>") becomes that token and the text between
    is encoded piece by piece, as Meta's chat code builds "<s>[INST] ... [/INST]" prompts. With
    `skip_special=False`, decode writes control tokens as their text, the text between decoded by sentencepiece.

    Args:
        path: the tokenizer.model file.
        model_proto: the serialized model, instead of `path`.
    """

    add_bos = True
    parse_special = False
    skip_special = True  # sentencepiece's decode drops control tokens
    chat_format = "llama2"
    backend_checks_ids = True

    def __init__(self, path: str | os.PathLike | None = None, *, model_proto: bytes | None = None):
        import sentencepiece

        if model_proto is None:
            model_proto = Path(path).read_bytes()
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
        except (RuntimeError, OSError) as error:
            raise CheckpointError(f"cannot read {path} as a sentencepiece model: {error}") from error
        self.source = str(path) if path is not None else "sentencepiece model"
        self.vocab_size = self.sp.vocab_size()
        # sentencepiece says -1 for "none"
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        eos = self.sp.eos_id()
        self.eos_id, self.eos_ids = (eos, frozenset([eos])) if eos >= 0 else (None, frozenset())
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else None
        self.control = {self.sp.id_to_piece(i): i for i in range(self.vocab_size) if self.sp.is_control(i)}
        self.control_ids = frozenset(self.control.values())
        # Longest first, so that a control token that contains another is matched whole.
        names = sorted(self.control, key=len, reverse=True)
        self._control_pattern = re.compile("|".join(map(re.escape, names))) if names else None
        self.special_tokens_map = {
            key: self.sp.id_to_piece(i)
            for key, i in (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("unk_token", self.sp.unk_id()))
            if i is not None and i >= 0
        }
        self.guess_specials()

    def _encode_text(self, text: str, parse_special: bool) -> list[int]:
        if not parse_special or self._control_pattern is None:
            return self.sp.encode(text)
        ids: list[int] = []
        start = 0
        for match in self._control_pattern.finditer(text):
            if match.start() > start:
                ids += self.sp.encode(text[start : match.start()])
            ids.append(self.control[match.group()])
            start = match.end()
        if start < len(text):
            ids += self.sp.encode(text[start:])
        return ids

    def _decode_ids(self, ids: list[int], skip_special: bool) -> str:
        if skip_special:
            return self.sp.decode(ids)
        parts, run = [], []
        for token_id in ids:
            if token_id in self.control_ids:
                parts += [self.sp.decode(run), self.sp.id_to_piece(token_id)]
                run = []
            else:
                run.append(token_id)
        return "".join(parts + [self.sp.decode(run)])

    def _token_text(self, token_id: int) -> str:
        piece = self.sp.id_to_piece(token_id)
        if self.sp.is_byte(token_id):
            return byte_piece_text(piece) or piece
        if self.sp.is_control(token_id) or self.sp.is_unknown(token_id):
            return piece
        return piece.replace("▁", " ")

    def _lookup_candidates(self, text: str) -> list[str]:
        return [c for c in (text.replace(" ", "▁"), text, byte_piece_for(text)) if c is not None]

    def _raw_to_id(self, raw: str) -> int | None:
        token_id = self.sp.piece_to_id(raw)
        # piece_to_id answers unk_id for unknown pieces
        return token_id if self.sp.id_to_piece(token_id) == raw else None

    def special_id(self, token: str) -> int | None:
        return self.control.get(token)
