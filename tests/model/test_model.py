"""Parity with transformers' LlamaForCausalLM and the behaviour of the forward pass."""

import pytest
import torch
from support.models import tiny_config
from support.reference import reference_pair

from llama_lens.config import RopeScaling
from llama_lens.model.llama import HookedLlama

SHAPES = {
    "gqa": {},
    "mha": dict(n_kv_heads=4),
    "mqa": dict(n_kv_heads=1),
    "tied": dict(tie_embeddings=True),
    "biases": dict(attention_bias=True, mlp_bias=True),
    "d_head_24": dict(d_head=24),
    "rope_linear": dict(rope_scaling=RopeScaling(kind="linear", factor=4.0)),
    # max_position_embeddings below the prompt length so the NTK base really grows.
    "rope_dynamic": dict(
        max_position_embeddings=8,
        rope_scaling=RopeScaling(kind="dynamic", factor=2.0, original_max_position_embeddings=8),
    ),
    # original context 32: wavelengths fall in all three bands (kept, smoothed, slowed) at d_head 16, as
    # test_llama3_rope_covers_its_three_bands checks.
    "rope_llama3": dict(
        rope_scaling=RopeScaling(
            kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32
        )
    ),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_transformers(shape, device):
    cfg = tiny_config(**SHAPES[shape])
    hf, ours = reference_pair(cfg, device=device)
    tokens = torch.randint(0, cfg.d_vocab, (2, 13)).to(device)
    with torch.no_grad():
        ref = hf(tokens, output_hidden_states=True, output_attentions=True)
        logits, cache = ours.run_with_cache(tokens)
        fused = ours(tokens)

    assert (ref.logits - logits).abs().max() <= 1e-4
    assert (ref.logits - fused).abs().max() <= 1e-4
    last = cfg.n_layers - 1
    for i in range(cfg.n_layers):
        # transformers' last hidden_states entry is after the final norm; the others are resid_post.
        ours_hidden = cache[f"blocks.{i}.hook_resid_post"]
        if i == last:
            ours_hidden = ours.ln_final(ours_hidden)
        torch.testing.assert_close(ours_hidden, ref.hidden_states[i + 1], atol=1e-5, rtol=0)
        torch.testing.assert_close(cache[f"blocks.{i}.attn.hook_pattern"], ref.attentions[i], atol=1e-6, rtol=0)
    torch.testing.assert_close(cache["hook_embed"], ref.hidden_states[0])


def test_dynamic_rope_changes_with_length():
    """Guards the dynamic test above: past max_position_embeddings the frequencies must actually move."""
    from llama_lens.model.attention import rope_inv_freq

    cfg = tiny_config(**SHAPES["rope_dynamic"])
    short, long = rope_inv_freq(cfg, 8, device=torch.device("cpu")), rope_inv_freq(cfg, 13, device=torch.device("cpu"))
    assert torch.equal(short, rope_inv_freq(tiny_config(), 8, device=torch.device("cpu")))
    assert not torch.allclose(short[1:], long[1:])
    # Built in Python without the original length, dynamic scaling grows past max_position_embeddings, as
    # transformers does (it was a TypeError comparing with None).
    bare = tiny_config(max_position_embeddings=8, rope_scaling=RopeScaling(kind="dynamic", factor=2.0))
    assert torch.equal(rope_inv_freq(bare, 13, device=torch.device("cpu")), long)


def test_llama3_rope_covers_its_three_bands():
    """Guards the llama3 parity test: some frequencies are kept, some slowed by `factor`, some smoothed."""
    import math

    from llama_lens.model.attention import rope_inv_freq

    cfg = tiny_config(**SHAPES["rope_llama3"])
    plain = rope_inv_freq(tiny_config(), 13, device=torch.device("cpu"))
    scaled = rope_inv_freq(cfg, 13, device=torch.device("cpu"))
    scaling = cfg.rope_scaling
    wavelen = 2 * math.pi / plain
    kept = wavelen < scaling.original_max_position_embeddings / scaling.high_freq_factor
    slowed = wavelen > scaling.original_max_position_embeddings / scaling.low_freq_factor
    smoothed = ~kept & ~slowed
    assert kept.any() and slowed.any() and smoothed.any()
    assert torch.equal(scaled[kept], plain[kept])
    torch.testing.assert_close(scaled[slowed], plain[slowed] / scaling.factor)
    assert ((scaled[smoothed] < plain[smoothed]) & (scaled[smoothed] > plain[smoothed] / scaling.factor)).all()


def test_fused_and_written_out_attention_agree(tiny_cfg, device):
    _, model = reference_pair(tiny_cfg, device=device)
    tokens = torch.randint(0, tiny_cfg.d_vocab, (3, 17))
    with torch.no_grad():
        fused = model(tokens)
        pattern_hooks = [(lambda n: n.endswith("hook_pattern"), lambda t, hook: None)]
        written_out = model.run_with_hooks(tokens, fwd_hooks=pattern_hooks)
    torch.testing.assert_close(fused, written_out, atol=1e-5, rtol=0)


def test_scores_are_masked_and_pattern_sums_to_one(tiny_cfg, device):
    _, model = reference_pair(tiny_cfg, device=device)
    _, cache = model.run_with_cache(torch.randint(0, 128, (2, 9)))
    scores, pattern = cache["blocks.1.attn.hook_attn_scores"], cache["blocks.1.attn.hook_pattern"]
    assert scores.shape == pattern.shape == (2, tiny_cfg.n_heads, 9, 9)
    future = torch.ones(9, 9, dtype=torch.bool, device=device).triu(1)
    assert torch.isneginf(scores[..., future]).all() and torch.isfinite(scores[..., ~future]).all()
    torch.testing.assert_close(pattern.sum(-1), torch.ones(2, tiny_cfg.n_heads, 9, device=device))


def test_left_padded_prompts_match_prompts_run_alone(tiny_cfg, device):
    _, model = reference_pair(tiny_cfg, device=device)
    short, long = torch.randint(3, 128, (1, 5)), torch.randint(3, 128, (1, 11))
    tokens = torch.zeros(2, 11, dtype=torch.long)
    tokens[0, 6:], tokens[1] = short[0], long[0]
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[0, :6] = 0
    with torch.no_grad():
        batched = model(tokens, attention_mask=mask)
        for written_out in (False, True):
            hooks = [(lambda n: n.endswith("hook_pattern"), lambda t, hook: None)] if written_out else []
            batched = model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=hooks)
            torch.testing.assert_close(batched[0, 6:], model(short)[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(batched[1], model(long)[0], atol=1e-5, rtol=0)
    assert torch.isfinite(batched).all()


def test_padding_is_inferred_from_leading_pad_tokens(tiny_cfg):
    _, model = reference_pair(tiny_cfg)

    class PadOnly:
        pad_id, bos_id = 0, 1

    model.tokenizer = PadOnly()
    tokens = torch.tensor([[0, 0, 1, 7, 9], [1, 5, 6, 7, 9]])
    assert model.infer_attention_mask(tokens).tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    with torch.no_grad():
        torch.testing.assert_close(model(tokens)[0, 2:], model(tokens[:1, 2:])[0], atol=1e-5, rtol=0)
    PadOnly.pad_id = 1  # pad doubles as BOS: the last leading one is real
    assert model.infer_attention_mask(torch.tensor([[1, 1, 1, 7], [1, 5, 6, 7]])).tolist() == [[0, 0, 1, 1], [1] * 4]


def test_resume_from_cached_residual(tiny_cfg, device):
    _, model = reference_pair(tiny_cfg, device=device)
    tokens = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
        resumed = model(tokens, resid=cache["blocks.1.hook_resid_pre"], start_at_layer=1)
        stopped = model(tokens, stop_at_layer=1)
    torch.testing.assert_close(resumed, logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(stopped, cache["blocks.1.hook_resid_pre"])


def test_partial_model_reads_out_its_last_layer():
    cfg = tiny_config(n_layers=3)
    _, full = reference_pair(cfg)
    partial = HookedLlama(cfg, layers=range(0, 2))
    partial.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith("blocks.2.")})
    tokens = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        _, cache = full.run_with_cache(tokens)
        expected = full.unembed(full.ln_final(cache["blocks.1.hook_resid_post"]))
        torch.testing.assert_close(partial(tokens), expected)
    assert [n for n in partial.hook_names if n.startswith("blocks.2")] == []

    upper = HookedLlama(cfg, layers=[2])
    upper.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith(("blocks.0.", "blocks.1."))})
    with pytest.raises(ValueError, match="resid="):
        upper(tokens)
    with torch.no_grad():
        torch.testing.assert_close(upper(resid=cache["blocks.2.hook_resid_pre"]), full(tokens), atol=1e-5, rtol=0)


