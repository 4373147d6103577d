"""Hostile GGUF files: each is refused with a CheckpointError naming the file and what is wrong, never a signal,
a silent misread or memory out of proportion to the file.

The files are built byte by byte here (not with gguf.GGUFWriter), so that duplicated keys, overlapping or
misaligned offsets and corrupt counts can be written at all.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llama_lens.errors import CheckpointError, LlamaLensError
from llama_lens.io.gguf_header import read_gguf_header
from llama_lens.tokenizer.gguf import gguf_tokenizer_config

pytest.importorskip("gguf")

U32, U64, F32, STRING, BOOL, ARRAY = 4, 10, 6, 8, 7, 9
ROOT = Path(__file__).resolve().parents[2]


def _string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _value(value_type: int, value) -> bytes:
    if value_type == STRING:
        return _string(value)
    if value_type == ARRAY:
        item_type, items = value
        body = b"".join(_value(item_type, item) for item in items)
        return struct.pack("<IQ", item_type, len(items)) + body
    return struct.pack({U32: "<I", U64: "<Q", F32: "<f", BOOL: "<?"}[value_type], value)


def build_gguf(
    path: Path,
    metadata: list[tuple[str, int, object]] = (),
    tensors: list[tuple[str, list[int], int]] | None = None,
    *,
    alignment: int = 32,
    n_tensors: int | None = None,
    n_keys: int | None = None,
) -> Path:
    """A GGUF v3 file: `metadata` as (key, type, value), `tensors` as (name, dims, data offset), all F32."""
    tensors = [("a.weight", [8], 0), ("b.weight", [8], 32)] if tensors is None else tensors
    header = b"GGUF" + struct.pack("<I", 3)
    header += struct.pack("<QQ", len(tensors) if n_tensors is None else n_tensors, n_keys or len(metadata))
    for key, value_type, value in metadata:
        header += _string(key) + struct.pack("<I", value_type) + _value(value_type, value)
    for name, dims, offset in tensors:
        header += _string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        header += struct.pack("<IQ", 0, offset)  # type 0: F32
    header += b"\0" * (-len(header) % alignment)
    end = max((offset + 4 * dims[0] for _, dims, offset in tensors if dims[0] < 2**20), default=0)
    path.write_bytes(header + b"\1" * end)
    return path


def test_a_well_formed_file_reads(tmp_path):
    header = read_gguf_header(build_gguf(tmp_path / "ok.gguf", [("general.architecture", STRING, "llama")]))
    assert set(header.tensors) == {"a.weight", "b.weight"}
    assert header.metadata == {"general.architecture": "llama"}


@pytest.mark.parametrize(
    ("metadata", "tensors", "message"),
    [
        (
            [("general.name", STRING, "x"), ("general.name", STRING, "y")],
            None,
            r"metadata key 'general.name' is stored twice",
        ),
        ([], [("a.weight", [8], 0), ("b.weight", [8], 16)], r"'b.weight' starts at data offset 16, not a multiple"),
        ([], [("a.weight", [16], 0), ("b.weight", [8], 32)], r"tensors 'a.weight' .* and 'b.weight' .* overlap"),
        ([], [("a.weight", [8], 0), ("a.weight", [8], 32)], r"tensor 'a.weight' is stored twice"),
        ([("general.alignment", U32, 24)], None, r"'general.alignment' must be a power of two"),
        ([("general.alignment", U32, 0)], None, r"'general.alignment' must be a power of two"),
        ([("general.alignment", U32, 2**30)], None, r"'general.alignment' must be a power of two"),
        ([("general.alignment", STRING, "32")], None, r"'general.alignment' must be a power of two"),
        ([("general.alignment", BOOL, True)], None, r"'general.alignment' must be a power of two"),
        ([], [("a.weight", [8, 1, 1, 1, 1], 0)], r"'a.weight' claims 5 dimensions"),
        ([], [("a.weight", [2**40], 0)], r"'a.weight' ends at byte \d+, past the end of the file"),
    ],
    ids=[
        "duplicate-key", "misaligned", "overlapping", "duplicate-tensor", "alignment-24", "alignment-0",
        "alignment-huge", "alignment-string", "alignment-bool", "five-dims", "dims-past-end",
    ],
)  # fmt: skip
def test_a_corrupt_header_is_refused_by_name(tmp_path, metadata, tensors, message):
    path = build_gguf(tmp_path / "bad.gguf", metadata, tensors)
    with pytest.raises(CheckpointError, match=r"bad\.gguf: .*" + message):
        read_gguf_header(path)


@pytest.mark.parametrize("field", ["n_keys", "n_tensors"])
def test_a_count_past_the_file_is_refused_before_anything_is_allocated(tmp_path, field):
    path = build_gguf(tmp_path / "bad.gguf", [("general.name", STRING, "x")], **{field: 2**62})
    with pytest.raises(CheckpointError, match=r"bad\.gguf: the GGUF header ends early .* claims \d+ items"):
        read_gguf_header(path)


def test_an_array_count_past_the_file_is_refused_naming_the_key(tmp_path):
    path = build_gguf(tmp_path / "bad.gguf", [("tokenizer.ggml.tokens", ARRAY, (STRING, ["a", "b"]))])
    content = bytearray(path.read_bytes())
    count_at = content.index(b"tokenizer.ggml.tokens") + len("tokenizer.ggml.tokens") + 4 + 4
    content[count_at : count_at + 8] = struct.pack("<Q", 2**60)
    path.write_bytes(bytes(content))
    with pytest.raises(CheckpointError, match=r"bad\.gguf: .*metadata key 'tokenizer.ggml.tokens' claims"):
        read_gguf_header(path)


def run_capped(script: str, tmp_path: Path, memory_bytes: int = 2 * 2**30) -> subprocess.CompletedProcess:
    """Runs `script` in a fresh interpreter under an address-space cap; a signal shows as a negative return code."""
    prelude = textwrap.dedent(f"""
        import resource, sys
        sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "tests")!r}]
        import torch, gguf  # their libraries mapped before the cap
        resource.setrlimit(resource.RLIMIT_AS, ({memory_bytes}, {memory_bytes}))
    """)
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(script)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip


def test_a_file_truncated_while_its_header_is_read_raises_instead_of_a_signal(tmp_path):
    # The first read window is made tiny, and the file is cut to its first window right after that read: the
    # next read finds it shorter. Through a memory map this was a SIGBUS.
    tokens = [f"token{i}" for i in range(2000)]
    path = build_gguf(tmp_path / "cut.gguf", [("tokenizer.ggml.tokens", ARRAY, (STRING, tokens))])
    result = run_capped(
        f"""
        import os
        import llama_lens.io.gguf_header as header
        from llama_lens.errors import CheckpointError
        header.FIRST_WINDOW = 256
        real_pread = os.pread
        def pread_then_truncate(fd, n, offset):
            data = real_pread(fd, n, offset)
            os.truncate({str(path)!r}, 256)
            return data
        header.os.pread = pread_then_truncate
        try:
            header.read_gguf_header({str(path)!r})
        except CheckpointError as err:
            print("refused:", err)
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "refused:" in result.stdout and "cut.gguf: the GGUF header ends early" in result.stdout


