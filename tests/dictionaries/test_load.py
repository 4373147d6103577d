"""Loading dictionaries: formats detected, sites mapped to our hooks, the math of each architecture checked
against a dense restatement, refusals by name, and decoder rows read on demand."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from support.dictionaries import write_circuit_tracer, write_llama_scope, write_saelens, write_sparsify

import llama_lens as ll
from llama_lens.errors import CheckpointError, ConfigError


def _dense_saelens(folder, x, architecture, k=4):
    """SAELens' encode/decode restated with the whole matrices (the cfg is the one write_saelens wrote)."""
    t = load_file(folder / "sae_weights.safetensors")
    sae_in = x if "transcoder" in architecture else x - t["b_dec"]
    if architecture == "gated":
        gate = (sae_in @ t["W_enc"] + t["b_gate"]) > 0
        acts = gate * F.relu(sae_in @ (t["W_enc"] * t["r_mag"].exp()) + t["b_mag"])
    else:
        pre = sae_in @ t["W_enc"] + t["b_enc"]
        acts = F.relu(pre)
        if "jumprelu" in architecture:
            acts = acts * (pre > t["threshold"])
        if architecture == "topk":
            keep = torch.zeros_like(pre).scatter(-1, pre.topk(k, dim=-1).indices, 1.0)
            acts = F.relu(pre) * keep
    out = acts @ t["W_dec"] + t["b_dec"]
    if "W_skip" in t:
        out = out + x @ t["W_skip"].T
    return acts, out


ARCHITECTURES = ["standard", "jumprelu", "topk", "gated", "transcoder", "skip_transcoder", "jumprelu_transcoder"]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_saelens_architectures_match_dense_math(tmp_path, architecture):
    transcoder = "transcoder" in architecture
    hook_in = "blocks.1.mlp.hook_in" if transcoder else "blocks.1.hook_resid_post"
    folder = write_saelens(tmp_path / "sae", hook_in, architecture=architecture, hook_out="blocks.1.hook_mlp_out")
    sae = ll.load_dictionary(folder)
    assert (sae.format, sae.architecture, sae.hook_in) == ("saelens", architecture, hook_in)
    assert sae.hook_out == ("blocks.1.hook_mlp_out" if transcoder else hook_in)
    x = torch.randn(3, 5, 64)
    acts, out = _dense_saelens(folder, x, architecture)
    torch.testing.assert_close(sae.encode(x), acts, atol=1e-5, rtol=0)
    torch.testing.assert_close(sae.decode(sae.encode(x), x), out, atol=1e-5, rtol=0)
    torch.testing.assert_close(sae(x), out, atol=1e-5, rtol=0)


def test_saelens_pre_6_config_and_tl_alias(tmp_path):
    folder = write_saelens(tmp_path / "old", "blocks.0.hook_mlp_in", pre_6=True)
    sae = ll.load_dictionary(folder)
    # TransformerLens' hook_mlp_in is the residual stream entering the MLP's norm: our hook_resid_mid.
    assert (sae.architecture, sae.hook_in, sae.apply_b_dec_to_input) == ("standard", "blocks.0.hook_resid_mid", True)


