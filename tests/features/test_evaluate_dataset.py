"""`ll.evaluate_dataset`: a dictionary's evaluation over a prompt dataset equals `ll.evaluate_dictionary` on the
same prompts, with a loaded model, a checkpoint path, a streamed model and Ray workers; it resumes and refuses
bad input by name."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from support.dictionaries import write_circuit_tracer, write_saelens
from support.models import CharTokenizer, char_model

import llama_lens as ll
from llama_lens.errors import ArgumentError, ArgumentTypeError
from llama_lens.runs.evaluate import sums_of
from llama_lens.testing import write_hf_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TESTS = Path(__file__).resolve().parents[1]
PROMPTS = ["the cat sat on the mat", "a", "hello world", "Paris is in France", "once upon a time there was a fox",
           "to be or not to be", "abc def", "quick brown fox", "jumps over the lazy dog"]  # fmt: skip
SITE = "blocks.1.hook_resid_pre"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    source = char_model(seed=4, scale=1.0)
    return write_hf_checkpoint(tmp_path_factory.mktemp("char") / "ckpt", source.cfg, source.state_dict())


@pytest.fixture(scope="module")
def model(checkpoint):
    return ll.load(checkpoint, tokenizer=CharTokenizer(), progress=False)


@pytest.fixture(scope="module")
def sae_folder(tmp_path_factory) -> Path:
    return write_saelens(tmp_path_factory.mktemp("sae") / "s", SITE, architecture="topk", k=5)


@pytest.fixture(scope="module")
def expected(model, sae_folder):
    return ll.evaluate_dictionary(model, ll.load_dictionary(sae_folder), PROMPTS).metrics


def assert_same_metrics(summary, expected):
    row = summary.iloc[0]
    assert row["hook"] == SITE and row["n_prompts"] == len(PROMPTS)
    for name, value in expected.items():
        assert row[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


def test_local_run_equals_evaluate_dictionary_and_resumes(model, sae_folder, expected, tmp_path):
    run = ll.evaluate_dataset(model, PROMPTS, dictionary=sae_folder, out=tmp_path / "r", batch_size=2, shard_size=4,
                              progress=False)  # fmt: skip
    assert run.n_shards == 3
    assert_same_metrics(run.summary(), expected)
    rows = run.to_frame()
    assert sorted(rows["prompt"]) == list(range(len(PROMPTS)))
    half = sums_of(rows[rows["prompt"] < 4], d_sae=32) + sums_of(rows[rows["prompt"] >= 4], d_sae=32)
    assert half.metrics() == pytest.approx(expected, rel=1e-5, nan_ok=True)
    again = ll.evaluate_dataset(model, PROMPTS, dictionary=ll.load_dictionary(sae_folder), out=tmp_path / "r",
                                batch_size=2, shard_size=4, progress=False)  # fmt: skip
    assert again.n_skipped == 3
    sizes = {name: (sae_folder / name).stat().st_size for name in ("cfg.json", "sae_weights.safetensors")}
    assert run.manifest["task_params"]["files"] == sizes  # a dictionary rewritten in place is not resumed


def test_streamed_checkpoint_equals_the_loaded_model(checkpoint, sae_folder, expected, tmp_path):
    run = ll.evaluate_dataset(checkpoint, PROMPTS, dictionary=sae_folder, out=tmp_path / "s", batch_size=3,
                              load_kwargs={"tokenizer": CharTokenizer(), "stream": True}, progress=False)  # fmt: skip
    assert run.manifest["model"]["load"]["stream"] is True
    assert_same_metrics(run.summary(), expected)


def test_one_dictionary_of_a_set(model, tmp_path):
    folder = write_circuit_tracer(tmp_path / "ct")
    with pytest.raises(ArgumentError, match="choose one with hook="):
        ll.evaluate_dataset(model, PROMPTS, dictionary=folder, out=tmp_path / "r", progress=False)
    run = ll.evaluate_dataset(model, PROMPTS[:3], dictionary=folder, hook="blocks.1.hook_mlp_out",
                              out=tmp_path / "r", progress=False)  # fmt: skip
    assert run.summary().iloc[0]["hook"] == "blocks.1.hook_mlp_out"


def test_bad_dictionaries_are_refused(model, checkpoint, tmp_path):
    with pytest.raises(ArgumentTypeError, match="folder or a Dictionary"):
        ll.evaluate_dataset(model, PROMPTS, dictionary=3, out=tmp_path / "a")
    wide = write_saelens(tmp_path / "w", SITE, d_in=32)
    with pytest.raises(ArgumentError, match="width 32"):
        ll.evaluate_dataset(model, PROMPTS, dictionary=wide, out=tmp_path / "b")
    with pytest.raises(ArgumentError, match="width 32"):  # a worker's model, checked at its first batch
        ll.evaluate_dataset(checkpoint, PROMPTS, dictionary=wide, out=tmp_path / "c", progress=False,
                            load_kwargs={"tokenizer": CharTokenizer()})  # fmt: skip


@pytest.mark.slow
def test_ray_workers_give_the_local_metrics(checkpoint, sae_folder, expected, tmp_path):
    ray = pytest.importorskip("ray")
    shim = tmp_path / "shim"  # see tests/runs/test_dataset.py's ray_cluster: jsonschema's slow optional import
    shim.mkdir()
    (shim / "rfc3987_syntax.py").write_text("raise ImportError('left out of the Ray processes')\n")
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(shim), str(TESTS), str(TESTS.parent), saved or ""])
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        run = ll.evaluate_dataset(checkpoint, PROMPTS, dictionary=sae_folder, out=tmp_path / "ray", executor="ray",
                                  num_workers=2, shard_size=3, load_kwargs={"tokenizer": CharTokenizer()},
                                  progress=False)  # fmt: skip
    finally:
        ray.shutdown()
        os.environ.pop("PYTHONPATH") if saved is None else os.environ.__setitem__("PYTHONPATH", saved)
    assert len({s["worker"] for s in run.stats}) == 2
    assert_same_metrics(run.summary(), expected)
    torch.manual_seed(0)
