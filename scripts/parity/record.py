"""Writes the parity fixtures: small dictionaries saved by their reference packages' own save functions, and
those packages' outputs on real activations of the embedded model.

Runs in the parity environment (scripts/parity/make_env.sh), after scripts/parity/dump_activations.py has
written the activations with the project's own environment:

    python scripts/parity/dump_activations.py                                   # -> fixtures/inputs.npz
    $LLAMA_LENS_HOME/parity-venv/bin/python scripts/parity/record.py            # -> fixtures/<name>/

Each fixture is a folder `tests/dictionaries/fixtures/<name>/` holding the dictionary (in the sub-folder that
manifest.json names) and `reference.npz`, per layer l of the dictionary (0 for all but the circuit-tracer set
and the CLT):
    counts_{l}   uint16 [N_ROWS]          features active in each row
    indices_{l}  uint8  [sum(counts)]     their ids, row after row (d_sae = 256)
    values_{l}   fp32   [sum(counts)]     their activations
    decode_{l}   fp32   [N_DECODE, d_out] the reference package's output (with skip connection) for the first
                                          N_DECODE rows
tests/dictionaries/test_parity.py compares `ll.load_dictionary` on the folders against these, importing no
reference package.

The weights are drawn at random, stored in bf16, then set so that each feature fires on a chosen share of the
rows (3-20%, ~29 of 256 features a row): each encoder bias (or threshold) is that quantile of the feature's
projection over the inputs. The reference outputs are computed in fp32 from the files as the package reads
them back.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # its eager decoder on CPU

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "dictionaries" / "fixtures"
D_SAE = 256
K = 32
N_DECODE = 64
RESID, MLP0, MLP1 = "blocks.1.hook_resid_post", "blocks.0.mlp.hook_in", "blocks.1.mlp.hook_in"
VERSIONS = {"sae-lens": "6.54.12", "eai-sparsify": "1.3.3", "circuit-tracer": "0.5.0"}

gen = torch.Generator().manual_seed(2026)


# --------------------------------------------------------------------------------------------------- helpers
def load_inputs() -> dict[str, torch.Tensor]:
    arrays = np.load(FIXTURES / "inputs.npz")
    out = {}
    for site in (RESID, MLP0, MLP1):
        bits = (arrays[f"{site}.hi"].astype(np.uint32) << 24) | (arrays[f"{site}.lo"].astype(np.uint32) << 16)
        out[site] = torch.from_numpy(bits.view(np.float32).copy())
    return out


def bf16(t: torch.Tensor) -> torch.Tensor:
    """t rounded to bf16, kept in fp32: what the bf16 files will hold."""
    return t.to(torch.bfloat16).float()


def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * scale


def encoder_directions(d_in: int) -> torch.Tensor:
    w = randn(d_in, D_SAE)
    return bf16(w / w.norm(dim=0))  # [d_in, d_sae], unit columns


def firing_quantiles(proj: torch.Tensor, low=0.03, high=0.2) -> torch.Tensor:
    """Per feature, the value its projection [N_ROWS, d_sae] exceeds on a share of rows drawn in [low, high]."""
    rates = low + (high - low) * torch.rand(proj.shape[1], generator=gen)
    ranks = ((1 - rates) * (proj.shape[0] - 1)).long()
    return proj.sort(dim=0).values[ranks, torch.arange(proj.shape[1])]


def decoder_rows(d_out: int, x: torch.Tensor) -> torch.Tensor:
    # ~30 active features of activation ~1 rebuild a vector of the inputs' typical norm
    return bf16(randn(D_SAE, d_out, scale=float(x.norm(dim=-1).mean()) / (30 * d_out**0.5)))


def skip_matrix(d: int) -> torch.Tensor:
    return bf16(randn(d, d, scale=0.3 / d**0.5))


def sparse(acts: torch.Tensor, layer: int = 0) -> dict[str, np.ndarray]:
    mask = acts != 0
    return {
        f"counts_{layer}": mask.sum(1).numpy().astype(np.uint16),
        f"indices_{layer}": mask.nonzero()[:, 1].numpy().astype(np.uint8),
        f"values_{layer}": acts[mask].numpy().astype(np.float32),
    }


def reference(acts: torch.Tensor, decoded: torch.Tensor, layer: int = 0) -> dict[str, np.ndarray]:
    return sparse(acts.detach().float(), layer) | {f"decode_{layer}": decoded.detach().float()[:N_DECODE].numpy()}


def fresh(name: str) -> Path:
    folder = FIXTURES / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


# --------------------------------------------------------------------------------------------------- SAELens
def saelens(name: str, architecture: str, x: torch.Tensor, site: str, site_out: str | None = None):
    from sae_lens import SAE
    from sae_lens.saes.gated_sae import GatedSAE, GatedSAEConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig
    from sae_lens.saes.transcoder import SkipTranscoder, SkipTranscoderConfig, Transcoder, TranscoderConfig

    d_in = d_out = x.shape[1]
    transcoder = "transcoder" in architecture
    metadata = SAEMetadata(hook_name=site, model_name="SmolLM2-135M-Instruct")
    if transcoder:
        metadata = SAEMetadata(hook_name=site, hook_name_out=site_out, model_name="SmolLM2-135M-Instruct")
    common = {"d_in": d_in, "d_sae": D_SAE, "dtype": "bfloat16", "metadata": metadata}
    classes = {
        "standard": (StandardSAE, StandardSAEConfig(**common)),
        "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig(**common)),
        "topk": (TopKSAE, TopKSAEConfig(**common, k=K)),
        "gated": (GatedSAE, GatedSAEConfig(**common)),
        "transcoder": (Transcoder, TranscoderConfig(**common, d_out=d_out, apply_b_dec_to_input=False)),
        "skip_transcoder": (SkipTranscoder, SkipTranscoderConfig(**common, d_out=d_out, apply_b_dec_to_input=False)),
    }
    cls, cfg = classes[architecture]
    b_dec = torch.zeros(d_out) if transcoder else bf16(x.mean(0))  # an SAE's input is centred on b_dec
    W_enc = encoder_directions(d_in)
    proj = (x - b_dec) @ W_enc
    cut = firing_quantiles(proj, 0.1, 0.3) if architecture == "topk" else firing_quantiles(proj)
    spread = proj.std(0)
    state = {"W_enc": W_enc, "W_dec": decoder_rows(d_out, x), "b_dec": b_dec}
    if architecture == "gated":
        r_mag = bf16(randn(D_SAE, scale=0.1))
        state |= {"b_gate": bf16(-cut), "r_mag": r_mag, "b_mag": bf16(-cut * r_mag.exp() + 0.1 * spread)}
    elif architecture == "jumprelu":
        # pre = proj + b_enc crosses the threshold on the chosen share of rows; the threshold is positive
        state |= {"b_enc": bf16(-cut + 0.5 * spread), "threshold": bf16(0.5 * spread)}
    else:
        state["b_enc"] = bf16(-cut)
    if architecture == "skip_transcoder":
        state["W_skip"] = skip_matrix(d_in)
    sae = cls(cfg)
    sae.load_state_dict({key: value.to(torch.bfloat16) for key, value in state.items()})
    folder = fresh(name) / "sae"
    sae.save_model(folder)

    ref = SAE.load_from_disk(folder, dtype="float32")
    with torch.no_grad():
        acts = ref.encode(x)
        return folder, reference(acts, ref(x))


# -------------------------------------------------------------------------------------------------- sparsify
def sparsify(name: str, hookpoint: str, x: torch.Tensor, *, transcode=False, skip=False):
    from sparsify import SparseCoder, SparseCoderConfig

    d_in = x.shape[1]
    cfg = SparseCoderConfig(num_latents=D_SAE, k=K, transcode=transcode, skip_connection=skip)
    coder = SparseCoder(d_in, cfg, dtype=torch.bfloat16)
    b_dec = torch.zeros(d_in) if transcode else bf16(x.mean(0))
    W_enc = encoder_directions(d_in)
    cut = firing_quantiles((x - b_dec) @ W_enc, 0.1, 0.3)
    state = {"encoder.weight": W_enc.T.contiguous(), "encoder.bias": bf16(-cut), "W_dec": decoder_rows(d_in, x)}
    state["b_dec"] = b_dec
    if skip:
        state["W_skip"] = skip_matrix(d_in)
    coder.load_state_dict({key: value.to(torch.bfloat16) for key, value in state.items()})
    folder = fresh(name) / hookpoint  # sparsify names a dictionary's folder after its hookpoint
    coder.save_to_disk(folder)

    ref = SparseCoder.load_from_disk(folder).float()
    with torch.no_grad():
        top_acts, top_indices, _ = ref.encode(x)
        acts = torch.zeros(len(x), D_SAE).scatter(-1, top_indices, top_acts)
        decoded = ref.decode(top_acts, top_indices)
        if skip:
            decoded = decoded + x @ ref.W_skip.mT
    return folder, reference(acts, decoded)


# -------------------------------------------------------------------------------------------- circuit-tracer
def jumprelu_layer(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """W_enc [d_sae, d_model], b_enc, threshold: circuit-tracer's JumpReLU (pre * (pre > threshold))."""
    W_enc = encoder_directions(x.shape[1])
    proj = x @ W_enc
    cut, spread = firing_quantiles(proj), proj.std(0)
    return {"W_enc": W_enc.T.contiguous(), "b_enc": bf16(-cut + 0.5 * spread), "threshold": bf16(0.5 * spread)}


