"""Splicing on a streamed model (layers read from disk per pass) and with the KV cache: the spliced streamed
model computes what the spliced loaded model computes, holds no layer afterwards, and greedy generation with a
spliced dictionary equals a loop of full forward passes (no KV cache) step by step."""

import pytest
import torch
from support.dictionaries import write_clt, write_saelens, write_sparsify
from support.models import tiny_config, tiny_model

import llama_lens as ll
from llama_lens.loading.stream import StreamedLlama
from llama_lens.testing import random_state_dict, write_hf_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SITES = {
    "sae at the residual stream": ("saelens", "blocks.1.hook_resid_post"),
    "sae at hook_z": ("saelens", "blocks.2.attn.hook_z"),
    "skip transcoder": ("transcoder", "blocks.1.mlp.hook_in"),
    "sparsify transcoder": ("sparsify", "layers.0.mlp"),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = tiny_config(n_layers=3)
    return write_hf_checkpoint(tmp_path_factory.mktemp("ckpt") / "hf", cfg, random_state_dict(cfg, seed=3), shards=2)


@pytest.fixture(scope="module")
def models(checkpoint):
    loaded = ll.load(checkpoint, index_cache=False, progress=False)
    streamed = ll.load(checkpoint, stream=True, index_cache=False, progress=False)
    assert isinstance(streamed, StreamedLlama)
    return loaded, streamed


def dictionary(tmp_path, kind):
    source, site = SITES[kind]
    if source == "sparsify":
        return ll.load_dictionary(write_sparsify(tmp_path / site, transcode=True))
    if source == "transcoder":
        return ll.load_dictionary(
            write_saelens(tmp_path / "t", site, architecture="skip_transcoder", hook_out="blocks.1.hook_mlp_out")
        )
    return ll.load_dictionary(write_saelens(tmp_path / "s", site, architecture="topk", k=6))


@pytest.mark.parametrize("kind", list(SITES))
def test_streamed_model_splices_as_the_loaded_one(models, tmp_path, kind):
    loaded, streamed = models
    sae = dictionary(tmp_path, kind)
    tokens = torch.randint(3, 128, (2, 9))
    with ll.spliced(loaded, sae):
        expected = loaded(tokens)
    with ll.spliced(streamed, sae):
        got = streamed(tokens)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (got - streamed(tokens)).abs().max() > 1e-3  # the dictionary did replace the activation
    with ll.spliced(streamed, sae, use_error_term=True):
        torch.testing.assert_close(streamed(tokens), loaded(tokens), atol=1e-5, rtol=0)
    _, cache = ll.run_with_dictionaries(streamed, tokens, dictionaries=sae, names_filter=sae.hook_out)
    _, expected_cache = ll.run_with_dictionaries(loaded, tokens, dictionaries=sae, names_filter=sae.hook_out)
    for name in (f"{sae.hook_out}.hook_sae_acts_post", f"{sae.hook_out}.hook_sae_recons", sae.hook_out):
        torch.testing.assert_close(cache[name], expected_cache[name], atol=1e-5, rtol=0)
    assert all(p.is_meta for n, p in streamed.named_parameters() if n.startswith("blocks."))


def greedy_by_full_forwards(model, tokens, steps):
    """The reference for generation: the whole sequence through the model at every step, no KV cache."""
    for _ in range(steps):
        tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens


@pytest.mark.parametrize("which", ["loaded", "streamed"])
@pytest.mark.parametrize("kind", ["sae at the residual stream", "skip transcoder"])
def test_generation_with_a_spliced_dictionary_equals_full_forwards(models, tmp_path, which, kind):
    model = models[which == "streamed"]
    sae = dictionary(tmp_path, kind)
    prompt = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(7))
    with ll.spliced(model, sae):
        generated = model.generate(prompt, max_new_tokens=8, temperature=0.0, use_kv_cache=True, stop_at_eos=False)
        reference = greedy_by_full_forwards(model, prompt, 8)
    assert generated.tokens[0] == reference[0, 6:].tolist()
    without = model.generate(prompt, max_new_tokens=8, temperature=0.0, stop_at_eos=False)
    assert without.tokens != generated.tokens  # the dictionary changes what the model says


