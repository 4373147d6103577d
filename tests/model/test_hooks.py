"""Hook points: names, shapes, reading and replacing activations, the cache."""

import pytest
import torch
from support.reference import reference_pair

GLOBAL_HOOKS = ["hook_embed", "ln_final.hook_scale", "ln_final.hook_normalized", "hook_logits"]
BLOCK_HOOKS = [
    "ln1.hook_scale",
    "ln1.hook_normalized",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "attn.hook_rot_q",
    "attn.hook_rot_k",
    "attn.hook_attn_scores",
    "attn.hook_pattern",
    "attn.hook_z",
    "attn.hook_result",
    "ln2.hook_scale",
    "ln2.hook_normalized",
    "mlp.hook_in",
    "mlp.hook_pre",
    "mlp.hook_pre_linear",
    "mlp.hook_post",
    "hook_resid_pre",
    "hook_attn_out",
    "hook_resid_mid",
    "hook_mlp_out",
    "hook_resid_post",
]


@pytest.fixture
def model(tiny_cfg, device):
    """The tiny model on `--device`: every test here runs on the GPU too."""
    return reference_pair(tiny_cfg, device=device)[1]


def test_hook_names_are_the_transformerlens_set(model):
    expected = GLOBAL_HOOKS + [f"blocks.{i}.{h}" for i in range(2) for h in BLOCK_HOOKS]
    assert sorted(model.hook_names) == sorted(expected)


def test_hook_shapes(model, tiny_cfg):
    batch, pos = 2, 5
    _, cache = model.run_with_cache(torch.randint(0, 128, (batch, pos)))
    d_model, n_heads, n_kv, d_head = 64, 4, 2, 16
    expected = {
        "hook_embed": (batch, pos, d_model),
        "blocks.0.hook_resid_pre": (batch, pos, d_model),
        "blocks.0.ln1.hook_scale": (batch, pos, 1),
        "blocks.0.attn.hook_q": (batch, pos, n_heads, d_head),
        "blocks.0.attn.hook_k": (batch, pos, n_kv, d_head),
        "blocks.0.attn.hook_rot_k": (batch, pos, n_kv, d_head),
        "blocks.0.attn.hook_pattern": (batch, n_heads, pos, pos),
        "blocks.0.attn.hook_z": (batch, pos, n_heads, d_head),
        "blocks.0.attn.hook_result": (batch, pos, n_heads, d_model),
        "blocks.0.mlp.hook_post": (batch, pos, tiny_cfg.d_mlp),
        "blocks.1.hook_mlp_out": (batch, pos, d_model),
        "hook_logits": (batch, pos, tiny_cfg.d_vocab),
    }
    for name, shape in expected.items():
        assert tuple(cache[name].shape) == shape, name
    assert list(cache.keys()) == model.hook_names  # forward order, every point


def test_noop_hooks_leave_logits_bit_identical(model):
    tokens = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        plain = model(tokens)
        # Avoid the points that switch attention to the written-out path (covered in test_model).
        fused_only = lambda n: "pattern" not in n and "scores" not in n and "result" not in n  # noqa: E731
        hooked = model.run_with_hooks(tokens, fwd_hooks=[(fused_only, lambda t, hook: None)])
    assert torch.equal(plain, hooked)


def test_patching_a_layer_changes_only_later_activations(model):
    tokens = torch.randint(0, 128, (1, 6))
    _, clean = model.run_with_cache(tokens)
    _, patched = model.run_with_cache(tokens, fwd_hooks=[("blocks.1.hook_resid_pre", lambda t, hook: t + 1.0)])
    names = model.hook_names
    cut = names.index("blocks.1.hook_resid_pre")
    for name in names[:cut]:
        assert torch.equal(clean[name], patched[name]), name
    for name in ("blocks.1.hook_resid_pre", "blocks.1.attn.hook_pattern", "hook_logits"):
        assert not torch.allclose(clean[name], patched[name]), name


