import base64

import matplotlib
import numpy as np
import pytest
import torch
from helpers import char_model, run_patterns

from llama_lens import plot_attention
from llama_lens import widgets as ll_widgets

matplotlib.use("Agg")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def model():
    return char_model()


def _image(fig, index=0):
    return fig.axes[index].images[0].get_array()


def _title(explorer):
    return explorer.figure.axes[0].get_title()


# ------------------------------------------------------------------------------------------ AttentionExplorer
def test_attention_explorer_follows_prompt_and_sliders(model):
    explorer = ll_widgets.AttentionExplorer(model, "hello")
    assert explorer.prompt == "hello"
    assert (explorer.layer, explorer.head, explorer.query) == (0, 0, 5)  # starts on the last query
    assert _title(explorer) == "layer 0, head 0: attention pattern"
    assert _image(explorer.figure).shape == (6, 6)
    assert [t.get_text() for t in explorer.figure.axes[0].get_xticklabels()] == ["<s>", "h", "e", "l", "l", "o"]

    explorer.prompt = "hello world"
    assert _image(explorer.figure).shape == (12, 12)
    assert explorer.query == 11
    assert explorer.status.startswith("12 tokens, 2 layers in")

    # Moving the sliders as a user would.
    explorer.controls["layer"].value = 1
    explorer.controls["head"].value = 3
    assert (explorer.layer, explorer.head) == (1, 3)
    assert _title(explorer) == "layer 1, head 3: attention pattern"
    _, cache = run_patterns(model, "hello world")
    np.testing.assert_allclose(_image(explorer.figure), cache["blocks.1.attn.hook_pattern"][0, 3].numpy(), rtol=1e-5)

    explorer.head = None
    panels = [ax for ax in explorer.figure.axes if ax.images and ax.get_title().startswith("head")]
    assert len(panels) == 4
    explorer.controls["head"].value = 1  # moving the head slider leaves "all heads"
    assert explorer.head == 1
    assert _title(explorer) == "layer 1, head 1: attention pattern"


def test_attention_explorer_readout_and_table_name_query_and_key(model):
    explorer = ll_widgets.AttentionExplorer(model, "hello world", layer=1, head=2)
    pattern = run_patterns(model, "hello world")[1]["blocks.1.attn.hook_pattern"][0, 2]
    explorer.query = 5  # "o"
    explorer.key = 2  # "e"
    weight = float(pattern[5, 2])
    assert explorer.readout == f"query 5 'o' → key 2 'e': weight {weight:.3f}"
    # The query row is outlined in red, the key cell in orange.
    outlines = {(p.get_xy(), p.get_width()) for p in explorer.figure.axes[0].patches}
    assert ((-0.5, 4.5), 12) in outlines and ((1.5, 4.5), 1) in outlines

    table = explorer.table
    assert list(table.columns) == ["key", "token", "weight"]
    assert table["weight"].tolist() == sorted(table["weight"].tolist(), reverse=True)
    best = int(pattern[5].argmax())
    assert table["key"].iloc[0] == best
    assert table["token"].iloc[0] == explorer.tokens[best]
    assert explorer.controls["key"].max == 5  # keys after the query are masked
    explorer.query = 1
    assert explorer.table["key"].tolist() == [int(k) for k in pattern[1, :2].argsort(descending=True)]  # 0, 1 only
    explorer.query = 5

    explorer.scores = True
    assert explorer.query == 5  # adding scores keeps the place
    assert _title(explorer) == "layer 1, head 2: attention scores (pre-softmax)"
    assert "(score " in explorer.readout


def test_attention_explorer_from_a_cache(model):
    logits, cache = run_patterns(model, ["ab", "xyz"])
    with pytest.raises(ValueError, match="tokens= has 5 entries but the cache covers 4 positions"):
        ll_widgets.AttentionExplorer(cache, tokens=["<pad>", "<s>", "x", "y", "z"])
    explorer = ll_widgets.AttentionExplorer((logits, cache), tokens=["<s>", "x", "y", "z"], prompt_index=1)
    assert explorer.controls["prompt"].disabled
    np.testing.assert_allclose(_image(explorer.figure), cache["blocks.0.attn.hook_pattern"][1, 0].numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="fixed cache"):
        explorer.prompt = "other"
    with pytest.raises(ValueError, match=r"layer=7 is not held; choose one of \[0, 1\]"):
        explorer.layer = 7
    with pytest.raises(ValueError, match="query=9 is out of range"):
        explorer.query = 9
    with pytest.raises(ValueError, match=r"prompt_index=2 is out of range: the cache holds 2 prompts \(0..1\)"):
        ll_widgets.AttentionExplorer(cache, prompt_index=2)