def test_gradients_flow(tiny_cfg, device):
    _, model = reference_pair(tiny_cfg, device=device)
    tokens = torch.randint(0, 128, (1, 6))
    logits, cache = model.run_with_cache(tokens, names_filter="blocks.0.hook_resid_post", detach=False)
    logits[0, -1, 5].backward()
    assert model.embed.weight.grad is not None and model.embed.weight.grad.abs().sum() > 0
    assert cache["blocks.0.hook_resid_post"].requires_grad


def test_greedy_generation_with_and_without_kv_cache_matches_transformers(device):
    cfg = tiny_config(eos_token_ids=())
    hf, model = reference_pair(cfg, device=device)
    prompt = torch.randint(3, 128, (1, 6)).to(device)
    cached = model.generate(prompt, max_new_tokens=10, temperature=0)
    uncached = model.generate(prompt, max_new_tokens=10, temperature=0, use_kv_cache=False)
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert cached.tokens == uncached.tokens == [ref[0, 6:].tolist()]
    assert len(cached.tokens[0]) == 10


def test_batched_generation_equals_one_prompt_at_a_time(device):
    cfg = tiny_config(eos_token_ids=())
    _, model = reference_pair(cfg, device=device)
    short, long = torch.randint(3, 128, (1, 4)), torch.randint(3, 128, (1, 9))

    class PadOnly:
        pad_id, bos_id, eos_ids = 0, 1, frozenset()

        def decode(self, ids):
            return " ".join(map(str, ids))

    model.tokenizer = PadOnly()
    batch = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1), long])
    together = model.generate(batch, max_new_tokens=6, temperature=0)
    model.tokenizer = None
    alone = [model.generate(p, max_new_tokens=6, temperature=0).tokens[0] for p in (short, long)]
    assert together.tokens == alone


