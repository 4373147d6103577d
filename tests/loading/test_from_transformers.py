"""`ll.from_transformers`: a hooked model over a loaded transformers model's own weights."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from support.models import CharTokenizer, tiny_transformers_model

import llama_lens as ll
from llama_lens.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CASES = {
    "llama": ("llama", {"tie_word_embeddings": True}),
    "llama-bias": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "mistral": ("mistral", {"sliding_window": 4}),
    "qwen2": ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
    "qwen3": ("qwen3", {"head_dim": 24, "tie_word_embeddings": True}),
}


def _tokens() -> torch.Tensor:
    return torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("case", CASES)
def test_logits_equal_and_weights_shared(case):
    hf_model = tiny_transformers_model(CASES[case][0], **CASES[case][1])
    model = ll.from_transformers(hf_model)
    assert model.cfg.architecture == type(hf_model).__name__
    tokens = _tokens()
    with torch.no_grad():
        assert (model(tokens) - hf_model(tokens).logits).abs().max().item() <= 1e-4

    # Every one of their parameters is one of ours: the same storage, nothing copied.
    theirs = {param.data_ptr() for param in hf_model.parameters()}
    ours = {param.data_ptr() for param in model.parameters()}
    assert ours == theirs
    assert model.blocks[1].attn.q_proj.weight is hf_model.model.layers[1].self_attn.q_proj.weight
    assert model.unembed.weight.data_ptr() == hf_model.lm_head.weight.data_ptr()
    assert (model.unembed.weight is model.embed.weight) == model.cfg.tie_embeddings


def test_a_head_untied_after_loading_is_the_one_used():
    # The config still says tie_word_embeddings, but transformers' forward uses the head's own weight now.
    hf_model = tiny_transformers_model("llama", tie_word_embeddings=True)
    hf_model.lm_head.weight = torch.nn.Parameter(hf_model.lm_head.weight.detach() * 2.0)
    model = ll.from_transformers(hf_model)
    assert not model.cfg.tie_embeddings
    assert model.unembed.weight is hf_model.lm_head.weight
    tokens = _tokens()
    with torch.no_grad():
        assert (model(tokens) - hf_model(tokens).logits).abs().max().item() <= 1e-4


def test_an_edit_to_their_weights_is_visible_in_ours():
    hf_model = tiny_transformers_model("qwen2")
    model = ll.from_transformers(hf_model)
    tokens = _tokens()
    with torch.no_grad():
        before = model(tokens)
        hf_model.model.layers[0].mlp.down_proj.weight.mul_(3.0)
        hf_model.model.layers[1].self_attn.k_proj.bias.add_(0.5)
        after, expected = model(tokens), hf_model(tokens).logits
    assert (after - before).abs().max().item() > 1e-2
    assert (after - expected).abs().max().item() <= 1e-4


def test_hooks_work_on_the_shared_model():
    hf_model = tiny_transformers_model("mistral", sliding_window=4)
    model = ll.from_transformers(hf_model, tokenizer=CharTokenizer())
    tokens = _tokens()
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
        # transformers' hidden_states[1] is layer 0's output: our resid_post of block 0.
        hidden = hf_model(tokens, output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(cache["blocks.0.hook_resid_post"], hidden, atol=1e-5, rtol=0)
    # Zeroing layer 1's MLP output gives what transformers gives with that MLP's down projection zeroed.
    with torch.no_grad():
        patched = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_mlp_out", lambda x, hook: x * 0)])
        saved = hf_model.model.layers[1].mlp.down_proj.weight.clone()
        hf_model.model.layers[1].mlp.down_proj.weight.zero_()
        expected = hf_model(tokens).logits
        hf_model.model.layers[1].mlp.down_proj.weight.copy_(saved)
    assert (patched - expected).abs().max().item() <= 1e-4
    assert (patched - logits).abs().max().item() > 1e-3
    assert model.to_str_tokens("ab") == ["<s>", "a", "b"]  # the tokenizer given


def test_requires_grad_is_left_as_it_was():
    hf_model = tiny_transformers_model("llama")
    hf_model.requires_grad_(False)
    hf_model.lm_head.weight.requires_grad_(True)
    model = ll.from_transformers(hf_model)
    assert [p.requires_grad for p in hf_model.parameters()] == [
        name == "lm_head.weight" for name, _ in hf_model.named_parameters()
    ]
    assert model.unembed.weight.requires_grad and not model.embed.weight.requires_grad


def test_a_transformers_tokenizer_is_wrapped(demo_path):
    from transformers import AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(demo_path)
    hf_model = tiny_transformers_model("llama", vocab_size=len(hf_tokenizer))
    model = ll.from_transformers(hf_model, tokenizer=hf_tokenizer)
    text = "The capital of France is"
    assert model.to_tokens(text, prepend_bos=False)[0].tolist() == hf_tokenizer(text)["input_ids"]


def test_other_models_are_refused_by_name():
    import transformers

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="got a GPT2LMHeadModel"):
        ll.from_transformers(gpt2)
    base = tiny_transformers_model("llama").model  # a LlamaModel: no head
    with pytest.raises(ValueError, match="got a LlamaModel.*ForCausalLM"):
        ll.from_transformers(base)


def test_unsupported_config_and_mixed_dtypes_are_refused():
    hf_model = tiny_transformers_model("llama")
    hf_model.config.rope_parameters = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    with pytest.raises(ConfigError, match="LlamaForCausalLM.config.*'yarn'"):
        ll.from_transformers(hf_model)

    hf_model = tiny_transformers_model("qwen2")
    hf_model.model.norm.to(torch.float64)
    with pytest.raises(ValueError, match="one device and one dtype"):
        ll.from_transformers(hf_model)


def test_importing_does_not_import_transformers():
    code = (
        "import sys, llama_lens as ll; from llama_lens import from_transformers; "
        "assert 'transformers' not in sys.modules, 'transformers was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_the_embedded_smollm2_loaded_by_transformers(demo_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(demo_path, dtype=torch.float32).eval()
    model = ll.from_transformers(hf_model, tokenizer=AutoTokenizer.from_pretrained(demo_path))
    assert {p.data_ptr() for p in model.parameters()} == {p.data_ptr() for p in hf_model.parameters()}
    tokens = model.to_tokens("The capital of France is")
    with torch.no_grad():
        assert (model(tokens) - hf_model(tokens).logits).abs().max().item() <= 1e-4
    assert model.generate("The capital of France is", max_new_tokens=2, temperature=0).text == " Paris."