def test_a_dictionary_first_read_in_inference_mode_still_takes_gradients(tmp_path):
    model = tiny_model()
    sae = dictionary(tmp_path, "sae at the residual stream")
    tokens = torch.randint(3, 128, (1, 5))
    with torch.inference_mode(), ll.spliced(model, sae):
        model(tokens)  # reads W_enc and the biases, and keeps them
    _, cache = ll.run_with_dictionaries(model, tokens, dictionaries=sae, use_error_term=True)
    x = cache["blocks.1.hook_resid_post"].clone().requires_grad_(True)
    sae.encode(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_plan_counts_the_encoder_biases_and_the_rows_a_pass_reads(checkpoint, tmp_path):
    sae = dictionary(tmp_path, "sae at the residual stream")  # TopK, k = 6, 32 features of width 64
    without = ll.plan(checkpoint, stream=True, tokens=4, cache=None)
    with_sae = ll.plan(checkpoint, stream=True, tokens=4, cache=None, dictionaries=[sae])
    held = (64 * 32 + 32 + 64) * 4  # W_enc, b_enc, b_dec in float32; the decoder is read by rows
    # 4 tokens * k = 24 firings, on 32 * (1 - exp(-24 / 32)) = 16.9 distinct features expected: 17 rows read
    encoding = 3 * 4 * 32 * 4 + 4 * 32  # pre-activations, activations, TopK's scatter; the mask
    decoding = 2 * 4 * 32 * 4 + 4 * 32 + 17 * 64 * 8 + 4 * 17 * 4  # + the rows read, the active columns
    working = max(encoding, decoding) + 4 * 256 * 4  # + inputs and outputs
    assert with_sae.dictionary_bytes == held + working
    assert with_sae.peak_bytes - without.peak_bytes == held + working
    assert "dictionaries" in repr(with_sae) and "dictionaries" not in repr(without)
    assert with_sae.to_frame().loc["dictionaries", "bytes"] == held + working
    streamed = ll.load(checkpoint, stream=True, index_cache=False, progress=False)
    with ll.spliced(streamed, sae):
        streamed(torch.randint(3, 128, (1, 4)))
    assert sum(t.nbytes for t in sae._loaded.values()) == held  # what a pass keeps is what the plan holds
    with pytest.raises(ll.ArgumentError, match="ll.load_dictionary"):
        ll.plan(checkpoint, stream=True, dictionaries=[str(tmp_path / "s")])


def test_plan_counts_a_cross_layer_transcoder(checkpoint, tmp_path):
    clt = ll.load_dictionary(write_clt(tmp_path / "clt", n_layers=3))  # 32 features a layer, width 64
    without = ll.plan(checkpoint, stream=True, tokens=4, cache=None)
    with_clt = ll.plan(checkpoint, stream=True, tokens=4, cache=None, dictionaries=[clt])
    held = 3 * (32 * 64 + 32 + 64 + 32) * 4  # per layer W_enc, b_enc, b_dec, threshold in float32
    # Kept by every layer for the pass: input, pre-activations, activations, active values (all 32 at most),
    # the rows to this and later layers (3 + 2 + 1 layers' worth); layer 0's rows as stored; the mask, one
    # output's reconstruction and error.
    working = 3 * 4 * (64 + 2 * 32 + 32) * 4 + 32 * 64 * 6 * 4 + 32 * 3 * 64 * 4 + 4 * (32 + 2 * 64 * 4)
    assert clt.splice_memory(4) == (held, working)
    assert with_clt.dictionary_bytes == held + working
    assert with_clt.peak_bytes - without.peak_bytes == held + working
    streamed = ll.load(checkpoint, stream=True, index_cache=False, progress=False)
    with ll.spliced(streamed, clt):
        streamed(torch.randint(3, 128, (1, 4)))
    assert sum(t.nbytes for t in clt._loaded.values()) == held  # what a pass keeps is what the plan holds
    decoder_bytes = sum(ref.file.bytes_read for ref in clt.decoders)
    assert 0 < decoder_bytes <= 32 * 64 * 6 * 4  # only the active rows, within the plan's bound
