"""The two text readers: `read_prompts` (one prompt per item, for dataset runs) and `read_texts` (running text,
for training and evaluating lenses).

They read the same kinds of source (a list of strings, a text file, a Parquet column) but mean different units:

- a prompt is one line: `read_prompts` reads a `.txt` file as one prompt per line (blank lines skipped), and also
  reads JSONL files (a field per line) with an optional target per prompt;
- a text is a passage: `read_texts` reads a `.txt` or `.md` file as one text per paragraph (blank lines between
  them, line breaks inside one folded into spaces) by default, or one per line with `split="line"`.

Every reader cuts a file into lines with `split_lines`, whose only separators are "\n", "\r\n" and "\r".
`str.splitlines` also cuts at form feed, vertical tab, NEL (U+0085), U+2028, U+2029 and the file separators:
characters that may sit inside a prompt (and, raw, inside a JSON string), where a cut would shift the index of
every later prompt.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ArgumentError, MissingFileError
from ..validate import check_choice
from .generated import generated_texts  # noqa: F401  (its home before data/generated.py)

TEXT_SUFFIXES = (".txt", ".md")
PARQUET_SUFFIXES = (".parquet", ".pq")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
SPLITS = ("paragraph", "line")
LINE_BREAK = re.compile(r"\r\n|\r|\n")  # the only line separators of a text file (see the module docstring)
BLANK_LINES = re.compile(r"\n[ \t]*\n")  # between paragraphs (after line breaks are made "\n")


# -------------------------------------------------------------------------------------------------- prompts
def read_prompts(
    prompts: str | os.PathLike | Sequence[str], *, column: str = "text", target_column: str | None = None
) -> tuple[list[str], list[Any] | None]:
    """Prompt texts (and targets) from a list, a text file, a JSONL file or a Parquet file.

    Args:
        prompts: a list of texts; a `.txt` file (one prompt per line, blank lines skipped); a `.jsonl` file
            (one JSON object per line, the prompt in field `column`); a `.parquet` file (column `column`).
        column: the field or column holding the prompt (JSONL, Parquet).
        target_column: the field or column holding each prompt's target (a token's text or id, or a list of
            them); JSONL and Parquet only.

    Returns:
        The texts and the targets (None without `target_column`).

    Raises:
        MissingFileError (a FileNotFoundError): a file that does not exist.
        ArgumentError (a ValueError): an unknown file type, a missing field or column (named, with its line), a
            prompt that is not text.
    """
    if isinstance(prompts, (str, os.PathLike)):
        path = Path(prompts)
        if not path.is_file():
            raise MissingFileError(
                f"prompts file {str(path)!r} does not exist; pass a list of texts, or a .txt, .jsonl or .parquet file"
            )
        suffix = path.suffix.lower()
        if suffix == ".txt":
            if target_column is not None:
                raise ArgumentError(f"{path} is a text file (one prompt per line): it has no column {target_column!r}")
            return _checked_prompts(_lines(path), str(path)), None
        if suffix in JSONL_SUFFIXES:
            return _read_jsonl(path, column, target_column)
        if suffix == ".parquet":
            keys = [column] if target_column is None else [column, target_column]
            values = _parquet_columns(path, keys)
            return _checked_prompts(values[0], str(path)), (None if target_column is None else values[1])
        raise ArgumentError(f"prompts file {path} has an unknown type {suffix!r}; use .txt, .jsonl or .parquet")
    if target_column is not None:
        raise ArgumentError(
            "target_column names a field of a JSONL or Parquet file; with a list of prompts use target="
        )
    if not isinstance(prompts, Sequence):  # a tensor of ids is not a Sequence either
        raise ArgumentError(f"prompts must be a list of texts or a file path, got {type(prompts).__name__}")
    return _checked_prompts(list(prompts), "prompts"), None


def _checked_prompts(texts: list[Any], source: str) -> list[str]:
    if not texts:
        raise ArgumentError(f"{source} holds no prompts")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ArgumentError(f"{source}: prompt {i} is {type(text).__name__} {text!r}, not text")
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:  # a lone surrogate, from a JSON escape such as "\ud800"
                raise ArgumentError(
                    f"{source}: prompt {i} holds {text[err.start]!r} at character {err.start}, a lone surrogate, "
                    "which is not text any tokenizer can encode"
                ) from None
    return texts


def _read_jsonl(path: Path, column: str, target_column: str | None) -> tuple[list[str], list[Any] | None]:
    texts, targets = [], []
    for number, line in enumerate(split_lines(_read_text(path)), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ArgumentError(f"{path}, line {number}: not JSON ({err.msg})") from None
        for key in (column, target_column):
            if key is not None and (not isinstance(row, dict) or key not in row):
                found = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise ArgumentError(
                    f"{path}, line {number}: no field {key!r} (found {found}); pass column=/target_column="
                )
        texts.append(row[column])
        if target_column is not None:
            targets.append(row[target_column])
    return _checked_prompts(texts, str(path)), (targets if target_column is not None else None)


# ---------------------------------------------------------------------------------------------------- texts
def read_texts(source: str | Path | Sequence[str], *, column: str = "text", split: str = "paragraph") -> list[str]:
    """The texts in `source`, non-empty ones only.

    Args:
        source: a list of strings; a text file (.txt, .md: see `split`); or a Parquet file (.parquet, .pq: the
            string column `column`, one text per row).
        column: the Parquet column to read.
        split: how a text file is cut into texts: "paragraph" (the default: paragraphs separated by blank lines,
            each one text with its line breaks folded into spaces) or "line" (each non-blank line one text, as
            `read_prompts` reads a prompt file).

    Returns:
        The texts, in order.

    Raises:
        MissingFileError (a FileNotFoundError): a path that does not exist.
        ArgumentError (a ValueError): a file of another kind, a missing or non-text Parquet column, or no text.
    """
    split = check_choice("split", split, SPLITS, "way to split a text file")
    if isinstance(source, (str, Path)) and (isinstance(source, Path) or _looks_like_path(source)):
        path = Path(source)
        if not path.is_file():
            raise MissingFileError(f"no text file at {path}")
        suffix = path.suffix.lower()
        if suffix in TEXT_SUFFIXES and split == "line":
            texts = _lines(path)
        elif suffix in TEXT_SUFFIXES:
            text = "\n".join(split_lines(_read_text(path)))
            texts = [" ".join(p.split()) for p in BLANK_LINES.split(text)]
        elif suffix in PARQUET_SUFFIXES:
            texts = [text for text in _parquet_columns(path, [column], text=True)[0] if text is not None]
        else:
            raise ArgumentError(
                f"{path}: read texts from {TEXT_SUFFIXES} files ({split}s) or {PARQUET_SUFFIXES} files (a column), "
                f"not {suffix or 'a file without suffix'}; or pass a list of strings"
            )
        where = str(path)
    elif isinstance(source, str):
        raise ArgumentError(
            f"texts must be a list of strings or a path to a text or Parquet file; got the string {source[:40]!r}, "
            "which is not a path: wrap a single text in a list"
        )
    else:
        texts = list(source)
        bad = [i for i, text in enumerate(texts) if not isinstance(text, str)]
        if bad:
            raise ArgumentError(f"texts[{bad[0]}] is {type(texts[bad[0]]).__name__}, not a string")
        where = "the list"
    texts = [text for text in texts if text.strip()]
    if not texts:
        raise ArgumentError(f"no text in {where}")
    return texts


def _looks_like_path(text: str) -> bool:
    return "\n" not in text and len(text) < 4096 and (Path(text).suffix.lower() in TEXT_SUFFIXES + PARQUET_SUFFIXES)


# ---------------------------------------------------------------------------------------------------- files
def split_lines(text: str) -> list[str]:
    """`text` cut at "\n", "\r\n" and "\r" only (not at form feed, NEL, U+2028, ...: see the module docstring);
    a final line break ends the last line rather than starting an empty one."""
    lines = LINE_BREAK.split(text)
    return lines[:-1] if lines and lines[-1] == "" else lines


def _read_text(path: Path) -> str:
    """The file as UTF-8 text (a byte-order mark dropped).

    Raises:
        ArgumentError (a ValueError): bytes that are not UTF-8, with their offset.
    """
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ArgumentError(f"{path} is not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8") from None


def _lines(path: Path) -> list[str]:
    """The file's non-blank lines, as they are."""
    return [line for line in split_lines(_read_text(path)) if line.strip()]


def _parquet_columns(path: Path, columns: Sequence[str], *, text: bool = False) -> list[list[Any]]:
    """The named columns of a Parquet file as lists, after checking they exist (and hold strings, with `text`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    for column in columns:
        if column not in schema.names:
            raise ArgumentError(
                f"{path} has no column {column!r} (its columns: {schema.names[:10]}); pass column=/target_column="
            )
        kind = schema.field(column).type
        if text and not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise ArgumentError(f"{path}: column {column!r} holds {kind}, not text")
    table = pq.read_table(path, columns=list(columns))
    return [table.column(column).to_pylist() for column in columns]
