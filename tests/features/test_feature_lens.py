"""The feature lens: the top features are the most active ones, each feature's DLA and read-out equal a direct
computation from the model's cache and weights, the features' DLA adds up with the rest of the stream to
`ll.direct_logit_attribution`'s component, only the reported decoder rows are read, and bad input is refused by
name. The embedded model's test (demo) repeats the checks with a small random dictionary at its real sites."""

import pytest
import torch
from support.dictionaries import write_saelens
from support.models import CharTokenizer, char_model, tiny_model

import llama_lens as ll
from llama_lens.errors import ArgumentError, ArgumentTypeError, UnknownNameError
from llama_lens.features.lens import feature_lens
from llama_lens.features.lens_result import FeatureLensResult

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return char_model(seed=2)


def _target_direction(model, target_id):
    return model.unembed.weight[target_id].float() * model.ln_final.weight.float()


def _written(model, hook, rows):
    """Decoder rows [n, d_out] at `hook` as residual-stream directions [n, d_model], restated from the weights."""
    if hook.endswith("attn.hook_z"):
        layer = int(hook.split(".")[1])
        w_o = model.blocks[layer].attn.W_O  # [n_heads, d_head, d_model]
        return torch.einsum("nhd,hdm->nm", rows.reshape(len(rows), *w_o.shape[:2]), w_o)
    if hook.endswith("mlp.hook_post"):
        return rows @ model.blocks[int(hook.split(".")[1])].mlp.W_out
    return rows


SITES = [
    ("blocks.1.hook_resid_post", {}),
    ("blocks.0.hook_mlp_out", {"architecture": "jumprelu"}),
    ("blocks.1.attn.hook_z", {}),
    ("blocks.0.mlp.hook_post", {"d_in": 128}),
    ("hook_embed", {"architecture": "topk", "k": 6}),
]


@pytest.mark.parametrize(("hook", "options"), SITES)
def test_top_features_dla_and_readout_match_a_direct_computation(model, tmp_path, hook, options):
    sae = ll.load_dictionary(write_saelens(tmp_path / "sae", hook, d_sae=48, **options))
    result = feature_lens(model, "hello world", sae, target="o", top_k=5, n_readout=4)
    _, cache = model.run_with_cache("hello world", names_filter=[hook, "ln_final.hook_scale"])
    acts = sae.encode(cache[hook][0])  # [pos, d_sae]
    scale = cache["ln_final.hook_scale"][0, :, 0]
    u = _target_direction(model, ord("o"))
    W_dec = sae.W_dec
    for p in range(acts.shape[0]):
        active = acts[p].nonzero().squeeze(-1)
        order = acts[p, active].argsort(descending=True)[:5]
        expected = active[order]
        got = result.feature_ids[0, p]
        assert got[: len(expected)].tolist() == expected.tolist()
        assert (got[len(expected) :] == -1).all()
        assert int(result.n_active[0, p]) == len(active)
        torch.testing.assert_close(result.activations[0, p, : len(expected)], acts[p, expected])
        directions = _written(model, hook, W_dec[expected])  # [n, d_model]
        dla = acts[p, expected] * (directions @ u) / scale[p]
        torch.testing.assert_close(result.dla[0, p, : len(expected)], dla, atol=1e-5, rtol=1e-4)
        for f in expected.tolist():
            logits = (_written(model, hook, W_dec[f : f + 1]) * model.ln_final.weight) @ model.unembed.weight.T
            top = logits[0].topk(4).indices.tolist()
            index = int((result.readouts[0].features == f).nonzero())
            assert result.readouts[0].top_ids[index].tolist() == top
            assert result.readout(0, f) == [model.tokenizer.token_strs([i])[0] for i in top]


