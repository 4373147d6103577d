"""The folder formats of published dictionaries, each read into `Dictionary` (headers only: no weights yet).

    SAELens 6.x / pre-6.0   cfg.json + sae_weights.safetensors
    sparsify                cfg.json + sae.safetensors, in a folder named after its hookpoint ("layers.3.mlp")
    Llama Scope             hyperparams.json + checkpoints/final.safetensors
    circuit-tracer          config.yaml + layer_{i}.safetensors (one transcoder per layer)
    circuit-tracer CLT      config.yaml + W_enc_{i}.safetensors + W_dec_{i}.safetensors (a cross-layer transcoder)

Each reader names the file and key of anything it cannot map (ConfigError) and checks tensor shapes against
the config (CheckpointError) before any weight is read.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError, MissingFileError
from ..files import read_json_file
from .cross_layer import CrossLayerTranscoder
from .dictionary import Dictionary, TensorRef
from .sites import circuit_tracer_site, our_hook, sparsify_sites
from .tensors import TensorFile

# SAELens architecture -> (activation, has W_skip)
_SAELENS_ARCHITECTURES = {
    "standard": ("relu", False),
    "jumprelu": ("jumprelu", False),
    "topk": ("topk", False),
    "gated": ("gated", False),
    "transcoder": ("relu", False),
    "skip_transcoder": ("relu", True),
    "jumprelu_transcoder": ("jumprelu", False),
}
_SAELENS_NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")


def detect_format(path: Path) -> str | None:
    """The format of a dictionary folder by the files in it, or None."""
    if (path / "cfg.json").is_file() and (path / "sae_weights.safetensors").is_file():
        return "saelens"
    if (path / "cfg.json").is_file() and (path / "sae.safetensors").is_file():
        return "sparsify"
    if (path / "hyperparams.json").is_file() and (path / "checkpoints" / "final.safetensors").is_file():
        return "llama_scope"
    if (path / "W_enc_0.safetensors").is_file():  # config.yaml is optional, as for circuit-tracer's load_clt
        return "circuit_tracer_clt"
    if (path / "config.yaml").is_file() or (path / "layer_0.safetensors").is_file():
        return "circuit_tracer"
    return None


def _check_shape(file: TensorFile, name: str, shape: tuple[int, ...], where: Path) -> None:
    if name not in file:
        raise CheckpointError(f"{file.path}: no tensor {name!r}, which {where} needs; it holds {file.names()}")
    if file.shape(name) != shape:
        raise CheckpointError(
            f"{file.path}: tensor {name!r} has shape {list(file.shape(name))}; {where} says {list(shape)}"
        )


# ------------------------------------------------------------------------------------------------ SAELens
def _saelens_cfg(cfg_path: Path) -> dict:
    """cfg.json as SAELens 6.x reads it: a pre-6.0 flat config has its keys renamed the way SAELens does."""
    cfg = read_json_file(cfg_path, ConfigError)
    if not isinstance(cfg, dict):
        raise ConfigError(f"{cfg_path}: not a JSON object")
    metadata = cfg.get("metadata") or {}
    version = str(cfg.get("sae_lens_version") or metadata.get("sae_lens_version") or "0")
    if int(re.match(r"\d*", version).group() or 0) < 6:
        renamed = {"hook_point": "hook_name", "activation_fn_str": "activation_fn"}
        cfg = {renamed.get(key, key): value for key, value in cfg.items()}
        cfg.setdefault("apply_b_dec_to_input", True)
        cfg.setdefault("architecture", "standard")
        k = (cfg.get("activation_fn_kwargs") or {}).get("k")
        if cfg.get("activation_fn") == "topk" and k is not None:
            cfg["architecture"], cfg["k"] = "topk", k
        if isinstance(cfg.get("normalize_activations"), bool):
            cfg["normalize_activations"] = "expected_average_only_in" if cfg["normalize_activations"] else "none"
    for key in ("hook_name", "hook_name_out"):
        if key not in cfg and key in metadata:
            cfg[key] = metadata[key]
    return cfg


def read_saelens(path: Path, *, hook_out: str | None = None) -> Dictionary:
    cfg_path = path / "cfg.json"
    cfg = _saelens_cfg(cfg_path)
    architecture = cfg.get("architecture", "standard")
    if architecture not in _SAELENS_ARCHITECTURES:
        raise ConfigError(
            f"{cfg_path}: architecture {architecture!r} (key 'architecture') is not one llama_lens reads; "
            f"it reads {', '.join(_SAELENS_ARCHITECTURES)}"
        )
    activation, skip = _SAELENS_ARCHITECTURES[architecture]
    normalize = cfg.get("normalize_activations", "none") or "none"
    if normalize not in _SAELENS_NORMALIZATIONS:
        raise ConfigError(
            f"{cfg_path}: normalize_activations {normalize!r} is not one llama_lens reads; it reads "
            f"{', '.join(_SAELENS_NORMALIZATIONS)}"
        )
    if "hook_name" not in cfg:
        raise ConfigError(f"{cfg_path}: no key 'hook_name' (nor metadata.hook_name): the site it reads")
    hook_in = our_hook(cfg["hook_name"], where=f"{cfg_path} key 'hook_name'")
    # SAELens has no TopK transcoder architecture: one is written as "topk" (the same math) with the hook it
    # writes in hook_name_out (as ll.train_dictionary writes it).
    out_name = cfg.get("hook_name_out")
    transcoder = "transcoder" in architecture or (architecture == "topk" and out_name not in (None, cfg["hook_name"]))
    if transcoder:
        out = hook_out or cfg.get("hook_name_out")
        if out is None:
            raise ConfigError(
                f"{cfg_path}: a transcoder without 'hook_name_out' (nor metadata.hook_name_out); pass "
                "hook_out= the hook it writes, e.g. 'blocks.3.hook_mlp_out'"
            )
        hook_out = our_hook(out, where=f"{cfg_path} key 'hook_name_out'")
    else:
        hook_out = hook_in
    d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    d_out = int(cfg.get("d_out", d_in)) if transcoder else d_in
    file = TensorFile(path / "sae_weights.safetensors")
    names = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_out), "b_dec": (d_out,)}
    if activation == "gated":
        names.update(b_gate=(d_sae,), b_mag=(d_sae,), r_mag=(d_sae,))
    else:
        names["b_enc"] = (d_sae,)
    if skip:
        names["W_skip"] = (d_out, d_in)
    for name, shape in names.items():
        _check_shape(file, name, shape, cfg_path)
    params = {name: TensorRef(file, name) for name in names}
    if activation == "jumprelu":
        if "threshold" in file:
            params["threshold"] = TensorRef(file, "threshold")
        elif "log_threshold" in file:
            params["threshold"] = TensorRef(file, "log_threshold", exp=True)
        else:
            raise CheckpointError(f"{file.path}: a jumprelu dictionary without 'threshold' or 'log_threshold'")
    if activation == "topk" and cfg.get("k") is None:
        raise ConfigError(f"{cfg_path}: a topk dictionary without key 'k'")
    return Dictionary(
        format="saelens",
        architecture=architecture,
        path=path,
        hook_in=hook_in,
        hook_out=hook_out,
        d_in=d_in,
        d_sae=d_sae,
        d_out=d_out,
        params=params,
        activation=activation,
        k=int(cfg["k"]) if activation == "topk" else None,
        # SAELens refuses b_dec on a transcoder's input (b_dec is d_out wide).
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)) and not transcoder,
        # expected_average_only_in is a training-time scaling that SAELens' inference leaves out.
        normalize_activations="none" if normalize == "expected_average_only_in" else normalize,
        rescale_acts_by_decoder_norm=bool(cfg.get("rescale_acts_by_decoder_norm", False)),
    )


# ----------------------------------------------------------------------------------------------- sparsify
def read_sparsify(path: Path, *, hookpoint: str | None = None) -> Dictionary:
    cfg_path = path / "cfg.json"
    cfg = read_json_file(cfg_path, ConfigError)
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise ConfigError(f"{cfg_path}: activation {activation!r} (key 'activation'): llama_lens reads 'topk'")
    transcode = bool(cfg.get("transcode", False))
    hook_in, hook_out = sparsify_sites(hookpoint or path.name, transcode, where=f"{path} (its folder name)")
    file = TensorFile(path / "sae.safetensors")
    if "encoder.weight" not in file:
        raise CheckpointError(f"{file.path}: no tensor 'encoder.weight'; it holds {file.names()}")
    d_sae, d_in = file.shape("encoder.weight")
    if "d_in" in cfg and int(cfg["d_in"]) != d_in:
        raise CheckpointError(f"{file.path}: encoder.weight reads width {d_in}; {cfg_path} says d_in {cfg['d_in']}")
    names = {"encoder.bias": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if cfg.get("skip_connection"):
        names["W_skip"] = (d_in, d_in)
    for name, shape in names.items():
        _check_shape(file, name, shape, cfg_path)
    params = {
        "W_enc": TensorRef(file, "encoder.weight", transposed=True),  # nn.Linear: [d_sae, d_in]
        "b_enc": TensorRef(file, "encoder.bias"),
        "W_dec": TensorRef(file, "W_dec"),
        "b_dec": TensorRef(file, "b_dec"),
    }
    if cfg.get("skip_connection"):
        params["W_skip"] = TensorRef(file, "W_skip")
    return Dictionary(
        format="sparsify",
        architecture=("skip_transcoder" if cfg.get("skip_connection") else "transcoder") if transcode else "topk",
        path=path,
        hook_in=hook_in,
        hook_out=hook_out,
        d_in=d_in,
        d_sae=d_sae,
        d_out=d_in,
        params=params,
        activation="topk",
        k=int(cfg.get("k", 32)),
        apply_b_dec_to_input=not transcode,  # sparsify centres an SAE's input on b_dec, not a transcoder's
    )


# -------------------------------------------------------------------------------------------- Llama Scope
def read_llama_scope(path: Path) -> Dictionary:
    cfg_path = path / "hyperparams.json"
    cfg = read_json_file(cfg_path, ConfigError)
    act_fn = cfg.get("act_fn", "jumprelu")
    if act_fn != "jumprelu":
        raise ConfigError(f"{cfg_path}: act_fn {act_fn!r} (key 'act_fn'): llama_lens reads Llama Scope's 'jumprelu'")
    d_model, d_sae = int(cfg["d_model"]), int(cfg["d_sae"])
    hook_in = our_hook(cfg["hook_point_in"], where=f"{cfg_path} key 'hook_point_in'")
    hook_out = our_hook(cfg.get("hook_point_out", cfg["hook_point_in"]), where=f"{cfg_path} key 'hook_point_out'")
    file = TensorFile(path / "checkpoints" / "final.safetensors")
    names = {"encoder.weight": (d_sae, d_model), "encoder.bias": (d_sae,), "decoder.weight": (d_model, d_sae)}
    for name, shape in names.items():
        _check_shape(file, name, shape, cfg_path)
    params = {
        "W_enc": TensorRef(file, "encoder.weight", transposed=True),
        "b_enc": TensorRef(file, "encoder.bias"),
        "W_dec": TensorRef(file, "decoder.weight", transposed=True),  # [d_model, d_sae]: read whole on first use
    }
    if "decoder.bias" in file:
        params["b_dec"] = TensorRef(file, "decoder.bias")
    # Dataset-wise normalization: inputs are scaled to norm sqrt(d_model) on average before encoding, the
    # threshold with them (as SAELens does, PR #483), and the output scaled back by the output's own norm.
    scale_in = scale_out = 1.0
    if cfg.get("norm_activation", "dataset-wise") == "dataset-wise":
        norms = cfg.get("dataset_average_activation_norm") or {}
        if "in" not in norms:
            raise ConfigError(f"{cfg_path}: dataset-wise norm without key 'dataset_average_activation_norm.in'")
        scale_in = d_model**0.5 / float(norms["in"])
        scale_out = d_model**0.5 / float(norms.get("out", norms["in"]))
    if "log_jumprelu_threshold" in file:
        params["threshold"] = TensorRef(file, "log_jumprelu_threshold", exp=True)
        threshold_scalar = None
    else:
        threshold_scalar = float(cfg["jump_relu_threshold"])
    dictionary = Dictionary(
        format="llama_scope",
        architecture="jumprelu",
        path=path,
        hook_in=hook_in,
        hook_out=hook_out,
        d_in=d_model,
        d_sae=d_sae,
        d_out=d_model,
        params=params,
        activation="jumprelu",
        input_scale=scale_in,
        output_scale=scale_out,
    )
    if threshold_scalar is not None:
        dictionary._loaded["threshold"] = torch.full((d_sae,), threshold_scalar)
    return dictionary


# ----------------------------------------------------------------------------------------- circuit-tracer
def read_circuit_tracer(path: Path) -> list[Dictionary]:
    """A per-layer transcoder set: one Dictionary per layer_{i}.safetensors, in layer order."""
    cfg = _read_yaml(path / "config.yaml") if (path / "config.yaml").is_file() else {}
    files = sorted(path.glob("layer_*.safetensors"), key=lambda p: int(re.sub(r"\D", "", p.stem) or -1))
    if not files:
        raise ConfigError(f"{path}: a circuit-tracer transcoder set without layer_{{i}}.safetensors files")
    input_hook = cfg.get("feature_input_hook", "mlp.hook_in")
    output_hook = cfg.get("feature_output_hook", "hook_mlp_out")
    dictionaries = []
    for layer_file in files:
        layer = int(re.sub(r"\D", "", layer_file.stem))
        where = f"{path / 'config.yaml'} key 'feature_input_hook'"
        file = TensorFile(layer_file)
        d_sae, d_model = file.shape("W_enc") if "W_enc" in file else (0, 0)
        for name, shape in {"W_enc": (d_sae, d_model), "W_dec": (d_sae, d_model), "b_enc": (d_sae,)}.items():
            _check_shape(file, name, shape, layer_file)
        params = {
            "W_enc": TensorRef(file, "W_enc", transposed=True),  # used as F.linear(x, W_enc): [d_sae, d_model]
            "b_enc": TensorRef(file, "b_enc"),
            "W_dec": TensorRef(file, "W_dec"),
            "b_dec": TensorRef(file, "b_dec"),
        }
        if "W_skip" in file:
            params["W_skip"] = TensorRef(file, "W_skip")
        jumprelu = "activation_function.threshold" in file
        if jumprelu:
            params["threshold"] = TensorRef(file, "activation_function.threshold")
        dictionaries.append(
            Dictionary(
                format="circuit_tracer",
                architecture="jumprelu_transcoder" if jumprelu else "transcoder",
                path=layer_file,
                hook_in=circuit_tracer_site(input_hook, layer, where=where),
                hook_out=circuit_tracer_site(output_hook, layer, where=where.replace("input", "output")),
                d_in=d_model,
                d_sae=d_sae,
                d_out=d_model,
                params=params,
                # circuit-tracer's JumpReLU is pre * (pre > threshold), without a ReLU.
                activation="threshold" if jumprelu else "relu",
            )
        )
    return dictionaries


def read_circuit_tracer_clt(path: Path) -> CrossLayerTranscoder:
    """A cross-layer transcoder as circuit-tracer's `CrossLayerTranscoder.to_safetensors` writes it."""
    cfg_path = path / "config.yaml"
    cfg = _read_yaml(cfg_path) if cfg_path.is_file() else {}
    kind = cfg.get("model_kind", "cross_layer_transcoder")
    if kind != "cross_layer_transcoder":
        raise ConfigError(
            f"{cfg_path}: model_kind {kind!r}, but the folder holds W_enc_{{i}}.safetensors files, which only a "
            "'cross_layer_transcoder' has"
        )
    layers = sorted(int(re.sub(r"\D", "", p.stem) or -1) for p in path.glob("W_enc_*.safetensors"))
    if layers != list(range(len(layers))):
        missing = sorted(set(range(max(layers) + 1)) - set(layers))
        raise MissingFileError(f"{path}: a CLT needs W_enc_{{i}}.safetensors for every layer; missing i = {missing}")
    n_layers = len(layers)
    # circuit-tracer's load_clt reads from the residual stream before the MLP's norm unless told otherwise.
    where = f"{cfg_path} key 'feature_input_hook'"
    hooks_in = [circuit_tracer_site(cfg.get("feature_input_hook", "hook_resid_mid"), i, where=where) for i in layers]
    where = f"{cfg_path} key 'feature_output_hook'"
    hooks_out = [circuit_tracer_site(cfg.get("feature_output_hook", "hook_mlp_out"), i, where=where) for i in layers]
    first = TensorFile(path / "W_enc_0.safetensors")
    _check_present(first, "W_enc_0", "b_dec_0")
    (d_sae, d_in), (d_out,) = first.shape("W_enc_0"), first.shape("b_dec_0")
    jumprelu = "threshold_0" in first
    encoders, decoders = [], []
    for i in layers:
        enc = first if i == 0 else TensorFile(path / f"W_enc_{i}.safetensors")
        shapes = {f"W_enc_{i}": (d_sae, d_in), f"b_enc_{i}": (d_sae,), f"b_dec_{i}": (d_out,)}
        if jumprelu:
            shapes[f"threshold_{i}"] = (d_sae,)
        for name, shape in shapes.items():
            _check_shape(enc, name, shape, path / "W_enc_0.safetensors")
        encoders.append(
            {
                "W_enc": TensorRef(enc, f"W_enc_{i}", transposed=True),  # [d_sae, d_in], used as x @ W_enc.T
                "b_enc": TensorRef(enc, f"b_enc_{i}"),
                "b_dec": TensorRef(enc, f"b_dec_{i}"),
            }
            | ({"threshold": TensorRef(enc, f"threshold_{i}")} if jumprelu else {})
        )
        dec_path = path / f"W_dec_{i}.safetensors"
        if not dec_path.is_file():
            raise MissingFileError(f"{dec_path}: no such file; a CLT needs W_dec_{{i}}.safetensors beside each W_enc")
        dec = TensorFile(dec_path)
        _check_shape(dec, f"W_dec_{i}", (d_sae, n_layers - i, d_out), path / "W_enc_0.safetensors")
        decoders.append(TensorRef(dec, f"W_dec_{i}"))
    return CrossLayerTranscoder(
        format="circuit_tracer_clt",
        path=path,
        n_layers=n_layers,
        d_in=d_in,
        d_sae=d_sae,
        d_out=d_out,
        hooks_in=hooks_in,
        hooks_out=hooks_out,
        encoders=encoders,
        decoders=decoders,
        activation="threshold" if jumprelu else "relu",
    )


def _check_present(file: TensorFile, *names: str) -> None:
    for name in names:
        if name not in file:
            raise CheckpointError(f"{file.path}: no tensor {name!r}; it holds {file.names()}")


def _read_yaml(path: Path) -> dict:
    """config.yaml of a circuit-tracer set: flat `key: value` lines are all it needs here (no yaml package)."""
    out = {}
    for line in path.read_text().splitlines():
        match = re.fullmatch(r"([A-Za-z_]\w*)\s*:\s*(.*?)\s*", line)
        if match and match.group(2):
            value = match.group(2).strip("'\"")
            out[match.group(1)] = json.loads(value) if value in ("true", "false") else value
    return out