def test_head_results_sum_to_attention_output_and_can_be_ablated(model):
    tokens = torch.randint(0, 128, (1, 6))
    _, cache = model.run_with_cache(tokens)
    per_head = cache["blocks.0.attn.hook_result"]
    torch.testing.assert_close(per_head.sum(2), cache["blocks.0.hook_attn_out"], atol=1e-5, rtol=0)

    def zero_head_2(result, *, hook):
        result[:, :, 2] = 0
        return result

    _, ablated = model.run_with_cache(tokens, fwd_hooks=[("blocks.0.attn.hook_result", zero_head_2)])
    expected = cache["blocks.0.attn.hook_result"][:, :, [0, 1, 3]].sum(2)
    torch.testing.assert_close(ablated["blocks.0.hook_attn_out"], expected, atol=1e-5, rtol=0)


def test_hooks_come_off_when_the_block_raises(model):
    def boom(t, *, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), model.hooks([("blocks.0.hook_resid_post", boom)]):
        model(torch.randint(0, 128, (1, 3)))
    assert not any(point.has_hooks for point in model.hook_dict.values())


def test_misspelt_hook_name_suggests_the_closest(model):
    hooks = model.hooks([("blocks.1.attn.hook_patern", lambda t, hook: None)])
    with pytest.raises(KeyError, match="did you mean 'blocks.1.attn.hook_pattern'") as err, hooks:
        pass
    assert "hook_resid_pre" not in str(err.value)  # never the whole list


def test_hook_returning_a_wrong_shape_names_the_hook(model):
    with pytest.raises(ValueError, match="blocks.0.hook_resid_mid"):
        model.run_with_hooks(
            torch.randint(0, 128, (1, 3)), fwd_hooks=[("blocks.0.hook_resid_mid", lambda t, hook: t[:, :1])]
        )


def test_hook_returning_another_dtype_or_device_names_the_hook(model, device):
    expected = rf"hook on 'blocks.0.attn.hook_z' returned shape .* float64 on {device.type}.*, expected .* float32"
    with pytest.raises(ValueError, match=expected):
        model.run_with_hooks(
            torch.randint(0, 128, (1, 3)), fwd_hooks=[("blocks.0.attn.hook_z", lambda t, hook: t.double())]
        )


def test_cache_helpers(model):
    tokens = torch.randint(0, 128, (2, 5))
    logits, cache = model.run_with_cache(tokens)
    resid, labels = cache.accumulated_resid(return_labels=True)
    assert labels == ["0_pre", "1_pre", "final_post"] and resid.shape == (3, 2, 5, 64)
    # TransformerLens' semantics: up to and including `layer`'s resid_pre; final_post once past the last layer.
    assert cache.accumulated_resid(layer=1, incl_mid=True, return_labels=True)[1] == ["0_pre", "0_mid", "1_pre"]
    assert cache.accumulated_resid(layer=1, mlp_input=True, return_labels=True)[1] == ["0_pre", "1_pre", "1_mid"]
    assert cache.accumulated_resid(layer=2, return_labels=True)[1] == labels
    assert torch.equal(cache.accumulated_resid(layer=0)[0], cache["blocks.0.hook_resid_pre"])
    parts, labels = cache.decompose_resid(return_labels=True)
    assert labels[0] == "embed" and len(labels) == 5
    torch.testing.assert_close(parts.sum(0), cache["blocks.1.hook_resid_post"], atol=1e-5, rtol=0)
    assert cache.stack("attn.hook_pattern").shape == (2, 2, 4, 5, 5)
    moved = cache.to("cpu")
    assert set(moved.keys()) == set(cache.keys()) and "hook_embed" in moved and len(moved) == len(cache)
    with pytest.raises(KeyError, match="did you mean"):
        cache["blocks.0.hook_resid_psot"]


def test_names_filter_forms(model):
    tokens = torch.randint(0, 128, (1, 4))
    assert list(model.run_with_cache(tokens, names_filter="hook_embed")[1].keys()) == ["hook_embed"]
    assert len(model.run_with_cache(tokens, names_filter=["hook_embed", "hook_logits"])[1]) == 2
    by_predicate = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("resid_post"))[1]
    assert list(by_predicate.keys()) == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert not by_predicate["blocks.0.hook_resid_post"].requires_grad
