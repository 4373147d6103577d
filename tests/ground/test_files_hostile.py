"""Atomic writes: a save that fails half way leaves the file it was replacing whole, and no temporary behind."""

from __future__ import annotations

import os

import pytest

from llama_lens.errors import UsageError
from llama_lens.files import atomic_path, default_file_mode, write_text_atomic


def test_a_write_that_fails_half_way_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("old")
    with pytest.raises(UsageError, match="disk full"), atomic_path(path) as temporary:
        temporary.write_text("half of the ne")
        raise UsageError("disk full")  # stands for the write's own failure (ENOSPC)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["config.json"]


def test_a_write_that_succeeds_replaces_the_file_with_the_usual_mode(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("old")
    write_text_atomic(path, "new")
    assert path.read_text() == "new"
    assert os.stat(path).st_mode & 0o777 == default_file_mode()
    assert os.listdir(tmp_path) == ["config.json"]


def test_the_temporary_keeps_the_final_name(tmp_path):
    # torch.save records the file name inside the zip; Meta shards are ordered by it.
    with atomic_path(tmp_path / "consolidated.03.pth") as temporary:
        assert temporary.name == "consolidated.03.pth" and temporary.parent != tmp_path
        temporary.write_bytes(b"x")
    assert (tmp_path / "consolidated.03.pth").read_bytes() == b"x"
