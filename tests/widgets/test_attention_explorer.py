"""The attention explorer on a tiny model: the data the page gets (thumbnails of every shown head, the open
head's full pattern), what each change costs, the saved page, and its view run in Node (tests/widgets/
view_harness.mjs). tests/integration/test_browser.py drives it in Chromium."""

import base64
import json
import re

import numpy as np
import pytest
import torch
from support.models import run_patterns
from test_widget_views import needs_node, run_view
from test_widgets import _forwards

from llama_lens import widgets as ll_widgets
from llama_lens.widgets.attention_explorer import THUMB


@pytest.fixture(scope="module")
def model(char_model):
    return char_model()


def _unpack(explorer, layer, head):
    """The open layer/head's pattern from the bytes the page gets (lower triangle, uint16)."""
    n = len(explorer.tokens)
    tri = n * (n + 1) // 2
    index = explorer.layers.index(layer) * explorer.n_heads + head
    words = np.frombuffer(explorer.patterns, dtype="<u2")[index * tri : (index + 1) * tri] / 65535
    pattern = np.zeros((n, n))
    pattern[np.tril_indices(n)] = words
    return pattern


def test_attention_ships_the_patterns_of_the_shown_layers(model):
    explorer = ll_widgets.AttentionExplorer(model, "hello world", layers=[0, 1], head=2)
    _, cache = run_patterns(model, "hello world")
    assert explorer.meta == {
        "tokens": model.to_str_tokens("hello world"), "layers": [0, 1], "n_heads": 4, "thumb": 12, "run": 1
    }  # fmt: skip
    for layer in (0, 1):
        for head in range(4):
            expected = cache[f"blocks.{layer}.attn.hook_pattern"][0, head].numpy()
            np.testing.assert_allclose(_unpack(explorer, layer, head), expected, atol=1 / 65535)
    assert explorer.query == 11 and explorer.head == {"layer": 0, "head": 2}
    frame = explorer.to_frame()
    assert len(frame) == 12 * 13 // 2
    row = frame[(frame["query"] == 5) & (frame["key"] == 2)].iloc[0]
    assert (row["query_token"], row["key_token"]) == ("o", "e")
    assert row["weight"] == pytest.approx(float(cache["blocks.0.attn.hook_pattern"][0, 2, 5, 2]), abs=1e-6)
    fig = explorer.to_figure()
    np.testing.assert_allclose(
        fig.axes[0].images[0].get_array(), cache["blocks.0.attn.hook_pattern"][0, 2].numpy(), rtol=1e-5
    )


def test_attention_changes_and_their_cost(model):
    counter, runs = _forwards(model)
    explorer = ll_widgets.AttentionExplorer(model, "hello world")
    with model.hooks([counter]):
        explorer.head = {"layer": 0, "head": 3}
        explorer.query = 4
        explorer.zoom = 8
        explorer.layers = [0, 1]  # held under the budget: no run
        assert runs == []
        explorer.prompt = "abc"
        assert len(runs) == 1 and explorer.query == 3
    with pytest.raises(ValueError, match="query=9 is out of range"):
        explorer.query = 9
    with pytest.raises(ValueError, match=r"layers \[5\] are not held"):
        explorer.layers = [5]
    with pytest.raises(ValueError, match="head layer 1 is not shown"):
        ll_widgets.AttentionExplorer(model, "hi").head = {"layer": 1, "head": 0}

    small = ll_widgets.AttentionExplorer(model, "hello world", cache_budget=0)
    with model.hooks([counter]):
        runs.clear()
        small.layers = [1]  # over the budget: only the shown layers are kept, so this runs the model
        assert len(runs) == 1 and small.head["layer"] == 1


