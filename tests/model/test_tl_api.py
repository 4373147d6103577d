"""TransformerLens habits: each checked against TransformerLens' definition written out here (transformer_lens is
not a dependency) or against a computation done by hand."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import llama_lens as ll
from llama_lens.utils import get_act_name


@pytest.fixture(scope="module")
def model(char_model):
    return char_model(seed=1)


def test_loss_return_types_match_cross_entropy(model):
    tokens = model.to_tokens(["hello world", "abc"], prepend_bos=True)  # right-padded
    mask = (torch.arange(tokens.shape[1]) < torch.tensor([[12], [4]])).long()
    with torch.no_grad():
        logits = model(tokens, attention_mask=mask)
        per_token = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
        per_token = per_token.view(2, -1)
        counted = (mask[:, :-1] * mask[:, 1:]).float()
        expected = (per_token * counted).sum() / counted.sum()
        loss = model(tokens, return_type="loss", attention_mask=mask)
        torch.testing.assert_close(loss, expected)
        both_logits, both_loss = model(tokens, return_type="both", attention_mask=mask)
        torch.testing.assert_close(both_loss, expected)
        assert torch.equal(both_logits, logits)
        torch.testing.assert_close(
            model(tokens, return_type="loss", loss_per_token=True, attention_mask=mask), per_token * counted
        )
        torch.testing.assert_close(model.loss_fn(logits, tokens), per_token.mean())
        assert model(tokens, return_type=None) is None
    with pytest.raises(ValueError, match="return_type must be"):
        model(tokens, return_type="logit")


def test_get_act_name_follows_transformer_lens_rules():
    # The examples of TransformerLens' get_act_name docstring.
    assert get_act_name("k", 6, "a") == "blocks.6.attn.hook_k"
    assert get_act_name("pre", 2) == "blocks.2.mlp.hook_pre"
    assert get_act_name("embed") == "hook_embed"
    assert get_act_name("normalized", 27, "ln2") == "blocks.27.ln2.hook_normalized"
    assert get_act_name("k6") == "blocks.6.attn.hook_k"
    assert get_act_name("scale4ln1") == "blocks.4.ln1.hook_scale"
    assert get_act_name("pre5") == "blocks.5.mlp.hook_pre"
    assert get_act_name("resid_post", 3) == "blocks.3.hook_resid_post"
    assert get_act_name("attn", 1) == "blocks.1.attn.hook_pattern"
    assert get_act_name("scale") == "ln_final.hook_scale"
    assert get_act_name("blocks.0.hook_resid_pre") == "blocks.0.hook_resid_pre"
    assert ll.utils.get_act_name is get_act_name


def test_cache_keys_shorthand_and_negative_layers(model):
    tokens = model.to_tokens("hello", prepend_bos=True)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    assert cache["pattern", 0] is cache["blocks.0.attn.hook_pattern"]
    assert cache["resid_post", -1] is cache["blocks.1.hook_resid_post"]
    assert cache["q", 1, "attn"] is cache["blocks.1.attn.hook_q"]
    assert cache["scale", 0, "ln2"] is cache["blocks.0.ln2.hook_scale"]
    assert cache["embed"] is cache["hook_embed"]
    assert ("z", -2) in cache and ("z", 5) not in cache
    with pytest.raises(KeyError, match=r"blocks\.5\.hook_resid_pre.*from \('resid_pre', 5\)"):
        _ = cache["resid_pre", 5]


def test_remove_batch_dim_and_pos_slice(model):
    tokens = model.to_tokens("hello world", prepend_bos=True)
    with torch.no_grad():
        _, full = model.run_with_cache(tokens)
        _, single = model.run_with_cache(tokens, remove_batch_dim=True)
        _, last = model.run_with_cache(tokens, pos_slice=-1)
        _, span = model.run_with_cache(tokens, pos_slice=(2, 5))
    assert not single.has_batch_dim
    for name in ("blocks.0.hook_resid_pre", "blocks.1.attn.hook_z", "blocks.0.attn.hook_pattern"):
        assert torch.equal(single[name], full[name][0])
    assert torch.equal(last["resid_pre", 1], full["resid_pre", 1][:, -1])
    assert torch.equal(last["z", 1], full["z", 1][:, -1])  # [batch, n_heads, d_head]
    assert torch.equal(last["pattern", 1], full["pattern", 1][:, :, -1])  # the last query row
    assert torch.equal(span["k", 0], full["k", 0][:, 2:5])
    with pytest.raises(ValueError, match="batch of one prompt"):
        model.run_with_cache(model.to_tokens(["a", "b"]), remove_batch_dim=True)


def test_token_helpers(model):
    assert model.to_single_token("a") == ord("a")
    with pytest.raises(ValueError, match="'ab' is not a single token"):
        model.to_single_token("ab")
    assert model.to_string(ord("x")) == "x"
    assert model.to_string([104, 105]) == "hi"
    assert model.to_string(torch.tensor([[104, 105], [111, 107]])) == ["hi", "ok"]
    assert model.to_str_tokens(["hi", "abc"], prepend_bos=False) == [["h", "i"], ["a", "b", "c"]]
    assert model.to_str_tokens("hi", prepend_bos=True) == ["<s>", "h", "i"]
    assert model.to_str_tokens(ord("q")) == ["q"]
    assert model.get_token_position("l", "hello", prepend_bos=True) == 3
    assert model.get_token_position("l", "hello", mode="last", prepend_bos=True) == 4
    assert model.get_token_position(ord("h"), torch.tensor([[1, 104, 105]])) == 1
    with pytest.raises(ValueError, match="does not occur"):
        model.get_token_position("z", "hello")


def test_to_tokens_pads_right_by_default_and_left_on_request(model):
    right = model.to_tokens(["ab", "xyz"], prepend_bos=True)
    assert right.tolist() == [[1, 97, 98, 0], [1, 120, 121, 122]]
    left = model.to_tokens(["ab", "xyz"], prepend_bos=True, padding_side="left")
    assert left.tolist() == [[0, 1, 97, 98], [1, 120, 121, 122]]
    assert model.to_tokens("ab", prepend_bos=False).tolist() == [[97, 98]]
    # Right padding leaves each real token where it was: its logits equal those of the prompt alone.
    with torch.no_grad():
        torch.testing.assert_close(model(right)[0, :3], model(right[:1, :3])[0])


def test_padded_query_rows_of_the_pattern_are_zero_as_in_transformer_lens(model):
    tokens, mask = model.prepare_tokens(["ab", "hello"], prepend_bos=True)  # left-padded: 3 pads before "<s>ab"
    with torch.no_grad():
        fused = model(tokens, attention_mask=mask)
        logits, cache = model.run_with_cache(tokens, attention_mask=mask)
    pattern = cache["pattern", 0]  # [batch, n_heads, q_pos, k_pos]
    assert torch.equal(pattern[0, :, :3], torch.zeros_like(pattern[0, :, :3]))
    torch.testing.assert_close(pattern[0, :, 3:].sum(-1), torch.ones(4, 3))
    assert torch.equal(pattern[0, :, 3:, :3], torch.zeros(4, 3, 3))  # real queries ignore the padding
    assert not cache["z", 0][0, :3].any()
    torch.testing.assert_close(logits, fused)  # the fused kernel's padded rows agree


def test_hook_layer_ctx_and_add_hook(model):
    point = model.hook_dict["blocks.1.attn.hook_q"]
    assert point.layer() == 1
    with pytest.raises(ValueError, match="not inside a block"):
        model.hook_dict["hook_embed"].layer()
    tokens = model.to_tokens("hey", prepend_bos=True)

    def count(tensor, *, hook):
        hook.ctx["calls"] = hook.ctx.get("calls", 0) + 1

    point.add_hook(count)
    with torch.no_grad():
        model(tokens)
        model(tokens)
    assert point.ctx["calls"] == 2
    point.remove_hooks("fwd")
    with torch.no_grad():
        model(tokens)
    assert point.ctx["calls"] == 2 and not point.has_hooks
    model.reset_hooks()
    assert point.ctx == {}
    with pytest.raises(ValueError, match="dir must be"):
        point.add_hook(count, dir="forward")


def test_blocks_take_ints_and_names_stay(model):
    assert model.blocks[0] is model.blocks["0"]
    assert model.blocks[-1] is model.blocks["1"]
    with pytest.raises(KeyError, match="layer 7 is not loaded"):
        _ = model.blocks[7]
    assert "blocks.0.attn.q_proj.weight" in model.state_dict()
    assert "blocks.1.hook_resid_post" in model.hook_names


def test_weight_views_reproduce_the_forward(model):
    cfg = model.cfg
    tokens = model.to_tokens("weights!", prepend_bos=True)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
        x = cache["normalized", 1, "ln1"] * model.blocks[1].ln1.w  # [batch, pos, d_model]
        torch.testing.assert_close(torch.einsum("bpm,hmd->bphd", x, model.W_Q[1]) + model.b_Q[1], cache["q", 1])
        torch.testing.assert_close(torch.einsum("bpm,hmd->bphd", x, model.W_K[1]) + model.b_K[1], cache["k", 1])
        torch.testing.assert_close(torch.einsum("bpm,hmd->bphd", x, model.W_V[1]) + model.b_V[1], cache["v", 1])
        attn_out = torch.einsum("bphd,hdm->bpm", cache["z", 1], model.W_O[1]) + model.b_O[1]
        torch.testing.assert_close(attn_out, cache["attn_out", 1], atol=1e-5, rtol=1e-5)
        y = cache["normalized", 0, "ln2"] * model.blocks[0].ln2.w
        torch.testing.assert_close(y @ model.W_gate[0], cache["pre", 0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(y @ model.W_in[0] + model.b_in[0], cache["pre_linear", 0], atol=1e-5, rtol=1e-5)
        mlp_out = cache["post", 0] @ model.W_out[0] + model.b_out[0]
        torch.testing.assert_close(mlp_out, cache["mlp_out", 0], atol=1e-5, rtol=1e-5)
        final = cache["ln_final.hook_normalized"] * model.ln_final.w
        torch.testing.assert_close(final @ model.W_U + model.b_U, logits, atol=1e-5, rtol=1e-5)
        assert torch.equal(model.W_E[tokens[0]], cache["hook_embed"][0])
    n, h, kv, d, m = cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_model
    assert model.W_Q.shape == (n, h, m, d) and model.W_K.shape == (n, kv, m, d) and model.W_O.shape == (n, h, d, m)
    assert model.W_in.shape == (n, m, cfg.d_mlp) and model.W_out.shape == (n, cfg.d_mlp, m)
    with pytest.raises(AttributeError, match="RoPE"):
        _ = model.W_pos
    # Per query head: head h reads key/value head h // n_rep.
    per_head = model.W_V_per_query_head
    for head in range(h):
        assert torch.equal(per_head[:, head], model.W_V[:, head // cfg.n_rep])
    ov = model.OV
    assert ov.shape == (n, h, m, m)
    torch.testing.assert_close(ov[1, 3].AB, per_head[1, 3] @ model.W_O[1, 3])
    torch.testing.assert_close(model.QK[0, 2].AB, model.W_Q[0, 2] @ model.W_K[0, 1].T)
    x = torch.randn(m)
    torch.testing.assert_close((x @ ov[1, 3]).AB, x @ ov[1, 3].AB, atol=1e-5, rtol=1e-5)
    assert torch.equal(model.tokens_to_residual_directions(torch.tensor([5, 7])), model.W_U[:, [5, 7]].T)
    assert torch.equal(model.tokens_to_residual_directions("a"), model.W_U[:, 97])


def test_grouped_kv_heads_explained_and_ungrouped(char_model):
    model = char_model(seed=2, n_heads=9, n_kv_heads=3, d_head=8)
    tokens = model.to_tokens("grouping", prepend_bos=True)

    def ablate_head_8(v, *, hook):
        v[:, :, 8] = 0.0

    with pytest.raises(ll.GroupedHeadsError, match=r"query head h reading key/value head h // 3") as info:
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_v", ablate_head_8)])
    assert isinstance(info.value, IndexError) and "ungroup_kv" in str(info.value)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    ungrouped = cache.ungroup("v", 0)
    assert ungrouped.shape == (1, tokens.shape[1], 9, 8)
    for head in range(9):
        assert torch.equal(ungrouped[:, :, head], cache["v", 0][:, :, head // 3])
    # What query head 8 reads, written out: its pattern times value head 8 // 3 gives its z.
    z8 = torch.einsum("qk,kd->qd", cache["pattern", 0][0, 8], ungrouped[0, :, 8])
    torch.testing.assert_close(z8, cache["z", 0][0, :, 8], atol=1e-5, rtol=1e-5)


def _tl_accumulated_resid(cache, n_layers, layer, incl_mid):
    """TransformerLens' accumulated_resid, written out (without apply_ln)."""
    parts, labels = [], []
    for i in range(layer + 1):
        if i == n_layers:
            parts.append(cache[f"blocks.{n_layers - 1}.hook_resid_post"])
            labels.append("final_post")
            continue
        parts.append(cache[f"blocks.{i}.hook_resid_pre"])
        labels.append(f"{i}_pre")
        if incl_mid and i < layer:
            parts.append(cache[f"blocks.{i}.hook_resid_mid"])
            labels.append(f"{i}_mid")
    return torch.stack(parts), labels


