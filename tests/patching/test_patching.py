"""ll.patching against the naive loop (one full hooked forward pass per patched site, TransformerLens' recipe
written out) and attribution patching against torch.autograd.grad."""

import pytest
import torch
from support.patching_loop import HOOKS, naive_sweep

import llama_lens as ll
from llama_lens.patching.sweep import reference_names


@pytest.fixture(scope="module")
def model(char_model):
    return char_model(seed=4)


@pytest.fixture(scope="module")
def pair(model):
    clean = model.to_tokens(["Paris", "Rome "], prepend_bos=True)
    corrupted = model.to_tokens(["Tokyo", "Oslo "], prepend_bos=True)
    assert clean.shape == corrupted.shape == (2, 6)
    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(clean)
        corrupted_logits = model(corrupted)
    metric = ll.patching.logit_diff_metric(model, clean_logits, corrupted_logits, answer="n", wrong="e")
    return clean, corrupted, clean_cache, clean_logits, corrupted_logits, metric


CASES = [
    ("resid_pre", True),
    ("resid_mid", True),
    ("resid_post", True),
    ("attn_out", True),
    ("mlp_out", True),
    ("z", True),
    ("z", False),
    ("q", False),
    ("k", True),
    ("v", False),
    ("pattern", True),
    ("pattern", False),
]


@pytest.mark.parametrize(("site", "by_pos"), CASES)
def test_batched_prefix_sweep_matches_the_naive_loop(model, pair, site, by_pos):
    clean, corrupted, clean_cache, *_, metric = pair
    expected = naive_sweep(model, corrupted, clean_cache, metric, site, by_pos)
    got, axes = ll.patching.patch_sweep(
        model, corrupted, clean_cache, metric, site, by_pos=by_pos, max_batch=6, progress=False
    )
    assert got.shape == expected.shape and axes[0] == "layer"
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_transformer_lens_names_and_signatures(model, pair):
    clean, corrupted, clean_cache, *_, metric = pair
    expected = naive_sweep(model, corrupted, clean_cache, metric, "resid_pre", True)
    got = ll.patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric)
    assert got.shape == (model.cfg.n_layers, corrupted.shape[1])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    heads = ll.patching.get_act_patch_attn_head_out_all_pos(model, corrupted, clean_cache, metric, progress=False)
    torch.testing.assert_close(
        heads, naive_sweep(model, corrupted, clean_cache, metric, "z", False), atol=1e-4, rtol=1e-4
    )
    assert ll.patching.get_act_patch_attn_head_v_by_pos(model, corrupted, clean_cache, metric).shape == (2, 6, 2)
    every = ll.patching.get_act_patch_block_every(model, corrupted, clean_cache, metric)
    assert every.shape == (3, 2, 6)
    torch.testing.assert_close(every[0], expected, atol=1e-4, rtol=1e-4)


def test_metrics_are_normalised(model, pair):
    _, _, _, clean_logits, corrupted_logits, metric = pair
    torch.testing.assert_close(metric(clean_logits), torch.tensor(1.0))
    torch.testing.assert_close(metric(corrupted_logits), torch.tensor(0.0), atol=1e-6, rtol=0)
    prob = ll.patching.target_prob_metric(model, "n")
    torch.testing.assert_close(prob(clean_logits), clean_logits[:, -1].softmax(-1)[:, ord("n")].mean())
    per_prompt = ll.patching.target_prob_metric(
        model, torch.tensor([ord("n"), ord("e")]), position=torch.tensor([3, 4])
    )
    expected = (clean_logits[0, 3].softmax(-1)[ord("n")] + clean_logits[1, 4].softmax(-1)[ord("e")]) / 2
    torch.testing.assert_close(per_prompt(clean_logits), expected)
    with pytest.raises(ValueError, match="position 9"):
        ll.patching.target_prob_metric(model, "n", position=9)(clean_logits)


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (10**6, r"answer token ids must lie in \[0, d_vocab=128\), got 1000000"),
        (-1, r"answer token ids must lie in \[0, d_vocab=128\), got -1"),
        (3.7, "an answer is a token .* got 3.7"),
        ([1, 2, 3], "answer gives 3 values, one per prompt, but there are 2 prompts"),
    ],
)
def test_a_bad_answer_is_named_not_a_torch_index_error(model, pair, answer, message):
    _, _, _, clean_logits, corrupted_logits, _ = pair
    with pytest.raises(ValueError, match=message):
        ll.patching.logit_diff_metric(model, clean_logits, corrupted_logits, answer=answer, wrong="e")
    with pytest.raises(ValueError, match=message):
        ll.patching.target_prob_metric(model, answer)(clean_logits)


