"""Random dictionaries written in each format's file layout, for the loader and splicing tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def _randn(*shape: int, scale: float = 0.3) -> torch.Tensor:
    return torch.randn(*shape) * scale


def write_saelens(
    folder: Path,
    hook: str,
    *,
    architecture: str = "standard",
    d_in: int = 64,
    d_sae: int = 32,
    d_out: int | None = None,
    hook_out: str | None = None,
    k: int = 4,
    normalize: str = "none",
    pre_6: bool = False,
) -> Path:
    """A SAELens 6.x folder (or a pre-6.0 flat cfg.json with `pre_6`)."""
    d_out = d_out or d_in
    tensors = {"W_enc": _randn(d_in, d_sae), "W_dec": _randn(d_sae, d_out), "b_dec": _randn(d_out, scale=0.1)}
    if architecture == "gated":
        tensors |= {"b_gate": _randn(d_sae, scale=0.1), "b_mag": _randn(d_sae, scale=0.1), "r_mag": _randn(d_sae)}
    else:
        tensors["b_enc"] = _randn(d_sae, scale=0.1)
    if "jumprelu" in architecture:
        tensors["threshold"] = torch.rand(d_sae) * 0.3
    if architecture == "skip_transcoder":
        tensors["W_skip"] = _randn(d_out, d_in, scale=0.05)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "sae_weights.safetensors")
    if pre_6:
        cfg = {"d_in": d_in, "d_sae": d_sae, "hook_point": hook, "activation_fn_str": "relu", "dtype": "float32"}
    else:
        cfg = {
            "architecture": architecture,
            "d_in": d_in,
            "d_sae": d_sae,
            "dtype": "float32",
            "apply_b_dec_to_input": "transcoder" not in architecture,
            "normalize_activations": normalize,
            "metadata": {"hook_name": hook, "sae_lens_version": "6.54.12"},
        }
        if architecture == "topk":
            cfg["k"] = k
        if "transcoder" in architecture:
            cfg["d_out"] = d_out
            cfg["metadata"]["hook_name_out"] = hook_out
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def write_sparsify(folder: Path, *, d_in: int = 64, d_sae: int = 32, k: int = 4, transcode=False, skip=False) -> Path:
    """A sparsify folder; its name is the hookpoint ("layers.1.mlp")."""
    tensors = {
        "encoder.weight": _randn(d_sae, d_in),
        "encoder.bias": _randn(d_sae, scale=0.1),
        "W_dec": _randn(d_sae, d_in),
        "b_dec": _randn(d_in, scale=0.1),
    }
    if skip:
        tensors["W_skip"] = _randn(d_in, d_in, scale=0.05)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "sae.safetensors")
    cfg = {"activation": "topk", "num_latents": d_sae, "k": k, "transcode": transcode, "skip_connection": skip}
    (folder / "cfg.json").write_text(json.dumps(cfg | {"d_in": d_in}))
    return folder


def write_llama_scope(folder: Path, hook: str, *, d_model: int = 64, d_sae: int = 32, norm_in=8.0, norm_out=8.0):
    tensors = {
        "encoder.weight": _randn(d_sae, d_model),
        "encoder.bias": _randn(d_sae, scale=0.1),
        "decoder.weight": _randn(d_model, d_sae),
        "decoder.bias": _randn(d_model, scale=0.1),
    }
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "checkpoints" / "final.safetensors")
    cfg = {
        "d_model": d_model,
        "d_sae": d_sae,
        "hook_point_in": hook,
        "hook_point_out": hook,
        "act_fn": "jumprelu",
        "jump_relu_threshold": 0.2,
        "norm_activation": "dataset-wise",
        "dataset_average_activation_norm": {"in": norm_in, "out": norm_out},
    }
    (folder / "hyperparams.json").write_text(json.dumps(cfg))
    return folder


def write_circuit_tracer(folder: Path, n_layers: int = 2, *, d_model: int = 64, d_sae: int = 32, skip=True):
    folder.mkdir(parents=True, exist_ok=True)
    for layer in range(n_layers):
        tensors = {
            "W_enc": _randn(d_sae, d_model),
            "b_enc": _randn(d_sae, scale=0.1),
            "W_dec": _randn(d_sae, d_model),
            "b_dec": _randn(d_model, scale=0.1),
            "activation_function.threshold": torch.rand(d_sae) * 0.3,
        }
        if skip:
            tensors["W_skip"] = _randn(d_model, d_model, scale=0.05)
        save_file(tensors, folder / f"layer_{layer}.safetensors")
    (folder / "config.yaml").write_text(
        "model_kind: transcoder_set\nfeature_input_hook: mlp.hook_in\nfeature_output_hook: hook_mlp_out\n"
    )
    return folder


def write_clt(
    folder: Path,
    n_layers: int = 2,
    *,
    d_model: int = 64,
    d_sae: int = 32,
    jumprelu=True,
    input_hook: str | None = "mlp.hook_in",
    output_hook: str = "hook_mlp_out",
) -> Path:
    """A cross-layer transcoder in circuit-tracer's layout (W_enc_{i} / W_dec_{i}.safetensors); no config.yaml
    when `input_hook` is None."""
    folder.mkdir(parents=True, exist_ok=True)
    for layer in range(n_layers):
        encoder = {
            f"W_enc_{layer}": _randn(d_sae, d_model),
            f"b_enc_{layer}": _randn(d_sae, scale=0.1),
            f"b_dec_{layer}": _randn(d_model, scale=0.1),
        }
        if jumprelu:
            encoder[f"threshold_{layer}"] = torch.rand(d_sae) * 0.3
        save_file(encoder, folder / f"W_enc_{layer}.safetensors")
        save_file({f"W_dec_{layer}": _randn(d_sae, n_layers - layer, d_model)}, folder / f"W_dec_{layer}.safetensors")
    if input_hook is not None:
        (folder / "config.yaml").write_text(
            "model_kind: cross_layer_transcoder\n"
            f"feature_input_hook: {input_hook}\nfeature_output_hook: {output_hook}\n"
        )
    return folder
