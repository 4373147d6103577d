"""The logit-lens explorer's frames grow with what the page shows: every cell's top-1, the first positions' top-k
and the shown metric come with a model run; the page asks for the rest through the widget's message channel
(lens_data.answer) as it scrolls, hovers, changes the colouring or saves a CSV. Saved pages carry everything."""

import base64
import json

import numpy as np
import pytest
from test_widget_views import csv_rows, needs_node, run_view

from llama_lens import widgets as ll_widgets
from llama_lens.widgets.lens_data import FRAME_COLUMNS, answer

PROMPT = "hello world " * 8  # 97 positions with the BOS: past the frame's first FRAME_COLUMNS


@pytest.fixture(scope="module")
def model(char_model):
    return char_model()


@pytest.fixture(scope="module")
def explorer(model):
    return ll_widgets.LogitLensExplorer(model, PROMPT, target="o")


def decode(part, n_readouts):
    """A columns part as (ids, probs), each [R, stop - start, k]."""
    shape = (n_readouts, part["stop"] - part["start"], part["k"])
    top = np.frombuffer(base64.b64decode(part["top"]), dtype="<" + part["packed"]["top"]).reshape(shape)
    probs = np.frombuffer(base64.b64decode(part["probs"]), dtype="<u2").reshape(shape) / 65535
    return np.array(part["vocab_ids"])[top], probs


def floats(packed):
    return np.frombuffer(base64.b64decode(packed), dtype="<f4")


def live_state(explorer):
    """What a live page holds: the traits as the kernel sends them (the frame, not the saved page's panels)."""
    return json.loads(json.dumps(explorer.page_state() | {"panels": explorer.panels}))


def test_the_frame_holds_every_top_token_and_the_first_positions_top_k(explorer):
    result = explorer.result
    n_readouts, n_positions = result.n_readouts, len(result.positions)
    (panel,) = explorer.panels
    top1, first = panel["parts"]
    assert (top1["start"], top1["stop"], top1["k"]) == (0, n_positions, 1)
    assert (first["start"], first["stop"], first["k"]) == (0, FRAME_COLUMNS, 10)
    ids, probs = decode(top1, n_readouts)
    np.testing.assert_array_equal(ids, result.top_ids[0, :, :, :1].numpy())
    np.testing.assert_allclose(probs, result.top_probs[0, :, :, :1].numpy(), atol=1 / 65535)
    ids, probs = decode(first, n_readouts)
    np.testing.assert_array_equal(ids, result.top_ids[0, :, :FRAME_COLUMNS].numpy())
    np.testing.assert_allclose(probs, result.top_probs[0, :, :FRAME_COLUMNS].numpy(), atol=1 / 65535)
    assert panel["metrics"] == {}  # coloured by the top-1 probability: no matrix of its own
    assert panel["run"] >= 1


def test_the_frame_grows_with_the_positions_in_sight_not_with_all(model):
    explorer = ll_widgets.LogitLensExplorer(model, "hello world " * 24)  # 289 positions
    frame, whole = (len(json.dumps(panel)) for panel in (explorer.panels[0], explorer.full_panel()))
    # The top-k of FRAME_COLUMNS (32) positions of 289 and the top-1 of the rest: under half of the saved page.
    assert frame < whole / 2


def test_the_frame_carries_the_shown_metric(model):
    explorer = ll_widgets.LogitLensExplorer(model, "hello", metric="entropy")
    (panel,) = explorer.panels
    assert list(panel["metrics"]) == ["entropy"]
    np.testing.assert_allclose(floats(panel["metrics"]["entropy"]["values"]), explorer.result.entropy[0].reshape(-1))
    assert [part["k"] for part in panel["parts"]] == [10]  # a short prompt: every position's top-k at once


def test_answers_to_the_page(explorer):
    result, run_id = explorer.result, explorer.panels[0]["run"]
    request = {"want": "columns", "run": run_id, "panel": 0, "start": 64, "stop": 96}
    reply = answer(explorer.runs, run_id, request)
    assert {key: reply[key] for key in ("want", "run", "panel", "start", "stop", "k")} == request | {"k": 10}
    ids, probs = decode(reply, result.n_readouts)
    np.testing.assert_array_equal(ids, result.top_ids[0, :, 64:96].numpy())
    np.testing.assert_allclose(probs, result.top_probs[0, :, 64:96].numpy(), atol=1 / 65535)
    reply = answer(explorer.runs, run_id, {"want": "metric", "run": run_id, "panel": 0, "metric": "kl"})
    np.testing.assert_allclose(floats(reply["values"]), result.kl_to_final[0].reshape(-1).numpy())
    # An older run's request is stale (its page is about to get the new frame); bad ones are named, never raised.
    assert answer(explorer.runs, run_id, request | {"run": run_id - 1})["stale"] is True
    for bad, why in [
        (request | {"panel": 1}, "panel 1 is not one of the 1 shown"),
        (request | {"panel": True}, "panel True"),
        (request | {"start": 90, "stop": 120}, "columns [90, 120) are not within [0, 97)"),
        ({"want": "metric", "run": run_id, "panel": 0, "metric": "prob"}, "metric 'prob' is not one of"),
        ({"want": "everything"}, "unknown request"),
        ("columns", "unknown request"),
    ]:
        assert why in answer(explorer.runs, run_id, bad)["error"]