def test_attention_from_a_padded_cache(model):
    tokens, mask = model.prepare_tokens(["ab", "xyz"])  # "ab" is left-padded: <pad> <s> a b
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, attention_mask=mask)
    names = model.to_str_tokens(tokens[0])
    explorer = ll_widgets.AttentionExplorer(cache, tokens=names, batch_index=0, attention_mask=mask, head=1)
    assert explorer.tokens == ["<s>", "a", "b"]
    np.testing.assert_allclose(_unpack(explorer, 0, 1), cache["blocks.0.attn.hook_pattern"][0, 1, 1:, 1:].numpy(),
                               atol=1 / 65535)  # fmt: skip
    with pytest.raises(ValueError, match="fixed cache"):
        explorer.prompt = "other"
    with pytest.raises(ValueError, match=r"batch_index=2 is out of range: the cache holds 2 prompts"):
        ll_widgets.AttentionExplorer(cache, batch_index=2)
    # The former name keeps working for one release, with a warning naming the new one.
    with pytest.warns(
        DeprecationWarning, match=r"^AttentionExplorer\(prompt_index=...\) is deprecated .*use batch_index="
    ):
        second = ll_widgets.AttentionExplorer(cache, tokens=model.to_str_tokens(tokens[1]), prompt_index=1)
    assert second.batch_index == second.prompt_index == 1 and second.tokens == model.to_str_tokens(tokens[1])
    with pytest.raises(ValueError, match="attention_mask= is for a cache of a padded batch"):
        ll_widgets.AttentionExplorer(model, "ab", attention_mask=mask)


def test_attention_save_html_carries_the_patterns(model, tmp_path):
    explorer = ll_widgets.AttentionExplorer(model, "hello", layers=[1])
    page = explorer.save_html(tmp_path / "attention.html").read_text()
    state = json.loads(re.search(r"const state = (.*);\n", page).group(1))
    assert base64.b64decode(state["patterns"]) == explorer.patterns
    assert "https://" not in page


@needs_node
def test_attention_thumbnails_drawn_once_and_text_kept(model, tmp_path):
    explorer = ll_widgets.AttentionExplorer(model, "hello world")
    state = explorer.page_state()
    layers, n_heads = state["meta"]["layers"], state["meta"]["n_heads"]
    steps = [{"report": "start"}, {"set": "head", "value": {"layer": layers[-1], "head": 1}}, {"report": "opened"}]
    out = run_view(tmp_path, state, steps, which="attention")
    assert out["errors"] == []
    start, opened = out["reports"]["start"], out["reports"]["opened"]
    assert start["thumbs"] == opened["thumbs"] == len(layers) * n_heads
    assert start["open_thumbs"] == opened["open_thumbs"] == 1
    assert opened["text_spans"] == len(state["meta"]["tokens"])
    # Opening a head drew one canvas (the heatmap's image), no thumbnail and no token of the text again.
    assert opened["made"]["canvas"] - start["made"]["canvas"] == 1
    assert opened["made"]["span"] == start["made"]["span"]


@needs_node
def test_attention_text_wraps_and_only_the_lines_in_sight_are_in_the_page(model, tmp_path):
    explorer = ll_widgets.AttentionExplorer(model, "hello world, " * 23)  # 299 characters and the BOS
    assert len(explorer.tokens) == 300
    # The stand-in measures 6 px a character: a 72 px box (12 px of margin) takes 10 a line, and 100 px of height
    # shows 5 lines of 24 px; two more either side are kept.
    steps = [{"box": ["ll-text", 72, 100]}, {"report": "top"}, {"mouseover": 5}, {"report": "hovered"}]
    steps += [{"scroll": [0, 20 * 24]}, {"report": "scrolled"}, {"mouseover": 210}, {"report": "hovered below"}]
    out = run_view(tmp_path, explorer.page_state(), steps, which="attention")
    assert out["errors"] == []
    top, hovered, scrolled, below = (out["reports"][k] for k in ("top", "hovered", "scrolled", "hovered below"))
    # Lines 0..6: "<s>" and 7 characters, then 10 a line; no line wider than the box.
    assert top["text_positions"] == list(range(68)) and top["text_spans"] == 68
    assert all(len(line) <= 10 for line in top["text_lines"]) and top["text_lines"][1] == "orld, hell"
    # A pointer moving over the text recolours the spans in the page and builds none.
    assert hovered["made"].get("span") == top["made"].get("span") and hovered["coloured_spans"] == 6
    # Scrolled to line 20: lines 18..26 are in the page, and only they.
    assert scrolled["text_positions"] == list(range(178, 268))
    weights = explorer.pattern(0)[0, 210, 178:211]  # query 210's keys in the page (the open head: layer 0, head 0)
    assert below["made"].get("span") == scrolled["made"].get("span")
    assert below["coloured_spans"] == int(((weights * 65535).round() > 0).sum()) > 0


