"""The interface every llama_lens tokenizer offers, and the helpers the backends share.

Defaults follow the checkpoint's own tokenizer, so that `encode(text)` gives what `AutoTokenizer` (for a Hugging
Face folder) or Meta's reference `Tokenizer.encode(text, bos=True, eos=False)` (for a Meta folder) gives:

- `bos=None` adds BOS when the checkpoint's tokenizer does (`add_bos`: tokenizer_config.json's `add_bos_token`, or
  a tokenizer.json post-processor that puts a special token first; True for Meta's Llama 2/3/4 files). A text whose
  own tokens already start with BOS (a rendered chat template) does not get a second one.
- `parse_special=None` reads special-token text such as "<|im_end|>" in the input as the special token or as plain
  text, as the reference does (`parse_special`: `tokenizers`/transformers parse added tokens, Meta's tiktoken and
  sentencepiece code keep them as text).
- `decode(ids, skip_special=None)` keeps or drops special tokens as the reference's decode does (`skip_special`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import ArgumentError, ConfigError
from .unicode import check_text

if TYPE_CHECKING:
    import torch

# Used only when neither tokenizer_config.json nor a post-processor names the BOS/EOS tokens.
BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>")
EOS_CANDIDATES = ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>", "</s>", "<eos>")
# Tokens that end a chat turn or a text in the usual Llama-family vocabularies; every one present is a stop id.
END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<|eot|>",
    "<|eom|>",
    "<|endoftext|>",
    "</s>",
    "<eos>",
    "<end_of_turn>",
)

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


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


def byte_piece_text(piece: str) -> str | None:
    """Text of a sentencepiece byte-fallback piece like "<0x0A>" ("\\n"); non-ASCII bytes stay "<0xE2>"."""
    match = _BYTE_PIECE.fullmatch(piece)
    if match is None:
        return None
    byte = int(match.group(1), 16)
    return chr(byte) if byte < 0x80 else f"<0x{byte:02X}>"


def byte_piece_for(text: str) -> str | None:
    """The byte-fallback piece that spells a one-byte text ("\\n" -> "<0x0A>"), else None."""
    data = text.encode("utf-8")
    return f"<0x{data[0]:02X}>" if len(data) == 1 else None


class Tokenizer:
    """What the model, the lens and the plots need from a tokenizer.

    Attributes:
        bos_id: the beginning-of-text id (None when the tokenizer has none).
        eos_ids: every id that ends a generation: the declared EOS and the end-of-turn tokens (e.g. "<|im_end|>",
            "<|eot_id|>", "<|eom_id|>") present in the vocabulary.
        eos_id: the main end-of-text id (the first one the checkpoint names), or None.
        pad_id: the padding id the tokenizer declares, or None.
        vocab_size: number of ids the tokenizer can produce (the model's d_vocab may be larger).
        add_bos: whether `encode` adds BOS by default, as the checkpoint's own tokenizer does.
        parse_special: whether `encode` reads special-token text as special tokens by default.
        skip_special: whether `decode` drops special tokens by default.
        chat_template: the Jinja chat template of tokenizer_config.json, or None.
        chat_format: "llama2", "llama3" or "llama4" for Meta's own chat formats (Meta folders), or None.
        special_tokens_map: the special-token strings a chat template may read (`bos_token`, `eos_token`, ...).
    """

    bos_id: int | None = None
    eos_id: int | None = None
    eos_ids: frozenset[int] = frozenset()
    pad_id: int | None = None
    vocab_size: int = 0
    add_bos: bool = True
    parse_special: bool = False
    skip_special: bool = False
    chat_template: str | None = None
    chat_format: str | None = None
    special_tokens_map: dict[str, Any] = {}  # replaced per instance, never mutated
    source: str = ""
    # True when `_decode_ids` raises (KeyError, IndexError, OverflowError, ...) on an id outside [0, vocab_size)
    backend_checks_ids: bool = False

    @property
    def padding_id(self) -> int:
        """The id left padding uses: the declared pad id, else the EOS id, else 0."""
        return next((i for i in (self.pad_id, self.eos_id) if i is not None), 0)

    def encode(self, text: str, *, bos: bool | None = None, parse_special: bool | None = None) -> list[int]:
        """Token ids of `text` [pos].

        Args:
            text: the text.
            bos: prepend `bos_id`; None does what the checkpoint's tokenizer does (`add_bos`), and never adds a
                second BOS to a text whose tokens already start with it.
            parse_special: read special-token text (e.g. "<|eot_id|>") as the special token rather than as
                plain text; None does what the checkpoint's tokenizer does (`parse_special`).

        Raises:
            ArgumentError: `text` is not a str, or holds a lone surrogate (named with its position).
        """
        if not isinstance(text, str):
            raise ArgumentError(f"encode takes a str, got {type(text).__name__}")
        check_text(text)
        ids = self._encode_text(text, self.parse_special if parse_special is None else bool(parse_special))
        return self.with_bos(ids, bos)

    def with_bos(self, ids: list[int], bos: bool | None = None) -> list[int]:
        """`ids` with BOS first when `bos` says so (None: as `encode` decides, see there)."""
        if self.bos_id is None:
            return ids
        if bos is None:
            bos = self.add_bos and not (ids and ids[0] == self.bos_id)
        return [self.bos_id, *ids] if bos else ids

    def decode(self, ids: Sequence[int], *, skip_special: bool | None = None) -> str:
        """The text of `ids` [pos].

        Args:
            ids: token ids.
            skip_special: drop special tokens (BOS, EOS, "<|eot_id|>", ...) instead of writing their text; None
                does what the checkpoint's tokenizer does (`skip_special`).
        """
        skip_special = self.skip_special if skip_special is None else bool(skip_special)
        if type(ids) is not list:  # the usual case first: a list goes to the backend as it is
            ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if not self.backend_checks_ids:
            return self._decode_ids(self._checked(ids), skip_special)
        # The backend refuses bad ids itself (no per-id Python on the way); only then are they looked for.
        try:
            return self._decode_ids(ids, skip_special)
        except (KeyError, IndexError, OverflowError, TypeError, ValueError):
            self._checked(ids)
            raise

    def token_strs(self, ids: Sequence[int]) -> list[str]:
        """The text each id stands for, e.g. " Paris" (not "ĠParis" or "▁Paris"); labels for tables and plots."""
        return [self._token_text(i) for i in self._checked(ids)]

    def _checked(self, ids: Sequence[int]) -> list[int]:
        # Backends skip, garble or raise without the id on out-of-range ids; say which id and why instead.
        ids = list(map(int, ids))
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):  # min/max: C loops, no per-id Python
            bad = [i for i in ids if not 0 <= i < self.vocab_size]
            raise ArgumentError(
                f"token ids {bad[:5]} are out of range for this tokenizer (vocab_size {self.vocab_size}, "
                f"{self.source}); a model's d_vocab may hold unused rows past the tokenizer's vocabulary"
            )
        return ids

    def id_of(self, token: str) -> int:
        """The id of the single token whose text is `token` (e.g. " Paris" with its leading space).

        Raises:
            ArgumentError: `token` is not one token; the message lists the pieces it encodes to.
        """
        if not isinstance(token, str):
            raise ArgumentError(f"id_of takes the text of a token, got {type(token).__name__}; pass an id directly")
        for raw in self._lookup_candidates(token):
            token_id = self._raw_to_id(raw)
            if token_id is not None and self._token_text(token_id) == token:
                return token_id
        ids = self.encode(token, bos=False)
        pieces = ", ".join(f"{text!r} (id {i})" for text, i in zip(self.token_strs(ids), ids))
        hint = f"pass the first piece ({self.token_strs(ids[:1])[0]!r}) or an id instead" if ids else "pass an id"
        raise ArgumentError(f"{token!r} is not a single token: it encodes to [{pieces}]; {hint}")

    def batch_encode(
        self,
        texts: Sequence[str],
        *,
        bos: bool | None = None,
        parse_special: bool | None = None,
        pad_id: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encodes several texts into one left-padded batch.

        Left padding keeps every prompt's last token in the last position, where the next-token logits are read.

        Args:
            texts: the prompts.
            bos: prepend `bos_id` to each prompt; None as `encode`.
            parse_special: as `encode`.
            pad_id: the id to pad with; defaults to `padding_id`.

        Returns:
            tokens [batch, pos] (int64) and attention_mask [batch, pos] (1 for real tokens, 0 for padding).
        """
        import torch

        if isinstance(texts, str):
            texts = [texts]
        if len(texts) == 0:
            raise ArgumentError("batch_encode needs at least one text")
        rows = [self.encode(text, bos=bos, parse_special=parse_special) for text in texts]
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

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        chat_template: str | None = None,
        **template_kwargs: Any,
    ) -> list[int] | str:
        """Formats a conversation as the checkpoint was trained to read it.

        A Hugging Face folder's template (tokenizer_config.json's `chat_template`) is rendered as transformers
        renders it (sandboxed Jinja) and the text is encoded with special tokens parsed and no BOS added, as
        transformers' `apply_chat_template` does. A Meta folder uses Meta's own format (Llama 2 `[INST]`,
        Llama 3 and 4 header tokens), encoded piece by piece as Meta's chat code does.

        Args:
            messages: dicts with "role" ("system", "user", "assistant", ...) and "content".
            add_generation_prompt: end with the header that opens the assistant's reply.
            tokenize: return token ids [pos] (True) or the formatted text (False).
            chat_template: a Jinja template to use instead of the checkpoint's.
            **template_kwargs: extra variables for the template (e.g. `tools`, `date_string`).

        Returns:
            token ids [pos] (BOS included where the format has one), or the text.

        Raises:
            ArgumentError: malformed messages, a template that raises, or no chat format for this tokenizer.
        """
        from .chat import apply_chat_template

        return apply_chat_template(
            self,
            messages,
            add_generation_prompt=add_generation_prompt,
            tokenize=tokenize,
            chat_template=chat_template,
            **template_kwargs,
        )

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, add_bos={self.add_bos}, "
            f"eos_ids={sorted(self.eos_ids)}, pad_id={self.pad_id}, source={self.source!r})"
        )

    # Each backend supplies these. A backend that knows special tokens overrides `_encode_text` / `_decode_ids`;
    # a minimal one (e.g. a character-level tokenizer in a test) only `_encode(text)` / `_decode(ids)`.
    def _encode_text(self, text: str, parse_special: bool) -> list[int]:
        return self._encode(text)

    def _decode_ids(self, ids: list[int], skip_special: bool) -> str:
        return self._decode(ids)

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

    def special_id(self, token: str) -> int | None:
        """The id of special token `token` (e.g. "<|eot_id|>"), or None when the vocabulary has no such token."""
        return self._raw_to_id(token)

    # Special tokens named by tokenizer_config.json.
    def set_specials(self, *, bos: str | None, eos: Sequence[str], pad: str | None, where: str) -> None:
        """Sets BOS/EOS/pad from token strings (tokenizer_config.json); an unknown token names `where`."""

        def resolve(token: str, key: str) -> int:
            token_id = self._raw_to_id(token)
            if token_id is None:
                raise ConfigError(f"{where}: {key} {token!r} is not in the vocabulary; fix or remove the entry")
            return token_id

        if bos is not None:
            self.bos_id = resolve(bos, "bos_token")
        if eos:
            eos_ids = [resolve(token, "eos_token") for token in eos]
            self.eos_id, self.eos_ids = eos_ids[0], frozenset(eos_ids)
        if pad is not None:
            self.pad_id = resolve(pad, "pad_token")

    def guess_specials(self) -> None:
        """Falls back on the usual Llama names when nothing named the BOS/EOS tokens, and adds the end-of-turn
        tokens of the vocabulary to `eos_ids` (generation stops at any of them)."""
        if self.bos_id is None:
            self.bos_id = next((i for t in BOS_CANDIDATES if (i := self.special_id(t)) is not None), None)
        if self.eos_id is None:
            self.eos_id = next((i for t in EOS_CANDIDATES if (i := self.special_id(t)) is not None), None)
        end_ids = {i for t in END_OF_TURN_TOKENS if (i := self.special_id(t)) is not None}
        self.eos_ids = frozenset(self.eos_ids) | end_ids | ({self.eos_id} if self.eos_id is not None else set())
