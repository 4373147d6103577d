"""Feature attribution and ablation: gradient x activation is exact where the metric is linear in the site
(float64), is the model's own gradient elsewhere, comes from one forward and one backward pass; a batched
ablation equals ablated runs one at a time and by hand; bad input is refused by name."""

import math

import pytest
import torch
from support.dictionaries import write_saelens
from support.models import tiny_model
from support.pass_counter import pass_counting_hooks

import llama_lens as ll
from llama_lens.patching import BatchedMetric, target_prob_metric

pytestmark = pytest.mark.usefixtures("one_torch_thread")

A, B = 5, 7  # the tokens the metric compares


def logit_diff(logits):
    return logits[0, -1, A] - logits[0, -1, B]


def _model():
    return tiny_model(seed=1).double()


def _sae(tmp_path, hook, name="sae", **kwargs):
    return ll.load_dictionary(write_saelens(tmp_path / name, hook, **kwargs), dtype=torch.float64)


def _tokens():
    return torch.randint(3, 128, (1, 7))


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu"])
def test_attribution_equals_the_ablation_effect_where_the_metric_is_linear(tmp_path, architecture):
    # The final norm's output reaches the logits through the unembedding alone: a logit difference is linear
    # in it, so gradient x activation is the exact effect of removing a node.
    model = _model()
    sae = _sae(tmp_path, "ln_final.hook_normalized", architecture=architecture, k=6)
    result = ll.feature_attribution(model, _tokens(), sae, logit_diff, top_n=10_000, ablate_errors=True)
    assert result.ablated.all() and len(result) > 7  # every feature node and the 7 error nodes
    assert (result.attributions - result.effects).abs().max() < 1e-10
    assert result.attributions.abs().max() > 1e-2


def test_attribution_is_the_models_gradient_at_each_site(tmp_path):
    model = _model()
    tokens = _tokens()
    dictionaries = [
        _sae(tmp_path, "blocks.0.hook_resid_post", "resid"),
        _sae(tmp_path, "blocks.1.attn.hook_z", "z"),
        ll.load_dictionary(
            write_saelens(
                tmp_path / "t", "blocks.1.mlp.hook_in", architecture="skip_transcoder", hook_out="blocks.1.hook_mlp_out"
            ),
            dtype=torch.float64,
        ),
    ]
    result = ll.feature_attribution(model, tokens, dictionaries, logit_diff, top_n=0)
    sites = [d.hook_out for d in dictionaries]
    # The plain model's gradient at each site, and its activations: an independent reading.
    acts = {}

    def keep(x, *, hook):
        acts[hook.name] = x

    with torch.enable_grad(), model.hooks([(sites + ["blocks.1.mlp.hook_in"], keep)]):
        value = logit_diff(model(tokens))
        grads = dict(zip(sites, torch.autograd.grad(value, [acts[s] for s in sites])))
    frame = result.to_frame()
    assert set(frame.kind) == {"feature", "error"}
    for dictionary in dictionaries:
        site = dictionary.hook_out
        grad = grads[site][0].flatten(1)  # [pos, d_out]
        x = acts[site][0].detach().flatten(1)
        source = acts[dictionary.hook_in][0].detach().flatten(1)  # what the dictionary reads
        rows = frame[frame.site == site]
        assert len(rows) > 0
        for row in rows.itertuples():
            if row.kind == "feature":
                expected = row.activation * float(grad[row.position] @ dictionary.W_dec[row.feature])
            else:
                error = x[row.position] - dictionary(source[row.position])
                expected = float(grad[row.position] @ error)
            assert math.isclose(row.attribution, expected, rel_tol=1e-9, abs_tol=1e-12), (site, row)
        # Per position, the features', the error's, b_dec's (and a skip connection's) shares add up to
        # gradient . activation.
        total = rows.groupby("position").attribution.sum()
        for position, value in total.items():
            rest = dictionary.param("b_dec")
            if dictionary.has_skip:
                rest = rest + dictionary.param("W_skip") @ source[position]
            share = float(grad[position] @ rest)
            assert math.isclose(value + share, float(grad[position] @ x[position]), rel_tol=1e-9, abs_tol=1e-12)


def test_one_forward_and_one_backward_then_one_batched_forward(tmp_path):
    model = _model()
    sae = _sae(tmp_path, "blocks.0.hook_resid_post")
    counts, hooks = pass_counting_hooks()
    tokens = _tokens()
    with model.hooks(**hooks):
        ll.feature_attribution(model, tokens, sae, logit_diff, top_n=0)
    assert counts == {"fwd": 1, "bwd": 1}
    counts.update(fwd=0, bwd=0)
    with model.hooks(**hooks):
        result = ll.feature_attribution(model, tokens, sae, logit_diff, top_n=12)
    assert counts == {"fwd": 2, "bwd": 1}  # 12 ablations and the clean row: one batch
    assert int(result.ablated.sum()) == 12
    counts.update(fwd=0, bwd=0)
    with model.hooks(**hooks):
        ll.feature_attribution(model, tokens, sae, logit_diff, top_n=12, max_batch=5)
    assert counts == {"fwd": 4, "bwd": 1}  # 13 rows, 5 at a time


