"""GraphExplorer: the payload holds the pruned graph only, with read-outs the feature lens agrees with and
contexts where features fire; the page (run in Node on the stand-in DOM of view_harness.mjs) shows them on hover
and keeps pins, selection and supernodes in the synced state; export writes them in circuit-tracer's format;
saved pages are offline and hostile prompt text stays text."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from support.chromium import HAVE_CHROMIUM, console_errors, saved_page_in_chromium
from support.dictionaries import write_circuit_tracer
from support.models import char_model

import llama_lens as ll
from llama_lens import widgets as ll_widgets
from llama_lens.errors import ArgumentError, ArgumentTypeError
from llama_lens.features.lens import readout_tokens

NODE = shutil.which("node")
HARNESS = Path(__file__).with_name("view_harness.mjs")
WIDGETS = Path(ll_widgets.__file__).parent
needs_node = pytest.mark.skipif(NODE is None, reason="needs node to run the views")
HOSTILE = ["hello <!--<script", "world</script><b>x", "the quick brown fox"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = char_model(seed=2)
    transcoders = ll.load_dictionary(write_circuit_tracer(tmp_path_factory.mktemp("ct") / "ct", 2))
    graph = ll.attribution_graph(model, "hello world", transcoders, batch_size=32)
    return model, transcoders, graph


@pytest.fixture(scope="module")
def explorer(setup):
    model, transcoders, graph = setup
    return ll_widgets.GraphExplorer(graph, model, transcoders, HOSTILE)


def run_view(tmp_path, state, steps):
    state_path, script_path = tmp_path / "state.json", tmp_path / "script.json"
    state_path.write_text(json.dumps(state))
    script_path.write_text(json.dumps(steps))
    command = [NODE, str(HARNESS), str(WIDGETS), "graph", str(state_path), str(script_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    return json.loads(done.stdout)


def first(explorer, kind):
    return next(n for n in explorer.meta["nodes"] if n["kind"] == kind)


# ------------------------------------------------------------------------------------------ the payload
def test_payload_holds_the_pruned_graph_only(setup, explorer, tmp_path):
    _, _, graph = setup
    meta = explorer.meta
    pruned = graph.to_json(tmp_path / "graph.json")
    # circuit-tracer's ids, but unique: an error node named as a layer-0 feature is marked.
    assert [n["id"].split("~")[0] for n in meta["nodes"]] == [n["node_id"] for n in pruned["nodes"]]
    assert len(set(explorer.node_ids)) == len(explorer.node_ids)
    assert all(n["kind"] == "error" for n in meta["nodes"] if "~" in n["id"])
    assert len(meta["edges"]) == len(pruned["links"]) < int((graph.adjacency != 0).sum())
    ids = [i.split("~")[0] for i in explorer.node_ids]
    for (s, t, w), link in zip(meta["edges"], pruned["links"]):
        assert (ids[s], ids[t]) == (link["source"], link["target"]) and w == pytest.approx(link["weight"], rel=1e-5)
    # The export is to_json's, with the ids made unique and the state in qParams.
    exported = explorer.export()
    assert [{**n, "node_id": n["node_id"].split("~")[0]} for n in exported["nodes"]] == pruned["nodes"]
    assert [x["weight"] for x in exported["links"]] == [x["weight"] for x in pruned["links"]]
    assert exported["metadata"] == pruned["metadata"] | {"slug": "graph"}
    kinds = {n["kind"] for n in meta["nodes"]}
    assert kinds == {"feature", "error", "embedding", "logit"}
    assert meta["tokens"] == graph.str_tokens and meta["n_layers"] == graph.n_layers
    size = len(json.dumps(meta))
    counts = f"{len(meta['nodes'])} nodes, {len(meta['edges'])} edges"
    print(f"\ngraph explorer payload, tiny model: {size / 1e3:.1f} kB, {counts}")
    assert size < 60_000


def test_readout_is_the_decoder_direction_through_the_unembedding(setup, explorer):
    model, transcoders, _ = setup
    node = first(explorer, "feature")
    direction = transcoders[node["layer"]].W_dec[node["feature"]].float()
    ids, _ = readout_tokens(model, direction[None], 5)
    assert node["readout"] == [model.tokenizer.token_strs([i])[0] for i in ids[0].tolist()]
    logits = (direction * model.ln_final.weight) @ model.unembed.weight.T
    assert int(logits.argmax()) == int(ids[0, 0])


def test_contexts_are_where_the_feature_fires_most(setup, explorer):
    model, transcoders, _ = setup
    node = first(explorer, "feature")
    dictionary = transcoders[node["layer"]]
    best = []
    for text in HOSTILE:
        _, cache = model.run_with_cache(text, names_filter=f"blocks.{node['layer']}.mlp.hook_in")
        acts = dictionary.encode(cache[f"blocks.{node['layer']}.mlp.hook_in"][0].float())[:, node["feature"]]
        best.append(float(acts.max()))
    shown = [c["max"] for c in node["ctx"]]
    assert shown == pytest.approx(sorted([b for b in best if b > 0], reverse=True)[:3], rel=1e-4)
    for ctx in node["ctx"]:
        assert ctx["acts"][ctx["at"]] == pytest.approx(ctx["max"], rel=1e-2) and len(ctx["tokens"]) == len(ctx["acts"])
        assert max(ctx["acts"]) == ctx["acts"][ctx["at"]]


# ------------------------------------------------------------------------------------------ the view
@needs_node
def test_hover_pin_select_group_and_export_in_the_page(explorer, tmp_path):
    feature_index = next(i for i, n in enumerate(explorer.meta["nodes"]) if n["kind"] == "feature" and n["ctx"])
    node = explorer.meta["nodes"][feature_index]
    a, b = explorer.node_ids[0], explorer.node_ids[1]
    keys = ["pinned", "selected", "supernodes", "view"]
    steps = [{"report": "start", "attrs": ["ll-gnode", "data-id"]}]
    steps += [{"dispatch": ["ll-gnode", feature_index, "mouseenter", {"clientX": 5, "clientY": 5}]}]
    steps += [{"report": "hover"}]
    steps += [
        {"dispatch": ["ll-gnode", feature_index, "click"]},
        {"report": "pinned", "keys": keys, "attrs": ["ll-gnode-pinned", "data-id"]},
    ]
    steps += [{"set": "view", "value": "pinned"}, {"report": "pinned_view", "attrs": ["ll-gnode", "data-id"]}]
    steps += [{"set": "view", "value": "all"}, {"dispatch": ["ll-gnode", 0, "click", {"shiftKey": True}]}]
    steps += [{"dispatch": ["ll-gnode", 1, "keydown", {"key": " "}]}]
    steps += [{"report": "selected", "keys": keys, "attrs": ["ll-gnode-selected", "data-id"]}]
    steps += [{"input": ["ll-group-label", "pair"]}, {"click": "text:group"}]
    steps += [{"report": "grouped", "keys": keys, "attrs": ["ll-gnode", "data-id"]}]
    steps += [{"dispatch": ["ll-gnode-supernode", 0, "mouseenter"]}, {"report": "super_hover"}]
    steps += [{"click": "text:export JSON"}]
    out = run_view(tmp_path, explorer.page_state() | {"offline": True}, steps)
    assert out["errors"] == []
    reports = out["reports"]
    assert reports["start"]["attrs"] == explorer.node_ids  # every node drawn, in order
    tip = reports["hover"]["tooltip"]
    assert f"feature {node['feature']} at layer {node['layer']}" in tip
    assert all(f"{t}" in tip for t in ("read-out", "top contexts"))
    assert tip.count('class="ll-gctx"') == len(node["ctx"])
    assert set(re.findall(r"</?([a-zA-Z]+)", tip)) <= {"b", "br", "span", "div"}  # the prompts' text stays text
    if any("<" in t for c in node["ctx"] for t in c["tokens"]):
        assert "&lt;" in tip
    assert reports["pinned"]["state"]["pinned"] == [node["id"]] and reports["pinned"]["attrs"] == [node["id"]]
    shown = set(reports["pinned_view"]["attrs"])
    neighbours = {explorer.node_ids[s] for s, t, _ in explorer.meta["edges"] if explorer.node_ids[t] == node["id"]}
    neighbours |= {explorer.node_ids[t] for s, t, _ in explorer.meta["edges"] if explorer.node_ids[s] == node["id"]}
    assert shown == neighbours | {node["id"]}
    assert reports["selected"]["state"]["selected"] == [a, b] and reports["selected"]["attrs"] == [a, b]
    grouped = reports["grouped"]
    assert grouped["state"]["supernodes"] == [["pair", a, b]] and grouped["state"]["selected"] == []
    assert a not in grouped["attrs"] and b not in grouped["attrs"] and "pair" in grouped["attrs"]
    assert "supernode pair (2 nodes)" in reports["super_hover"]["tooltip"]
    # The page's export is Python's, for the same state (weights to 6 significant digits).
    explorer_state = {"pinned": [node["id"]], "supernodes": [["pair", a, b]]}
    page = json.loads(out["csv"][0])
    explorer.pinned, explorer.supernodes = explorer_state["pinned"], explorer_state["supernodes"]
    try:
        python = explorer.export()
    finally:
        explorer.pinned, explorer.supernodes = [], []
    assert page["qParams"] == python["qParams"] and page["metadata"] == python["metadata"]
    assert page["nodes"] == python["nodes"]
    assert [(x["source"], x["target"]) for x in page["links"]] == [(x["source"], x["target"]) for x in python["links"]]
    assert [x["weight"] for x in page["links"]] == pytest.approx([x["weight"] for x in python["links"]], rel=1e-5)


@needs_node
def test_supernode_edges_are_summed_and_enter_pins(explorer, tmp_path):
    meta = explorer.meta
    # Two nodes with an edge to the same target: grouped, their edges to it become one.
    by_target: dict[int, list[int]] = {}
    for s, t, _ in meta["edges"]:
        by_target.setdefault(t, []).append(s)
    target, sources = next((t, s) for t, s in by_target.items() if len(s) >= 2)
    members = [explorer.node_ids[i] for i in sources[:2]]
    state = explorer.page_state() | {"offline": True, "supernodes": [["g", *members]], "max_edges": 100000}
    steps = [{"report": "drawn", "attrs": ["ll-gedge", "stroke-width"]}]
    steps += [{"dispatch": ["ll-gnode", 0, "keydown", {"key": "Enter"}]}, {"report": "entered", "keys": ["pinned"]}]
    out = run_view(tmp_path, state, steps)
    assert out["errors"] == []
    merged = {}
    for s, t, w in meta["edges"]:
        key = tuple("g" if explorer.node_ids[i] in members else i for i in (s, t))
        if key[0] != key[1]:
            merged[key] = merged.get(key, 0.0) + w
    assert len(out["reports"]["drawn"]["attrs"]) == len(merged)
    assert ("g", target) in merged
    first_drawn = next(i for i in explorer.node_ids if i not in members)
    assert out["reports"]["entered"]["state"]["pinned"] == [first_drawn]


@needs_node
def test_hover_timing_of_the_tiny_graph(explorer, tmp_path):
    n = len(explorer.node_ids)
    steps = [{"dispatch": ["ll-gnode", i % n, "mouseenter"]} for i in range(100)] + [{"report": "end"}]
    out = run_view(tmp_path, explorer.page_state() | {"offline": True}, steps)
    assert out["errors"] == []
    hover = sorted(out["timings"]["hover"])
    print(f"\ngraph explorer in Node (stand-in DOM), tiny graph: hover median {hover[len(hover) // 2]:.3f} ms, "
          f"draw {out['timings']['draw'][0]:.1f} ms")  # fmt: skip


# ------------------------------------------------------------------------------------------ Python side
def test_saved_page_is_offline_and_escapes_prompt_text(setup, tmp_path):
    model, transcoders, _ = setup
    graph = ll.attribution_graph(model, "a <!--<script", transcoders, batch_size=32)
    explorer = ll.widgets.GraphExplorer(graph, model, transcoders, ["x</script><script>alert(1)</script>"])
    page = explorer.save_html(tmp_path / "graph.html").read_text()
    assert page.lower().count("<script") == 1 and page.lower().count("</script") == 1
    assert "http" not in page.split("<script", 1)[1].replace("http://www.w3.org/2000/svg", "")
    state = json.loads(re.search(r"const state = (.*);\n", page).group(1))
    assert state["meta"]["tokens"] == graph.str_tokens and "<!--<script" in state["meta"]["prompt"]
    assert "llama-lens-static" in explorer.static_bundle()["text/html"]
    if NODE is None:
        return
    # Every tooltip keeps the prompts' text as text: "<" arrives as "&lt;", and only the view's own tags appear.
    steps = []
    for i in range(len(explorer.node_ids)):
        steps += [{"dispatch": ["ll-gnode", i, "mouseenter"]}, {"report": str(i)}]
    out = run_view(tmp_path, state | {"offline": True}, steps)
    assert out["errors"] == []
    tips = [r["tooltip"] for r in out["reports"].values()]
    assert all(set(re.findall(r"</?([a-zA-Z]+)", tip)) <= {"b", "br", "span", "div"} for tip in tips)
    assert any("&lt;" in tip for tip in tips)


def test_export_writes_pins_and_supernodes(explorer, tmp_path):
    a, b, c = explorer.node_ids[:3]
    explorer.pinned = [a, b, a]
    explorer.supernodes = [["two", b, c]]
    try:
        assert explorer.pinned == [a, b] and explorer.supernodes == [["two", b, c]]
        assert json.dumps(explorer.state)
        data = explorer.export(tmp_path / "g.json", pinned_only=True)
        assert json.loads((tmp_path / "g.json").read_text()) == data
        assert data["qParams"]["pinnedIds"] == [a, b] and data["qParams"]["supernodes"] == [["two", b, c]]
        assert {n["node_id"] for n in data["nodes"]} == {a, b, c}
        assert all(x["source"] in {a, b, c} and x["target"] in {a, b, c} for x in data["links"])
        frame = explorer.nodes_frame()
        assert frame.set_index("id").loc[b, "supernode"] == "two" and frame["pinned"].sum() == 2
    finally:
        explorer.pinned, explorer.supernodes = [], []


def test_bad_input_is_refused_by_name(setup, explorer):
    model, transcoders, graph = setup
    with pytest.raises(ArgumentError, match="not nodes of the pruned graph"):
        explorer.pinned = ["nope"]
    with pytest.raises(ArgumentError, match="in two supernodes"):
        explorer.supernodes = [["a", explorer.node_ids[0]], ["b", explorer.node_ids[0]]]
    with pytest.raises(ArgumentError, match="at least one node"):
        explorer.supernodes = [["a"]]
    with pytest.raises(ArgumentError, match="view"):
        explorer.view = "some"
    with pytest.raises(ArgumentError, match="does not exist"):
        explorer.export("/no/such/folder/g.json")
    with pytest.raises(ArgumentTypeError, match="AttributionGraph"):
        ll_widgets.GraphExplorer("graph")
    with pytest.raises(ArgumentError, match="both model= and transcoders="):
        ll_widgets.GraphExplorer(graph, model)
    with pytest.raises(ArgumentError, match="contexts= needs"):
        ll_widgets.GraphExplorer(graph, contexts=["x"])
    with pytest.raises(ArgumentTypeError, match="list of prompt texts"):
        ll_widgets.GraphExplorer(graph, model, transcoders, "one text")
    assert explorer.pinned == [] and torch.is_tensor(graph.adjacency)


def test_without_a_model_the_graph_alone_is_shown(setup):
    _, _, graph = setup
    explorer = ll_widgets.GraphExplorer(graph, node_threshold=0.5)
    features = [n for n in explorer.meta["nodes"] if n["kind"] == "feature"]
    assert features and all("readout" not in n and "ctx" not in n for n in features)
    assert explorer.to_figure().axes[0].get_yticklabels()[0].get_text() == "emb"


# ------------------------------------------------------------------------------------------ Chromium
@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.skipif(not HAVE_CHROMIUM, reason="needs chromium and chromedriver")
def test_saved_page_in_chromium_hovers_pins_and_groups(explorer, tmp_path, monkeypatch):
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never fetch a browser or driver
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    page = explorer.save_html(tmp_path / "graph.html")
    with saved_page_in_chromium(page, tmp_path / "profile") as driver:
        css = driver.find_elements
        nodes = css(By.CSS_SELECTOR, ".ll-gnode")
        assert [n.get_attribute("data-id") for n in nodes] == explorer.node_ids
        feature = next(i for i, n in enumerate(explorer.meta["nodes"]) if n["kind"] == "feature")
        ActionChains(driver).move_to_element(nodes[feature]).perform()
        tooltip = driver.find_element(By.CSS_SELECTOR, ".ll-tooltip")
        assert tooltip.is_displayed() and "read-out" in tooltip.text
        ActionChains(driver).click(nodes[feature]).perform()
        driver.execute_script("arguments[0].focus()", nodes[-1])
        ActionChains(driver).send_keys(Keys.ENTER).perform()  # the focused node is pinned too
        pinned = [n.get_attribute("data-id") for n in css(By.CSS_SELECTOR, ".ll-gnode-pinned")]
        assert sorted(pinned) == sorted([explorer.node_ids[feature], explorer.node_ids[-1]])
        for n in nodes[1:3]:
            ActionChains(driver).key_down(Keys.SHIFT).click(n).key_up(Keys.SHIFT).perform()
        assert len(css(By.CSS_SELECTOR, ".ll-gnode-selected")) == 2
        driver.find_element(By.CSS_SELECTOR, ".ll-group-label").send_keys("pair")
        next(b for b in css(By.TAG_NAME, "button") if b.text == "group").click()
        supernode = driver.find_element(By.CSS_SELECTOR, ".ll-gnode-supernode")
        assert supernode.get_attribute("data-id") == "pair" and not css(By.CSS_SELECTOR, ".ll-gnode-selected")
        timings = driver.execute_script("return window.llamaLensTimings")
        errors = console_errors(driver)
        assert not errors, errors
    print(f"\ngraph explorer in Chromium, tiny graph: first draw {timings['draw'][0]:.1f} ms, hover "
          f"{timings['hover'][0]:.2f} ms")  # fmt: skip
