"""The dataset runner (llama_lens.runs.runner): prompt sources, batching by length, Parquet shards checked against
direct `logit_lens` / `direct_logit_attribution` calls per prompt, resume after SIGKILL, the manifest, and the
Ray executor against the local one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from support.models import CharTokenizer, assert_same_top_k

import llama_lens as ll
from llama_lens.data.texts import read_prompts
from llama_lens.errors import ManifestMismatchError
from llama_lens.runs.executors import ModelSpec, ShardWorker
from llama_lens.runs.prompts import make_records, plan_shards
from llama_lens.runs.shards import ShardJob
from llama_lens.runs.tasks import LensTask
from llama_lens.testing import write_hf_checkpoint

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
# Lengths from 1 to 30 characters, in no order, so that shards and batches mix and pad them.
pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = [
    "the cat sat on the mat",
    "a",
    "hello world",
    "Paris is in France",
    "xyz",
    "once upon a time there was a fox",
    "to be or not to be",
    "abc def",
    "q",
    "lorem ipsum dolor sit",
    "one two three four five",
    "zz",
    "quick brown fox",
    "jumps over",
    "the lazy dog sleeps all day",
    "mm hmm",
    "abcdefghijklmnop",
    "x y z",
]
TARGETS = [" ", "e", "a", " ", "z", "x", "b", "f", " ", "t", "s", "z", " ", "o", "y", "m", "q", "!"]
ATOL = 1e-5


@pytest.fixture(scope="module")
def checkpoint(char_model, tmp_path_factory) -> Path:
    source = char_model()
    return write_hf_checkpoint(tmp_path_factory.mktemp("char") / "ckpt", source.cfg, source.state_dict())


@pytest.fixture(scope="module")
def model(checkpoint):
    return ll.load(checkpoint, tokenizer=CharTokenizer(), progress=False)


def stacked(column: pd.Series) -> torch.Tensor:
    """A list column (numpy arrays per cell) as one tensor [rows, k]."""
    return torch.from_numpy(np.stack(column.to_numpy()))


def lens_rows(frame: pd.DataFrame, prompt: int) -> pd.DataFrame:
    return frame[frame["prompt"] == prompt].reset_index(drop=True)


def assert_matches_logit_lens(
    model, frame: pd.DataFrame, prompts, targets, positions, *, top_k=5, readout=("embed", "resid_post")
) -> None:
    """Every prompt's rows against `ll.logit_lens` on that prompt alone (no padding, no batch)."""
    assert sorted(frame["prompt"].unique()) == list(range(len(prompts)))
    for i, text in enumerate(prompts):
        n_tokens = len(model.tokenizer.encode(text))
        own = positions(n_tokens)
        direct = ll.logit_lens(
            model, text, target=None if targets is None else targets[i], positions=own, top_k=top_k, readout=readout
        )
        rows = lens_rows(frame, i)
        n_readouts = direct.n_readouts
        assert len(rows) == n_readouts * len(own)
        # Rows are read-out major, then position.
        assert rows["label"].tolist() == [label for label in direct.labels for _ in own]
        assert rows["position"].tolist() == own * n_readouts
        assert rows["token"].tolist() == [direct.str_tokens[0][p] for p in own] * n_readouts

        def expected(tensor):  # [1, n_readouts, n_pos, ...] -> [n_readouts * n_pos, ...]
            return tensor[0].flatten(0, 1)

        ids, probs = stacked(rows["top_ids"]), stacked(rows["top_probs"])
        assert_same_top_k(ids, probs, expected(direct.top_probs), expected_ids=expected(direct.top_ids), atol=ATOL)
        assert [list(cell) for cell in rows["top_tokens"]] == [
            [model.tokenizer.token_strs([t])[0] for t in row] for row in ids.tolist()
        ]
        for column, field in (("entropy", "entropy"), ("kl_to_final", "kl_to_final")):
            torch.testing.assert_close(
                torch.tensor(rows[column].to_numpy()), expected(getattr(direct, field)), atol=ATOL, rtol=0
            )
        if targets is not None:
            assert rows["target"].tolist() == [targets[i]] * len(rows)
            for column in ("target_prob", "target_logit"):
                torch.testing.assert_close(
                    torch.tensor(rows[column].to_numpy()),
                    expected(getattr(direct, column + "s"))[:, 0],
                    atol=ATOL,
                    rtol=0,
                )
            # A rank may differ by the tokens tied with the target within rounding; exact here on the whole.
            assert (torch.tensor(rows["target_rank"].to_numpy()) - expected(direct.target_ranks)[:, 0]).abs().max() <= 1