@pytest.mark.parametrize(("position", "message"), [([1, 2, 3], "position gives 3 values"), (1.5, "an integer")])
def test_a_bad_metric_position_is_named(model, pair, position, message):
    _, _, _, clean_logits, _, _ = pair
    with pytest.raises(ValueError, match=message):
        ll.patching.target_prob_metric(model, "n", position=position)(clean_logits)


def test_activation_patching_result_frame_and_plot(model):
    result = ll.patching.activation_patching(
        model,
        ["Paris is a", "Rome is a "],
        ["Tokyo is a", "Oslo is a "],
        ll.patching.target_prob_metric(model, "n"),
        sites=["resid_pre", "z"],
        prepend_bos=True,
        progress=False,
    )
    assert result.scores["resid_pre"].shape == (2, 11) and result.scores["z"].shape == (2, 11, 4)
    frame = result.to_frame()
    assert len(frame) == 2 * 11 + 2 * 11 * 4
    row = frame[(frame.site == "z") & (frame.layer == 1) & (frame.position == 3) & (frame["head"] == 2)]
    assert float(row.score.iloc[0]) == float(result.scores["z"][1, 3, 2])
    assert frame[frame.site == "resid_pre"].token.tolist()[:3] == ["<s>", "P", "a"]
    fig = result.plot()
    assert len(fig.axes) == 4 and "resid_pre" in fig.axes[0].get_title()
    with pytest.raises(ValueError, match="same shape"):
        ll.patching.activation_patching(model, "abc", "abcd", lambda logits: logits.sum(), progress=False)
    with pytest.raises(ValueError, match="unknown patching site 'resid'"):
        ll.patching.activation_patching(model, "abc", "abd", lambda logits: logits.sum(), sites="resid")


@pytest.mark.parametrize(
    ("site", "by_pos"), [("resid_pre", True), ("mlp_out", True), ("z", True), ("v", False), ("pattern", True)]
)
def test_attribution_patching_is_gradient_times_difference(model, pair, site, by_pos):
    clean, corrupted, clean_cache, *_, metric = pair
    result = ll.patching.attribution_patching(model, clean, corrupted, metric, sites=site, by_pos=by_pos)
    names = [f"blocks.{layer}.{HOOKS[site]}" for layer in range(model.cfg.n_layers)]
    value, cache = model.run_with_cache(corrupted, names_filter=names, detach=False)
    grads = torch.autograd.grad(metric(value), [cache[n] for n in names])
    expected = []
    for name, grad in zip(names, grads):
        product = (clean_cache[name] - cache[name].detach()) * grad
        if site == "pattern":
            expected.append(product.sum(dim=(0, 3)).T)  # [q_pos, n_heads]
        elif site in ("resid_pre", "mlp_out"):
            expected.append(product.sum(dim=(0, 2)))
        else:
            expected.append(product.sum(dim=(0, 3)) if by_pos else product.sum(dim=(0, 1, 3)))
    torch.testing.assert_close(result.scores[site], torch.stack(expected), atol=1e-5, rtol=1e-4)
    assert result.method == "attribution"
    assert result.to_frame().method.unique().tolist() == ["attribution"]


EVERY_SITE = [
    ("resid_pre", True),
    ("resid_mid", True),
    ("resid_post", True),
    ("attn_out", True),
    ("mlp_out", True),
    ("z", True),
    ("z", False),
    ("q", True),
    ("q", False),
    ("k", True),
    ("k", False),
    ("v", True),
    ("v", False),
    ("pattern", True),
    ("pattern", False),
    ("pattern", "dest_src"),
]


@pytest.fixture(scope="module")
def padded_pairs(model):
    """Per padding side: clean and corrupted ids [2, 7] with their (equal) masks, and the clean cache."""
    pairs = {}
    for side in ("left", "right"):
        clean, clean_mask = model.prepare_tokens(["Paris!", "Rome"], prepend_bos=True, padding_side=side)
        corrupted, corrupted_mask = model.prepare_tokens(["Tokyo!", "Oslo"], prepend_bos=True, padding_side=side)
        assert clean.shape == (2, 7) and torch.equal(clean_mask, corrupted_mask) and not bool(clean_mask.all())
        with torch.no_grad():
            clean_logits, clean_cache = model.run_with_cache(clean, attention_mask=clean_mask)
            corrupted_logits = model(corrupted, attention_mask=corrupted_mask)
        pairs[side] = (corrupted, corrupted_mask, clean_cache, clean_logits, corrupted_logits)
    return pairs


