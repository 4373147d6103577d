"""Cross-layer transcoders in circuit-tracer's layout: sites, the math against a dense restatement, lazy decoder
rows, refusals by name, and splicing (with the error term the logits are unchanged)."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.dictionaries import write_clt
from support.models import tiny_model

import llama_lens as ll
from llama_lens.errors import ArgumentError, CheckpointError, ConfigError, MissingFileError


def _dense(folder, x, n_layers=2):
    """circuit-tracer's CLT math with the whole matrices: x [n_layers, ..., d_model] -> (acts, outputs)."""
    enc = [load_file(folder / f"W_enc_{i}.safetensors") for i in range(n_layers)]
    dec = [load_file(folder / f"W_dec_{i}.safetensors")[f"W_dec_{i}"] for i in range(n_layers)]
    acts = []
    for i in range(n_layers):
        pre = x[i] @ enc[i][f"W_enc_{i}"].T + enc[i][f"b_enc_{i}"]
        acts.append(pre * (pre > enc[i][f"threshold_{i}"]))
    outs = []
    for j in range(n_layers):
        out = enc[j][f"b_dec_{j}"] + sum(acts[i] @ dec[i][:, j - i] for i in range(j + 1))
        outs.append(out)
    return torch.stack(acts), torch.stack(outs)


def test_clt_sites_math_and_lazy_rows(tmp_path):
    folder = write_clt(tmp_path / "clt")
    clt = ll.load_dictionary(folder)
    assert isinstance(clt, ll.CrossLayerTranscoder)
    assert clt.hooks_in == ["blocks.0.mlp.hook_in", "blocks.1.mlp.hook_in"]
    assert clt.hooks_out == ["blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"]
    assert (clt.n_layers, clt.d_in, clt.d_sae, clt.d_out, clt.activation) == (2, 64, 32, 64, "threshold")
    assert clt.bytes_read == 0  # opening reads headers only
    x = torch.randn(2, 3, 5, 64)
    acts, outs = _dense(folder, x)
    torch.testing.assert_close(clt.encode(x), acts, atol=1e-5, rtol=0)
    torch.testing.assert_close(clt.decode(clt.encode(x)), outs, atol=1e-5, rtol=0)
    torch.testing.assert_close(clt(x), outs, atol=1e-5, rtol=0)
    torch.testing.assert_close(clt.decode_layer([acts[0], acts[1]], 1), outs[1], atol=1e-5, rtol=0)
    # one feature of layer 0 reads its directions to layers 0 and 1, and nothing else of the decoder
    before = clt.bytes_read
    rows = clt.W_dec_rows(0, [7])
    assert rows.shape == (1, 2, 64) and clt.bytes_read - before == 2 * 64 * 4
    W_dec_0 = load_file(folder / "W_dec_0.safetensors")["W_dec_0"]
    torch.testing.assert_close(rows[0], W_dec_0[7])
    torch.testing.assert_close(clt.W_dec_rows(0, [7, 2, 7, 3]), W_dec_0[[7, 2, 7, 3]])  # any order, repeats


def test_clt_without_config_uses_circuit_tracers_defaults(tmp_path):
    clt = ll.load_dictionary(write_clt(tmp_path / "clt", jumprelu=False, input_hook=None))
    # circuit-tracer's load_clt: hook_resid_mid -> hook_mlp_out, ReLU without thresholds
    assert clt.hooks_in == ["blocks.0.hook_resid_mid", "blocks.1.hook_resid_mid"]
    assert clt.activation == "relu"
    x = torch.randn(4, 64)
    enc = load_file(tmp_path / "clt" / "W_enc_1.safetensors")
    torch.testing.assert_close(clt.encode_layer(x, 1), torch.relu(x @ enc["W_enc_1"].T + enc["b_enc_1"]))


def test_clt_refusals_name_the_file(tmp_path):
    folder = write_clt(tmp_path / "hook", input_hook="attn.hook_q")
    with pytest.raises(ConfigError, match=r"config\.yaml key 'feature_input_hook': hook 'blocks.0.attn.hook_q'"):
        ll.load_dictionary(folder)
    folder = write_clt(tmp_path / "kind")
    (folder / "config.yaml").write_text("model_kind: transcoder_set\n")
    with pytest.raises(ConfigError, match="model_kind 'transcoder_set'"):
        ll.load_dictionary(folder)
    folder = write_clt(tmp_path / "dec")
    (folder / "W_dec_1.safetensors").unlink()
    with pytest.raises(MissingFileError, match=r"W_dec_1\.safetensors: no such file"):
        ll.load_dictionary(folder)
    folder = write_clt(tmp_path / "gap", n_layers=3)
    (folder / "W_enc_1.safetensors").unlink()
    with pytest.raises(MissingFileError, match=r"missing i = \[1\]"):
        ll.load_dictionary(folder)
    folder = write_clt(tmp_path / "shape")
    save_file({"W_dec_1": torch.zeros(32, 2, 64)}, folder / "W_dec_1.safetensors")  # should be [32, 1, 64]
    with pytest.raises(CheckpointError, match=r"W_dec_1\.safetensors: tensor 'W_dec_1' has shape \[32, 2, 64\]"):
        ll.load_dictionary(folder)
    clt = ll.load_dictionary(write_clt(tmp_path / "ok"))
    with pytest.raises(ArgumentError, match="layer must be an int in"):
        clt.encode_layer(torch.zeros(64), 2)