# ------------------------------------------------------------------------------------------ what the page is sent
def _thumbnail(explorer, layer, head):
    """A head's thumbnail from the bytes the page gets: [side, side] shades (lower triangle; -1 above)."""
    side, n_heads = explorer.meta["thumb"], explorer.n_heads
    tri = side * (side + 1) // 2
    index = explorer.layers.index(layer) * n_heads + head
    shades = np.frombuffer(explorer.thumbs, dtype=np.uint8)[index * tri : (index + 1) * tri]
    out = np.full((side, side), -1)
    out[np.tril_indices(side)] = shades
    return out


def test_thumbnails_are_the_brightest_weight_of_each_block(model):
    explorer = ll_widgets.AttentionExplorer(model, "hello world, " * 10, layers=[0, 1])
    n = len(explorer.tokens)
    assert n == 131 and explorer.meta["thumb"] == 44  # blocks of 3 positions (the last holds 2)
    assert len(explorer.thumbs) == 2 * explorer.n_heads * 44 * 45 // 2
    for layer, head in [(0, 0), (1, 3)]:
        pattern = explorer.pattern(layer)[head]
        padded = torch.zeros(132, 132)
        padded[:n, :n] = pattern
        brightest = padded.view(44, 3, 44, 3).amax(dim=(1, 3))
        expected = (brightest.sqrt() * 255).round().numpy()
        shown = _thumbnail(explorer, layer, head)
        below = np.tril_indices(44)
        np.testing.assert_array_equal(shown[below], expected[below])
        assert shown[below].max() > 200  # every query row sums to 1: some block of it is bright


def test_the_frame_grows_with_the_shown_heads_thumbnails_only(model):
    text = "hello world, " * 23  # 300 positions
    one = ll_widgets.AttentionExplorer(model, text, layers=[0])
    both = ll_widgets.AttentionExplorer(model, text, layers=[0, 1])
    side = one.meta["thumb"]
    assert side <= THUMB and len(both.thumbs) - len(one.thumbs) == model.cfg.n_heads * side * (side + 1) // 2
    state = both.get_state()  # what the page is sent, and what a notebook saved with its widget state stores
    assert sum(len(v) for v in state.values() if isinstance(v, bytes)) == len(both.thumbs) < 300 * 301
    # The saved page still carries every shown head's full pattern: it has no kernel to ask.
    assert len(both.patterns) == 2 * model.cfg.n_heads * 300 * 301


def _pattern_of(buffer, n):
    shown = np.zeros((n, n))
    shown[np.tril_indices(n)] = np.frombuffer(buffer, dtype="<u2") / 65535
    return shown


def test_the_kernel_answers_the_pages_request_for_a_head_without_a_model_run(model):
    counter, runs = _forwards(model)
    explorer = ll_widgets.AttentionExplorer(model, "hello world", layers=[0, 1])
    run = explorer.meta["run"]
    request = {"want": "head", "layer": 1, "head": 2, "run": run}
    with model.hooks([counter]):
        explorer.head = {"layer": 1, "head": 2}
        reply, buffers = explorer.answer(request)
    assert runs == [] and reply == request and len(buffers) == 1
    np.testing.assert_allclose(_pattern_of(buffers[0], 12), explorer.pattern(1)[2].numpy(), atol=1 / 65535)
    # Hostile or late requests get a reason, never an exception in the kernel's message handler.
    assert explorer.answer(request | {"layer": 5})[0]["error"] == "layer 5, head 2 is not shown"
    assert "error" in explorer.answer(request | {"head": "2"})[0]
    assert "unknown request" in explorer.answer(["head"])[0]["error"]
    explorer.prompt = "abc"  # new data: a new run number, so the page never mixes the two
    assert explorer.meta["run"] == run + 1 and explorer.answer(request) == (request | {"stale": True}, [])