@pytest.mark.parametrize("normalize", ["none", "constant_norm_rescale", "layer_norm"])
@pytest.mark.parametrize("hook", ["blocks.1.hook_mlp_out", "blocks.0.hook_attn_out"])
def test_features_add_up_with_the_rest_to_the_component_dla(model, tmp_path, hook, normalize):
    # Every active feature reported: their DLA, plus the bias's and the error's, is the component's DLA in
    # ll.direct_logit_attribution (the same frozen-scale convention), at every position.
    sae = ll.load_dictionary(write_saelens(tmp_path / "sae", hook, d_sae=40, normalize=normalize))
    result = feature_lens(model, "hello there", sae, target="e", top_k=40)
    attribution = ll.direct_logit_attribution(model, "hello there", target="e", positions=None, heads=False)
    label = f"{hook.split('.')[1]}_{'mlp' if 'mlp' in hook else 'attn'}"
    component = attribution.components[0, attribution.labels.index(label), :, 0]  # [pos]
    _, cache = model.run_with_cache("hello there", names_filter=[hook])
    x = cache[hook][0]
    acts = sae.encode(x)
    rest = x - (sae.decode(acts, x) - sae.decode(torch.zeros_like(acts), x))  # the bias, the error
    u = _target_direction(model, ord("e"))
    rest_dla = (rest @ u) / result.scale
    assert (result.feature_ids[0] >= 0).sum() == (acts != 0).sum()
    torch.testing.assert_close(result.dla[0].nan_to_num(0).sum(-1) + rest_dla, component, atol=1e-5, rtol=1e-4)


def test_transcoder_and_two_dictionaries_at_one_site(model, tmp_path):
    folder = write_saelens(
        tmp_path / "t", "blocks.0.mlp.hook_in", architecture="skip_transcoder", hook_out="blocks.0.hook_mlp_out"
    )
    transcoder = ll.load_dictionary(folder)
    first = ll.load_dictionary(write_saelens(tmp_path / "a", "blocks.1.hook_resid_pre"))
    second = ll.load_dictionary(write_saelens(tmp_path / "b", "blocks.1.hook_resid_pre"))
    result = feature_lens(model, "abc", [second, transcoder, first], top_k=3)
    # Forward order: layer 0's MLP output, then layer 1's input twice, told apart by their folders.
    assert result.labels == ["blocks.0.hook_mlp_out", "blocks.1.hook_resid_pre (b)", "blocks.1.hook_resid_pre (a)"]
    assert result.sites[0].hook_in == "blocks.0.mlp.hook_in" and result.dla is None
    _, cache = model.run_with_cache("abc", names_filter="blocks.0.mlp.hook_in")
    acts = transcoder.encode(cache["blocks.0.mlp.hook_in"][0])
    torch.testing.assert_close(result.activations[0, :, 0], acts.max(-1).values)
    frame = result.to_frame()
    assert "dla" not in frame and list(frame.columns[:8]) == [
        "layer", "hook", "site", "hook_in", "position", "token", "rank", "feature"
    ]  # fmt: skip


def test_a_site_that_writes_nothing_has_no_readout_or_dla(model, tmp_path):
    sae = ll.load_dictionary(write_saelens(tmp_path / "in", "blocks.0.mlp.hook_in"))
    result = feature_lens(model, "abc", sae, target="a", top_k=3)
    assert result.sites[0].written == ""
    assert result.dla.isnan().all() and result.readouts[0].top_ids.shape[1] == 0
    assert result.to_frame()["top_tokens"].map(len).eq(0).all()


def test_only_the_reported_decoder_rows_are_read(model, tmp_path):
    # 64 tokens; a decoder of 4,096 rows, of which at most 64 x 8 can be reported.
    folder = write_saelens(tmp_path / "big", "blocks.1.hook_resid_post", d_sae=4096)
    sae = ll.load_dictionary(folder)
    tokens = torch.randint(3, 128, (64,))
    encoder_only = ll.load_dictionary(folder)
    _, cache = model.run_with_cache(tokens, names_filter="blocks.1.hook_resid_post")
    encoder_only.encode(cache["blocks.1.hook_resid_post"][0])
    encoder_bytes = encoder_only.bytes_read  # W_enc, b_enc and b_dec (applied to the input), read whole
    before = sae.bytes_read
    result = feature_lens(model, tokens, sae, target=5, top_k=8)
    rows = (result.feature_ids[result.feature_ids >= 0]).unique().numel()
    row_bytes = 64 * 4
    assert sae.bytes_read - before == encoder_bytes + rows * row_bytes
    assert rows * row_bytes < 4096 * row_bytes / 4  # a small part of the decoder
    print(f"\nfeature lens, 64 tokens: read {rows} of 4096 decoder rows ({rows * row_bytes} B of {4096 * row_bytes} B)")


