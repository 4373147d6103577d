"""Feature attribution and ablation with a cross-layer transcoder spliced in (float64, tiny model, random CLT):
a feature's attribution is the first-order change of the metric as it is scaled, and the model's gradient
summed over every layer it writes to; its ablation equals a hand-written splice with it zeroed; bad input is
refused by name."""

import pytest
import torch
from support.dictionaries import write_clt, write_saelens
from support.models import tiny_model

import llama_lens as ll

pytestmark = pytest.mark.usefixtures("one_torch_thread")

A, B = 5, 7


def logit_diff(logits):
    return logits[0, -1, A] - logits[0, -1, B]


def _setup(tmp_path, seed=0):
    torch.manual_seed(seed)
    model = tiny_model(seed=1).double()
    clt = ll.load_dictionary(write_clt(tmp_path / "clt"), dtype=torch.float64)
    return model, clt, torch.randint(3, 128, (1, 7))


def _by_hand(model, clt, tokens, layer=None, position=None, feature=None, scale=1.0):
    """The metric of the spliced model with feature (layer, position, feature) scaled by `scale`: each layer's
    output is the CLT's decode of its features with that one scaled, plus this run's error (output - decode of
    the unscaled features), as a SAELens user would splice with the error term."""
    acts = {}

    def read(k):
        def hook(x, *, hook):
            acts[k] = clt.encode_layer(x, k)

        return hook

    def write(j):
        def hook(y, *, hook):
            clean = [acts[i] for i in range(j + 1)]
            scaled = [a.clone() for a in clean]
            if layer is not None and layer <= j:
                scaled[layer][0, position, feature] *= scale
            return clt.decode_layer(scaled, j) + (y - clt.decode_layer(clean, j))

        return hook

    hooks = [(name, read(k)) for k, name in enumerate(clt.hooks_in)]
    hooks += [(name, write(j)) for j, name in enumerate(clt.hooks_out)]
    with torch.no_grad():
        return float(logit_diff(model.run_with_hooks(tokens, fwd_hooks=hooks)))


def test_clt_attribution_is_the_first_order_change_and_the_gradient_over_every_layer_written(tmp_path):
    model, clt, tokens = _setup(tmp_path)
    result = ll.feature_attribution(model, tokens, clt, logit_diff, top_n=0)
    assert result.sites == clt.hooks_out
    frame = result.to_frame()
    features = frame[frame.kind == "feature"]
    assert set(features.layer) == {0, 1} and len(features) > 20  # features of both layers fired
    # The plain model's gradient at each layer's MLP output: an independent reading.
    outs = {}

    def keep(x, *, hook):
        outs[hook.name] = x

    with torch.enable_grad(), model.hooks([(clt.hooks_out, keep)]):
        value = logit_diff(model(tokens))
        grads = [g[0] for g in torch.autograd.grad(value, [outs[name] for name in clt.hooks_out])]
    assert abs(result.metric - float(value.detach())) < 1e-12
    eps = 1e-6
    for row in features.head(40).itertuples():
        directions = clt.W_dec_rows(row.layer, [row.feature])[0]  # [n_layers - layer, d_out]
        expected = row.activation * sum(
            float(grads[row.layer + k][row.position] @ directions[k]) for k in range(len(directions))
        )
        assert abs(row.attribution - expected) < 1e-10 * max(1.0, abs(expected)), row
        # The first-order change: d(metric)/d(scale) at scale 1, by central differences.
        up = _by_hand(model, clt, tokens, row.layer, row.position, row.feature, 1 + eps)
        down = _by_hand(model, clt, tokens, row.layer, row.position, row.feature, 1 - eps)
        assert abs(row.attribution - (up - down) / (2 * eps)) < 1e-6 * max(1.0, abs(row.attribution)), row
    # The second layer's features reach the logits through one layer's output, the first's through two.
    assert features[features.layer == 0].attribution.abs().max() > 1e-3
    errors = frame[frame.kind == "error"]
    assert len(errors) == 2 * tokens.shape[1]  # one per layer's output and position
    with torch.no_grad():
        cache = model.run_with_cache(tokens, names_filter=lambda name: name in clt.hooks_in)[1]
        acts = [clt.encode_layer(cache[name], k) for k, name in enumerate(clt.hooks_in)]
    for row in errors.itertuples():
        error = outs[row.site][0, row.position].detach() - clt.decode_layer(acts, row.layer)[0, row.position]
        assert abs(row.attribution - float(grads[row.layer][row.position] @ error)) < 1e-10