def test_attention_explorer_leaves_out_the_padding_of_a_batch_cache(model):
    tokens, mask = model.prepare_tokens(["ab", "xyz"])  # "ab" is left-padded: <pad> <s> a b
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, attention_mask=mask)
    names = model.to_str_tokens(tokens[0])
    explorer = ll_widgets.AttentionExplorer(cache, tokens=names, prompt_index=0, attention_mask=mask, head=1)
    np.testing.assert_allclose(_image(explorer.figure), cache["blocks.0.attn.hook_pattern"][0, 1, 1:, 1:].numpy())
    assert (explorer.controls["query"].min, explorer.controls["key"].min) == (1, 1)
    assert 0 not in explorer.table["key"].tolist()
    with pytest.raises(ValueError, match="query=0 is out of range 1..3"):
        explorer.query = 0
    with pytest.raises(ValueError, match="attention_mask= is for a cache of a padded batch"):
        ll_widgets.AttentionExplorer(model, "ab", attention_mask=mask)


def test_attention_explorer_reports_a_bad_prompt_and_keeps_the_figure(model):
    explorer = ll_widgets.AttentionExplorer(model, "fine")
    figure = explorer.figure
    explorer.prompt = "caf\u00e9"  # the character tokenizer knows ASCII only
    assert explorer.error is not None and "ASCII" in explorer.error
    assert explorer.status.startswith("error:")
    assert explorer.figure is figure
    explorer.prompt = "fine again"
    assert explorer.error is None
    assert _image(explorer.figure).shape == (11, 11)


def test_hold_redraws_once(model, monkeypatch):
    explorer = ll_widgets.AttentionExplorer(model, "hello")
    calls = []
    draw = plot_attention.attention
    monkeypatch.setattr(plot_attention, "attention", lambda *a, **k: calls.append(a) or draw(*a, **k))
    with explorer.hold():
        explorer.layer = 1
        explorer.head = 2
        explorer.query = 3
    assert len(calls) == 1
    assert _title(explorer) == "layer 1, head 2: attention pattern"


def _count_draws(monkeypatch, explorer, state):
    """A list that gets `state()` each time the explorer draws."""
    draws = []
    draw = explorer._draw
    monkeypatch.setattr(explorer, "_draw", lambda: draws.append(state()) or draw())
    return draws


@pytest.mark.slow
def test_attention_explorer_redraws_once_per_control_change(model, monkeypatch):
    explorer = ll_widgets.AttentionExplorer(model, "hello world", head=None)
    draws = _count_draws(monkeypatch, explorer, lambda: (explorer.head, explorer.query, explorer.key))
    # As the front end changes them: one control's value at a time.
    changes = [
        ("head", 2),  # also leaves "all heads"
        ("all_heads", True),
        ("all_heads", False),
        ("key", 9),
        ("query", 3),  # also clamps the key to 3
        ("layer", 1),
        ("scores", True),
        ("scores", False),
        ("query", 11),
        ("key", 0),
        ("prompt", "abc"),
    ]
    for name, value in changes:
        draws.clear()
        explorer.controls[name].value = value
        assert len(draws) == 1, f"setting {name} to {value!r} drew {len(draws)} times: {draws}"
        if (name, value) == ("head", 2):
            assert draws == [(2, 11, 0)] and _title(explorer) == "layer 0, head 2: attention pattern"
        if (name, value) == ("query", 3):
            assert draws == [(2, 3, 3)] and explorer.key == 3
    assert explorer.query == 3  # the new prompt's last query


