"""FeatureExplorer: the packed payload stays within 1 MB for 30 sites x 300 positions x top-10, the page (run
in Node on the stand-in DOM of view_harness.mjs) shows what the result holds on hover, click, keyboard and CSV,
saved pages work offline, and the Python side refuses bad state by name. The hover timings are measured in the
harness and, in Chromium, on a saved page of the full-size payload (printed, not asserted)."""

import csv
import io
import json
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from support.chromium import HAVE_CHROMIUM, console_errors, saved_page_in_chromium
from support.dictionaries import write_saelens
from support.models import char_model

import llama_lens as ll
from llama_lens import widgets as ll_widgets
from llama_lens.errors import ArgumentError
from llama_lens.features.lens_result import FeatureLensResult, SiteReadout
from llama_lens.features.lens_sites import FeatureSite
from llama_lens.lens.inputs import LensInputs
from llama_lens.widgets.feature_data import pack

NODE = shutil.which("node")
HARNESS = Path(__file__).with_name("view_harness.mjs")
WIDGETS = Path(ll_widgets.__file__).parent
needs_node = pytest.mark.skipif(NODE is None, reason="needs node to run the views")
ROW_H = 18


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dictionaries")
    model = char_model(seed=2)
    dictionaries = [
        ll.load_dictionary(write_saelens(folder / "a", "blocks.1.hook_resid_post")),
        ll.load_dictionary(write_saelens(folder / "b", "blocks.0.hook_mlp_out", architecture="topk", k=3)),
    ]
    return ll.feature_lens(model, "hello world", dictionaries, target="o", top_k=4)