def test_frame_and_plot(model, tmp_path):
    sae = ll.load_dictionary(write_saelens(tmp_path / "s", "blocks.1.hook_resid_post"))
    result = feature_lens(model, "hello", sae, target="o", top_k=4, positions=[-2, -1])
    assert isinstance(result, FeatureLensResult) and result.positions == [4, 5]
    frame = result.to_frame()
    assert set(frame["position"]) == {4, 5} and set(frame["token"]) == {"l", "o"}
    assert frame.groupby("position")["rank"].max().tolist() == [3, 3]
    assert (frame["target"] == "o").all() and frame["dla"].notna().all()
    assert all(len(tokens) == 5 for tokens in frame["top_tokens"])
    for metric in ("activation", "dla", "l0"):
        fig = result.plot(metric)
        image = fig.axes[0].images[0]
        assert image.get_array().shape == (1, 2)
        texts = [t.get_text() for t in fig.axes[0].texts]
        assert texts == [str(int(f)) for f in result.feature_ids[0, :, 0]]
    values = result.plot("dla").axes[0].images[0].get_array()
    torch.testing.assert_close(torch.tensor(values.data[0]), result.dla[0].sum(-1), check_dtype=False)


# ------------------------------------------------------------------------------------------------ hostile
def test_bad_input_is_refused_by_name(model, tmp_path):
    sae = ll.load_dictionary(write_saelens(tmp_path / "s", "blocks.1.hook_resid_post"))
    narrow = ll.load_dictionary(write_saelens(tmp_path / "narrow", "blocks.0.hook_resid_post", d_in=32))
    with pytest.raises(ArgumentError, match=r"narrow.*reads 32 numbers at blocks.0.hook_resid_post.*64 \(d_model\)"):
        feature_lens(model, "hi", narrow)
    with pytest.raises(ArgumentTypeError, match="Dictionary objects"):
        feature_lens(model, "hi", ["not a dictionary"])
    with pytest.raises(ArgumentError, match="at least one dictionary"):
        feature_lens(model, "hi", [])
    with pytest.raises(ArgumentError, match="one prompt"):
        feature_lens(model, ["hi", "ho"], sae)
    with pytest.raises(ArgumentError, match="one target"):
        feature_lens(model, "hi", sae, target=[["a", "b"]])
    with pytest.raises(ArgumentError, match="top_k"):
        feature_lens(model, "hi", sae, top_k=0)
    with pytest.raises(ArgumentError, match="position"):
        feature_lens(model, "hi", sae, positions=[40])
    result = feature_lens(model, "hi", sae, top_k=2)
    with pytest.raises(ArgumentError, match="needs a target"):
        result.plot("dla")
    with pytest.raises(ArgumentError, match="metric"):
        result.plot("probability")
    with pytest.raises(ArgumentError, match="no site 'blocks.0.hook_resid_post'"):
        result.readout("blocks.0.hook_resid_post", 0)


def test_a_layer_not_loaded_is_named(tmp_path):
    partial = tiny_model(layers=[0], tokenizer=CharTokenizer())
    sae = ll.load_dictionary(write_saelens(tmp_path / "s", "blocks.1.hook_resid_post"))
    with pytest.raises(UnknownNameError, match=r"s: the model has no hook point 'blocks.1.hook_resid_post'"):
        feature_lens(partial, "hi", sae)


# ------------------------------------------------------------------------------------------------ the demo model
def test_embedded_model_with_a_small_dictionary(demo_path, tmp_path):
    model = ll.load(demo_path, dtype=torch.float32, layers=range(0, 6), progress=False)
    hook = "blocks.5.hook_mlp_out"
    sae = ll.load_dictionary(write_saelens(tmp_path / "sae", hook, d_in=576, d_sae=512))
    prompt = "The Eiffel Tower is in the city of"
    result = feature_lens(model, prompt, sae, target=" Paris", top_k=512)
    attribution = ll.direct_logit_attribution(model, prompt, target=" Paris", positions=None, heads=False)
    component = attribution.components[0, attribution.labels.index("5_mlp"), :, 0]
    _, cache = model.run_with_cache(prompt, names_filter=[hook])
    x = cache[hook][0]
    acts = sae.encode(x)
    u = _target_direction(model, model.tokenizer.id_of(" Paris"))
    rest = (x - acts @ sae.W_dec) @ u / result.scale
    torch.testing.assert_close(result.dla[0].nan_to_num(0).sum(-1) + rest, component, atol=1e-4, rtol=1e-4)
    top = result.feature_ids[0, -1, 0].item()
    logits = (sae.W_dec[top] * model.ln_final.weight) @ model.unembed.weight.T
    expected = model.tokenizer.token_strs(logits.topk(5).indices.tolist())
    assert result.readout(hook, top) == expected
    frame = result.to_frame()
    assert frame["token"].iloc[-1] == result.str_tokens[0][-1]
