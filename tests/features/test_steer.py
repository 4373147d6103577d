"""Steering: vectors and feature directions added at hook points during forward passes and `generate`; greedy
generations agree with and without the KV cache; the hooks come off after the block; contrastive vectors are
the mean differences they claim; bad input is refused by name."""

import pytest
import torch
from support.dictionaries import write_saelens
from support.models import char_model, tiny_config, tiny_model

import llama_lens as ll
from llama_lens.model.generate import decoding_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = [f"{word} {i}" for i, word in enumerate(["cat", "a dog", "the sea is", "x", "hello there, friend"] * 4)]


def _unembed_direction(model, token: int) -> torch.Tensor:
    row = model.unembed.weight[token].detach()
    return row / row.norm()


def _no_hooks_left(model) -> bool:
    return not any(point.has_hooks for point in model.hook_dict.values())


def test_a_vector_toward_a_tokens_unembedding_raises_its_logit():
    model = tiny_model()
    tokens = torch.randint(3, 128, (2, 6))
    token = 77
    plain = model(tokens)
    direction = _unembed_direction(model, token)
    with torch.no_grad():
        small = ll.steer(model, direction, layers=[1], scale=0.5)
        with small:
            nudged = model(tokens)
        with ll.steer(model, direction, layers=[1], scale=200.0):
            pushed = model(tokens)
    gain = (nudged - plain)[..., token] - (nudged - plain).mean(-1)
    assert (gain > 0).all()  # every position moves toward the token, more than the average logit
    assert (pushed.argmax(-1) == token).all()
    assert _no_hooks_left(model)
    torch.testing.assert_close(model(tokens), plain, rtol=0, atol=0)


def test_hooks_come_off_after_the_block_even_when_it_raises():
    model = tiny_model()
    with pytest.raises(KeyError), ll.steer(model, torch.ones(64), layers=[0]):
        assert not _no_hooks_left(model)
        raise KeyError("inside")
    assert _no_hooks_left(model)


def test_steering_adds_scale_times_vector_at_the_hook():
    model = tiny_model()
    tokens = torch.randint(3, 128, (1, 5))
    vector = torch.randn(64)
    name = "blocks.0.hook_attn_out"
    _, plain = model.run_with_cache(tokens, names_filter=name)
    with ll.steer(model, [vector, vector], hooks=name, scale=1.5):  # two vectors at one hook add up
        _, steered = model.run_with_cache(tokens, names_filter=name)
    torch.testing.assert_close(steered[name] - plain[name], (3.0 * vector).expand(1, 5, 64), atol=1e-5, rtol=0)


def test_a_features_decoder_direction_at_its_site(tmp_path):
    model = tiny_model()
    sae = ll.load_dictionary(write_saelens(tmp_path / "sae", "blocks.0.hook_resid_post", d_sae=16))
    tokens = torch.randint(3, 128, (1, 5))
    name = "blocks.0.hook_resid_post"
    _, plain = model.run_with_cache(tokens, names_filter=name)
    with ll.steer(model, (sae, 3), scale=2.0):
        _, steered = model.run_with_cache(tokens, names_filter=name)
    expected = (2.0 * sae.W_dec[3]).expand(1, 5, 64)
    torch.testing.assert_close(steered[name] - plain[name], expected, atol=1e-5, rtol=0)
    vector = ll.SteeringVector.from_feature(sae, 3, scale=2.0)
    assert vector.hook == name and vector.scale == 2.0


def test_steering_at_hook_z_takes_a_flattened_vector():
    model = tiny_model()
    tokens = torch.randint(3, 128, (1, 4))
    name = "blocks.1.attn.hook_z"
    vector = torch.randn(4 * 16)
    _, plain = model.run_with_cache(tokens, names_filter=name)
    with ll.steer(model, vector, hooks=[name]):
        _, steered = model.run_with_cache(tokens, names_filter=name)
    torch.testing.assert_close(steered[name] - plain[name], vector.view(4, 16).expand(1, 4, 4, 16), atol=1e-5, rtol=0)


@pytest.mark.parametrize("positions", ["all", "generated", [0, 3, 9]])
def test_steered_greedy_generation_agrees_with_and_without_the_kv_cache(positions):
    model = char_model(seed=1, scale=1.0, eos_token_ids=()).double()
    vector = torch.randn(64, dtype=torch.float64) * 2.0
    with ll.steer(model, vector, layers=[0, 1], positions=positions):
        cached = model.generate(PROMPTS, max_new_tokens=32, temperature=0)
        uncached = model.generate(PROMPTS, max_new_tokens=32, temperature=0, use_kv_cache=False)
    plain = model.generate(PROMPTS, max_new_tokens=32, temperature=0)
    assert len(PROMPTS) == 20 and all(len(row) == 32 for row in cached.tokens)
    assert cached.tokens == uncached.tokens
    assert cached.tokens != plain.tokens  # the vector does steer