def test_a_batched_ablation_equals_single_ablated_runs(tmp_path):
    model = _model()
    tokens = _tokens()
    resid, mlp = _sae(tmp_path, "blocks.0.hook_resid_post", "resid"), _sae(tmp_path, "blocks.1.hook_mlp_out", "mlp")
    x = model.run_with_cache(tokens, names_filter="blocks.0.hook_resid_post")[1]["blocks.0.hook_resid_post"][0]
    acts = resid.encode(x)  # [pos, d_sae]
    active = acts.nonzero().tolist()[:4]
    nodes = [("blocks.0.hook_resid_post", p, f) for p, f in active]
    nodes += [("blocks.1.hook_mlp_out", 6, -1), ("blocks.0.hook_resid_post", -1, -1)]
    batched = ll.ablate_features(model, tokens, [resid, mlp], nodes, logit_diff)
    for node, effect in zip(nodes, batched):
        alone = ll.ablate_features(model, tokens, [resid, mlp], [node], logit_diff)
        assert abs(float(alone[0]) - float(effect)) < 1e-10
    with torch.no_grad():
        clean = float(logit_diff(model(tokens)))
    for (_, p, f), effect in zip(nodes[:4], batched):  # by hand: remove the feature's write at its position

        def remove(act, *, hook, p=p, f=f):
            act = act.clone()
            act[0, p] -= acts[p, f] * resid.W_dec[f]
            return act

        with torch.no_grad():
            logits = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_post", remove)])
        ablated = float(logit_diff(logits))
        assert abs((clean - ablated) - float(effect)) < 1e-10


def test_metric_forms_agree(tmp_path):
    model = _model()
    tokens = _tokens()
    sae = _sae(tmp_path, "blocks.1.hook_resid_pre")
    prob = target_prob_metric(model, A)  # a PositionMetric: unembeds the last position alone
    by_hand = ll.feature_attribution(model, tokens, sae, lambda logits: logits[0, -1].softmax(-1)[A], top_n=5)
    positional = ll.feature_attribution(model, tokens, sae, prob, top_n=5)
    batched = ll.feature_attribution(
        model, tokens, sae, BatchedMetric(lambda logits: logits[:, 0, -1].softmax(-1)[:, A]), top_n=5
    )
    # target_prob_metric takes its softmax in float32: agreement to float32 rounding.
    for other, rtol in ((positional, 1e-5), (batched, 1e-9)):
        atol = 1e-7 * rtol
        torch.testing.assert_close(other.attributions, by_hand.attributions, rtol=rtol, atol=atol)
        torch.testing.assert_close(other.effects, by_hand.effects, rtol=rtol, atol=atol, equal_nan=True)
    with torch.no_grad():
        assert math.isclose(by_hand.metric, float(prob(model(tokens))), rel_tol=1e-6)


def test_result_frame_and_plot(tmp_path):
    model = tiny_model(seed=1)
    sae = ll.load_dictionary(write_saelens(tmp_path / "s", "blocks.1.hook_resid_post"))
    result = ll.feature_attribution(model, _tokens(), sae, logit_diff, top_n=3)
    frame = result.to_frame()
    columns = ["prompt", "site", "layer", "position", "token", "feature", "kind", "activation", "attribution", "effect"]
    assert list(frame.columns) == columns
    assert frame.attribution.abs().is_monotonic_decreasing
    assert frame.effect.notna().sum() == 3 and (frame.layer == 1).all()
    features = frame[frame.kind == "feature"]
    assert features.effect.notna().iloc[:3].all()  # the top 3 features are the ones ablated
    figure = result.plot()
    assert figure.axes[0].get_xlabel().startswith("attribution")


def test_bad_input_is_refused_by_name(tmp_path):
    model = _model()
    sae = _sae(tmp_path, "blocks.0.hook_resid_post")
    tokens = _tokens()
    with pytest.raises(ll.ArgumentError, match="prompt: ablate_features takes one prompt"):
        ll.ablate_features(model, torch.randint(3, 128, (2, 5)), sae, [("blocks.0.hook_resid_post", 0, 0)], logit_diff)
    narrow = _sae(tmp_path, "blocks.0.hook_resid_pre", "narrow", d_in=32)
    with pytest.raises(ll.ArgumentError, match="narrow"):
        ll.feature_attribution(model, tokens, narrow, logit_diff)
    far = _sae(tmp_path, "blocks.7.hook_resid_post", "far")
    with pytest.raises(ll.UnknownNameError, match="far.*blocks.7.hook_resid_post"):
        ll.feature_attribution(model, tokens, far, logit_diff)
    with pytest.raises(ll.ArgumentError, match="same hook point"):
        ll.feature_attribution(model, tokens, [sae, _sae(tmp_path, "blocks.0.hook_resid_post", "twin")], logit_diff)
    with pytest.raises(ll.ArgumentError, match="one number"):
        ll.feature_attribution(model, tokens, sae, lambda logits: logits[0, -1, :2], top_n=0)
    with pytest.raises(ll.ArgumentTypeError, match="Dictionary"):
        ll.feature_attribution(model, tokens, ["sae"], logit_diff)
    with pytest.raises(ll.ArgumentError, match="no dictionary writes 'blocks.1.hook_resid_post'"):
        ll.ablate_features(model, tokens, sae, [("blocks.1.hook_resid_post", 0, 0)], logit_diff)
    with pytest.raises(ll.ArgumentError, match="feature=32 is out of range"):
        ll.ablate_features(model, tokens, sae, [("blocks.0.hook_resid_post", 0, 32)], logit_diff)
    with pytest.raises(ll.ArgumentError, match="position=9 is out of range"):
        ll.ablate_features(model, tokens, sae, [("blocks.0.hook_resid_post", 9, 0)], logit_diff)
    with pytest.raises(ll.ArgumentError, match="top_n"):
        ll.feature_attribution(model, tokens, sae, logit_diff, top_n=-1)
    assert not any(point.has_hooks for point in model.hook_dict.values())