def test_clt_splice_with_and_without_error_term(tmp_path):
    model = tiny_model()
    tokens = torch.randint(0, 128, (2, 7))
    clt = ll.load_dictionary(write_clt(tmp_path / "clt"))
    plain, plain_cache = model.run_with_cache(tokens)
    with ll.spliced(model, clt, use_error_term=True):
        spliced = model(tokens)
    assert (spliced - plain).abs().max() <= 1e-5
    logits, cache = ll.run_with_dictionaries(model, tokens, dictionaries=clt)
    assert (logits - plain).abs().max() > 1e-3  # the reconstruction does replace the MLP outputs
    # Layer 0's output is the CLT's from the model's own MLP input; layer 1's adds layer 0's features' writes.
    x0 = plain_cache["blocks.0.mlp.hook_in"]
    torch.testing.assert_close(cache["blocks.0.hook_mlp_out"], clt.decode_layer([clt.encode_layer(x0, 0)], 0))
    acts = [cache[f"blocks.{i}.hook_mlp_out.hook_sae_acts_post"] for i in range(2)]
    torch.testing.assert_close(acts[1], clt.encode_layer(cache["blocks.1.mlp.hook_in"], 1))
    torch.testing.assert_close(cache["blocks.1.hook_mlp_out"], clt.decode_layer(acts, 1), atol=1e-5, rtol=0)
    # generation with the KV cache agrees with generation without it
    prompt = torch.randint(3, 128, (1, 5))
    with ll.spliced(model, clt):
        cached = model.generate(prompt, max_new_tokens=6, temperature=0.0, use_kv_cache=True)
        uncached = model.generate(prompt, max_new_tokens=6, temperature=0.0, use_kv_cache=False)
    assert torch.equal(torch.as_tensor(cached.tokens), torch.as_tensor(uncached.tokens))


def test_a_spliced_pass_from_a_later_layer_does_not_reuse_an_earlier_passs_features(tmp_path):
    """A CLT's output at layer 1 holds the writes of layer 0's features. A pass resumed at layer 1 from a cached
    residual has no layer-0 features of its own: the splice refuses it, where it used those of the pass before."""
    model = tiny_model()
    clt = ll.load_dictionary(write_clt(tmp_path / "clt"))
    first, second = torch.randint(3, 128, (2, 1, 7)).unbind()
    with ll.spliced(model, clt):
        _, cache = model.run_with_cache(second, names_filter="blocks.1.hook_resid_pre")
        resid = cache["blocks.1.hook_resid_pre"]
        expected = model(second)
        model(first)  # the pass whose layer-0 features were left behind
        with pytest.raises(ArgumentError, match=r"features of layers 0\.\.1.*did not read layers \[0\]"):
            model(resid, start_at_layer=1)
        # A pass split with stop_at_layer and resumed from the residual it returned is one pass.
        resid = model(second, stop_at_layer=1)
        torch.testing.assert_close(model(resid, start_at_layer=1), expected, rtol=0, atol=0)
        # Resumed with another batch, it is not.
        model(second, stop_at_layer=1)
        with pytest.raises(ArgumentError, match=r"did not read layers \[0\]"):
            model(torch.cat([resid, resid]), start_at_layer=1)
        # A full pass after a refused one runs as usual.
        torch.testing.assert_close(model(second), expected, rtol=0, atol=0)


def test_clt_float64_files_keep_their_precision(tmp_path):
    folder = write_clt(tmp_path / "clt")
    for file in folder.glob("*.safetensors"):
        save_file({k: (v.double() + 1e-12) for k, v in load_file(file).items()}, file)  # not float32-exact
    clt = ll.load_dictionary(folder, dtype=torch.float64)
    enc = load_file(folder / "W_enc_1.safetensors")
    dec = load_file(folder / "W_dec_0.safetensors")["W_dec_0"]
    assert clt.W_enc(1).dtype == torch.float64
    assert torch.equal(clt.W_enc(1), enc["W_enc_1"].T)
    assert torch.equal(clt.param(1, "threshold"), enc["threshold_1"])
    assert torch.equal(clt.W_dec_rows(0, [3, 1]), dec[[3, 1]])
    assert (enc["W_enc_1"].float().double() != enc["W_enc_1"]).any()  # a float32 step would have changed them
    x = torch.randn(5, 64, dtype=torch.float64)
    pre = x @ enc["W_enc_1"].T + enc["b_enc_1"]
    torch.testing.assert_close(clt.encode_layer(x, 1), pre * (pre > enc["threshold_1"]), rtol=1e-14, atol=1e-14)