def write_yaml(path: Path, config: dict) -> None:
    import yaml

    path.write_text(yaml.dump(config))


def circuit_tracer_set(name: str, xs: list[torch.Tensor]):
    from circuit_tracer.transcoder.activation_functions import JumpReLU
    from circuit_tracer.transcoder.single_layer_transcoder import (
        SingleLayerTranscoder,
        TranscoderSet,
        load_transcoder_set,
    )

    d_model = xs[0].shape[1]
    transcoders = {}
    for layer, x in enumerate(xs):
        enc = jumprelu_layer(x)
        transcoder = SingleLayerTranscoder(
            d_model,
            D_SAE,
            JumpReLU(enc["threshold"].to(torch.bfloat16), 0.1),
            layer,
            skip_connection=True,
            device=torch.device("cpu"),
            dtype=torch.bfloat16,
        )
        state = {"W_enc": enc["W_enc"], "b_enc": enc["b_enc"], "W_dec": decoder_rows(d_model, x)}
        state |= {"b_dec": bf16(randn(d_model, scale=0.05)), "W_skip": skip_matrix(d_model)}
        state["activation_function.threshold"] = enc["threshold"]
        transcoder.load_state_dict({key: value.to(torch.bfloat16) for key, value in state.items()})
        transcoders[layer] = transcoder
    hooks = {"feature_input_hook": "mlp.hook_in", "feature_output_hook": "hook_mlp_out"}
    folder = fresh(name) / "transcoders"
    TranscoderSet(transcoders, **hooks).to_safetensors(str(folder))
    write_yaml(folder / "config.yaml", {"model_kind": "transcoder_set", "scan": "llama-lens-fixture"} | hooks)

    paths = {layer: str(folder / f"layer_{layer}.safetensors") for layer in range(len(xs))}
    ref = load_transcoder_set(paths, scan="fixture", **hooks, device=torch.device("cpu"), dtype=torch.float32)
    out = {}
    with torch.no_grad():
        for layer, x in enumerate(xs):
            acts = ref[layer].encode(x)
            out |= reference(acts, ref[layer].decode(acts, x), layer)
    return folder, out