def test_a_corrupt_dimension_count_costs_no_memory_out_of_proportion(tmp_path):
    # A dimension count of 2**31 in a file of a few MB: once cost ~5x the file in Python ints before the error.
    path = build_gguf(tmp_path / "dims.gguf", [("general.name", STRING, "x" * 4_000_000)], [("a.weight", [8], 0)])
    content = bytearray(path.read_bytes())
    n_dims_at = content.index(b"a.weight") + len(b"a.weight")
    content[n_dims_at : n_dims_at + 4] = struct.pack("<I", 2**31)
    path.write_bytes(bytes(content))
    result = run_capped(
        f"""
        from llama_lens.io.gguf_header import read_gguf_header
        from llama_lens.errors import CheckpointError
        try:
            read_gguf_header({str(path)!r})
        except CheckpointError as err:
            print("refused:", err)
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "claims 2147483648 dimensions" in result.stdout


TOKENS = ["<unk>", "<s>", "</s>", "a", "b"]


@pytest.mark.parametrize(
    ("key", "value"),
    [("bos_token_id", 5), ("bos_token_id", -1), ("eos_token_id", 99), ("bos_token_id", "1"), ("bos_token_id", True)],
)
def test_a_special_token_id_outside_the_vocabulary_is_refused_by_name(key, value):
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": TOKENS, f"tokenizer.ggml.{key}": value}
    with pytest.raises(CheckpointError, match=rf"m\.gguf: metadata key 'tokenizer.ggml.{key}' is .*not the id"):
        gguf_tokenizer_config(meta, "m.gguf")


def test_a_special_token_id_inside_the_vocabulary_is_read():
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": TOKENS, "tokenizer.ggml.bos_token_id": 1}
    config = gguf_tokenizer_config(meta, "m.gguf")
    assert config["bos_token"] == "<s>" and config["add_bos_token"] is True


def test_a_non_bool_add_bos_token_is_refused_by_name():
    meta = {"tokenizer.ggml.tokens": TOKENS, "tokenizer.ggml.add_bos_token": "yes"}
    with pytest.raises(LlamaLensError, match=r"m\.gguf: metadata key 'tokenizer.ggml.add_bos_token'"):
        gguf_tokenizer_config(meta, "m.gguf")
