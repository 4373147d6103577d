"""Steering the embedded model (SmolLM2-135M-Instruct): greedy chat generations agree with and without the KV
cache for 20 prompts x 32 tokens, and a vector toward a token's unembedding raises that token's logit."""

import pytest
import torch

import llama_lens as ll
from llama_lens.model.generate import _at_step

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


@pytest.fixture(scope="module")
def wedding_vector(model):
    return ll.steering_vector(
        model,
        [_chat(model, "Talk about weddings."), _chat(model, "Describe a wedding.")],
        [_chat(model, "Talk about the weather."), _chat(model, "Describe a road.")],
        layer=12,
    )


def test_steered_chat_generations_agree_with_and_without_kv_cache(model, wedding_vector):
    """20 prompts x 32 tokens. An uncached greedy step is one pass over the prompt and the tokens so far, whose
    last logits pick the next token; by causality those are the logits at that column of one pass over the
    whole generated sequence. So one pass checks every uncached step of all 20 generations, and a short real
    uncached `generate` (3 prompts x 16 tokens) checks that path itself."""
    prompts = [_chat(model, q) for q in QUESTIONS]
    plain = model.generate(prompts, max_new_tokens=32, temperature=0, stop_at_eos=False)
    with ll.steer(model, wedding_vector, scale=4.0, positions="generated"):
        cached = model.generate(prompts, max_new_tokens=32, temperature=0, stop_at_eos=False)
        uncached = model.generate(prompts[:3], max_new_tokens=16, temperature=0, stop_at_eos=False, use_kv_cache=False)
        tokens, mask = model.prepare_tokens(prompts)
        generated = torch.tensor(cached.tokens)
        with torch.no_grad(), _at_step(tokens.shape[1], 0):  # what the uncached generate runs at its last step
            logits = model(
                torch.cat([tokens, generated[:, :-1]], 1),
                attention_mask=torch.cat([mask, torch.ones_like(generated[:, :-1])], 1),
            )[:, tokens.shape[1] - 1 :]
    assert len(prompts) == 20 and generated.shape == (20, 32)
    assert [row[:16] for row in cached.tokens[:3]] == uncached.tokens
    # Each cached token is the uncached pass's greedy choice: its logit is the row's largest, to rounding.
    chosen = logits.gather(-1, generated[..., None])[..., 0]
    assert (chosen >= logits.max(-1).values - 1e-4).all()
    assert (logits.argmax(-1) == generated).float().mean() >= 0.99  # ties within rounding are all it allows
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