# ------------------------------------------------------------------------------------------- prompt sources
def test_prompt_sources_agree(tmp_path):
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n\n")
    (tmp_path / "p.jsonl").write_text(
        "\n".join(json.dumps({"question": p, "answer": t, "other": 1}) for p, t in zip(PROMPTS, TARGETS))
    )
    pq.write_table(pa.table({"question": PROMPTS, "answer": TARGETS}), tmp_path / "p.parquet")

    assert read_prompts(PROMPTS) == (PROMPTS, None)
    assert read_prompts(tmp_path / "p.txt") == (PROMPTS, None)
    assert read_prompts(str(tmp_path / "p.jsonl"), column="question", target_column="answer") == (PROMPTS, TARGETS)
    assert read_prompts(tmp_path / "p.parquet", column="question", target_column="answer") == (PROMPTS, TARGETS)


def test_prompt_source_errors(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"text": "a"}\n{"prompt": "b"}\n')
    with pytest.raises(ValueError, match=r"p\.jsonl, line 2: no field 'text'"):
        read_prompts(tmp_path / "p.jsonl")
    pq.write_table(pa.table({"question": ["a"]}), tmp_path / "p.parquet")
    with pytest.raises(ValueError, match=r"no column 'text' \(its columns: \['question'\]\)"):
        read_prompts(tmp_path / "p.parquet")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_prompts(tmp_path / "missing.txt")
    (tmp_path / "p.csv").write_text("a\n")
    with pytest.raises(ValueError, match="unknown type '.csv'"):
        read_prompts(tmp_path / "p.csv")
    with pytest.raises(ValueError, match="prompt 1 is int"):
        read_prompts(["a", 3])
    with pytest.raises(ValueError, match="prompt 1 has 2 targets, prompt 0 has 1"):
        make_records(["a", "b"], targets=["x", ["y", "z"]])


def test_plan_sorts_by_length_and_keeps_indices():
    records = make_records(PROMPTS)
    n_tokens = [len(p) + 1 for p in PROMPTS]
    shards = plan_shards(records, n_tokens, shard_size=5)
    order = [r.index for shard in shards for r in shard.records]
    assert sorted(order) == list(range(len(PROMPTS)))
    lengths = [n_tokens[i] for i in order]
    assert lengths == sorted(lengths)
    assert [len(s.records) for s in shards] == [5, 5, 5, 3]
    assert all(PROMPTS[r.index] == r.text for shard in shards for r in shard.records)


# ------------------------------------------------------------------------------------------------- results
def test_lens_rows_match_logit_lens_per_prompt(model, tmp_path):
    # Batches of 4 prompts of different lengths are left-padded; every prompt must read as if run alone.
    run = ll.lens_dataset(
        model, PROMPTS, out=tmp_path / "run", target=TARGETS, batch_size=4, shard_size=7, progress=False
    )
    assert (run.n_shards, run.n_skipped) == (3, 0)
    frame = run.to_frame()
    assert_matches_logit_lens(model, frame, PROMPTS, TARGETS, lambda n: [n - 1])

    summary = run.summary()
    assert summary["label"].tolist() == ["embed", "0_post", "1_post"]
    for label, group in frame.groupby("label", sort=False):
        row = summary[summary["label"] == label].iloc[0]
        assert row["n_prompts"] == len(PROMPTS)
        for column in ("entropy", "kl_to_final", "top_prob", "target_prob", "target_rank"):
            assert abs(row[column] - group[column].mean()) <= 1e-6 * max(1.0, abs(row[column]))
        assert row["target_top1"] == (group["target_rank"] == 0).mean()