def circuit_tracer_clt(name: str, xs: list[torch.Tensor]):
    from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder, load_clt

    n_layers, d_model = len(xs), xs[0].shape[1]
    hooks = {"feature_input_hook": "mlp.hook_in", "feature_output_hook": "mlp.hook_out"}
    clt = CrossLayerTranscoder(
        n_layers, D_SAE, d_model, activation_function="jump_relu", lazy_decoder=False, **hooks,
        device=torch.device("cpu"), dtype=torch.bfloat16,
    )  # fmt: skip
    layers = [jumprelu_layer(x) for x in xs]
    state = {
        "W_enc": torch.stack([layer["W_enc"] for layer in layers]),
        "b_enc": torch.stack([layer["b_enc"] for layer in layers]),
        "b_dec": bf16(randn(n_layers, d_model, scale=0.05)),
        "activation_function.threshold": torch.stack([layer["threshold"] for layer in layers])[:, None],
    }
    for source, x in enumerate(xs):  # each feature writes to its own layer and every later one
        rows = torch.stack([decoder_rows(d_model, x) for _ in range(n_layers - source)], dim=1)
        state[f"W_dec.{source}"] = rows
    clt.load_state_dict({key: value.to(torch.bfloat16) for key, value in state.items()})
    folder = fresh(name) / "clt"
    clt.to_safetensors(str(folder))
    write_yaml(folder / "config.yaml", {"model_kind": "cross_layer_transcoder", "scan": "llama-lens-fixture"} | hooks)

    ref = load_clt(str(folder), **hooks, device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=True)
    x = torch.stack(xs)
    with torch.no_grad():
        acts = ref.encode(x)  # [n_layers, N_ROWS, d_sae]
        decoded = ref.decode(acts[:, :N_DECODE].to_sparse())  # [n_layers, N_DECODE, d_model]
    out = {}
    for layer in range(n_layers):
        out |= reference(acts[layer], decoded[layer], layer)
    return folder, out