@pytest.mark.slow
def test_lens_explorer_redraws_once_per_control_change(model, monkeypatch):
    explorer = ll_widgets.LogitLensExplorer(model, "hello world", target="o")
    draws = _count_draws(monkeypatch, explorer, lambda: explorer.position)
    changes = [("metric", "rank"), ("position", 4), ("readout", "resid_mid"), ("layers", (1, 1)), ("target", "l"),
               ("prompt", "abc")]  # fmt: skip
    for name, value in changes:
        draws.clear()
        explorer.controls[name].value = value
        assert len(draws) == 1, f"setting {name} to {value!r} drew {len(draws)} times"


@pytest.mark.slow
def test_attention_explorer_keeps_one_layer_over_the_cache_budget(model):
    _, full = run_patterns(model, "hello world")
    forwards = []
    count = ("hook_embed", lambda tensor, *, hook: forwards.append(1))
    # "hello world" is 12 positions; each layer's pattern is [1, 4 heads, 12, 12] float32: 2304 bytes.
    with model.hooks([count]):
        explorer = ll_widgets.AttentionExplorer(model, "hello world", head=3, cache_budget=2 * 2304)
        assert sorted(explorer.cache.keys()) == ["blocks.0.attn.hook_pattern", "blocks.1.attn.hook_pattern"]
        explorer.layer = 1
        assert len(forwards) == 1  # under the budget a layer change only redraws

        forwards.clear()
        explorer = ll_widgets.AttentionExplorer(model, "hello world", head=3, cache_budget=2 * 2304 - 1)
        assert list(explorer.cache.keys()) == ["blocks.0.attn.hook_pattern"]
        assert "over the cache budget" in explorer.status
        np.testing.assert_allclose(_image(explorer.figure), full["blocks.0.attn.hook_pattern"][0, 3].numpy(), rtol=1e-5)
        explorer.controls["layer"].value = 1
        assert list(explorer.cache.keys()) == ["blocks.1.attn.hook_pattern"]
        assert _title(explorer) == "layer 1, head 3: attention pattern"
        np.testing.assert_allclose(_image(explorer.figure), full["blocks.1.attn.hook_pattern"][0, 3].numpy(), rtol=1e-5)
        explorer.controls["head"].value = 1  # the head is in the cached layer: no forward
        np.testing.assert_allclose(_image(explorer.figure), full["blocks.1.attn.hook_pattern"][0, 1].numpy(), rtol=1e-5)
        assert len(forwards) == 2

        explorer.query = 4
        explorer.scores = True  # scores of the shown layer only; the place is kept
        assert sorted(explorer.cache.keys()) == ["blocks.1.attn.hook_attn_scores", "blocks.1.attn.hook_pattern"]
        assert explorer.query == 4
        assert "(score " in explorer.readout
        explorer.controls["layer"].value = 0
        assert sorted(explorer.cache.keys()) == ["blocks.0.attn.hook_attn_scores", "blocks.0.attn.hook_pattern"]
        scores = "blocks.0.attn.hook_attn_scores"
        np.testing.assert_allclose(explorer.cache[scores], full[scores])  # -inf where masked, in both
        assert len(forwards) == 4


def _record_status(explorer):
    seen = []
    explorer._status.observe(lambda _: seen.append(explorer.status), names="value")
    return seen


def test_status_line_counts_layers_while_the_model_runs(monkeypatch):
    model = char_model(n_layers=4)
    lens = ll_widgets.LogitLensExplorer(model, "hi")
    seen = _record_status(lens)
    monkeypatch.setattr(ll_widgets._Explorer, "PROGRESS_INTERVAL", 0.0)  # report every layer
    lens.prompt = "hello world"
    start = "computing the lens of 12 tokens"
    steps = [f"layer {i} / 4" for i in (1, 2, 3)] + ["reading out"]  # after the last layer: the read-out
    assert seen[:-1] == [f"{start}…"] + [f"{start}: {step}…" for step in steps]
    assert seen[-1].startswith("12 tokens, 4 read-outs in")

    attention = ll_widgets.AttentionExplorer(model, "hi", cache_budget=0)  # one layer at a time
    seen = _record_status(attention)
    attention.layer = 2  # the forward stops after the shown layer
    start = "running the model on 3 tokens"
    assert seen[:-1] == [f"{start}…"] + [f"{start}: layer {i} / 3…" for i in (1, 2, 3)]
    assert seen[-1].startswith("3 tokens, layer 2 in")

    # Throttled: a prompt computed within the interval shows no per-layer step.
    monkeypatch.setattr(ll_widgets._Explorer, "PROGRESS_INTERVAL", 60.0)
    seen = _record_status(lens)
    lens.prompt = "abc"
    assert len(seen) == 2 and seen[0] == "computing the lens of 4 tokens…"