@pytest.mark.parametrize("mode", ["constant_norm_rescale", "layer_norm", "expected_average_only_in"])
def test_saelens_normalize_activations(tmp_path, mode):
    sae = ll.load_dictionary(write_saelens(tmp_path / "n", "blocks.0.hook_resid_pre", normalize=mode))
    t = load_file(tmp_path / "n" / "sae_weights.safetensors")
    x = torch.randn(4, 64) * 3
    if mode == "constant_norm_rescale":
        coeff = 64**0.5 / x.norm(dim=-1, keepdim=True)
        x_in, undo = x * coeff, lambda y: y / coeff
    elif mode == "layer_norm":
        mu, std = x.mean(-1, keepdim=True), (x - x.mean(-1, keepdim=True)).std(-1, keepdim=True)
        x_in, undo = (x - mu) / (std + 1e-5), lambda y: y * std + mu
    else:  # SAELens' inference leaves this training-time scaling out
        x_in, undo = x, lambda y: y
    acts = F.relu((x_in - t["b_dec"]) @ t["W_enc"] + t["b_enc"])
    torch.testing.assert_close(sae.encode(x), acts, atol=1e-5, rtol=0)
    torch.testing.assert_close(sae(x), undo(acts @ t["W_dec"] + t["b_dec"]), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("name", "transcode", "skip", "sites"),
    [
        ("layers.1", False, False, ("blocks.1.hook_resid_post",) * 2),
        ("layers.1.mlp", False, False, ("blocks.1.hook_mlp_out",) * 2),
        ("layers.0.self_attn", False, False, ("blocks.0.hook_attn_out",) * 2),
        ("embed_tokens", False, False, ("hook_embed",) * 2),
        ("layers.1.mlp", True, False, ("blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out")),
        ("layers.1.mlp", True, True, ("blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out")),
        ("layers.0", True, False, ("blocks.0.hook_resid_pre", "blocks.0.hook_resid_post")),
    ],
)
def test_sparsify_sites_and_math(tmp_path, name, transcode, skip, sites):
    folder = write_sparsify(tmp_path / name, transcode=transcode, skip=skip)
    coder = ll.load_dictionary(folder)
    assert (coder.hook_in, coder.hook_out) == sites
    t = load_file(folder / "sae.safetensors")
    x = torch.randn(6, 64)
    pre = F.relu((x if transcode else x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"])
    values, indices = pre.topk(4, dim=-1)
    acts = torch.zeros_like(pre).scatter(-1, indices, values)
    out = acts @ t["W_dec"] + t["b_dec"] + (x @ t["W_skip"].T if skip else 0)
    torch.testing.assert_close(coder.encode(x), acts, atol=1e-5, rtol=0)
    torch.testing.assert_close(coder(x), out, atol=1e-5, rtol=0)


def test_sparsify_run_folder_gives_every_hookpoint(tmp_path):
    write_sparsify(tmp_path / "run" / "layers.0")
    write_sparsify(tmp_path / "run" / "layers.1.mlp")
    sites = [d.hook_out for d in ll.load_dictionary(tmp_path / "run")]
    assert sites == ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]


def test_llama_scope_scales_inputs_and_threshold_alike(tmp_path):
    folder = write_llama_scope(tmp_path / "ls", "blocks.1.hook_resid_post", norm_in=4.0, norm_out=5.0)
    sae = ll.load_dictionary(folder)
    t = load_file(folder / "checkpoints" / "final.safetensors")
    x = torch.randn(5, 64)
    s_in, s_out = 8 / 4.0, 8 / 5.0
    # SAELens folds s_in into W_enc and the threshold, and 1/s into W_dec and b_dec (PR #483).
    pre = x @ (t["encoder.weight"].T * s_in) + t["encoder.bias"]
    acts = F.relu(pre) * (pre > 0.2 * s_in)
    torch.testing.assert_close(sae.encode(x), acts, atol=1e-5, rtol=0)
    torch.testing.assert_close(sae(x), (acts @ t["decoder.weight"].T + t["decoder.bias"]) / s_out, atol=1e-5, rtol=0)


def test_circuit_tracer_set(tmp_path):
    folder = write_circuit_tracer(tmp_path / "ct")
    layers = ll.load_dictionary(folder)
    assert [(d.hook_in, d.hook_out) for d in layers] == [
        (f"blocks.{i}.mlp.hook_in", f"blocks.{i}.hook_mlp_out") for i in range(2)
    ]
    t = load_file(folder / "layer_1.safetensors")
    x = torch.randn(5, 64)
    pre = x @ t["W_enc"].T + t["b_enc"]
    acts = pre * (pre > t["activation_function.threshold"])
    torch.testing.assert_close(layers[1].encode(x), acts, atol=1e-5, rtol=0)
    out = acts @ t["W_dec"] + t["b_dec"] + x @ t["W_skip"].T
    torch.testing.assert_close(layers[1](x), out, atol=1e-5, rtol=0)


def test_unknown_architecture_and_hook_are_refused_by_name(tmp_path):
    folder = write_saelens(tmp_path / "a", "blocks.0.hook_resid_pre")
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps(cfg | {"architecture": "matryoshka_batchtopk"}))
    with pytest.raises(ConfigError, match=r"cfg\.json: architecture 'matryoshka_batchtopk'"):
        ll.load_dictionary(folder)
    folder = write_saelens(tmp_path / "b", "blocks.0.attn.hook_q")
    with pytest.raises(ConfigError, match=r"cfg\.json key 'hook_name': hook 'blocks.0.attn.hook_q'"):
        ll.load_dictionary(folder)
    with pytest.raises(ConfigError, match="sparsify hookpoint 'layers.0.self_attn' \\(transcoder\\)"):
        ll.load_dictionary(write_sparsify(tmp_path / "run" / "layers.0.self_attn", transcode=True))
    with pytest.raises(ConfigError, match="no dictionary format"):
        ll.load_dictionary(folder.parent)  # a folder of SAELens folders


def test_shape_mismatch_names_file_and_tensor(tmp_path):
    folder = write_saelens(tmp_path / "s", "blocks.0.hook_resid_pre")
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps(cfg | {"d_sae": 31}))
    with pytest.raises(CheckpointError, match=r"sae_weights\.safetensors: tensor 'W_enc' has shape \[64, 32\]"):
        ll.load_dictionary(folder)


def test_opening_reads_no_weights_and_decode_reads_active_rows_only(tmp_path):
    folder = write_saelens(tmp_path / "t", "blocks.0.hook_resid_pre", architecture="topk", d_sae=256, k=2)
    sae = ll.load_dictionary(folder)
    assert sae.bytes_read == 0
    acts = torch.zeros(1, 256)
    acts[0, [3, 200]] = 1.0
    before = sae.bytes_read
    out = sae.decode(acts)
    t = load_file(folder / "sae_weights.safetensors")
    torch.testing.assert_close(out, acts @ t["W_dec"] + t["b_dec"], atol=1e-6, rtol=0)
    # two decoder rows of 64 float32 values, and b_dec
    assert sae.bytes_read - before == 2 * 64 * 4 + 64 * 4
    torch.testing.assert_close(sae.W_dec_rows([200, 3]), t["W_dec"][[200, 3]])