def test_positions_all_and_from_start(model, tmp_path):
    run = ll.lens_dataset(
        model, PROMPTS, out=tmp_path / "all", positions="all", readout="resid_mid", top_k=3, progress=False
    )
    assert_matches_logit_lens(
        model, run.to_frame(), PROMPTS, None, lambda n: list(range(n)), top_k=3, readout="resid_mid"
    )
    # Ints count from each prompt's first token (BOS included); past a prompt's end they are left out.
    run = ll.lens_dataset(model, PROMPTS, out=tmp_path / "ints", positions=[1, -1], progress=False)
    frame = run.to_frame()
    assert_matches_logit_lens(model, frame, PROMPTS, None, lambda n: sorted({1 % n, n - 1} if n > 1 else {0}))


def test_attribution_rows_match_direct_logit_attribution(model, tmp_path):
    run = ll.attribution_dataset(
        model, PROMPTS, out=tmp_path / "attr", target=TARGETS, heads=True, batch_size=5, progress=False
    )
    frame = run.to_frame()
    for i, text in enumerate(PROMPTS):
        direct = ll.direct_logit_attribution(model, text, target=TARGETS[i], heads=True)
        rows = lens_rows(frame, i)
        assert rows["label"].tolist() == direct.labels
        torch.testing.assert_close(
            torch.tensor(rows["contribution"].to_numpy()), direct.components[0, :, 0, 0], atol=ATOL, rtol=0
        )
        torch.testing.assert_close(
            torch.tensor(rows["final_logit"].to_numpy()),
            direct.final_logits[0, 0, 0].expand(len(rows)),
            atol=ATOL,
            rtol=0,
        )
        attn = rows[rows["component"] == "attn"]
        heads = stacked(attn["head_contributions"])  # [n_layers, n_heads]
        torch.testing.assert_close(heads, direct.heads[0, :, :, 0, 0], atol=ATOL, rtol=0)
        assert rows[rows["component"] != "attn"]["head_contributions"].isna().all()
    summary = run.summary()
    assert summary["label"].tolist() == ["embed", "0_attn", "0_mlp", "1_attn", "1_mlp"]
    torch.testing.assert_close(
        torch.tensor(summary["contribution"].to_numpy()),
        torch.tensor(frame.groupby("label", sort=False)["contribution"].mean().to_numpy()),
    )


def test_bad_arguments(model, checkpoint, tmp_path):
    with pytest.raises(ValueError, match=r"prompt 1: target 'ab' is not a single token"):
        ll.lens_dataset(model, ["a", "b"], out=tmp_path / "t", target=["a", "ab"], progress=False)
    with pytest.raises(ValueError, match="pass the checkpoint's path"):
        ll.lens_dataset(model, PROMPTS, out=tmp_path / "r", executor="ray")
    with pytest.raises(ValueError, match="executor must be one of"):
        ll.lens_dataset(model, PROMPTS, out=tmp_path / "r", executor="dask")
    with pytest.raises(ValueError, match="num_workers=2 needs executor='ray'"):
        ll.lens_dataset(model, PROMPTS, out=tmp_path / "r", num_workers=2)
    with pytest.raises(ValueError, match="unknown read-out"):
        ll.lens_dataset(checkpoint, PROMPTS, out=tmp_path / "r", readout="resid_post_")
    with pytest.raises(ValueError, match="needs targets"):
        ll.attribution_dataset(model, PROMPTS, out=tmp_path / "r")
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------------------- manifest, resume
def test_rerun_with_other_parameters_is_refused(model, tmp_path):
    out = tmp_path / "run"
    first = ll.lens_dataset(model, PROMPTS, out=out, shard_size=6, progress=False)
    again = ll.lens_dataset(model, PROMPTS, out=out, shard_size=6, progress=False)
    assert (again.n_skipped, again.stats) == (first.n_shards, [])
    with pytest.raises(ManifestMismatchError, match=r"task_params\.top_k: 5 there, 3 now.*another out= folder"):
        ll.lens_dataset(model, PROMPTS, out=out, shard_size=6, top_k=3, progress=False)
    with pytest.raises(ManifestMismatchError, match=r"prompts\.count: 18 there, 17 now"):
        ll.lens_dataset(model, PROMPTS[:-1], out=out, shard_size=6, progress=False)
    with pytest.raises(ManifestMismatchError, match=r"shard_size: 6 there, 5 now"):
        ll.lens_dataset(model, PROMPTS, out=out, shard_size=5, progress=False)