# ----------------------------------------------------------------------------------------------- Llama Scope
def llama_scope(name: str, x: torch.Tensor, site: str):
    """Written by hand in Llama Scope's layout (no package writes it); read back by SAELens' Llama Scope loader,
    with the dataset-norm scaling folded in as SAE.from_pretrained does for Llama Scope releases."""
    from sae_lens import SAE
    from sae_lens.loading import pretrained_sae_loaders
    from sae_lens.saes import sae as sae_module
    from safetensors.torch import save_file

    d_model = x.shape[1]
    norm = float(bf16(x.norm(dim=-1).mean()))  # dataset_average_activation_norm, in == out for an SAE
    scale = d_model**0.5 / norm
    threshold = 0.25
    W_enc = encoder_directions(d_model)
    # SAELens: pre = x @ (W_enc * scale) + b_enc, firing where pre > threshold * scale
    b_enc = bf16(scale * threshold - scale * firing_quantiles(x @ W_enc))
    folder = fresh(name) / "Llama3_1-8B-Base-L1R-8x"
    (folder / "checkpoints").mkdir(parents=True)
    tensors = {
        "encoder.weight": W_enc.T.contiguous(),
        "encoder.bias": b_enc,
        "decoder.weight": decoder_rows(d_model, x * scale).T.contiguous(),
        "decoder.bias": bf16(randn(d_model, scale=0.05)),
    }
    tensors = {key: value.to(torch.bfloat16) for key, value in tensors.items()}
    save_file(tensors, folder / "checkpoints" / "final.safetensors")
    hyperparams = {
        "d_model": d_model,
        "d_sae": D_SAE,
        "hook_point_in": site,
        "hook_point_out": site,
        "act_fn": "jumprelu",
        "jump_relu_threshold": threshold,
        "norm_activation": "dataset-wise",
        "dataset_average_activation_norm": {"in": norm, "out": norm},
        "top_k": -1,
        "sparsity_include_decoder_norm": True,
    }
    (folder / "hyperparams.json").write_text(json.dumps(hyperparams, indent=2))

    def local_download(repo_id, filename, subfolder=None, **_):
        return str(folder.parent / (f"{subfolder}/{filename}" if subfolder else filename))

    pretrained_sae_loaders.hf_hub_download = local_download
    sae_module.get_norm_scaling_factor = lambda release, sae_id: scale
    ref = SAE.from_pretrained_with_cfg_and_sparsity(
        "local/llama-scope-fixture", folder.name, converter=pretrained_sae_loaders.llama_scope_sae_huggingface_loader
    )[0]
    with torch.no_grad():
        acts = ref.encode(x)
        return folder, reference(acts, ref(x))


# ------------------------------------------------------------------------------------------------------ main
def main() -> None:
    torch.set_grad_enabled(False)
    inputs = load_inputs()
    resid, mlp0, mlp1 = inputs[RESID], inputs[MLP0], inputs[MLP1]
    out1 = "blocks.1.hook_mlp_out"
    jobs = {
        "saelens_standard": (lambda n: saelens(n, "standard", resid, RESID), [RESID]),
        "saelens_jumprelu": (lambda n: saelens(n, "jumprelu", resid, RESID), [RESID]),
        "saelens_topk": (lambda n: saelens(n, "topk", resid, RESID), [RESID]),
        "saelens_gated": (lambda n: saelens(n, "gated", resid, RESID), [RESID]),
        "saelens_transcoder": (lambda n: saelens(n, "transcoder", mlp1, MLP1, out1), [MLP1]),
        "saelens_skip_transcoder": (lambda n: saelens(n, "skip_transcoder", mlp1, MLP1, out1), [MLP1]),
        "sparsify_sae": (lambda n: sparsify(n, "layers.1", resid), [RESID]),
        "sparsify_transcoder": (lambda n: sparsify(n, "layers.1.mlp", mlp1, transcode=True), [MLP1]),
        "sparsify_skip": (lambda n: sparsify(n, "layers.1.mlp", mlp1, transcode=True, skip=True), [MLP1]),
        "circuit_tracer_set": (lambda n: circuit_tracer_set(n, [mlp0, mlp1]), [MLP0, MLP1]),
        "circuit_tracer_clt": (lambda n: circuit_tracer_clt(n, [mlp0, mlp1]), [MLP0, MLP1]),
        "llama_scope": (lambda n: llama_scope(n, resid, RESID), [RESID]),
    }
    only = set(sys.argv[1:])
    manifest_path = FIXTURES / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    for name, (write, sites) in jobs.items():
        if only and name not in only:
            continue
        folder, ref = write(name)
        np.savez_compressed(FIXTURES / name / "reference.npz", **ref)
        package = next(p for p in VERSIONS if p.split("-")[-1] in name or (p == "sae-lens" and "llama" in name))
        active = [len(ref[key]) / len(ref[key.replace("values", "counts")]) for key in ref if key.startswith("values")]
        manifest[name] = {
            "folder": str(folder.relative_to(FIXTURES)),
            "inputs": sites,
            "topk": name in ("saelens_topk", "sparsify_sae", "sparsify_transcoder", "sparsify_skip"),
            "reference": f"{package} {VERSIONS[package]}",
            "active_per_row": [round(a, 1) for a in active],
        }
        size = sum(p.stat().st_size for p in (FIXTURES / name).rglob("*") if p.is_file())
        print(f"{name:26s} {size / 1e6:5.2f} MB  active per row {manifest[name]['active_per_row']}")
    manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    total = sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file())
    print(f"fixtures: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
