"""The explorers' Python side on a tiny model: the data the page gets, each control's cost (which changes run
the model), state, the static picture and the standalone page. tests/test_browser.py drives the page itself."""

import json
import re
import threading
import time

import numpy as np
import pytest
import torch
from support.models import CharTokenizer, assert_same_top_k

import llama_lens as ll
from llama_lens import widgets as ll_widgets
from llama_lens.widgets.lens_data import prompt_tokens, unpack_panel


@pytest.fixture(scope="module")
def model(char_model):
    return char_model()


def _forwards(model):
    """A hook that counts model runs (one hook_embed call per forward), and the list it appends to."""
    runs = []
    return ("hook_embed", lambda tensor, *, hook: runs.append(1)), runs


def _reference(model, text, token_id):
    """Every read-out's full logits by hand: resid streams from run_with_cache, ln_final, unembed."""
    tokens = model.to_tokens(text)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        streams = [cache["hook_embed"][0]] + [cache[f"blocks.{i}.hook_resid_post"][0] for i in model.layer_indices]
        logits = torch.stack([model.unembed(model.ln_final(s)) for s in streams]).double()  # [R, pos, d_vocab]
    probs = logits.softmax(-1)
    return logits, probs[..., token_id]


def _assert_ranks(ranks, logits, token_id, slack=1e-4):
    """Ranks (tokens with a strictly higher logit) within what float rounding allows."""
    target = logits[..., token_id : token_id + 1]
    low = (logits > target + slack).sum(-1)
    high = (logits > target - slack).sum(-1) - 1  # the target itself is within the slack
    ranks = torch.as_tensor(ranks).reshape(low.shape)
    assert bool(((low <= ranks) & (ranks <= high)).all()), (ranks, low, high)


