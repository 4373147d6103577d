"""TransformerLens' names on the embedding and unembedding modules: `model.embed.W_E`, `model.unembed.W_U` and
`model.unembed.b_U`, in memory and on a streamed model (whose weights stay on disk)."""

import pytest
import torch
from support.models import tiny_config

import llama_lens as ll
from llama_lens.loading.stream_vocab import OnDiskWeight
from llama_lens.testing import random_state_dict, write_hf_checkpoint


def test_module_aliases_are_the_model_views(char_model):
    model = char_model(seed=1)
    assert model.embed.W_E is model.embed.weight and torch.equal(model.embed.W_E, model.W_E)
    assert torch.equal(model.unembed.W_U, model.W_U) and model.unembed.W_U.shape == (model.cfg.d_model, 128)
    assert model.unembed.W_U.data_ptr() == model.unembed.weight.data_ptr()  # a view: nothing copied
    assert torch.equal(model.unembed.b_U, torch.zeros(model.cfg.d_vocab))
    tokens = model.to_tokens("aliases")
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
        final = cache["ln_final.hook_normalized"] * model.ln_final.w
        torch.testing.assert_close(final @ model.unembed.W_U + model.unembed.b_U, logits, atol=1e-5, rtol=1e-5)
        assert torch.equal(model.embed.W_E[tokens[0]], cache["hook_embed"][0])
    # The modules keep their parameter names: a state dict loads as before.
    assert {"embed.weight", "unembed.weight"} <= set(model.state_dict())


def test_streamed_aliases_keep_on_disk_semantics(tmp_path):
    cfg = tiny_config(n_layers=1)
    path = write_hf_checkpoint(tmp_path / "hf", cfg, random_state_dict(cfg, seed=4), shards=2)
    model = ll.load(path, stream=True, unembed="stream")
    full_embed = ll.Checkpoint(path, index_cache=False).load_tensor("model.embed_tokens.weight")
    assert isinstance(model.embed.W_E, OnDiskWeight)  # read by rows, as the weight itself
    ids = torch.tensor([3, 99, 3])
    assert torch.equal(model.embed.W_E[ids], full_embed[ids].to(model.embed.W_E.dtype))
    assert torch.equal(model.unembed.b_U, torch.zeros(cfg.d_vocab, dtype=model.unembed.weight.dtype))
    # The transpose needs the whole matrix: the same error as model.W_U, saying how to read it.
    with pytest.raises(ll.LlamaLensError, match=r"unembed.weight of this streamed model.*weight\.read\(\)"):
        model.unembed.W_U  # noqa: B018
