"""Backward hooks on every hook point, checked against torch.autograd.grad on the same tensors."""

import pytest
import torch


@pytest.fixture(scope="module")
def model(char_model):
    return char_model(seed=3)


@pytest.fixture(scope="module")
def tokens(model):
    return model.to_tokens(["gradients flow", "back!"], prepend_bos=True, padding_side="left")


def _autograd_reference(model, tokens):
    """Every activation kept in the graph, and d(loss)/d(activation) from torch.autograd.grad."""
    loss, cache = model.run_with_cache(tokens, return_type="loss", detach=False)
    names = list(cache.keys())
    grads = torch.autograd.grad(loss, [cache[n] for n in names], allow_unused=True)
    return loss, dict(zip(names, grads))


def test_incl_bwd_caches_the_gradient_of_every_hook_point(model, tokens):
    _, expected = _autograd_reference(model, tokens)
    model.zero_grad()
    loss, cache = model.run_with_cache(tokens, return_type="loss", incl_bwd=True)
    assert loss.dim() == 0
    for name in model.hook_names:
        if name.endswith("hook_result"):
            continue  # computed only when hooked; checked below
        assert f"{name}_grad" in cache, name
        grad = cache[f"{name}_grad"]
        assert grad.shape == cache[name].shape
        reference = expected[name] if expected[name] is not None else torch.zeros_like(grad)
        torch.testing.assert_close(grad, reference, atol=1e-6, rtol=1e-4, msg=name)
    assert cache["blocks.0.attn.hook_k_grad"].shape[2] == model.cfg.n_kv_heads
    # hook_result's gradient is the attention output's, for every head.
    result_grad = cache["blocks.1.attn.hook_result_grad"]  # [batch, pos, n_heads, d_model]
    for head in range(model.cfg.n_heads):
        torch.testing.assert_close(result_grad[:, :, head], cache["blocks.1.hook_attn_out_grad"])
    model.zero_grad()


def test_incl_bwd_needs_a_scalar_output(model, tokens):
    with pytest.raises(ValueError, match="return_type='loss'"):
        model.run_with_cache(tokens, incl_bwd=True)
    assert not any(point.has_hooks for point in model.hook_dict.values())


def test_bwd_hooks_see_and_replace_the_gradient(model, tokens):
    _, expected = _autograd_reference(model, tokens)
    seen = {}

    def record(grad, *, hook):
        seen[hook.name] = grad.clone()

    def double(grad, *, hook):
        return grad * 2

    with model.hooks(bwd_hooks=[("blocks.1.hook_resid_mid", double), (lambda n: n.endswith("resid_pre"), record)]):
        model(tokens, return_type="loss").backward()
    model.zero_grad()
    # Everything before resid_mid of layer 1 reaches the loss only through it, so those gradients double.
    torch.testing.assert_close(seen["blocks.0.hook_resid_pre"], 2 * expected["blocks.0.hook_resid_pre"])
    torch.testing.assert_close(seen["blocks.1.hook_resid_pre"], 2 * expected["blocks.1.hook_resid_pre"])
    assert not model.hook_dict["blocks.1.hook_resid_mid"].bwd_fns


def test_transformer_lens_recipe_reset_hooks_end_false(model, tokens):
    _, expected = _autograd_reference(model, tokens)
    grads = {}

    def save(grad, *, hook):
        grads[hook.name] = grad

    loss = model.run_with_hooks(
        tokens, return_type="loss", bwd_hooks=[("blocks.0.attn.hook_pattern", save)], reset_hooks_end=False
    )
    loss.backward()
    model.reset_hooks()
    model.zero_grad()
    torch.testing.assert_close(grads["blocks.0.attn.hook_pattern"], expected["blocks.0.attn.hook_pattern"])
    assert not model.hook_dict["blocks.0.attn.hook_pattern"].has_hooks


def test_backward_hooks_work_on_frozen_weights(char_model, tokens):
    model = char_model(seed=3)
    _, expected = _autograd_reference(model, tokens)
    model.requires_grad_(False)
    _, cache = model.run_with_cache(
        tokens, return_type="loss", incl_bwd=True, names_filter=lambda n: n.endswith(("resid_pre", "hook_z"))
    )
    for name in ("blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.1.attn.hook_z"):
        torch.testing.assert_close(cache[f"{name}_grad"], expected[name], atol=1e-6, rtol=1e-4)
    assert all(p.grad is None for p in model.parameters())


def test_add_hook_bwd_direction(model, tokens):
    point = model.hook_dict["hook_embed"]
    calls = []
    point.add_hook(lambda grad, *, hook: calls.append(grad.shape), dir="bwd")
    try:
        model(tokens, return_type="loss").backward()
    finally:
        point.remove_hooks("bwd")
        model.zero_grad()
    assert calls == [torch.Size([2, tokens.shape[1], model.cfg.d_model])]
    assert not point.bwd_fns