def _live_state(explorer):
    """The synced values as a notebook's page gets them (no `patterns`: those heads come from the kernel)."""
    state = explorer.page_state()
    del state["patterns"]
    return state


@needs_node
def test_the_page_shows_the_thumbnail_until_the_kernel_sends_the_pattern(model, tmp_path):
    explorer = ll_widgets.AttentionExplorer(model, "hello world", layers=[0, 1])
    state = _live_state(explorer)
    run = explorer.meta["run"]
    first = {"want": "head", "layer": 0, "head": 0, "run": run}
    opened = {"want": "head", "layer": 1, "head": 2, "run": run}
    reply, buffers = explorer.answer(opened)
    answer = reply | {"pattern": base64.b64encode(buffers[0]).decode()}  # the harness passes no buffers
    steps = [
        {"report": "start"},
        {"set": "head", "value": {"layer": 1, "head": 2}},
        {"report": "waiting"},
        {"click": "text:CSV"},
        {"report": "csv refused"},
        {"deliver": answer | {"run": run - 1}},  # about older data: dropped
        {"report": "stale"},
        {"deliver": answer},
        {"click": "text:CSV"},
        {"report": "answered"},
        {"set": "head", "value": {"layer": 1, "head": 2}},
        {"report": "again"},
    ]
    out = run_view(tmp_path, state, steps, which="attention")
    assert out["errors"] == []
    reports = out["reports"]
    assert reports["start"]["asked"] == [first] and reports["waiting"]["asked"] == [opened]
    assert "the thumbnail until the kernel sends the full pattern" in _title(reports["waiting"])
    assert reports["csv refused"]["downloads"] == [] and "has not come yet" in _status(reports["csv refused"])
    assert "thumbnail" in _title(reports["stale"])
    assert "thumbnail" not in _title(reports["answered"]) and reports["answered"]["downloads"] == ["attention_L1H2.csv"]
    rows = out["csv"][0].splitlines()
    assert len(rows) == 1 + 12 * 13 // 2 and rows[1].startswith("1,2,0,")
    assert len(out["timings"]["open"]) == 2 and len(out["timings"]["open_thumb"]) == 1
    assert reports["again"]["asked"] == []  # the page keeps what it was sent


@needs_node
def test_a_saved_page_opens_every_head_from_what_it_carries(model, tmp_path):
    explorer = ll_widgets.AttentionExplorer(model, "hello <!--<script>x", layers=[0, 1])
    state = explorer.page_state() | {"offline": True}
    steps = [{"set": "head", "value": {"layer": 1, "head": 3}}, {"report": "opened"}, {"click": "text:CSV"},
             {"report": "csv"}]  # fmt: skip
    out = run_view(tmp_path, state, steps, which="attention")
    assert out["errors"] == [] and "thumbnail" not in _title(out["reports"]["opened"])
    assert out["reports"]["opened"]["asked"] == []  # a saved page has no kernel to ask
    assert out["reports"]["csv"]["downloads"] == ["attention_L1H3.csv"]
    assert out["timings"]["open"] and "open_thumb" not in out["timings"]


def _title(report):
    return report["texts"]["title"]


def _status(report):
    return report["texts"]["status"]


@needs_node
def test_long_prompts_get_labelled_cells_that_scroll(model, tmp_path):
    explorer = ll_widgets.AttentionExplorer(model, "hello world, " * 23)  # 300 positions
    steps = [{"report": "default"}, {"hover": [70 + 2.5 * 10, 70 + 6.5 * 10]}, {"report": "hovered"}]
    steps += [{"set": "zoom", "value": 2}, {"report": "zoomed out"}]
    out = run_view(tmp_path, explorer.page_state(), steps, which="attention")
    assert out["errors"] == []
    # 10 px cells with the tokens written beside them (70 px of labels), not 1 px cells without: 3,070 px wide.
    assert out["reports"]["default"]["heatmap"] == [{"width": "3070px", "labels": 70}]
    assert (
        out["reports"]["hovered"]["tooltip"].startswith("query 6 ")
        and "→ key 2 " in out["reports"]["hovered"]["tooltip"]
    )
    assert out["reports"]["zoomed out"]["heatmap"] == [{"width": "600px", "labels": 0}]  # the whole at once
