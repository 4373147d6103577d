"""The two text readers: prompts (one per line) and texts (one per paragraph, or per line with split="line")."""

from __future__ import annotations

import pytest

import llama_lens as ll
from llama_lens.errors import ArgumentError, MissingFileError


def test_a_text_file_is_read_by_line_for_prompts_and_by_paragraph_for_texts(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("The capital of France is\nOnce upon a\n\nTwo plus two is\n")
    assert ll.read_prompts(path) == (["The capital of France is", "Once upon a", "Two plus two is"], None)
    assert ll.read_texts(path) == ["The capital of France is Once upon a", "Two plus two is"]
    assert ll.read_texts(path, split="line") == ll.read_prompts(path)[0]
    with pytest.raises(ValueError, match="split= takes one of"):
        ll.read_texts(path, split="sentence")


def test_reader_errors_are_library_errors(tmp_path):
    with pytest.raises(MissingFileError):
        ll.read_prompts(tmp_path / "missing.txt")
    with pytest.raises(MissingFileError):
        ll.read_texts(tmp_path / "missing.txt")
    with pytest.raises(ArgumentError, match="holds no prompts"):
        ll.read_prompts([])
    with pytest.raises(ArgumentError, match="no text in the list"):
        ll.read_texts([" "])
