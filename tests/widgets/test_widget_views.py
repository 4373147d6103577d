"""The explorers' views run in Node on a stand-in DOM (tests/widgets/view_harness.mjs): every metric with and
without its data, the CSV button with and without a target, keyboard access, saved pages in every mode, and
the inlined state safe against any text (an injection corpus). Assertions are on widget state, not pixels;
tests/integration/test_browser.py drives the same controls in Chromium."""

import csv
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from llama_lens import widgets as ll_widgets
from llama_lens.widgets.base import script_json
from llama_lens.widgets.lens_data import unpack_panel
from llama_lens.widgets.lens_explorer import COLORMAPS, METRICS

NODE = shutil.which("node")
HARNESS = Path(__file__).with_name("view_harness.mjs")
WIDGETS = Path(ll_widgets.__file__).parent
needs_node = pytest.mark.skipif(NODE is None, reason="needs node to run the views")

# Texts that end or change an inline <script> or a JavaScript line, as prompts and targets would carry them.
INJECTIONS = [
    "<!--<script",
    "</script><script>alert(1)</script>",
    "</SCRIPT >",
    "<!-- a comment",
    "-->",
    "<script>",
    "]]>",
    "a & b &amp; c",
    "x\u2028y\u2029z",
    "<\\/script>",
    "'\"`${1}`",
    "\\u003c",
    "<img src=x onerror=alert(1)>",
]


@pytest.fixture(scope="module")
def model(char_model):
    return char_model()