def test_lens_explorer_tokenizes_each_prompt_once(monkeypatch):
    model = char_model()
    lens = ll_widgets.LogitLensExplorer(model, "hi")
    calls = []
    encode = model.tokenizer.batch_encode
    monkeypatch.setattr(model.tokenizer, "batch_encode", lambda *a, **k: calls.append(a) or encode(*a, **k))
    lens.prompt = "hello"
    assert len(calls) == 1


def test_attention_explorer_long_prompt_window(model):
    text = "abcdefghij" * 15  # 151 positions with BOS
    explorer = ll_widgets.AttentionExplorer(model, text, max_positions=40)
    assert _image(explorer.figure).shape == (40, 40)
    assert explorer.controls["query"].min == 151 - 40
    explorer.query = 151 - 40
    assert explorer.figure.axes[0].patches[0].get_xy() == (-0.5, -0.5)


# ------------------------------------------------------------------------------------------ static fallback
def test_mimebundle_carries_a_png_of_the_current_figure(model):
    explorer = ll_widgets.AttentionExplorer(model, "hi")
    bundle = explorer._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert bundle["text/plain"]
    png = base64.b64decode(bundle["image/png"])
    assert png.startswith(PNG_MAGIC)
    assert png == explorer.png == explorer._repr_png_()
    assert explorer.controls is not None and explorer.children  # the widget view itself is intact

    explorer.layer = 1
    assert base64.b64decode(explorer._repr_mimebundle_()["image/png"]) != png  # follows the figure
    assert explorer._image.value == explorer.png


def test_ipython_display_formatter_offers_the_png(model):
    from IPython.core.formatters import DisplayFormatter

    explorer = ll_widgets.AttentionExplorer(model, "hi")
    data, _ = DisplayFormatter().format(explorer)
    assert "image/png" in data
    assert "application/vnd.jupyter.widget-view+json" in data


def test_figure_png_renders_without_pyplot():
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 1))
    fig.add_subplot().imshow(torch.rand(3, 3).numpy())
    png = ll_widgets.figure_png(fig, dpi=50)
    assert png.startswith(PNG_MAGIC)
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (100, 50)


# ------------------------------------------------------------------------------------------ LogitLensExplorer
def _lens_image(explorer):
    return explorer.figure.axes[0].images[0].get_array()


def test_lens_explorer_follows_prompt_target_metric_readout_and_layers(model):
    from llama_lens.lens import logit_lens

    explorer = ll_widgets.LogitLensExplorer(model, "hello world", target="d")
    state = (explorer.prompt, explorer.target, explorer.metric, explorer.readout)
    assert state == ("hello world", "d", "prob", "resid_post")
    assert explorer.layers == (0, 1)
    assert _lens_image(explorer).shape == (2, 12)  # 2 read-outs × 12 positions
    assert explorer.position == 11  # the last position, where the next token is predicted
    assert explorer.status.startswith("12 tokens, 2 read-outs in")
    expected = logit_lens(model, "hello world", target="d", readout="resid_post")
    np.testing.assert_allclose(_lens_image(explorer), expected.top_probs[0, :, :, 0].numpy(), rtol=1e-5)

    explorer.metric = "rank"
    assert "rank of 'd'" in _title(explorer)
    np.testing.assert_allclose(_lens_image(explorer), expected.target_ranks[0, :, :, 0].numpy() + 1)

    explorer.controls["readout"].value = "resid_mid"
    assert [t.get_text() for t in explorer.figure.axes[0].get_yticklabels()] == ["0_mid", "1_mid"]
    explorer.controls["layers"].value = (1, 1)
    assert explorer.result.labels == ["1_mid"]
    assert _lens_image(explorer).shape == (1, 12)

    explorer.prompt = "abc"
    assert _lens_image(explorer).shape == (1, 4)
    assert explorer.position == 3


