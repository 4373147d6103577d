"""Hostile dataset runs: finished shards damaged, cut, deleted or swapped for a link under their final names
(recomputed on the rerun, or refused by name), a manifest that is not a run's, and positions=[k] past the end of
short prompts (those prompts left out and listed, the run goes on)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch

import llama_lens as ll
from llama_lens.errors import ArgumentError, ManifestMismatchError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["the cat sat", "a", "hello world", "xyz", "once upon a time", "ab cd", "q", "lorem ipsum"]
KWARGS = {"batch_size": 2, "shard_size": 2, "progress": False}
HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def model(char_model):
    return char_model(seed=1)


def run(model, out, **kwargs):
    return ll.lens_dataset(model, PROMPTS, out=out, activations=[HOOK], **(KWARGS | kwargs))


def same_frame(a: pd.DataFrame, b: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(a.drop(columns=["top_tokens"]), b.drop(columns=["top_tokens"]), atol=1e-6)


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "byte flipped": flip,
    "cut short": lambda path: os.truncate(path, path.stat().st_size // 2),
    "emptied": lambda path: path.write_bytes(b""),
    "deleted": lambda path: path.unlink(),
    "record garbled": lambda path: path.with_name(f".{path.name}.digest").write_text("{"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("kind", ["shards/shard-00001.parquet", "activations/shard-00001.safetensors"])
def test_a_damaged_finished_shard_is_recomputed(model, tmp_path, damage, kind):
    first = run(model, tmp_path / "run")
    expected, rows = first.to_frame(), first.activations()[5][HOOK]
    DAMAGE[damage](tmp_path / "run" / kind)
    again = run(model, tmp_path / "run")
    assert again.n_skipped == first.n_shards - 1 and [s["shard"] for s in again.stats] == [1]
    same_frame(again.to_frame(), expected)
    data = again.activations()
    assert torch.equal(data[5][HOOK], rows) and len(data) == len(first.activations())
    assert run(model, tmp_path / "run").n_skipped == first.n_shards  # whole again: trusted again


def test_a_shard_swapped_for_a_link_out_of_the_run_is_refused(model, tmp_path):
    run(model, tmp_path / "run")
    shard = tmp_path / "run" / "shards" / "shard-00002.parquet"
    foreign = tmp_path / "elsewhere.parquet"
    shard.rename(foreign)
    shard.symlink_to(foreign)
    with pytest.raises(ArgumentError, match="shard-00002.parquet.* leads out of"):
        run(model, tmp_path / "run")


@pytest.mark.parametrize("text", ["{half", "[]", "\xff"])
def test_a_manifest_that_is_not_a_run_is_refused_by_name(model, tmp_path, text):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "manifest.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(ManifestMismatchError, match="manifest.json is (not JSON|a JSON list)"):
        run(model, tmp_path / "run")


def test_positions_past_short_prompts_leave_them_out_and_the_run_goes_on(model, tmp_path):
    result = ll.lens_dataset(model, PROMPTS, out=tmp_path / "run", positions=[5], **KWARGS)
    lengths = [len(model.to_tokens(p)[0]) for p in PROMPTS]
    short = [i for i, n in enumerate(lengths) if n <= 5]
    assert short and result.prompts_without_positions == short
    frame = result.to_frame()
    assert sorted(set(frame["prompt"])) == [i for i in range(len(PROMPTS)) if i not in short]
    assert set(frame["position"]) == {5}
    # The rows of a long prompt are those of its run alone.
    alone = ll.lens_dataset(model, [PROMPTS[0]], out=tmp_path / "alone", positions=[5], **KWARGS).to_frame()
    same_frame(frame[frame["prompt"] == 0].reset_index(drop=True), alone)
    assert ll.lens_dataset(model, PROMPTS, out=tmp_path / "run", positions=[5], **KWARGS).n_skipped == result.n_shards


def test_positions_past_every_prompt_is_an_argument_error(model, tmp_path):
    with pytest.raises(ArgumentError, match=r"no prompt has any of positions=\[50\]: the longest has \d+ tokens"):
        ll.lens_dataset(model, PROMPTS, out=tmp_path / "run", positions=[50], **KWARGS)


def test_index_records_shard_digests_and_no_temporary_is_left(model, tmp_path):
    run(model, tmp_path / "run")
    index = json.loads((tmp_path / "run" / "activations" / "index.json").read_text())
    for shard in index["shards"]:
        path = tmp_path / "run" / "activations" / shard["file"]
        assert shard["size"] == path.stat().st_size and len(shard["sha256"]) == 64
    assert not list((tmp_path / "run").rglob("*.tmp-*"))
