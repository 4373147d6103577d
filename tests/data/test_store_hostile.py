"""Hostile activation stores: shards cut short or changed in place (before and while open), index.json values of
the wrong type, and shard files the index places outside the store. Every case ends in a LlamaLensError naming
the file and key: no SIGBUS (the cases that used to die run in a child process whose exit status is checked),
no rows silently read as zeros, no file outside the store served as its own."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llama_lens as ll
from llama_lens.data.shard_reader import ShardReader
from llama_lens.errors import ArgumentError, MissingFileError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["the cat sat on the mat", "a", "hello world", "xyz", "once upon a time there", "ab cd"]
HOOK = "blocks.0.hook_resid_post"
# A child process may use this much address space: torch's own mappings fit, a runaway allocation does not.
MEMORY_CAP = 8 << 30


@pytest.fixture(scope="module")
def store(char_model, tmp_path_factory):
    """A finished store of two shards; each test copies it before damaging it."""
    out = tmp_path_factory.mktemp("store") / "run"
    ll.store_activations(char_model(), PROMPTS, hook_names=[HOOK], out=out, shard_size=3, progress=False)
    return out / "activations"


@pytest.fixture
def copy(store, tmp_path):
    target = tmp_path / "activations"
    target.mkdir()
    for path in store.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def edit_index(folder: Path, change) -> None:
    path = folder / "index.json"
    index = json.loads(path.read_text())
    change(index)
    path.write_text(json.dumps(index))


def run_child(code: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter under a memory cap: a signal death shows as a negative return code."""
    prelude = f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({MEMORY_CAP}, {MEMORY_CAP}))\n"
    return subprocess.run([sys.executable, "-c", prelude + code], cwd=ROOT, capture_output=True, text=True, timeout=120)


CUT_WHILE_OPEN = """
import os, llama_lens as ll
from llama_lens.errors import LlamaLensError
data = ll.ActivationDataset({folder!r}, unit={unit!r})
items = [data[i] for i in range(len(data))]  # every shard is open and read once
shard = data._files[-1]
os.truncate(shard, int(os.path.getsize(shard) * {keep}))
try:
    for i in range(len(data)):
        data[i]
except LlamaLensError as err:
    print("REFUSED", type(err).__name__, err)
else:
    print("READ")
"""


@pytest.mark.parametrize("unit", ["token", "prompt"])
@pytest.mark.parametrize("keep", [0.5, 0.97])
def test_shard_cut_while_open_is_an_error_not_sigbus(copy, unit, keep):
    result = run_child(CUT_WHILE_OPEN.format(folder=str(copy), unit=unit, keep=keep))
    assert result.returncode == 0, f"died with {result.returncode}: {result.stderr[-2000:]}"
    assert "REFUSED ArgumentError" in result.stdout, result.stdout + result.stderr[-2000:]
    assert "shard-00001.safetensors" in result.stdout


def test_shard_cut_before_open_is_refused_by_size(copy):
    shard = copy / "shard-00001.safetensors"
    os.truncate(shard, shard.stat().st_size - 100)
    with pytest.raises(ArgumentError, match=r"shard-00001.safetensors is \d+ bytes, but the store's index says"):
        ll.ActivationDataset(copy)


def test_last_page_zeroed_is_refused_not_read_as_zeros(copy):
    # Same size, last bytes zeroed: what a cut-and-regrown or half-flushed file looks like.
    shard = copy / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-512:] = bytes(512)
    shard.write_bytes(bytes(data))
    dataset = ll.ActivationDataset(copy)
    with pytest.raises(ArgumentError, match=r"shard-00000.safetensors does not match its digest .*shards\[0\]"):
        for i in range(len(dataset)):
            dataset[i]


def test_missing_shard_is_named(copy):
    (copy / "shard-00001.safetensors").unlink()
    with pytest.raises(MissingFileError, match=r"shard-00001.safetensors \(shards\[1\]"):
        ll.ActivationDataset(copy)


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.safetensors", "sub/../../outside.safetensors"])
def test_index_pointing_outside_the_store_is_refused(copy, tmp_path, name):
    edit_index(copy, lambda index: index["shards"][0].update(file=name))
    with pytest.raises(ArgumentError, match=r"shards\[0\]\.file = .* (is not inside|leads out of)"):
        ll.ActivationDataset(copy)


def test_symlinked_shard_out_of_the_store_is_refused(copy, tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    (copy / "shard-00000.safetensors").rename(foreign)
    (copy / "shard-00000.safetensors").symlink_to(foreign)
    with pytest.raises(ArgumentError, match=r"shards\[0\]\.file = 'shard-00000.safetensors' leads out of"):
        ll.ActivationDataset(copy)


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (lambda index: index.update(hook_names="blocks.0.hook_resid_post"), "hook_names"),
        (lambda index: index["shapes"].update({HOOK: "sixteen"}), f"shapes.{HOOK}"),
        (lambda index: index["shards"][1].update(size="1234"), r"shards\[1\]\.size"),
        (lambda index: index["shards"][0].update(file=7), r"shards\[0\]\.file"),
        (lambda index: index.update(shards={"file": "x"}), "shards"),
        (lambda index: index.pop("shapes"), "'shapes'"),
    ],
)
def test_wrong_typed_index_values_name_the_key(copy, change, key):
    edit_index(copy, change)
    with pytest.raises(ArgumentError, match=rf"index.json.*{key}"):
        ll.ActivationDataset(copy)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\xff\xfe"])
def test_index_that_is_not_an_object_is_refused(copy, text):
    (copy / "index.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(ArgumentError, match="index.json"):
        ll.ActivationDataset(copy)


def shard_bytes(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (struct.pack("<Q", 1 << 62) + b"{}", "header length"),  # no 4 EiB allocation before the check
        (b"\x01\x00", "the header length ends past the file's end"),
        (shard_bytes({"prompt": {"dtype": "I64", "shape": [1000], "data_offsets": [0, 8000]}}, bytes(16)), "'prompt'"),
        (shard_bytes({"prompt": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 16]}}, bytes(16)), "'dtype'"),
        (shard_bytes({"prompt": {"dtype": "I64", "shape": [-2], "data_offsets": [0, 16]}}, bytes(16)), "'shape'"),
        (shard_bytes({"prompt": [1, 2]}, bytes(16)), "'prompt'"),
    ],
)
def test_shard_headers_are_checked_against_the_file(tmp_path, content, match):
    path = tmp_path / "shard.safetensors"
    path.write_bytes(content)
    with pytest.raises(ArgumentError, match=match) as caught:
        ShardReader(path)
    assert str(path) in str(caught.value)


def test_reader_matches_safetensors_and_survives_pickling(store):
    from safetensors.torch import load_file

    path = store / "shard-00000.safetensors"
    expected, reader = load_file(path), ShardReader(path)
    for name, tensor in expected.items():
        assert torch.equal(reader.rows(name), tensor)
        assert torch.equal(reader.rows(name, 1, 3), tensor[1:3])
    reader.close()
    import pickle

    data = pickle.loads(pickle.dumps(ll.ActivationDataset(store)))
    assert torch.equal(data[0][HOOK], ll.ActivationDataset(store)[0][HOOK])