RESUME_SCRIPT = """
import sys, time
sys.path[:0] = [{tests!r}, {root!r}]
import torch
import llama_lens as ll
from support.models import CharTokenizer

torch.set_num_threads(1)
model = ll.load({checkpoint!r}, tokenizer=CharTokenizer(), progress=False)
slow = lambda tensor, *, hook: time.sleep(0.15)  # one pause per batch: the run outlasts the kill
with model.hooks([("hook_embed", slow)]):
    ll.lens_dataset(model, {prompts!r}, out={out!r}, target={targets!r}, **{kwargs!r})
"""


def test_resume_after_sigkill_gives_the_uninterrupted_files(model, checkpoint, tmp_path):
    prompts, targets = PROMPTS * 3, TARGETS * 3
    kwargs = {"batch_size": 2, "shard_size": 2, "progress": False}
    out = tmp_path / "killed"
    script = RESUME_SCRIPT.format(
        tests=str(TESTS), root=str(ROOT), checkpoint=str(checkpoint), prompts=prompts, out=str(out),
        targets=targets, kwargs=kwargs,
    )  # fmt: skip
    process = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    shards = out / "shards"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(shards.glob("*.parquet"))) < 3:
        assert process.poll() is None, process.stderr.read().decode()
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = len(list(shards.glob("*.parquet")))
    n_shards = len(prompts) // 2
    assert 3 <= finished < n_shards, "the kill should land half way"

    resumed = ll.lens_dataset(model, prompts, out=out, target=targets, **kwargs)
    assert resumed.n_skipped == finished and len(resumed.stats) == n_shards - finished
    assert not list(shards.glob(".*.tmp-*"))
    assert len(pd.read_parquet(shards)) == len(resumed.to_frame())  # the folder reads as one table
    whole = ll.lens_dataset(model, prompts, out=tmp_path / "whole", target=targets, **kwargs)
    assert sorted(p.name for p in shards.iterdir()) == sorted(p.name for p in (tmp_path / "whole/shards").iterdir())
    assert_same_rows(resumed.to_frame(), whole.to_frame())
    assert_same_rows(resumed.summary(), whole.summary())


def assert_same_rows(frame: pd.DataFrame, expected: pd.DataFrame) -> None:
    """Same columns, same rows in the same order: equal where exact, float columns within rounding, top-k ids
    equal where their probabilities are not tied."""
    assert list(frame.columns) == list(expected.columns)
    assert len(frame) == len(expected)
    for column in frame.columns:
        values, wanted = frame[column], expected[column]
        if column == "top_ids":
            probs, wanted_probs = stacked(frame["top_probs"]), stacked(expected["top_probs"])
            assert_same_top_k(stacked(values), probs, wanted_probs, expected_ids=stacked(wanted), atol=ATOL)
        elif column in ("top_tokens", "top_probs", "top_id", "top_token"):
            continue  # follow top_ids (ties) and top_probs (checked with them)
        elif values.dtype.kind == "f":
            torch.testing.assert_close(
                torch.tensor(values.to_numpy()), torch.tensor(wanted.to_numpy()), atol=ATOL, rtol=0
            )
        elif column == "target_rank":
            assert (values - wanted).abs().max() <= 1
        else:
            assert values.tolist() == wanted.tolist(), column


