"""Atomic writes with digest records (llama_lens.data.safe_files): a write that fails half way leaves the old
file, its record and no temporary behind."""

from __future__ import annotations

import pytest

from llama_lens.data.safe_files import matches_record, read_record, write_atomic


def test_atomic_write_that_fails_keeps_the_old_file_and_no_leftover(tmp_path):
    path = tmp_path / "index.json"
    write_atomic(path, lambda p: p.write_text("old"), record=True)

    def half_then_fail(temporary):
        temporary.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, half_then_fail, record=True)
    assert path.read_text() == "old" and read_record(path)["size"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [".index.json.digest", "index.json"]


def test_a_record_tells_a_changed_file(tmp_path):
    path = tmp_path / "shard.bin"
    write_atomic(path, lambda p: p.write_bytes(b"abcdef"), record=True)
    assert matches_record(path)
    path.write_bytes(b"abcdeg")
    assert not matches_record(path)