def test_accumulated_and_decomposed_resid(model):
    tokens = model.to_tokens(["the cat sat", "a dog ran!"], prepend_bos=True)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
        for layer, expect_layer in ((-1, 2), (None, 2), (1, 1), (0, 0)):
            for incl_mid in (False, True):
                got, labels = cache.accumulated_resid(layer, incl_mid=incl_mid, return_labels=True)
                expected, expected_labels = _tl_accumulated_resid(cache, 2, expect_layer, incl_mid)
                assert labels == expected_labels and torch.equal(got, expected)
        # apply_ln at the unembedding: ln_final applied to each component on its own (the logit lens).
        lens = cache.accumulated_resid(-1, apply_ln=True, pos_slice=-1)  # [n, batch, d_model]
        torch.testing.assert_close(lens[-1] @ model.W_U, logits[:, -1], atol=1e-5, rtol=1e-5)
        mid = cache["resid_pre", 1][:, -1]
        expected = mid / mid.pow(2).mean(-1, keepdim=True).add(model.cfg.eps).sqrt() * model.ln_final.w
        torch.testing.assert_close(lens[1], expected, atol=1e-5, rtol=1e-5)
        # apply_ln at a layer: divided by that layer's cached scale.
        stack = cache.accumulated_resid(1, apply_ln=True)
        torch.testing.assert_close(
            stack[1] * model.blocks[1].ln1.w, cache["normalized", 1, "ln1"] * model.blocks[1].ln1.w
        )

        parts, labels = cache.decompose_resid(-1, return_labels=True)
        assert labels == ["embed", "0_attn_out", "0_mlp_out", "1_attn_out", "1_mlp_out"]
        torch.testing.assert_close(parts.sum(0), cache["resid_post", 1], atol=1e-5, rtol=1e-5)
        attn_only = cache.decompose_resid(layer=1, mode="attn", incl_embeds=False, pos_slice=-1)
        assert torch.equal(attn_only, cache["attn_out", 0][None, :, -1])
        mlp_input = cache.decompose_resid(layer=1, mlp_input=True, return_labels=True)[1]
        assert mlp_input == ["embed", "0_attn_out", "0_mlp_out", "1_attn_out"]
        # Logit attributions of the full decomposition add up to the logit.
        target = tokens[:, -1]
        attrs = cache.logit_attrs(cache.decompose_resid(-1, pos_slice=-1), target, pos_slice=-1)
        torch.testing.assert_close(attrs.sum(0), logits[:, -1].gather(-1, target[:, None])[:, 0], atol=1e-4, rtol=1e-4)
        diff = cache.logit_attrs(
            cache.decompose_resid(-1, pos_slice=-1), target, incorrect_tokens=target + 1, pos_slice=-1
        )
        expected = logits[:, -1].gather(-1, target[:, None]) - logits[:, -1].gather(-1, target[:, None] + 1)
        torch.testing.assert_close(diff.sum(0), expected[:, 0], atol=1e-4, rtol=1e-4)