def test_generation_stops_at_eos_and_hooks_fire(device):
    cfg = tiny_config(eos_token_ids=())
    _, model = reference_pair(cfg, device=device)
    prompt = torch.randint(3, 128, (1, 5))
    free = model.generate(prompt, max_new_tokens=8, temperature=0).tokens[0]
    # The first step that brings a token not seen before becomes the end of sequence.
    stop = next(j for j in range(1, 8) if free[j] not in free[:j])
    model.cfg = tiny_config(eos_token_ids=(free[stop],))
    calls = []
    with model.hooks([("blocks.0.hook_resid_post", lambda t, hook: calls.append(t.shape[1]))]):
        stopped = model.generate(prompt, max_new_tokens=8, temperature=0).tokens[0]
    assert stopped == free[:stop]
    assert calls[0] == 5 and set(calls[1:]) == {1}  # the prompt, then one new position per step


def test_sampling_is_seeded_and_top_p_restricts(tiny_cfg, device):
    from llama_lens.model.generate import sample_top_p

    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    draws = {sample_top_p(probs.clone(), 0.7, generator=torch.Generator().manual_seed(s)).item() for s in range(200)}
    assert draws == {0, 1}
    _, model = reference_pair(tiny_cfg, device=device)
    prompt = torch.randint(3, 128, (1, 4))
    first = model.generate(prompt, max_new_tokens=5, temperature=1.0, top_p=0.95, seed=3, stop_at_eos=False)
    again = model.generate(prompt, max_new_tokens=5, temperature=1.0, top_p=0.95, seed=3, stop_at_eos=False)
    assert first.tokens == again.tokens


