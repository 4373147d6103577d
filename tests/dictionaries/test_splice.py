"""Splicing dictionaries into the forward pass: with the error term the logits are unchanged at every kind of
site; without it the site holds the reconstruction; the cache gets SAELens' names; the KV cache agrees."""

import pytest
import torch
from support.dictionaries import write_circuit_tracer, write_saelens, write_sparsify
from support.models import tiny_model

import llama_lens as ll
from llama_lens.dictionaries.splice import SAE_POINTS

SAE_SITES = [
    ("hook_embed", 64),
    ("blocks.0.hook_resid_pre", 64),
    ("blocks.0.hook_resid_mid", 64),
    ("blocks.1.hook_resid_post", 64),
    ("blocks.0.hook_attn_out", 64),
    ("blocks.1.hook_mlp_out", 64),
    ("blocks.0.ln2.hook_normalized", 64),
    ("blocks.1.attn.hook_z", 64),  # n_heads * d_head = 4 * 16
    ("blocks.0.mlp.hook_post", 128),
]


def _dictionaries(tmp_path, site, width):
    if site == "transcoder":
        return ll.load_dictionary(
            write_saelens(
                tmp_path / "t", "blocks.1.mlp.hook_in", architecture="skip_transcoder", hook_out="blocks.1.hook_mlp_out"
            )
        )
    if site == "sparsify":
        return ll.load_dictionary(write_sparsify(tmp_path / "layers.0.mlp", transcode=True))
    if site == "circuit_tracer":
        return ll.load_dictionary(write_circuit_tracer(tmp_path / "ct"))
    return ll.load_dictionary(write_saelens(tmp_path / "s", site, d_in=width, architecture="topk", k=8))


@pytest.mark.parametrize("site", [s for s, _ in SAE_SITES] + ["transcoder", "sparsify", "circuit_tracer"])
def test_error_term_leaves_logits_unchanged(tmp_path, site):
    model = tiny_model()
    tokens = torch.randint(0, 128, (2, 7))
    dictionaries = _dictionaries(tmp_path, site, dict(SAE_SITES).get(site, 64))
    plain = model(tokens)
    with ll.spliced(model, dictionaries, use_error_term=True):
        spliced = model(tokens)
    assert (spliced - plain).abs().max() <= 1e-5
    with ll.spliced(model, dictionaries):
        without_error = model(tokens)
    assert (without_error - plain).abs().max() > 1e-3  # the reconstruction does replace the activation


def test_cache_holds_saelens_names_and_the_reconstruction(tmp_path):
    model = tiny_model()
    tokens = torch.randint(0, 128, (2, 6))
    sae = _dictionaries(tmp_path, "blocks.1.hook_resid_pre", 64)
    _, plain_cache = model.run_with_cache(tokens, names_filter="blocks.1.hook_resid_pre")
    _, cache = ll.run_with_dictionaries(model, tokens, dictionaries=sae, names_filter="blocks.1.hook_resid_pre")
    site = "blocks.1.hook_resid_pre"
    for point in SAE_POINTS:
        assert cache[f"{site}.{point}"].shape[:2] == (2, 6)
    x = plain_cache[site]
    torch.testing.assert_close(cache[f"{site}.hook_sae_input"], x)
    torch.testing.assert_close(cache[f"{site}.hook_sae_acts_post"], sae.encode(x))
    torch.testing.assert_close(cache[f"{site}.hook_sae_recons"], sae(x))
    torch.testing.assert_close(cache[f"{site}.hook_sae_error"], x - sae(x))
    torch.testing.assert_close(cache[site], sae(x))  # the site itself holds what the model ran on
    assert ((cache[f"{site}.hook_sae_acts_post"] != 0).sum(-1) <= 8).all()


def test_spliced_generation_agrees_with_and_without_kv_cache(tmp_path):
    model = tiny_model()
    dictionaries = _dictionaries(tmp_path, "transcoder", 64)
    tokens = torch.randint(3, 128, (1, 5))
    with ll.spliced(model, dictionaries):
        cached = model.generate(tokens, max_new_tokens=6, temperature=0.0, use_kv_cache=True)
        uncached = model.generate(tokens, max_new_tokens=6, temperature=0.0, use_kv_cache=False)
    assert torch.equal(torch.as_tensor(cached.tokens), torch.as_tensor(uncached.tokens))


def test_error_term_is_exact_and_passes_saelens_gradients(tmp_path):
    # The spliced activation equals the model's own exactly, and gradients reach the decoder as through
    # SAELens' recons + (x - recons).detach().
    model = tiny_model()
    tokens = torch.randint(0, 128, (2, 6))
    site = "blocks.0.hook_resid_post"
    sae = _dictionaries(tmp_path, site, 64)
    W_dec = sae.param("W_dec").requires_grad_(True)  # decode then reads the rows of this tensor
    _, cache = model.run_with_cache(tokens, names_filter=site)
    with ll.spliced(model, sae, use_error_term=True):
        _, spliced = model.run_with_cache(tokens, names_filter=site)
        model(tokens).logsumexp(-1).sum().backward()
    assert torch.equal(spliced[site], cache[site])
    ours, W_dec.grad = W_dec.grad.clone(), None

    def saelens_error_term(x, *, hook):
        recons = sae(x)
        return recons + (x - recons).detach()

    with model.hooks([(site, saelens_error_term)]):
        model(tokens).logsumexp(-1).sum().backward()
    assert ours.abs().max() > 0
    torch.testing.assert_close(ours, W_dec.grad, atol=1e-6, rtol=1e-5)