def run_view(tmp_path, state, steps, which="lens"):
    state_path, script_path = tmp_path / "state.json", tmp_path / "script.json"
    state_path.write_text(json.dumps(state))
    script_path.write_text(json.dumps(steps))
    command = [NODE, str(HARNESS), str(WIDGETS), which, str(state_path), str(script_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
    return json.loads(done.stdout)


def csv_rows(text: str) -> list[list[str]]:
    # Split by the CSV reader: top tokens of a random model include control characters that splitlines() splits at.
    return list(csv.reader(io.StringIO(text, newline="")))


def n_cells(explorer) -> int:
    return explorer.result.n_readouts * len(explorer.result.positions)


def saved_state(page: str) -> dict:
    return json.loads(re.search(r"const state = (.*);\n", page).group(1))


# ------------------------------------------------------------------------------------------ the inlined state
@pytest.mark.parametrize("text", INJECTIONS)
def test_script_json_is_inert_in_a_script_and_reads_back(text):
    value = {"prompt": text, "list": [text, {"k": text}]}
    inlined = script_json(value)
    assert not set(inlined) & set("<>&\u2028\u2029")
    assert json.loads(inlined) == value


def test_saved_pages_survive_the_injection_corpus(model, tmp_path):
    ascii_only = [text for text in INJECTIONS if text.isascii()]  # what the character model's tokenizer takes
    for index, text in enumerate(ascii_only):
        explorer = ll_widgets.LogitLensExplorer(model, "hi " + text, target="o")
        page = explorer.save_html(tmp_path / f"lens{index}.html").read_text()
        # One script, opened and closed once; no comment opened inside it.
        assert page.lower().count("<script") == 1 and page.lower().count("</script") == 1, text
        assert "<!--" not in page
        assert saved_state(page)["prompt"] == "hi " + text


@needs_node
def test_javascript_reads_the_inlined_state_as_python_wrote_it(tmp_path):
    # What the page's script evaluates, compared with the value: the escapes change no character.
    value = {"corpus": INJECTIONS}
    source = tmp_path / "read.js"
    source.write_text(f"process.stdout.write(JSON.stringify({script_json(value)}));")
    done = subprocess.run([NODE, str(source)], capture_output=True, text=True, timeout=30, check=True)
    assert json.loads(done.stdout) == value


# ------------------------------------------------------------------------------------------ every control
@needs_node
@pytest.mark.parametrize("target", ["", "o"])
def test_every_metric_and_the_csv_without_errors(model, tmp_path, target):
    # As the kernel sends it: a target's ranks are computed only when a rank colouring asks for them.
    explorer = ll_widgets.LogitLensExplorer(model, "hello world", target=target)
    state = explorer.page_state()
    if target:
        state["target_data"]["panels"][0]["ranks"] = None  # what the page holds before the ranks arrive
    steps = []
    for metric in METRICS:
        steps += [{"set": "metric", "value": metric}, {"hover": [2.5 * 36, 18 * 1.5]}, {"report": metric}]
        steps += [{"click": "text:CSV"}, {"report": metric + " csv"}]
    out = run_view(tmp_path, state, steps)
    assert out["errors"] == []
    reports = out["reports"]
    assert all(reports[m]["cells"] == 1 for m in METRICS)  # the heatmap stays
    assert all(reports[m + " csv"]["downloads"] == ["logit_lens.csv"] for m in METRICS)
    if target:
        assert "ranking" in reports["target_rank"]["legend"]
        assert "target probability: 0" in reports["target_prob"]["legend"]
    else:
        assert "set a target" in reports["target_rank"]["legend"]
    assert "choose a colour token" in reports["token_prob"]["legend"]
    header, *rows = csv_rows(out["csv"][0])
    assert header[-2:] == ["target_prob", "target_rank"] and len(rows) == n_cells(explorer)
    if target:  # the probability is there, the rank left empty until computed
        assert all(row[-2] and row[-1] == "" for row in rows)


@needs_node
def test_colour_maps_and_raw_logits_colour_the_cells(model, tmp_path):
    explorer = ll_widgets.LogitLensExplorer(model, "hello world", colormap="magma")
    state = explorer.page_state()
    assert state["colormap"] == "magma"
    steps = [{"report": "magma"}]
    for name in COLORMAPS:
        steps += [{"set": "colormap", "value": name}, {"report": name}]
    steps += [{"set": "metric", "value": "logit"}, {"hover": [2.5 * 36, 18 * 1.5]}, {"report": "logit"}]
    out = run_view(tmp_path, state, steps)
    assert out["errors"] == []
    reports = out["reports"]
    # Each map draws its own colours: the maps' cell colours (the redraw after the switch) differ pairwise.
    colours = {name: set(reports[name]["fills"]) for name in COLORMAPS}
    for a in COLORMAPS:
        for b in COLORMAPS:
            if a < b:
                assert colours[a] != colours[b], (a, b)
    with pytest.raises(ValueError, match="colormap"):
        explorer.colormap = "jet"
    # Raw logits: the legend spans the least to the greatest top-1 logit shown.
    logits = explorer.result.top_logits[0, :, :, 0]
    low, high = (float(x) for x in reports["logit"]["legend"].split(": ")[1].split(" … "))
    assert low == pytest.approx(float(logits.min()), abs=0.01) and high == pytest.approx(float(logits.max()), abs=0.01)
    assert "top-1 logit (raw)" in reports["logit"]["legend"]
    saved_logits = unpack_panel(explorer.full_panel(0))["logit"]
    np.testing.assert_array_equal(np.reshape(saved_logits, logits.shape), logits.numpy())


@needs_node
@pytest.mark.parametrize(
    ("n_layers", "expected"), [(2, ["emb", "0", "1"]), (23, ["emb", "2", "5", "8", "11", "14", "17", "20", "22"])]
)
def test_the_trajectory_chart_has_per_layer_ticks(tmp_path, n_layers, expected):
    from support.models import char_model

    model = char_model(n_layers=n_layers)
    explorer = ll_widgets.LogitLensExplorer(model, "hello")
    top = int(explorer.result.top_ids[0, -1, -1, 0])
    steps = [{"set": "pins", "value": [{"panel": 0, "position": 2, "ids": [top]}]}, {"report": "pinned"}]
    out = run_view(tmp_path, explorer.page_state(), steps)
    assert out["errors"] == []
    # R = n_layers + 1 read-outs; a number every ceil(R / 10)-th, the last one's unless too close to another.
    assert out["reports"]["pinned"]["tick_labels"] == expected


@needs_node
def test_ranks_arriving_redraw_the_rank_colouring(model, tmp_path):
    explorer = ll_widgets.LogitLensExplorer(model, "hello world", target="o")
    state = explorer.page_state()
    filled = state["target_data"]
    waiting = json.loads(json.dumps(filled))
    waiting["panels"][0]["ranks"] = None
    state["target_data"] = waiting
    steps = [{"set": "metric", "value": "target_rank"}, {"report": "waiting"}]
    steps += [{"set": "target_data", "value": filled}, {"report": "ranked"}, {"click": "text:CSV"}]
    out = run_view(tmp_path, state, steps)
    assert out["errors"] == []
    assert "ranking" in out["reports"]["waiting"]["legend"]
    assert "rank 0" in out["reports"]["ranked"]["legend"]
    rows = csv_rows(out["csv"][0])[1:]
    assert [int(row[-1]) for row in rows] == filled["panels"][0]["ranks"]


@needs_node
def test_saved_pages_carry_what_every_mode_needs(model, tmp_path):
    explorer = ll_widgets.LogitLensExplorer(model, "hello world", target="o")
    explorer.token = "l"
    status = explorer.status
    state = saved_state(explorer.save_html(tmp_path / "lens.html").read_text())
    assert explorer.status == status  # saving changes nothing shown
    for key, token in (("target_data", "o"), ("token_data", "l")):
        ranks = state[key]["panels"][0]["ranks"]
        assert ranks is not None and len(ranks) == n_cells(explorer)
        assert state[key]["id"] == ord(token)
    state["offline"] = True
    steps = []
    for metric in METRICS:
        steps += [{"set": "metric", "value": metric}, {"hover": [2.5 * 36, 18 * 1.5]}, {"report": metric}]
    out = run_view(tmp_path, state, steps)
    assert out["errors"] == []
    for metric in METRICS:
        assert "not saved" not in out["reports"][metric]["legend"] and "ranking" not in out["reports"][metric]["legend"]
    assert "target rank: <b>" in out["reports"]["target_rank"]["tooltip"]
    assert "–" not in out["reports"]["target_rank"]["tooltip"].split("</b>")[1].split("<table>")[0]


@needs_node
def test_keyboard_moves_the_selected_cell_and_enter_pins(model, tmp_path):
    explorer = ll_widgets.LogitLensExplorer(model, "hello", target="o")
    state = explorer.page_state() | {"offline": True}
    steps = [{"key": "ArrowUp"}, {"report": "first"}, {"key": "ArrowLeft"}, {"key": "ArrowDown"}, {"report": "moved"}]
    steps += [{"key": "Enter"}, {"report": "pinned"}, {"key": "ArrowDown"}, {"key": "ArrowDown"}, {"report": "floor"}]
    out = run_view(tmp_path, state, steps)
    assert out["errors"] == []
    reports, last, top_row = out["reports"], explorer.result.positions[-1], explorer.result.n_readouts - 1
    # The first key selects the top row (the last read-out) at the last position, and shows its tooltip.
    assert reports["first"]["selection"] == {"panel": 0, "row": top_row, "position": last}
    assert explorer.result.labels[top_row] in reports["first"]["tooltip"]
    assert reports["moved"]["selection"] == {"panel": 0, "row": top_row - 1, "position": last - 1}
    top = explorer.result.top_ids[0, top_row - 1, last - 1, 0].item()
    assert reports["pinned"]["pins"] == [{"panel": 0, "position": last - 1, "ids": [top]}]
    assert reports["floor"]["selection"]["row"] == 0  # clamped at the bottom row


@needs_node
def test_tooltip_stays_inside_the_explorer(model, tmp_path):
    explorer = ll_widgets.LogitLensExplorer(model, "hello", top_k=20)
    steps = [{"root_height": 150}, {"hover": [36 * 2.5, 18 * 1.5]}, {"report": "beside"}]
    steps += [{"box": ["ll-tooltip", 200, 120]}, {"report": "low"}]  # the browser reports the sizes (after layout)
    out = run_view(tmp_path, explorer.page_state(), steps)
    assert out["errors"] == []
    # The hover itself reads no layout: the tooltip goes beside the pointer (y = 27 + 14). Once the browser
    # reports its size (120 px in the stand-in DOM), which would hang below the 150 px explorer, it moves up to
    # fit, where a notebook's output area would otherwise cut off its last rows.
    assert out["reports"]["beside"]["tooltip_top"] == "41px"
    assert out["reports"]["low"]["tooltip_top"] == f"{150 - 120}px"


@needs_node
@pytest.mark.parametrize("name", ["LogitLensExplorer", "AttentionExplorer", "FeatureExplorer", "GraphExplorer"])
def test_the_shipped_scripts_parse_without_their_comments(name, tmp_path):
    """The page gets each script compacted (base.compact: no comment lines, no indentation): it still parses as
    a module, and it is smaller than the files."""
    from llama_lens.widgets.base import compact

    explorer_class = getattr(ll_widgets, name)
    script = tmp_path / "explorer.mjs"
    script.write_text(explorer_class._esm)
    subprocess.run([NODE, "--check", str(script)], check=True, capture_output=True, timeout=60)
    source = (Path(ll_widgets.__file__).parent / "common.js").read_text()
    assert len(compact(source)) < 0.8 * len(source)
    assert compact("a {\n  b: 1; /* why */\n}\n/* a\n rule */\n", "x.css") == "a {\nb: 1;\n}\n"