def test_generated_positions_are_the_prompts_last_and_the_new_tokens():
    model = char_model(seed=1, scale=1.0, eos_token_ids=())
    name = "blocks.1.hook_resid_post"
    prompts = ["hi", "a longer one"]  # left-padded to 13 columns (BOS included)
    seen = {"plain": [], "steered": []}

    def recorder(key):
        def record(act, *, hook):
            step = decoding_step()
            seen[key].append((step.start, act.detach().clone()))

        return record

    for key in seen:
        scale = 0.0 if key == "plain" else 1.0
        steering = ll.steer(model, torch.ones(64), layers=[1], positions="generated", scale=scale)
        with steering, model.hooks([(name, recorder(key))]):
            model.generate(prompts, max_new_tokens=4, temperature=0, use_kv_cache=False)
    prompt_pos = seen["plain"][0][1].shape[1]
    for (start, plain), (_, steered) in zip(seen["plain"], seen["steered"]):
        assert start == 0
        changed = (steered - plain).abs().amax(dim=(0, 2)) > 0  # [pos]
        assert changed.tolist() == [c >= prompt_pos - 1 for c in range(plain.shape[1])]
    # Outside generate: the last position of the pass only.
    tokens = torch.randint(3, 128, (1, 6))
    _, plain = model.run_with_cache(tokens, names_filter=name)
    with ll.steer(model, torch.ones(64), layers=[1], positions="generated"):
        _, steered = model.run_with_cache(tokens, names_filter=name)
    assert ((steered[name] - plain[name]).abs().amax(dim=(0, 2)) > 0).tolist() == [False] * 5 + [True]


def test_a_steering_hook_set_works_through_fwd_hooks():
    model = char_model(seed=2, scale=1.0, eos_token_ids=())
    steering = ll.steer(model, torch.randn(64) * 3, layers=[0])
    with steering:
        inside = model.generate("abc", max_new_tokens=8, temperature=0)
    through = model.generate("abc", max_new_tokens=8, temperature=0, fwd_hooks=steering.hooks)
    assert inside.tokens == through.tokens
    assert _no_hooks_left(model)


@pytest.mark.parametrize("reduce", ["last", "mean"])
def test_contrastive_vector_is_the_mean_difference(reduce):
    model = char_model(seed=3, scale=1.0)
    positive, negative = ["good day", "nice", "great fun"], ["bad day", "awful"]
    vector = ll.steering_vector(model, positive, negative, layer=-1, reduce=reduce, batch_size=2)
    name = "blocks.1.hook_resid_post"
    assert vector.hook == name and vector.scale == 1.0

    def mean_of(prompts):  # one prompt at a time, no padding: an independent reading of the definition
        rows = []
        for text in prompts:
            _, cache = model.run_with_cache(text, names_filter=name)
            act = cache[name][0]  # [pos, d_model], BOS first
            rows.append(act[-1] if reduce == "last" else act[1:].mean(0))
        return torch.stack(rows).mean(0)

    torch.testing.assert_close(vector.vector, mean_of(positive) - mean_of(negative), atol=1e-5, rtol=1e-5)


def test_contrastive_vector_from_token_ids_equals_from_texts():
    model = char_model(seed=3, scale=1.0)
    ids = [model.prepare_tokens(t)[0][0].tolist() for t in ("yes", "ok")]
    from_ids = ll.steering_vector(model, [ids[0]], [ids[1]], layer=0)
    from_texts = ll.steering_vector(model, ["yes"], ["ok"], layer=0)
    torch.testing.assert_close(from_ids.vector, from_texts.vector)


def test_bad_input_is_refused_by_name():
    model = tiny_model()
    with pytest.raises(ll.UnknownNameError, match="hook_resid_post"):
        ll.steer(model, torch.ones(64), hooks="blocks.0.hook_resid_pots")
    with pytest.raises(ll.ArgumentError, match="cannot steer at 'blocks.0.attn.hook_pattern'"):
        ll.steer(model, torch.ones(64), hooks="blocks.0.attn.hook_pattern")
    with pytest.raises(ll.ArgumentError, match="width 32; that hook holds 64"):
        ll.steer(model, torch.ones(32), layers=[0])
    with pytest.raises(ll.ArgumentError, match="width 64; that hook holds 128"):
        ll.steer(model, torch.ones(64), hooks="blocks.0.mlp.hook_post")
    with pytest.raises(ll.ArgumentError, match="needs a place"):
        ll.steer(model, torch.ones(64))
    with pytest.raises(ll.ArgumentError, match="not both"):
        ll.steer(model, torch.ones(64), layers=[0], hooks="blocks.0.hook_resid_pre")
    with pytest.raises(ll.ArgumentError, match="out of range"):
        ll.steer(model, torch.ones(64), layers=[2])
    with pytest.raises(ll.ArgumentError, match="positions="):
        ll.steer(model, torch.ones(64), layers=[0], positions="new")
    with pytest.raises(ll.ArgumentError, match="positions="):
        ll.steer(model, torch.ones(64), layers=[0], positions=[-1])
    with pytest.raises(ll.ArgumentError, match="scale"):
        ll.steer(model, torch.ones(64), layers=[0], scale=float("nan"))
    with pytest.raises(ll.ArgumentError, match="float tensor"):
        ll.steer(model, torch.ones(2, 64), layers=[0])
    with pytest.raises(ll.ArgumentTypeError, match="vectors must be"):
        ll.steer(model, "up", layers=[0])
    with pytest.raises(ll.ArgumentError, match="negative_prompts must be a non-empty list"):
        ll.steering_vector(model, [[5, 6]], [], layer=0)
    with pytest.raises(ll.ArgumentError, match="layer=5 is out of range"):
        ll.steering_vector(model, [[5, 6]], [[7]], layer=5)
    with pytest.raises(ll.ArgumentError, match="reduce"):
        ll.steering_vector(model, [[5, 6]], [[7]], layer=0, reduce="max")
    assert _no_hooks_left(model)


def test_feature_ids_are_checked(tmp_path):
    model = tiny_model(tiny_config())
    sae = ll.load_dictionary(write_saelens(tmp_path / "sae", "blocks.0.hook_resid_post", d_sae=16))
    with pytest.raises(ll.ArgumentError, match="feature=16 is out of range"):
        ll.steer(model, (sae, 16))