def test_stack_head_results_and_stack_activation(model):
    tokens = model.to_tokens("heads and more", prepend_bos=True)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        _, with_result = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_result"))
    heads, labels = cache.stack_head_results(-1, return_labels=True, incl_remainder=True)
    assert labels[:5] == ["L0H0", "L0H1", "L0H2", "L0H3", "L1H0"] and labels[-1] == "remainder"
    torch.testing.assert_close(heads[4:8], with_result["result", 1].permute(2, 0, 1, 3), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(heads.sum(0), cache["resid_post", 1], atol=1e-5, rtol=1e-5)
    one_layer = cache.stack_head_results(layer=1, pos_slice=-1)
    torch.testing.assert_close(one_layer, with_result["result", 0][:, -1].permute(1, 0, 2), atol=1e-5, rtol=1e-5)
    assert torch.equal(cache.stack_activation("resid_post"), torch.stack([cache["resid_post", i] for i in range(2)]))
    assert cache.stack_activation("scale", 1, "ln1").shape[0] == 1


def test_start_at_layer_and_the_deprecated_start_layer(model):
    tokens = model.to_tokens("resume here", prepend_bos=True)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
        resid = cache["resid_pre", 1]
        torch.testing.assert_close(model(resid, start_at_layer=1), logits)
        torch.testing.assert_close(model(resid=resid, start_at_layer=1), logits)
        loss = model(resid, start_at_layer=1, tokens=tokens, return_type="loss")
        torch.testing.assert_close(loss, model(tokens, return_type="loss"))
        torch.testing.assert_close(model(tokens, stop_at_layer=1), resid)
        with pytest.warns(DeprecationWarning, match="start_at_layer"):
            torch.testing.assert_close(model(resid=resid, start_layer=1), logits)


def test_generate_with_hooks_top_k_and_verbose(model, capsys):
    greedy = model.generate("ab", max_new_tokens=4, temperature=0, prepend_bos=True)
    top1 = model.generate("ab", max_new_tokens=4, temperature=1.0, top_k=1, seed=0, prepend_bos=True)
    assert top1.tokens == greedy.tokens

    def boost_z(logits, *, hook):
        logits[..., ord("z")] += 1000.0

    hooked = model.generate("ab", max_new_tokens=3, temperature=0, fwd_hooks=[("hook_logits", boost_z)], verbose=True)
    assert hooked.text == "zzz"
    assert not model.hook_dict["hook_logits"].has_hooks
    with pytest.raises(ValueError, match="top_k must be"):
        model.generate("ab", top_k=0)


def test_cfg_aliases_and_runtime_facts(model):
    cfg = model.cfg
    assert (cfg.n_key_value_heads, cfg.eps, cfg.rotary_base, cfg.n_ctx) == (
        cfg.n_kv_heads,
        cfg.norm_eps,
        cfg.rope_theta,
        cfg.max_position_embeddings,
    )
    assert (cfg.act_fn, cfg.normalization_type, cfg.positional_embedding_type) == ("silu", "RMS", "rotary")
    assert model.device == torch.device("cpu") and model.dtype == torch.float32
    with pytest.raises(AttributeError, match="model.device"):
        _ = cfg.device
    with pytest.raises(AttributeError, match="model.dtype"):
        _ = cfg.dtype


def test_test_prompt_reports_the_rank(model, capsys):
    with torch.no_grad():
        logits = model(model.to_tokens("hello", prepend_bos=True))[0, -1]
    rows = ll.utils.test_prompt("hello", "x", model, prepend_space_to_answer=False, prepend_bos=True, top_k=3)
    expected_rank = int((logits > logits[ord("x")]).sum())
    assert rows[0]["rank"] == expected_rank and rows[0]["token"] == "x"
    torch.testing.assert_close(torch.tensor(rows[0]["prob"]), logits.softmax(-1)[ord("x")])
    assert f"Rank: {expected_rank}" in capsys.readouterr().out


def test_no_warning_without_start_layer(model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            model(model.to_tokens("ok"), start_at_layer=0)
