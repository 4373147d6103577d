"""RunOptions: checked when made, taken as options= or as keywords by the dataset entry points."""

from __future__ import annotations

import numpy as np
import pytest
from support.models import char_model

import llama_lens as ll
from llama_lens.errors import ArgumentError, ArgumentTypeError, LlamaLensError
from llama_lens.runs.options import RunOptions


def test_options_are_checked_when_made():
    assert type(RunOptions(batch_size=np.int64(4)).batch_size) is int
    with pytest.raises(ArgumentError, match="executor must be one of"):
        RunOptions(executor="dask")
    with pytest.raises(ValueError, match="batch_size=0 is out of range"):
        RunOptions(batch_size=0)
    with pytest.raises(ArgumentError, match="num_workers=2 needs executor='ray'"):
        RunOptions(num_workers=2)
    with pytest.raises(ArgumentError, match="num_gpus_per_worker must be a number >= 0"):
        RunOptions(executor="ray", num_gpus_per_worker=-1)
    with pytest.raises(ArgumentError, match="load_kwargs must be a dict"):
        RunOptions(load_kwargs=["cuda"])
    assert RunOptions(executor="ray", num_workers=2).num_workers == 2


def test_keywords_fold_into_options_and_override_them():
    base = RunOptions(batch_size=8, progress=False)
    assert RunOptions.merged(base, {}) is not None and RunOptions.merged(base, {}) == base
    assert RunOptions.merged(base, {"batch_size": 2}) == RunOptions(batch_size=2, progress=False)
    assert RunOptions.merged(None, {"shard_size": 3}) == RunOptions(shard_size=3)
    with pytest.raises(ArgumentTypeError, match="unexpected keyword argument 'batchsize'"):
        RunOptions.merged(base, {"batchsize": 2})
    with pytest.raises(ArgumentTypeError, match="options must be a RunOptions"):
        RunOptions.merged({"batch_size": 2}, {})


def test_entry_points_take_options_or_keywords_alike(tmp_path):
    model = char_model()
    prompts = ["ab", "abc", "a", "abcd", "b"]
    by_options = ll.lens_dataset(
        model, prompts, out=tmp_path / "options", options=ll.RunOptions(batch_size=2, shard_size=3, progress=False)
    )
    by_keywords = ll.lens_dataset(model, prompts, out=tmp_path / "keywords", batch_size=2, shard_size=3, progress=False)
    assert by_options.manifest["shard_size"] == by_keywords.manifest["shard_size"] == 3
    assert by_options.n_shards == by_keywords.n_shards == 2
    assert by_options.to_frame().equals(by_keywords.to_frame())
    with pytest.raises(LlamaLensError, match="unexpected keyword argument 'shardsize'"):
        ll.attribution_dataset(model, prompts, out=tmp_path / "bad", target="a", shardsize=3)


def test_store_activations_takes_hook_names_by_keyword(tmp_path):
    model = char_model()
    with pytest.warns(DeprecationWarning, match="pass hook_names= by keyword"):
        old = ll.store_activations(model, ["ab", "c"], ["hook_embed"], out=tmp_path / "old", progress=False)
    new = ll.store_activations(model, ["ab", "c"], hook_names=["hook_embed"], out=tmp_path / "new", progress=False)
    assert len(old) == len(new) == 5  # tokens: BOS + 2, BOS + 1
    with pytest.raises(ArgumentTypeError, match="needs hook_names="):
        ll.store_activations(model, ["ab"], out=tmp_path / "none", progress=False)


def test_frame_is_the_deprecated_spelling_of_to_frame(tmp_path):
    model = char_model(seed=2)
    result = ll.lens_dataset(model, ["abc", "abd"], out=tmp_path / "run", progress=False)
    with pytest.warns(DeprecationWarning, match=r"use \.to_frame\(\)"):
        assert result.frame().equals(result.to_frame())
