"""Parity with the reference packages, on files they wrote: `ll.load_dictionary` on each fixture folder of
tests/dictionaries/fixtures/ (written by scripts/parity/record.py with sae-lens, eai-sparsify and circuit-tracer,
from 4,096 real activations of the embedded model) encodes as the package did (max |Δ| ≤ 1e-5, the same
features active; TopK index sets equal but for exact ties) and decodes within 1e-5·‖x‖. No reference package is
imported here. Then, on the embedded model, splicing each kind of fixture in with the error term leaves the
logits within 1e-5 of the plain run."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import llama_lens as ll

FIXTURES = Path(__file__).parent / "fixtures"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
ENCODE_ATOL = 1e-5
DECODE_RTOL = 1e-5  # of the input row's norm


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    """The recorded activations: bf16 bit patterns stored as high and low bytes, read back as exact fp32."""
    arrays = np.load(FIXTURES / "inputs.npz")
    out = {}
    for key in arrays.files:
        if key.endswith(".hi"):
            site = key[: -len(".hi")]
            bits = (arrays[key].astype(np.uint32) << 24) | (arrays[f"{site}.lo"].astype(np.uint32) << 16)
            out[site] = torch.from_numpy(bits.view(np.float32).copy())
    return out


def _reference_acts(ref, layer: int, n_rows: int, d_sae: int) -> torch.Tensor:
    counts = torch.from_numpy(ref[f"counts_{layer}"].astype(np.int64))
    rows = torch.repeat_interleave(torch.arange(n_rows), counts)
    dense = torch.zeros(n_rows, d_sae)
    dense[rows, torch.from_numpy(ref[f"indices_{layer}"].astype(np.int64))] = torch.from_numpy(ref[f"values_{layer}"])
    return dense


def _check_encode(ours: torch.Tensor, theirs: torch.Tensor, pre: torch.Tensor | None, k: int | None) -> None:
    differs = (ours != 0) != (theirs != 0)
    if differs.any():
        # TopK only: a row may pick another of features tied exactly at its k-th largest pre-activation.
        assert k is not None, f"active sets differ in {int(differs.any(1).sum())} rows"
        for row in differs.any(1).nonzero().squeeze(-1).tolist():
            top = pre[row].topk(k + 1).values
            assert top[k - 1] == top[k], f"row {row}: TopK picks other features and the k-th value is no tie"
        return
    assert (ours - theirs).abs().max() <= ENCODE_ATOL


def _check_decode(ours: torch.Tensor, theirs: torch.Tensor, x: torch.Tensor) -> None:
    delta = (ours - theirs).abs().max(-1).values
    assert (delta <= DECODE_RTOL * x.norm(dim=-1)).all(), f"worst |Δ|/‖x‖ {float((delta / x.norm(dim=-1)).max()):.2e}"


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_matches_reference_package(name, inputs):
    entry = MANIFEST[name]
    ref = np.load(FIXTURES / name / "reference.npz")
    loaded = ll.load_dictionary(FIXTURES / entry["folder"])
    xs = [inputs[site] for site in entry["inputs"]]
    n_rows, n_decode = len(xs[0]), len(ref["decode_0"])
    assert n_rows == 4096
    if isinstance(loaded, ll.CrossLayerTranscoder):
        x = torch.stack(xs)
        ours = loaded.encode(x)
        for layer in range(loaded.n_layers):
            _check_encode(ours[layer], _reference_acts(ref, layer, n_rows, loaded.d_sae), None, None)
        decoded = loaded.decode(ours[:, :n_decode])
        for layer in range(loaded.n_layers):
            _check_decode(decoded[layer], torch.from_numpy(ref[f"decode_{layer}"]), xs[layer][:n_decode])
        return
    dictionaries = loaded if isinstance(loaded, list) else [loaded]
    assert len(dictionaries) == len(xs)
    for layer, (dictionary, x) in enumerate(zip(dictionaries, xs)):
        assert dictionary.hook_in == entry["inputs"][layer]
        _, pre = dictionary.encode_pre(x)
        ours = dictionary.encode(x)
        k = dictionary.k if entry["topk"] else None
        _check_encode(ours, _reference_acts(ref, layer, n_rows, dictionary.d_sae), pre, k)
        decoded = dictionary.decode(ours[:n_decode], x[:n_decode])
        _check_decode(decoded, torch.from_numpy(ref[f"decode_{layer}"]), x[:n_decode])


def test_fixtures_are_sparse_and_small():
    """The fixtures fire 20-60 features a row (not half of them), and stay small."""
    for name, entry in MANIFEST.items():
        assert all(20 <= active <= 60 for active in entry["active_per_row"]), name
    total = sum(path.stat().st_size for path in FIXTURES.rglob("*") if path.is_file())
    assert total < 40e6


# ------------------------------------------------------------------------------------ splicing, real model
SPLICE_KINDS = {
    "resid SAE": "saelens_topk",
    "resid SAE, dataset norm": "llama_scope",
    "MLP transcoder": "saelens_transcoder",
    "skip transcoder": "sparsify_skip",
    "per-layer set": "circuit_tracer_set",
    "cross-layer": "circuit_tracer_clt",
}


@pytest.fixture(scope="module")
def demo_model(demo_path):
    return ll.load(demo_path, dtype=torch.float32, progress=False)


@pytest.mark.parametrize("kind", SPLICE_KINDS)
def test_error_term_leaves_the_embedded_models_logits_unchanged(kind, demo_model):
    dictionaries = ll.load_dictionary(FIXTURES / MANIFEST[SPLICE_KINDS[kind]]["folder"])
    tokens = demo_model.to_tokens("The Eiffel Tower is located in the city of Paris, which is in France.")
    plain = demo_model(tokens)
    with ll.spliced(demo_model, dictionaries, use_error_term=True):
        spliced = demo_model(tokens)
    assert (spliced - plain).abs().max() <= 1e-5
    with ll.spliced(demo_model, dictionaries):
        replaced = demo_model(tokens)
    assert (replaced - plain).abs().max() > 1e-3  # without the error term the reconstruction is what runs