def run_view(tmp_path, state, steps):
    state_path, script_path = tmp_path / "state.json", tmp_path / "script.json"
    state_path.write_text(json.dumps(state))
    script_path.write_text(json.dumps(steps))
    command = [NODE, str(HARNESS), str(WIDGETS), "features", str(state_path), str(script_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    return json.loads(done.stdout)


def synthetic(n_sites=30, n_pos=300, k=10, d_sae=16384, seed=0) -> FeatureLensResult:
    """A feature lens of the issue's size: features drawn by a Zipf law (as real dictionaries' features recur
    along a prompt; about 41,000 distinct ones here), read-outs of 5 random tokens with texts of 2-9 random
    letters, random activations and DLA."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(49152)]
    popularity = 1.0 / torch.arange(1, d_sae + 1).float()
    sites, ids, readouts = [], [], []
    for s in range(n_sites):
        site_ids = torch.stack([torch.multinomial(popularity, k, generator=g) for _ in range(n_pos)])
        features = site_ids.unique()
        top = torch.randint(0, len(words), (len(features), 5), generator=g)
        strs = [[words[i] for i in row] for row in top.tolist()]
        readouts.append(SiteReadout(features, top, torch.randn(len(features), 5, generator=g), strs))
        hook = f"blocks.{s}.hook_resid_post"
        sites.append(FeatureSite(hook, hook, hook, s, Path(f"sae{s}"), d_sae, "residual"))
        ids.append(site_ids)
    activations = torch.rand(n_sites, n_pos, k, generator=g).sort(-1, descending=True).values * 20
    tokens = torch.randint(0, len(words), (1, n_pos), generator=g)
    inputs = LensInputs(
        tokens, torch.ones_like(tokens), [[words[i] for i in tokens[0].tolist()]], list(range(n_pos)),
        torch.tensor([[5]]), [[words[5]]],
    )  # fmt: skip
    return FeatureLensResult(
        inputs, sites, torch.stack(ids), activations, torch.randn(n_sites, n_pos, k, generator=g) * 0.3,
        torch.randint(20, 200, (n_sites, n_pos), generator=g), readouts, torch.ones(n_pos),
    )  # fmt: skip


# ------------------------------------------------------------------------------------------ the payload
def test_payload_of_30_sites_300_positions_top_10_is_within_1_mb():
    meta, data = pack(synthetic())
    size = len(json.dumps(meta)) + len(data)
    print(f"\nfeature explorer payload, 30 x 300 x top-10: {size / 1e6:.3f} MB ({sum(meta['n_unique'])} features)")
    assert size <= 1_000_000


def test_payload_refuses_nothing_and_marks_empty_cells(result):
    meta, data = pack(result)
    assert meta["empty"] == 0xFFFF and meta["k"] == 4 and meta["n_readout"] == 3
    assert meta["labels"] == result.labels and meta["target"] == "o"
    # The TopK site has 3 active features per position: its fourth entry is empty in every cell.
    assert (result.feature_ids[0, :, 3] == -1).all()


# ------------------------------------------------------------------------------------------ the view
@needs_node
def test_hover_click_follow_and_csv_show_the_result(result, tmp_path):
    explorer = ll_widgets.FeatureExplorer(result)
    explorer.zoom = 36
    top_site = len(result.sites) - 1  # drawn at the top
    steps = [{"hover": [0.5 * 36, 0.5 * ROW_H]}, {"report": "hover"}, {"click_at": [2.5 * 36, 0.5 * ROW_H]}]
    steps += [{"report": "clicked"}, {"click_item": ["ll-feature", 1]}, {"report": "followed"}, {"click": "text:CSV"}]
    out = run_view(tmp_path, explorer.page_state() | {"offline": True}, steps)
    assert out["errors"] == []
    reports = out["reports"]
    frame = result.to_frame()
    cell = frame[(frame["site"] == result.labels[top_site]) & (frame["position"] == 0)]
    tip = reports["hover"]["tooltip"]
    assert result.labels[top_site] in tip and f"{int(result.n_active[top_site, 0])} active" in tip
    assert re.findall(r"<td>#(\d+)</td>", tip) == [str(f) for f in cell["feature"]]
    shown_dla = [float(v) for v in re.findall(r"<td>#\d+</td><td>[^<]*</td><td>([^<]*)</td>", tip)]
    assert shown_dla == pytest.approx(list(cell["dla"]), abs=2e-3)
    assert reports["clicked"]["selection"] == {"site": top_site, "position": 2}
    second = int(frame[(frame["site"] == result.labels[top_site]) & (frame["position"] == 2)]["feature"].iloc[1])
    assert reports["followed"]["feature"] == {"site": top_site, "feature": second}
    fires = (result.feature_ids[top_site] == second).any(-1).sum().item()
    assert reports["followed"]["marks"].count("ll-mark ll-mark-pinned") == fires
    assert f"at {fires} of {len(result.positions)} positions" in reports["followed"]["popup"][1]
    header, *rows = list(csv.reader(io.StringIO(out["csv"][0], newline="")))
    assert header == ["site", "position", "token", "rank", "feature", "activation", "dla", "readout"]
    assert sorted(int(row[4]) for row in rows) == sorted(frame["feature"])


@needs_node
def test_keyboard_moves_the_selection_and_enter_follows_the_top_feature(result, tmp_path):
    state = ll_widgets.FeatureExplorer(result).page_state() | {"offline": True}
    steps = [{"key": "ArrowUp"}, {"report": "first"}, {"key": "ArrowLeft"}, {"key": "ArrowDown"}, {"report": "moved"}]
    steps += [{"key": "Enter"}, {"report": "followed"}, {"key": "ArrowDown"}, {"key": "ArrowDown"}, {"report": "floor"}]
    out = run_view(tmp_path, state, steps)
    assert out["errors"] == []
    reports, last = out["reports"], result.positions[-1]
    assert reports["first"]["selection"] == {"site": 1, "position": last}  # the top row, the last position
    assert result.labels[1] in reports["first"]["tooltip"]
    assert reports["moved"]["selection"] == {"site": 0, "position": last - 1}
    top = int(result.feature_ids[0, last - 1, 0])
    assert reports["followed"]["feature"] == {"site": 0, "feature": top}
    assert reports["floor"]["selection"]["site"] == 0  # clamped at the bottom row


@needs_node
def test_hover_timing_on_the_full_size_payload(tmp_path):
    explorer = ll_widgets.FeatureExplorer(synthetic())
    explorer.zoom = 4
    state = explorer.page_state() | {"offline": True}
    steps = [{"hover": [(c * 7 % 300 + 0.5) * 4, (c % 30 + 0.5) * ROW_H]} for c in range(200)]
    out = run_view(tmp_path, state, steps + [{"report": "end"}])
    assert out["errors"] == [] and "<b>blocks." in out["reports"]["end"]["tooltip"]
    hover = sorted(out["timings"]["hover"])
    print(
        f"\nfeature explorer in Node (stand-in DOM), 30 x 300 x top-10: hover median {hover[len(hover) // 2]:.2f} ms, "
        f"max {hover[-1]:.2f} ms (n={len(hover)}); unpack {out['timings']['unpack'][0]:.0f} ms, "
        f"draw {out['timings']['draw'][0]:.0f} ms"
    )


# ------------------------------------------------------------------------------------------ Python side
def test_saved_page_is_offline_and_carries_the_data(result, tmp_path):
    explorer = ll.widgets.FeatureExplorer(result)
    assert isinstance(explorer, ll_widgets.FeatureExplorer)
    page = explorer.save_html(tmp_path / "features.html").read_text()
    assert page.lower().count("<script") == 1 and "http" not in page.split("<script", 1)[1]
    state = json.loads(re.search(r"const state = (.*);\n", page).group(1))
    assert state["meta"]["labels"] == result.labels and isinstance(state["payload"], str)
    figure = explorer.to_figure()
    assert figure.axes[0].images[0].get_array().shape == (2, len(result.positions))
    assert "llama-lens-static" in explorer.static_bundle()["text/html"]
    assert explorer.to_frame().equals(result.to_frame())


def test_bad_state_is_refused_by_name(result):
    explorer = ll_widgets.FeatureExplorer(result)
    with pytest.raises(ArgumentError, match="fixed result"):
        explorer.prompt = "other"
    with pytest.raises(ArgumentError, match="was not read"):
        explorer.selection = {"site": 0, "position": 99}
    with pytest.raises(ArgumentError, match="out of range"):
        explorer.selection = {"site": 5, "position": 0}
    with pytest.raises(ArgumentError, match="not among the top features"):
        explorer.feature = {"site": 0, "feature": 10_000}
    with pytest.raises(ArgumentError, match="metric"):
        explorer.metric = "probability"
    with pytest.raises(ArgumentError, match="FeatureLensResult or a HookedLlama"):
        ll_widgets.FeatureExplorer("a model")
    with pytest.raises(ArgumentError, match="fixed result"):
        ll_widgets.FeatureExplorer(result, target=" Paris")
    explorer.selection = {"site": 1, "position": 3}
    assert explorer.state["selection"] == {"site": 1, "position": 3}


def test_from_a_model_the_prompt_reruns_the_lens(tmp_path):
    model = char_model(seed=2)
    sae = ll.load_dictionary(write_saelens(tmp_path / "s", "blocks.1.hook_resid_post"))
    explorer = ll_widgets.FeatureExplorer(model, "hello", [sae], target="o", top_k=3, threaded=False)
    assert explorer.live and explorer.result.positions == list(range(6))
    explorer.prompt = "hi there"
    assert explorer.result.str_tokens[0][1:] == list("hi there") and explorer.meta["tokens"][1] == "h"
    explorer.target = "#104"
    assert explorer.result.target_ids.tolist() == [[104]]
    with pytest.raises(ArgumentError, match="non-empty text"):
        explorer.prompt = ""


# ------------------------------------------------------------------------------------------ Chromium
@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.skipif(not HAVE_CHROMIUM, reason="needs chromium and chromedriver")
def test_saved_full_size_page_in_chromium(tmp_path, monkeypatch):
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never fetch a browser or driver
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    explorer = ll_widgets.FeatureExplorer(synthetic())
    explorer.zoom = 4
    page = explorer.save_html(tmp_path / "features.html")
    with saved_page_in_chromium(page, tmp_path / "profile") as driver:
        canvas = driver.find_element(By.CSS_SELECTOR, "canvas.ll-cells")
        width, height = driver.execute_script(
            "const r = arguments[0].getBoundingClientRect(); return [r.width, r.height]", canvas
        )
        for c in range(60):
            x, y = (c * 7 % 200 + 0.5) * 4, (c % 30 + 0.5) * ROW_H
            ActionChains(driver).move_to_element_with_offset(canvas, int(x - width / 2), int(y - height / 2)).perform()
        tooltip = driver.find_element(By.CSS_SELECTOR, ".ll-tooltip")
        assert "blocks." in tooltip.text and len(tooltip.find_elements(By.CSS_SELECTOR, "tr")) == 11
        timings = driver.execute_script("return window.llamaLensTimings")
        errors = console_errors(driver)
        assert not errors, errors
    hover = sorted(timings["hover"])
    print(
        f"\nfeature explorer in Chromium, saved page {page.stat().st_size / 1e6:.2f} MB, 30 x 300 x top-10: hover "
        f"median {hover[len(hover) // 2]:.2f} ms, max {hover[-1]:.2f} ms (n={len(hover)}); unpack "
        f"{timings['unpack'][0]:.0f} ms, first draw {timings['draw'][0]:.0f} ms"
    )