def _every_position_metric(logits):
    """A TransformerLens-style metric on full logits that reads every position (padding included): the logits
    a patched run does not recompute (before the patched position) must be the corrupted run's."""
    return logits.log_softmax(-1)[..., ord("n")].mean()


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize(("site", "by_pos"), EVERY_SITE)
def test_prefix_reuse_matches_the_naive_loop_with_padding(model, padded_pairs, site, by_pos, padding_side):
    # Runs start at every position from 0 (the shared BOS, and whole-head patches) to the last; batch 2 with
    # padding; a metric on full logits with left padding, one reading each prompt's last real token with right.
    corrupted, mask, clean_cache, clean_logits, corrupted_logits = padded_pairs[padding_side]
    if padding_side == "left":
        metric = _every_position_metric
    else:
        last = mask.sum(-1) - 1  # [batch]
        metric = ll.patching.logit_diff_metric(
            model, clean_logits, corrupted_logits, answer="n", wrong="e", position=last
        )
    expected = naive_sweep(model, corrupted, clean_cache, metric, site, by_pos, attention_mask=mask)
    for skip_unchanged in (True, False):
        got, _ = ll.patching.patch_sweep(
            model,
            corrupted,
            clean_cache,
            metric,
            site,
            by_pos=by_pos,
            attention_mask=mask,
            max_batch=6,
            skip_unchanged=skip_unchanged,
            progress=False,
        )
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_patched_runs_start_at_the_patched_layer_and_position(model, pair):
    clean, corrupted, _, _, _, metric = pair
    pos = corrupted.shape[1]
    names = reference_names(model, "resid_pre", [1])
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean, names_filter=names)
        _, corrupted_cache = model.run_with_cache(corrupted, names_filter=names)
    # Both prompts start with BOS: computed alike, its residual stream is the same bits in both runs, and a
    # patch there writes the value already there (skipped). Were it not the same bits, the patch would run.
    name = "blocks.1.hook_resid_pre"
    bos_unchanged = torch.equal(clean_cache[name][:, 0], corrupted_cache[name][:, 0])
    seen = []

    def record(act, *, hook):
        seen.append((hook.name, act.shape[0], act.shape[1]))

    for skip_unchanged, first in ((False, 0), (True, int(bos_unchanged))):
        seen.clear()
        with model.hooks([(lambda name: name.endswith("hook_resid_pre"), record)]):
            ll.patching.patch_sweep(
                model,
                corrupted,
                clean_cache,
                metric,
                "resid_pre",
                layers=[1],
                corrupted_cache=corrupted_cache,
                skip_unchanged=skip_unchanged,
                progress=False,
            )
        # One block call per patched position, at layer 1 only, over the positions from the patched one on.
        assert sorted(seen) == sorted(("blocks.1.hook_resid_pre", 2, pos - p) for p in range(first, pos))


def test_transformer_lens_head_layouts(model, pair):
    clean, corrupted, clean_cache, *_, metric = pair
    cfg = model.cfg
    pattern_by_pos = naive_sweep(model, corrupted, clean_cache, metric, "pattern", True)  # [n_layers, pos, n_heads]
    got = ll.patching.get_act_patch_attn_head_pattern_by_pos(model, corrupted, clean_cache, metric, progress=False)
    torch.testing.assert_close(got, pattern_by_pos.permute(0, 2, 1), atol=1e-4, rtol=1e-4)  # TL: head, then dest

    dest_src = ll.patching.get_act_patch_attn_head_pattern_dest_src_pos(
        model, corrupted, clean_cache, metric, progress=False
    )
    assert dest_src.shape == (cfg.n_layers, cfg.n_heads, 6, 6)
    torch.testing.assert_close(
        dest_src, naive_sweep(model, corrupted, clean_cache, metric, "pattern", "dest_src"), atol=1e-4, rtol=1e-4
    )

    every = ll.patching.get_act_patch_attn_head_all_pos_every(model, corrupted, clean_cache, metric, progress=False)
    assert every.shape == (5, cfg.n_layers, cfg.n_heads)
    for row, site in enumerate(["z", "q", "k", "v", "pattern"]):
        expected = naive_sweep(model, corrupted, clean_cache, metric, site, False)
        heads = expected.shape[-1]  # n_kv_heads for k and v, zero-padded to n_heads as TransformerLens does
        torch.testing.assert_close(every[row, :, :heads], expected, atol=1e-4, rtol=1e-4)
        assert bool((every[row, :, heads:] == 0).all())
    by_pos = ll.patching.get_act_patch_attn_head_by_pos_every(model, corrupted, clean_cache, metric, progress=False)
    assert by_pos.shape == (5, cfg.n_layers, 6, cfg.n_heads)
    torch.testing.assert_close(by_pos[4], pattern_by_pos, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        by_pos[2, ..., : cfg.n_kv_heads],
        naive_sweep(model, corrupted, clean_cache, metric, "k", True),
        atol=1e-4,
        rtol=1e-4,
    )
    with pytest.raises(ValueError, match="dest_src"):
        ll.patching.patch_sweep(model, corrupted, clean_cache, metric, "z", by_pos="dest_src", progress=False)