def test_clt_ablation_equals_a_splice_with_the_feature_zeroed(tmp_path):
    model, clt, tokens = _setup(tmp_path)
    clean = _by_hand(model, clt, tokens)
    result = ll.feature_attribution(model, tokens, clt, logit_diff, top_n=30, max_batch=7)
    frame = result.to_frame()
    ablated = frame[frame.effect.notna()]
    assert len(ablated) == 30 and (ablated.kind == "feature").all()
    assert set(ablated.layer) == {0, 1}  # layer 0's ablations change both layers' outputs
    for row in ablated.itertuples():
        zeroed = _by_hand(model, clt, tokens, row.layer, row.position, row.feature, 0.0)
        assert abs(row.effect - (clean - zeroed)) < 1e-10, row
    # ablate_features on the same nodes, one at a time and batched with an error node, agrees.
    nodes = [(row.site, row.position, row.feature) for row in ablated.head(5).itertuples()]
    nodes.append((clt.hooks_out[0], 3, -1))
    effects = ll.ablate_features(model, tokens, clt, nodes, logit_diff)
    torch.testing.assert_close(effects[:5], torch.tensor(ablated.effect.head(5).tolist(), dtype=torch.float64))
    alone = ll.ablate_features(model, tokens, clt, nodes[-1:], logit_diff)
    assert abs(float(alone[0]) - float(effects[-1])) < 1e-10


def test_clt_with_a_per_layer_dictionary(tmp_path):
    # A CLT and an SAE on the residual stream: each site's attribution is still the model's gradient there.
    model, clt, tokens = _setup(tmp_path)
    sae = ll.load_dictionary(write_saelens(tmp_path / "sae", "blocks.0.hook_resid_post"), dtype=torch.float64)
    both = ll.feature_attribution(model, tokens, [sae, clt], logit_diff, top_n=10, ablate_errors=True)
    alone = ll.feature_attribution(model, tokens, clt, logit_diff, top_n=0)
    frame, clt_only = both.to_frame(), alone.to_frame()
    mine = frame[frame.site.isin(clt.hooks_out)].sort_values(["site", "position", "feature"])
    theirs = clt_only.sort_values(["site", "position", "feature"])
    torch.testing.assert_close(
        torch.tensor(mine.attribution.to_numpy()), torch.tensor(theirs.attribution.to_numpy()), rtol=1e-9, atol=1e-12
    )
    assert frame.effect.notna().sum() == 10


def test_clt_bad_input_is_refused_by_name(tmp_path):
    model, clt, tokens = _setup(tmp_path)
    deep = ll.load_dictionary(write_clt(tmp_path / "deep", n_layers=3))
    with pytest.raises(ll.UnknownNameError, match="deep.*blocks.2.mlp.hook_in"):
        ll.feature_attribution(model, tokens, deep, logit_diff)
    narrow = ll.load_dictionary(write_clt(tmp_path / "narrow", d_model=32), dtype=torch.float64)
    with pytest.raises(
        ll.ArgumentError, match=r"blocks.0.mlp.hook_in has last dimension 64; this CLT takes 32.*narrow"
    ):
        ll.feature_attribution(model, tokens, narrow, logit_diff)
    transcoder = ll.load_dictionary(
        write_saelens(
            tmp_path / "t", "blocks.1.mlp.hook_in", architecture="transcoder", hook_out="blocks.1.hook_mlp_out"
        )
    )
    with pytest.raises(ll.ArgumentError, match="same hook point.*blocks.1.hook_mlp_out"):
        ll.feature_attribution(model, tokens, [clt, transcoder], logit_diff)
    with pytest.raises(ll.ArgumentTypeError, match="dictionaries: expected Dictionary or CrossLayerTranscoder"):
        ll.feature_attribution(model, tokens, [clt, str(tmp_path / "clt")], logit_diff)
    with pytest.raises(ll.ArgumentError, match="feature=32 is out of range.*blocks.1.hook_mlp_out"):
        ll.ablate_features(model, tokens, clt, [("blocks.1.hook_mlp_out", 0, 32)], logit_diff)
    with pytest.raises(ll.ArgumentError, match="nodes: no dictionary writes 'blocks.1.mlp.hook_in'"):
        ll.ablate_features(model, tokens, clt, [("blocks.1.mlp.hook_in", 0, 0)], logit_diff)
    assert not any(point.has_hooks for point in model.hook_dict.values())
