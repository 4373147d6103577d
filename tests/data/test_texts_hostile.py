"""Hostile text files: characters that `str.splitlines` takes for line breaks inside a prompt, Windows and old
Mac line ends, raw U+2028 in JSONL strings, bytes that are not UTF-8 and lone surrogates. Prompt indices never
shift, and a refused file is an ArgumentError naming it."""

from __future__ import annotations

import json

import pytest

from llama_lens.data.texts import read_prompts, read_texts, split_lines
from llama_lens.errors import ArgumentError

INSIDE_A_LINE = ["\f", "\v", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


@pytest.mark.parametrize("char", INSIDE_A_LINE)
def test_txt_prompts_are_cut_only_at_line_breaks(tmp_path, char):
    path = tmp_path / "prompts.txt"
    prompts = [f"first{char}half", "second", f"third {char} end"]
    path.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    assert read_prompts(path) == (prompts, None)
    assert read_texts(path, split="line") == prompts


@pytest.mark.parametrize("end", ["\n", "\r\n", "\r"])
def test_every_line_end_gives_the_same_prompts(tmp_path, end):
    path = tmp_path / "prompts.txt"
    path.write_bytes(end.join(["one", "", "two", "three"]).encode() + end.encode())
    assert read_prompts(path)[0] == ["one", "two", "three"]


def test_jsonl_with_raw_line_separators_in_strings_is_read(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [{"text": "a\u2028b", "target": "x"}, {"text": "c\x85d\u2029e", "target": "y"}]
    # ensure_ascii=False writes U+2028 raw, as many tools do (valid JSON: it is not a JSON line break).
    path.write_text("\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    assert read_prompts(path, target_column="target") == (["a\u2028b", "c\x85d\u2029e"], ["x", "y"])


def test_paragraphs_with_windows_line_ends(tmp_path):
    path = tmp_path / "book.txt"
    path.write_bytes(b"first line\r\nstill first\r\n\r\nsecond\r\n  \r\nthird\f page\r\n")
    assert read_texts(path) == ["first line still first", "second", "third page"]


def test_a_byte_order_mark_is_not_part_of_the_first_prompt(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeffhello\nworld\n".encode())
    assert read_prompts(path)[0] == ["hello", "world"]


@pytest.mark.parametrize("name", ["prompts.txt", "prompts.jsonl"])
def test_bytes_that_are_not_utf8_are_refused_by_name(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(ArgumentError, match=rf"{name} is not UTF-8 text \(byte 13"):
        read_prompts(path)


def test_a_lone_surrogate_prompt_is_refused_by_index(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "bad \\ud800 half"}\n')
    with pytest.raises(ArgumentError, match=r"prompts.jsonl: prompt 1 holds '\\ud800' at character 4"):
        read_prompts(path)


def test_split_lines_separators():
    assert split_lines("a\r\nb\rc\nd\u2028e\n") == ["a", "b", "c", "d\u2028e"]
    assert split_lines("") == [] and split_lines("\n") == [""] and split_lines("x") == ["x"]