# ------------------------------------------------------------------------------------------ the lens's data
def test_lens_payload_holds_the_lens_compactly(model):
    explorer = ll_widgets.LogitLensExplorer(model, "hello world", top_k=4)
    (packed,) = [explorer.full_panel(panel) for panel in range(len(explorer.panels))]
    assert packed["packed"] == {"top": "u2", "probs": "u2", "logit": "f4", "entropy": "f4", "kl": "f4"}
    assert all(isinstance(packed[key], str) for key in packed["packed"])  # base64 in the JSON
    data = unpack_panel(packed)
    result = ll.logit_lens(model, "hello world", readout=("embed", "resid_post"), top_k=4)
    assert data["labels"] == result.labels == ["embed", "0_post", "1_post"]
    assert data["tokens"] == result.str_tokens[0] and data["k"] == 4
    ids = np.array(data["vocab_ids"])[data["top"]].reshape(3, 12, 4)
    np.testing.assert_array_equal(ids, result.top_ids[0].numpy())
    texts = np.array(data["vocab"], dtype=object)[data["top"]].reshape(3, 12, 4)
    assert texts.tolist() == result.top_strs[0]
    probs = np.reshape(data["probs"], (3, 12, 4)) / data["prob_scale"]
    np.testing.assert_allclose(probs, result.top_probs[0].numpy(), atol=1 / 65535)
    np.testing.assert_allclose(np.reshape(data["entropy"], (3, 12)), result.entropy[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(np.reshape(data["kl"], (3, 12)), result.kl_to_final[0].numpy(), atol=1e-6)
    assert explorer.result.labels == result.labels


def test_target_values_match_a_hand_written_read_out(model):
    explorer = ll_widgets.LogitLensExplorer(model, "hello world", target="o")
    logits, probs = _reference(model, "hello world", ord("o"))
    values = explorer.target_data["panels"][0]
    assert explorer.target_data["id"] == ord("o") and explorer.target_data["text"] == "o"
    np.testing.assert_allclose(np.reshape(values["probs"], probs.shape), probs.numpy(), atol=2e-5)
    assert values["ranks"] is None  # a sweep over the vocabulary per cell: computed when a colouring needs it
    explorer.metric = "target_rank"
    _assert_ranks(explorer.target_data["panels"][0]["ranks"], logits, ord("o"))
    frame = explorer.to_frame()
    assert {"target_prob", "target_rank"} <= set(frame.columns) and len(frame) == 3 * 12


def test_ids_by_explicit_syntax_and_targets_that_are_not_one_token(model):
    explorer = ll_widgets.LogitLensExplorer(model, "hello", target="#104")
    assert explorer.target_data["id"] == 104 and explorer.target_data["text"] == "h"
    explorer = ll_widgets.LogitLensExplorer(model, "hello", target=104)  # an int means an id
    assert explorer.target == "#104"
    with pytest.raises(ValueError, match="ids run from 0 to 127"):
        explorer.target = "#999"
    assert explorer.target == "#104"  # the last good value stays
    with pytest.raises(ValueError, match="not a single token"):
        explorer.target = "ab"
    # Typed in the page: the error shows on the status line instead of raising.
    explorer.set_state({"target": "ab"})
    assert "not a single token" in explorer.error and explorer.target == "#104"


class SpacedTokenizer(CharTokenizer):
    """CharTokenizer plus one spaced token: " o" is id 5 (as " Paris" is one token in real vocabularies)."""

    def _token_text(self, token_id):
        return " o" if token_id == 5 else super()._token_text(token_id)

    def _raw_to_id(self, raw):
        return 5 if raw == " o" else super()._raw_to_id(raw)


def test_target_box_suggests_the_spaced_token_when_it_ranks_higher(char_model):
    model = char_model()
    model.tokenizer = SpacedTokenizer()
    explorer = ll_widgets.LogitLensExplorer(model, "hello", target="o")
    logits, _ = _reference(model, "hello", 5)
    last = logits[-1, -1]
    spaced_rank, typed_rank = int((last > last[5]).sum()), int((last > last[ord("o")]).sum())
    hint = explorer.target_data["hint"]
    if spaced_rank < typed_rank:
        assert hint == {"text": " o", "id": 5, "rank": spaced_rank, "rank_typed": typed_rank}
    else:
        assert hint is None
    # Make " o" the model's top prediction at the last position: the hint must then appear.
    with torch.no_grad():
        model.unembed.weight[5] = model.unembed.weight[int(last.argmax())] * 3
    explorer = ll_widgets.LogitLensExplorer(model, "hello", target="o")
    assert explorer.target_data["hint"]["text"] == " o" and explorer.target_data["hint"]["rank"] == 0


# ------------------------------------------------------------------------------------------ what each change costs
def test_only_prompt_and_readout_changes_run_the_model(model):
    explorer = ll_widgets.LogitLensExplorer(model, "hello world", target="o", compare="hello there")
    counter, runs = _forwards(model)
    with model.hooks([counter]):
        changes = [
            ("target", "l"),
            ("token", "#101"),
            ("metric", "token_rank"),
            ("zoom", 12),
            ("stride", 2),
            ("diff", True),
            ("trajectory", "rank"),
            ("selection", {"panel": 1, "row": 2, "position": 3}),
            ("pins", [{"panel": 0, "position": 4, "ids": [111, 108]}]),
            ("pinned_positions", [2]),
        ]
        for name, value in changes:
            setattr(explorer, name, value)
            assert runs == [], f"changing {name} ran the model"
        explorer.readout = "resid_mid"
        assert len(runs) == 2  # two panels, one run each
        assert explorer.result.labels == ["embed", "0_mid", "1_mid"]
        explorer.prompt = "abc"
        assert len(runs) == 4
    assert explorer.panels[0]["tokens"] == ["<s>", "a", "b", "c"]
    assert explorer.pins == [] and explorer.selection == {}  # places of the old prompt are gone


def test_pins_are_summed_trajectories(model):
    explorer = ll_widgets.LogitLensExplorer(model, "hello world")
    explorer.pins = [{"position": 4, "ids": [111, 108]}, {"position": 11, "ids": [100]}]
    logits, p_o = _reference(model, "hello world", 111)
    _, p_l = _reference(model, "hello world", 108)
    first, second = explorer.traces
    assert first["texts"] == ["o", "l"] and first["panel"] == 0
    np.testing.assert_allclose(first["probs"], (p_o + p_l)[:, 4].numpy(), atol=2e-5)
    best = torch.minimum((logits[:, 4] > logits[:, 4, 111:112]).sum(-1), (logits[:, 4] > logits[:, 4, 108:109]).sum(-1))
    assert np.abs(np.array(first["ranks"]) - best.numpy()).max() <= 1
    _, p_d = _reference(model, "hello world", 100)
    np.testing.assert_allclose(second["probs"], p_d[:, 11].numpy(), atol=2e-5)
    with pytest.raises(ValueError, match="pin position 40 is not read out"):
        explorer.pins = [{"position": 40, "ids": [1]}]


@pytest.mark.slow
def test_a_newer_request_cancels_an_older_one(char_model):
    model = char_model(n_layers=4)
    explorer = ll_widgets.LogitLensExplorer(model, "hi", threaded=True)
    finished = []
    explorer.observe(lambda change: finished.append(change["new"][0]["tokens"]), names="panels")
    # A model-wide hook (add_hook), so that it slows the worker thread too: hooks from model.hooks() are the
    # adding thread's own.
    model.add_hook("blocks.0.hook_resid_post", lambda tensor, *, hook: time.sleep(0.4))
    try:
        explorer.set_state({"prompt": "first"})  # as the page sends it: runs in a worker thread
        time.sleep(0.1)
        assert explorer.busy  # the page dims the picture meanwhile
        explorer.set_state({"prompt": "second"})
        deadline = time.monotonic() + 20
        while (explorer.busy or threading.active_count() > 1) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        model.reset_hooks()
    assert finished == [["<s>", "s", "e", "c", "o", "n", "d"]]  # the first run was cancelled, not shown
    assert not explorer.busy and explorer.error == ""


# ------------------------------------------------------------------------------------------ state
def test_state_is_json_and_settable(model):
    explorer = ll_widgets.LogitLensExplorer(model, "hello world", target="o", metric="target_rank")
    explorer.pins = [{"position": 3, "ids": [104]}]
    explorer.stride = 2
    state = json.loads(json.dumps(explorer.state))
    assert state["metric"] == "target_rank" and state["pins"] == [{"panel": 0, "position": 3, "ids": [104]}]

    other = ll_widgets.LogitLensExplorer(model, "abc")
    other.state = state
    assert other.state == state
    timeless = lambda panels: [{k: v for k, v in panel.items() if k not in ("seconds", "run")} for panel in panels]
    assert timeless(other.panels) == timeless(explorer.panels) and other.traces[0]["texts"] == ["h"]
    with pytest.raises(ValueError, match=r"unknown state key\(s\) \['colour'\]"):
        other.state = {"colour": "red"}
    with pytest.raises(ValueError, match="metric='pink' is not one of"):
        other.metric = "pink"
    assert other.metric == "target_rank"
    with pytest.raises(ValueError, match="stride must be an integer"):
        other.state = {"stride": 0, "metric": "kl"}
    assert other.metric == "target_rank"  # a bad state changes nothing


def test_chat_messages_go_through_the_chat_template(model, monkeypatch):
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="no chat template"):
        ll_widgets.LogitLensExplorer(model, messages)
    calls = []

    def template(messages, add_generation_prompt, tokenize):
        calls.append((messages, add_generation_prompt, tokenize))
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"

    monkeypatch.setattr(model.tokenizer, "apply_chat_template", template, raising=False)
    explorer = ll_widgets.LogitLensExplorer(model, messages)
    assert calls == [(messages, True, False)]
    assert "".join(explorer.panels[0]["tokens"]) == "user: hi\nassistant:"
    assert prompt_tokens(model, messages).shape[1] == len("user: hi\nassistant:")
    with pytest.raises(ValueError, match='every chat message needs "role" and "content"'):
        explorer.prompt = [{"text": "hi"}]


def test_comparison_panels_share_the_vocabulary(model, char_model):
    other = char_model(seed=1)
    explorer = ll_widgets.LogitLensExplorer(model, "hello", compare_model=other, target="l")
    assert len(explorer.panels) == 2 and explorer.compare_prompt == "hello"
    second = ll.logit_lens(other, "hello", readout=("embed", "resid_post"))
    panel = explorer.full_panel(1)
    np.testing.assert_array_equal(
        np.array(panel["vocab_ids"])[unpack_panel(panel)["top"]].reshape(3, 6, 10)[..., 0],
        second.top_ids[0, :, :, 0].numpy(),
    )
    _, probs = _reference(other, "hello", ord("l"))
    np.testing.assert_allclose(np.reshape(explorer.target_data["panels"][1]["probs"], (3, 6)), probs, atol=2e-5)
    explorer.compare_prompt = None
    assert len(explorer.panels) == 1 and set(explorer.to_frame()["panel"]) == {0}


# ------------------------------------------------------------------------------------------ the tuned lens
def _tuned_lens(model, scale=0.3):
    """A tuned lens for `model` whose translators are set by hand to random non-zero weights and biases."""
    tuned = ll.TunedLens.for_model(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for translator in tuned.translators.values():
            translator.weight.copy_(torch.randn(translator.weight.shape, generator=generator) * scale)
            translator.bias.copy_(torch.randn(translator.bias.shape, generator=generator))
    return tuned


def _assert_panel_is(explorer, result, panel=0):
    """The panel's top tokens and probabilities are the LensResult's (ties in any order)."""
    data = unpack_panel(explorer.full_panel(panel))
    shape = tuple(result.top_ids[0].shape)
    ids = torch.tensor(data["vocab_ids"])[torch.tensor(data["top"])].reshape(shape)
    probs = torch.tensor(data["probs"], dtype=torch.float32).reshape(shape) / data["prob_scale"]
    assert data["labels"] == result.labels
    assert_same_top_k(ids, probs, result.top_probs[0].float(), expected_ids=result.top_ids[0], atol=6e-5)


def test_tuned_lens_switch_reads_through_the_translators(model):
    tuned = _tuned_lens(model)
    explorer = ll_widgets.LogitLensExplorer(model, "hello world", target="o", tuned_lens=tuned)
    assert explorer.lens == "tuned" and explorer.has_tuned_lens
    assert "tuned lens" in explorer.titles[0] and "tuned lens" in explorer.status
    expected = ll.logit_lens(model, "hello world", target="o", lens=tuned, top_k=10, keep_logits=True)
    plain = ll.logit_lens(model, "hello world", target="o", top_k=10)
    # The translators change the read-outs below the last layer (else this test could not tell the lenses apart).
    assert expected.lens_kind == "tuned" and (expected.top_ids[0, :-1, :, 0] != plain.top_ids[0, :-1, :, 0]).any()
    assert (expected.target_probs[0, :-1] - plain.target_probs[0, :-1]).abs().max() > 1e-3  # >> the tolerance
    _assert_panel_is(explorer, expected)
    # The target and pins are read from the kept residual streams: through the same translators.
    target_probs = np.reshape(explorer.target_data["panels"][0]["probs"], (3, 12))
    np.testing.assert_allclose(target_probs, expected.target_probs[0, :, :, 0].numpy(), atol=2e-5)
    explorer.metric = "target_rank"
    _assert_ranks(explorer.target_data["panels"][0]["ranks"], expected.logits[0].double(), ord("o"))
    explorer.pins = [{"position": 4, "ids": [ord("o")]}]
    np.testing.assert_allclose(explorer.traces[0]["probs"], expected.target_probs[0, :, 4, 0].numpy(), atol=2e-5)

    # Back to the logit lens: one model run, and the plain logit lens again.
    counter, runs = _forwards(model)
    with model.hooks([counter]):
        explorer.lens = "logit"
    assert len(runs) == 1 and explorer.result.lens_kind == "logit" and "logit lens" in explorer.titles[0]
    _assert_panel_is(explorer, plain)
    target_probs = np.reshape(explorer.target_data["panels"][0]["probs"], (3, 12))
    np.testing.assert_allclose(target_probs, plain.target_probs[0, :, :, 0].numpy(), atol=2e-5)


def test_tuned_lens_state_round_trip(model):
    tuned = _tuned_lens(model)
    explorer = ll_widgets.LogitLensExplorer(model, "hello world", target="o", tuned_lens=tuned)
    state = json.loads(json.dumps(explorer.state))
    assert state["lens"] == "tuned"
    other = ll_widgets.LogitLensExplorer(model, "abc", tuned_lens=tuned, lens="logit")
    assert other.result.lens_kind == "logit"
    other.state = state
    assert other.state == state and other.result.lens_kind == "tuned"
    timeless = lambda panels: [{k: v for k, v in panel.items() if k not in ("seconds", "run")} for panel in panels]
    assert timeless(other.panels) == timeless(explorer.panels)
    assert other.target_data["panels"] == explorer.target_data["panels"]
    assert ll_widgets.LogitLensExplorer(model, "abc").state["lens"] == "logit"


def test_tuned_lens_errors(model, char_model):
    plain = ll_widgets.LogitLensExplorer(model, "hello")
    assert not plain.has_tuned_lens
    with pytest.raises(ValueError, match='lens="tuned" needs a tuned lens'):
        plain.lens = "tuned"
    assert plain.lens == "logit" and plain.result.lens_kind == "logit"
    with pytest.raises(ValueError, match='lens="tuned" needs a tuned lens'):
        ll_widgets.LogitLensExplorer(model, "hello", lens="tuned")
    tuned = _tuned_lens(model)
    with pytest.raises(ValueError, match="lens='fancy' is not one of"):
        ll_widgets.LogitLensExplorer(model, "hello", tuned_lens=tuned, lens="fancy")
    with pytest.raises(ValueError, match="compare_model= and tuned_lens= do not go together"):
        ll_widgets.LogitLensExplorer(model, "hello", tuned_lens=tuned, compare_model=char_model(seed=1))
    with pytest.raises(ValueError, match="layers"):
        ll_widgets.LogitLensExplorer(model, "hello", tuned_lens=_tuned_lens(char_model(n_layers=3)))
    # The lens has translators for resid_post only: resid_mid is refused, naming it, and nothing changes.
    explorer = ll_widgets.LogitLensExplorer(model, "hello", tuned_lens=tuned)
    with pytest.raises(ValueError, match="no translator for resid_mid"):
        explorer.readout = "resid_mid"
    assert explorer.readout == "resid_post" and explorer.result.labels == ["embed", "0_post", "1_post"]
    explorer.lens = "logit"
    explorer.readout = "resid_mid"  # the logit lens reads any stream
    with pytest.raises(ValueError, match="no translator for resid_mid"):
        explorer.lens = "tuned"
    assert explorer.lens == "logit"


# ------------------------------------------------------------------------------------------ pictures and pages
def test_static_picture_is_a_separate_output_the_view_hides(model, monkeypatch):
    import IPython.display

    explorer = ll_widgets.LogitLensExplorer(model, "hello")
    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda *a, **k: shown.append((a, k)) or _Handle())
    explorer._ipython_display_()
    (view, view_options), (static, options) = shown
    assert "application/vnd.jupyter.widget-view+json" in view[0] and view_options["raw"]
    assert options == {"raw": True, "display_id": True}
    page = static[0]["text/html"]
    assert f"llama-lens-static-{explorer.static_id}" in page
    assert re.search(r'<img [^>]*src="data:image/png;base64,[A-Za-z0-9+/=]{200,}"', page)
    assert "image/png" not in static[0]  # the PNG is sent once, inside the HTML
    assert page.count("data:image/png;base64,") == 1
    assert "llama-lens-static-${id}" in ll_widgets.LogitLensExplorer._esm


class _Handle:
    def update(self, *args, **kwargs):
        pass


def test_save_html_is_standalone(model, tmp_path):
    explorer = ll_widgets.LogitLensExplorer(model, "hello </script> world", target="o")
    path = explorer.save_html(tmp_path / "lens.html")
    page = path.read_text()
    assert "<script src" not in page and "https://" not in page and "import(" not in page
    assert page.count("</script>") == 1  # the prompt's "</script>" is escaped inside the data
    state = json.loads(re.search(r"const state = (.*);\n", page).group(1))
    assert state["panels"] == json.loads(json.dumps([explorer.full_panel(p) for p in range(len(explorer.panels))]))
    assert state["target_data"]["id"] == ord("o")
    with pytest.raises(ValueError, match="does not exist"):
        explorer.save_html(tmp_path / "missing" / "lens.html")


def test_exports_from_python(model, tmp_path):
    explorer = ll_widgets.LogitLensExplorer(model, "hello", target="o", metric="target_prob")
    fig = explorer.to_figure()
    image = fig.axes[0].images[0].get_array()  # its orientation is plot_lens's business; its values are ours
    values = np.sort(np.asarray(image).ravel())
    np.testing.assert_allclose(values, np.sort(np.array(explorer.target_data["panels"][0]["probs"])), atol=2e-5)
    import pandas as pd

    table = pd.read_csv(explorer.save_csv(tmp_path / "lens.csv"), keep_default_na=False)
    assert list(table.columns[:3]) == ["panel", "batch_index", "label"] and len(table) == 3 * 6
    np.testing.assert_allclose(table["target_prob"], explorer.target_data["panels"][0]["probs"])
    assert ll_widgets.figure_png(fig).startswith(b"\x89PNG")


def test_static_pictures_are_indexed_pngs_a_fraction_of_the_size(model):
    import base64
    import io

    from PIL import Image

    explorer = ll_widgets.AttentionExplorer(model, "a prompt long enough for a heatmap, " * 3)
    fig = explorer.to_figure()
    full = ll_widgets.figure_png(fig, dpi=80)
    indexed = ll_widgets.figure_png(fig, dpi=80, palette=True)
    assert len(indexed) < len(full) / 2
    with Image.open(io.BytesIO(indexed)) as image, Image.open(io.BytesIO(full)) as reference:
        assert image.mode == "P" and image.size == reference.size
        # Each pixel within a few levels of the full-colour picture (256 colours for a ramp and the text).
        difference = np.abs(
            np.asarray(image.convert("RGB"), dtype=int) - np.asarray(reference.convert("RGB"), dtype=int)
        )
        assert np.percentile(difference, 99) <= 16
    html = explorer.static_bundle()["text/html"]
    png = base64.b64decode(re.search(r"base64,([^\"]+)", html).group(1))
    assert png.startswith(b"\x89PNG") and Image.open(io.BytesIO(png)).mode == "P"