def test_generation_runs_one_forward_per_new_token(tiny_cfg):
    _, model = reference_pair(tiny_config(eos_token_ids=()))
    calls = []
    with model.hooks([("hook_embed", lambda t, hook: calls.append(t.shape[1]))]):
        out = model.generate(torch.randint(3, 128, (1, 5)), max_new_tokens=4, temperature=0)
    assert len(out.tokens[0]) == 4
    assert calls == [5, 1, 1, 1]  # the prompt, then one position per step; none after the last token


@pytest.mark.parametrize(("temperature", "top_p"), [(-1.0, 0.9), (float("nan"), 0.9), (1.0, 0.0), (1.0, float("nan"))])
def test_generation_refuses_bad_sampling_settings(tiny_cfg, temperature, top_p):
    _, model = reference_pair(tiny_cfg)
    with pytest.raises(ValueError, match="need temperature >= 0 and 0 < top_p <= 1"):
        model.generate(torch.randint(3, 128, (1, 5)), max_new_tokens=2, temperature=temperature, top_p=top_p)


def test_forward_takes_ids_as_lists_and_rejects_a_mismatched_resid(tiny_cfg):
    _, model = reference_pair(tiny_cfg)
    ids = [5, 9, 17, 3]
    with torch.no_grad():
        expected = model(torch.tensor([ids]))
        assert torch.equal(model(ids), expected)
        assert torch.equal(model([ids]), expected)
        expected = r"resid must be \[batch, pos, d_model=64\] float32 .* got \(1, 4, 64\) bfloat16"
        with pytest.raises(ValueError, match=expected):
            model(resid=torch.zeros(1, 4, 64, dtype=torch.bfloat16), start_at_layer=0)
    with pytest.raises(ValueError, match=r"token ids must be integers \[pos\] or \[batch, pos\]"):
        model(torch.rand(1, 4))


# ------------------------------------------------------------------------------------- the real SmolLM2
@pytest.fixture(scope="module")
def smollm2_pair(demo_path):
    from transformers import LlamaForCausalLM

    import llama_lens as ll

    hf = LlamaForCausalLM.from_pretrained(demo_path, dtype=torch.float32).eval()
    return hf, ll.load(demo_path, dtype=torch.float32, progress=False)


def test_smollm2_logits_match_transformers(smollm2_pair):
    hf, ours = smollm2_pair
    prompts = ["The capital of France is", "Attention heads in layer 3 of a small language model often"]
    tokens, mask = ours.tokenizer.batch_encode(prompts, bos=True)  # left-padded
    with torch.no_grad():
        expected = hf(tokens, attention_mask=mask).logits
        logits = ours(tokens, attention_mask=mask)
    real = mask.bool()
    assert (logits[real] - expected[real]).abs().max().item() <= 1e-4


def test_smollm2_greedy_continuation_says_paris(smollm2_pair):
    _, ours = smollm2_pair
    out = ours.generate("The capital of France is", max_new_tokens=6, temperature=0)
    assert out.text.startswith(" Paris")


def test_bad_token_ids_and_masks_are_named_before_the_embedding(tiny_cfg):
    _, model = reference_pair(tiny_cfg)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, d_vocab=128\), got 3\.\.128"):
        model(torch.tensor([[3, 128]]))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, d_vocab=128\)"):
        model.generate([5, -1], max_new_tokens=2, temperature=0)
    with pytest.raises(ValueError, match="pos >= 1"):
        model(torch.zeros(1, 0, dtype=torch.long))
    expected = r"attention_mask must be \[batch, pos\] = \(2, 4\) like the tokens, got \(2, 3\)"
    with pytest.raises(ValueError, match=expected):
        model(torch.ones(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 3, dtype=torch.long))


def test_every_entry_point_takes_the_same_prompt_forms(tiny_cfg):
    from llama_lens.lens.logit import logit_lens

    _, model = reference_pair(tiny_config(eos_token_ids=()))
    ids = [5, 9, 17, 3]
    as_list = model.generate(ids, max_new_tokens=3, temperature=0).tokens
    as_tensor = model.generate(torch.tensor([ids]), max_new_tokens=3, temperature=0).tokens
    as_1d = model.generate(torch.tensor(ids), max_new_tokens=3, temperature=0).tokens
    assert as_list == as_tensor == as_1d and len(as_list) == 1
    lens = logit_lens(model, ids)
    assert lens.tokens.tolist() == [ids]
