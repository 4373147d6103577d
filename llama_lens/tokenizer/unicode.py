"""The one check every text passes before it is tokenized: it must be encodable as UTF-8.

A Python str can hold lone surrogates (U+D800..U+DFFF): JSON's "\\ud800" escapes, files read with
errors="surrogateescape", a surrogate pair split by slicing. They are not characters and have no UTF-8 bytes, so
every tokenizer backend fails on them in its own way (tokenizers: "TextInputSequence must be str", tiktoken and
sentencepiece: UnicodeEncodeError). Here they are found first and named by position.
"""

from __future__ import annotations

from ..errors import ArgumentError


def check_text(text: str, what: str = "the text") -> None:
    """Raises ArgumentError naming the first lone surrogate in `text` and its character index."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        found = text[err.start]
        raise ArgumentError(
            f"{what} holds a lone surrogate U+{ord(found):04X} at character {err.start} (of {len(text)}): it is not "
            "a character and has no UTF-8 bytes to tokenize. Replace it, e.g. text.encode('utf-8', "
            "'replace').decode('utf-8'), or join surrogate pairs with text.encode('utf-16', "
            "'surrogatepass').decode('utf-16')"
        ) from None