def test_lens_explorer_table_is_the_selected_position(model):
    explorer = ll_widgets.LogitLensExplorer(model, "hello world", target="o")
    explorer.position = 4  # the first "l"
    result = explorer.result
    table = explorer.table
    assert list(table.columns) == ["read-out", "top tokens", "entropy", "kl_to_final", "target_prob", "target_rank"]
    assert table["read-out"].tolist() == result.labels
    np.testing.assert_allclose(table["entropy"], result.entropy[0, :, 4].numpy(), rtol=1e-6)
    assert table["target_rank"].tolist() == result.target_ranks[0, :, 4, 0].tolist()
    assert table["top tokens"][0].startswith(repr(result.top_strs[0][0][4][0]))
    # The selected column is outlined in the heatmap.
    (outline,) = explorer.figure.axes[0].patches
    assert outline.get_xy() == (3.5, -0.5)
    explorer.target = None
    assert "target_prob" not in explorer.table.columns


def test_lens_explorer_errors_go_to_the_status_line(model):
    explorer = ll_widgets.LogitLensExplorer(model, "hello", target="o")
    figure = explorer.figure
    explorer.target = None
    explorer.metric = "rank"
    assert explorer.error == "the metric 'rank' needs a target: type one into the target box"
    assert explorer.status.startswith("error:")
    explorer.metric = "entropy"  # a drawable metric clears a drawing error
    assert explorer.error is None and explorer.status.startswith("6 tokens")
    assert explorer.figure is not figure
    explorer.target = "ab"  # two tokens
    assert "not a single token" in explorer.error
    with pytest.raises(ValueError, match="unknown metric"):
        explorer.metric = "probability"
    with pytest.raises(ValueError, match="is not read out"):
        explorer.position = 40


def test_lens_explorer_long_prompt_reads_out_the_last_positions(model):
    explorer = ll_widgets.LogitLensExplorer(model, "abcdefghij" * 10, max_positions=16)
    assert _lens_image(explorer).shape == (2, 16)
    assert "the last 16 positions" in explorer.status
    assert [p for _, p in explorer.controls["position"].options] == list(range(85, 101))
    assert explorer.figure.get_size_inches()[0] <= 16


def test_lens_explorer_mimebundle_has_the_png(model):
    explorer = ll_widgets.LogitLensExplorer(model, "hi")
    bundle = explorer._repr_mimebundle_()
    assert base64.b64decode(bundle["image/png"]) == explorer.png
    assert explorer.png.startswith(PNG_MAGIC)
    assert "application/vnd.jupyter.widget-view+json" in bundle


def test_lens_explorer_rejects_bad_arguments(model):
    with pytest.raises(ValueError, match="unknown read-out"):
        ll_widgets.LogitLensExplorer(model, "hi", readout="resid_post_ln")
    with pytest.raises(ValueError, match=r"layers=\(0, 5\)"):
        ll_widgets.LogitLensExplorer(model, "hi", layers=(0, 5))
    with pytest.raises(ValueError, match="needs a HookedLlama"):
        ll_widgets.LogitLensExplorer({}, "hi")


@pytest.mark.slow
def test_nbconvert_html_without_widget_state_shows_the_picture(model):
    """A notebook saved without widget state (JupyterLab's default) exports to HTML with the PNG visible."""
    nbconvert = pytest.importorskip("nbconvert", reason="nbconvert comes with jupyterlab (the notebooks extra)")
    import nbformat

    explorer = ll_widgets.AttentionExplorer(model, "hi")
    bundle = explorer._repr_mimebundle_()
    notebook = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("ll.widgets.AttentionExplorer(model, 'hi')")
    cell.outputs = [nbformat.v4.new_output("execute_result", data=bundle, execution_count=1)]
    notebook.cells = [cell]
    html, _ = nbconvert.HTMLExporter().from_notebook_node(notebook)
    assert f'src="data:image/png;base64,{bundle["image/png"]}"' in html