# ------------------------------------------------------------------------------------------------------ ray
SKIP_RFC3987_SYNTAX = (
    "raise ImportError('left out of the Ray processes of tests/test_dataset.py: it builds a parser on import')\n"
)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    import ray

    # Every Ray process imports jsonschema, whose optional rfc3987-syntax (installed with jupyter's extras)
    # builds an Earley parser on import: 10 s per process, past the 15 s the raylet gives its agents to start
    # (ray-project/ray#65983). A module of that name that raises ImportError makes jsonschema go without it.
    shim = tmp_path_factory.mktemp("shim")
    (shim / "rfc3987_syntax.py").write_text(SKIP_RFC3987_SYNTAX)
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "RAY_USAGE_STATS_ENABLED")}
    # The workers unpickle CharTokenizer from tests/support/models.py; the Ray processes inherit this environment.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(shim), str(TESTS), str(ROOT), saved["PYTHONPATH"] or ""])
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # offline: no usage statistics
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_ray_writes_the_local_rows(ray_cluster, checkpoint, tmp_path):
    kwargs = dict(
        target=TARGETS, batch_size=3, shard_size=4, activations=["blocks.1.hook_resid_post"], progress=False,
        load_kwargs={"tokenizer": CharTokenizer()},
    )  # fmt: skip
    distributed = ll.lens_dataset(checkpoint, PROMPTS, out=tmp_path / "ray", executor="ray", num_workers=2, **kwargs)
    assert ray_cluster.is_initialized()  # a connection it did not make is left open
    assert len({s["worker"] for s in distributed.stats}) == 2
    local = ll.lens_dataset(checkpoint, PROMPTS, out=tmp_path / "local", **kwargs)
    assert distributed.manifest == local.manifest
    assert_same_rows(distributed.to_frame(), local.to_frame())
    stored, expected = distributed.activations(), local.activations()
    assert len(stored) == len(expected) == sum(len(p) + 1 for p in PROMPTS)
    for i in range(0, len(stored), 7):
        assert (stored[i]["prompt"], stored[i]["position"]) == (expected[i]["prompt"], expected[i]["position"])
        torch.testing.assert_close(stored[i]["blocks.1.hook_resid_post"], expected[i]["blocks.1.hook_resid_post"])
    # A folder finished by Ray resumes (skips everything) locally: the executor is not a parameter of the run.
    assert ll.lens_dataset(checkpoint, PROMPTS, out=tmp_path / "ray", **kwargs).n_skipped == distributed.n_shards


def test_shard_worker_loads_the_model_from_its_path_and_writes_the_local_shard(checkpoint, model, tmp_path):
    # What each Ray actor runs, here in this process: the model loaded from the path, one shard processed.
    local = ll.lens_dataset(model, PROMPTS, out=tmp_path / "local", target=TARGETS, shard_size=6, progress=False)
    records = make_records(PROMPTS, TARGETS)
    shard = plan_shards(records, [len(p) + 1 for p in PROMPTS], shard_size=6)[1]
    job = ShardJob(out=str(tmp_path / "worker"), task=LensTask(("embed", "resid_post")), batch_size=16)
    worker = ShardWorker(ModelSpec(str(checkpoint), {"tokenizer": CharTokenizer()}), job, num_threads=1)
    stats = worker.run(shard)
    assert (stats["shard"], stats["n_prompts"], stats["worker"]) == (1, 6, os.getpid())
    written = pd.read_parquet(tmp_path / "worker/shards/shard-00001.parquet")
    assert_same_rows(written, pd.read_parquet(tmp_path / "local/shards/shard-00001.parquet"))
    assert sorted(written["prompt"].unique()) == sorted(r.index for r in shard.records)
    assert local.n_shards == 3
