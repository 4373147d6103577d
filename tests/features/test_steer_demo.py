"""Steering the embedded model (SmolLM2-135M-Instruct): greedy chat generations agree with and without the KV
cache for 20 prompts x 32 tokens, and a vector toward a token's unembedding raises that token's logit."""

import pytest
import torch

import llama_lens as ll

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

QUESTIONS = [
    "Name a fruit.", "What is rain?", "Say hello.", "Pick a colour.", "Describe a cat.", "What is 2 + 2?",
    "Name a city.", "What do bees make?", "Tell me a joke.", "What is the sun?", "Name a tree.", "Why sleep?",
    "What is tea?", "Name a river.", "Count to three.", "What is ice?", "Name a bird.", "What is a map?",
    "Name a sport.", "What is bread?",
]  # fmt: skip


@pytest.fixture(scope="module")
def model(demo_path):
    return ll.load(demo_path, dtype=torch.float32, progress=False)


def _chat(model, question: str) -> str:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}]
    return model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_steered_chat_generations_agree_with_and_without_kv_cache(model):
    prompts = [_chat(model, q) for q in QUESTIONS]
    vector = ll.steering_vector(
        model,
        [_chat(model, "Talk about weddings."), _chat(model, "Describe a wedding.")],
        [_chat(model, "Talk about the weather."), _chat(model, "Describe a road.")],
        layer=12,
    )
    plain = model.generate(prompts, max_new_tokens=32, temperature=0, stop_at_eos=False)
    with ll.steer(model, vector, scale=4.0, positions="generated"):
        cached = model.generate(prompts, max_new_tokens=32, temperature=0, stop_at_eos=False)
        uncached = model.generate(prompts, max_new_tokens=32, temperature=0, stop_at_eos=False, use_kv_cache=False)
    assert len(prompts) == 20 and all(len(row) == 32 for row in cached.tokens)
    assert cached.tokens == uncached.tokens
    assert sum(a != b for a, b in zip(cached.tokens, plain.tokens)) >= 10  # the vector steers most answers


def test_a_vector_toward_a_tokens_unembedding_raises_its_logit(model):
    token = model.to_single_token(" Paris")
    prompt = _chat(model, "Where should I travel this summer?")
    direction = model.unembed.weight[token].detach()
    direction = direction / direction.norm()
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    with torch.no_grad():
        plain, cache = model.run_with_cache(prompt, names_filter=last)
        scale = 0.25 * float(cache[last][0, -1].norm())  # a quarter of the residual stream's own size
        with ll.steer(model, direction, hooks=last, scale=scale):
            steered = model(prompt)[0, -1]
    plain = plain[0, -1]
    # The top token becomes a Paris ("Paris" and " Paris" have near-equal unembeddings); " Paris" joins the top 10.
    assert token not in plain.topk(10).indices and token in steered.topk(10).indices
    assert steered.softmax(-1)[token] > 100 * plain.softmax(-1)[token]
    assert (steered - plain)[token] > (steered - plain).mean()