def test_requests_through_the_widget_channel(explorer, monkeypatch):
    replies = []
    monkeypatch.setattr(explorer, "send", lambda content, buffers=None: replies.append(content))
    run_id = explorer.panels[0]["run"]
    explorer._handle_custom_msg({"want": "metric", "run": run_id, "panel": 0, "metric": "entropy"}, [])
    assert replies[0]["metric"] == "entropy" and replies[0]["run"] == run_id


@needs_node
def test_the_page_asks_for_what_it_shows_and_draws_it_when_it_comes(explorer, tmp_path):
    run_id = explorer.panels[0]["run"]
    columns = {"want": "columns", "start": 64, "stop": 96, "run": run_id, "panel": 0}
    kl = {"want": "metric", "metric": "kl", "run": run_id, "panel": 0}
    entropy = {"want": "metric", "metric": "entropy", "run": run_id, "panel": 0}
    steps = [
        {"report": "start"},
        {"hover": [80.5 * 36, 18 * 1.5]},  # position 80: its top-k is not in the frame
        {"report": "hovered"},
        {"deliver": answer(explorer.runs, run_id, columns)},
        {"report": "arrived"},
        {"set": "metric", "value": "kl"},
        {"report": "kl asked"},
        {"deliver": answer(explorer.runs, run_id, kl) | {"run": run_id - 1}},  # an older run's: dropped
        {"report": "stale"},
        {"deliver": answer(explorer.runs, run_id, kl)},
        {"report": "kl"},
        {"click": "text:CSV"},
        {"report": "csv asked"},
        {"deliver": answer(explorer.runs, run_id, entropy)},
        {"report": "csv"},
    ]
    out = run_view(tmp_path, live_state(explorer), steps)
    assert out["errors"] == []
    reports = out["reports"]
    # In sight at first: positions 0..22 (800 px of 36 px cells), in the frame's first FRAME_COLUMNS; the block
    # beyond is asked for at once, so the tooltips there are ready before the pointer gets there.
    assert FRAME_COLUMNS == 32 and reports["start"]["asked"] == [columns | {"start": 32, "stop": 64}]
    assert "loading" in reports["hovered"]["tooltip"] and reports["hovered"]["asked"] == [columns]
    assert reports["arrived"]["tooltip"].count("<tr>") == 10 and "loading" not in reports["arrived"]["tooltip"]
    assert "loading" in reports["kl asked"]["legend"] and reports["kl asked"]["asked"] == [kl]
    assert "loading" in reports["stale"]["legend"]
    high = float(explorer.result.kl_to_final.max())
    assert reports["kl"]["legend"].endswith(f"0.00 … {high:.2f}")
    # The CSV waits for the entropy it writes, then holds every cell.
    assert reports["csv asked"]["asked"] == [entropy] and reports["csv asked"]["downloads"] == []
    assert reports["csv"]["downloads"] == ["logit_lens.csv"]
    header, *rows = csv_rows(out["csv"][0])
    assert len(rows) == explorer.result.n_readouts * 97
    entropies = [float(row[header.index("entropy")]) for row in rows]
    np.testing.assert_allclose(entropies, explorer.result.entropy[0].reshape(-1).numpy(), rtol=1e-5)


@needs_node
def test_scrolling_asks_for_the_positions_in_sight(explorer, tmp_path):
    run_id = explorer.panels[0]["run"]
    steps = [{"scroll": [70 * 36, 0]}, {"report": "scrolled"}, {"scroll": [70 * 36, 0]}, {"report": "again"}]
    out = run_view(tmp_path, live_state(explorer), steps)
    assert out["errors"] == []
    # The block beyond the first screen (32..64) is asked for with the first picture; then positions 70..92 are
    # in sight (800 px), and a block of 32 beyond: the blocks from 64 on, asked once.
    asked = [(m["start"], m["stop"]) for m in out["reports"]["scrolled"]["asked"]]
    assert asked == [(32, 64), (64, 96), (96, 97)]
    assert all(m["run"] == run_id for m in out["reports"]["scrolled"]["asked"])
    assert out["reports"]["again"]["asked"] == []


@needs_node
def test_a_saved_page_asks_for_nothing(explorer, tmp_path):
    state = explorer.page_state() | {"offline": True}
    steps = [{"scroll": [70 * 36, 0]}, {"hover": [80.5 * 36, 18 * 1.5]}, {"set": "metric", "value": "kl"}]
    steps += [{"click": "text:CSV"}, {"report": "saved"}]
    out = run_view(tmp_path, state, steps)
    assert out["errors"] == [] and out["reports"]["saved"]["asked"] == []
    assert out["reports"]["saved"]["tooltip"].count("<tr>") == 10
    assert out["reports"]["saved"]["downloads"] == ["logit_lens.csv"]
