"""The activation store (llama_lens.data.store): rows written by the dataset runner against
`run_with_cache` on each prompt alone, both dataset units, the dtype, a DataLoader, and refused hooks."""

from __future__ import annotations

import json

import pytest
import torch
from support.models import CharTokenizer

import llama_lens as ll
from llama_lens.errors import UnknownNameError
from llama_lens.testing import write_hf_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["the cat sat", "a", "hello world, again", "xyz", "once upon a time", "ab cd", "q r s t u v"]
HOOKS = ["hook_embed", "blocks.0.hook_resid_post", "blocks.1.attn.hook_z"]


@pytest.fixture(scope="module")
def loaded_char_model(char_model, tmp_path_factory):
    """`char_model()` written as a Hugging Face checkpoint and loaded back with `ll.load`, as a user's would be."""
    source = char_model()
    path = write_hf_checkpoint(tmp_path_factory.mktemp("char") / "ckpt", source.cfg, source.state_dict())
    return ll.load(path, tokenizer=CharTokenizer(), progress=False)


def cached(model, text: str, names):
    """Each hook's activations [pos, ...] for the prompt alone (no batch, no padding)."""
    _, cache = model.run_with_cache(model.to_tokens(text), names_filter=names)
    return {name: cache[name][0] for name in names}


def test_store_round_trip_per_token_and_per_prompt(loaded_char_model, tmp_path):
    # Batches of 3 prompts of different lengths are left-padded: each stored row must be the prompt's own.
    data = ll.store_activations(
        loaded_char_model, PROMPTS, hook_names=HOOKS, out=tmp_path / "run", batch_size=3, shard_size=4, progress=False
    )
    n_tokens = [len(p) + 1 for p in PROMPTS]  # BOS + one token per character
    assert len(data) == sum(n_tokens)
    expected = {i: cached(loaded_char_model, text, HOOKS) for i, text in enumerate(PROMPTS)}
    seen = []
    for item in data:
        seen.append((item["prompt"], item["position"]))
        for name in HOOKS:
            torch.testing.assert_close(item[name], expected[item["prompt"]][name][item["position"]], atol=1e-5, rtol=0)
    assert seen == [(i, p) for i, n in enumerate(n_tokens) for p in range(n)]  # (prompt, position) order

    prompts = ll.ActivationDataset(tmp_path / "run", ["blocks.1.attn.hook_z"], unit="prompt")
    assert len(prompts) == len(PROMPTS)
    for i in range(len(PROMPTS)):
        item = prompts[i]
        assert item["prompt"] == i and item["position"].tolist() == list(range(n_tokens[i]))
        assert set(item) == {"blocks.1.attn.hook_z", "prompt", "position"}
        torch.testing.assert_close(item["blocks.1.attn.hook_z"], expected[i]["blocks.1.attn.hook_z"], atol=1e-5, rtol=0)

    index = json.loads((tmp_path / "run/activations/index.json").read_text())
    assert index["n_tokens"] == sum(n_tokens) and index["n_prompts"] == len(PROMPTS)
    assert index["shapes"]["blocks.1.attn.hook_z"] == [loaded_char_model.cfg.n_heads, loaded_char_model.cfg.d_head]
    assert [s["n_prompts"] for s in index["shards"]] == [4, 3]


def test_store_beside_the_lens_keeps_the_forward_pass_tensor(loaded_char_model, tmp_path):
    # The lens normalizes its read-outs with ln_final a second time; the store keeps the forward pass's call.
    names = ["ln_final.hook_normalized", "blocks.1.hook_resid_mid"]
    run = ll.lens_dataset(
        loaded_char_model, PROMPTS, out=tmp_path / "run", activations=names, activation_positions=[-2, -1],
        activation_dtype="bfloat16", batch_size=4, progress=False,
    )  # fmt: skip
    data = run.activations()
    assert data.index["dtype"] == "BF16"
    for item in data:
        text = PROMPTS[item["prompt"]]
        assert item["position"] in (len(text) - 1, len(text))  # the last two of BOS + characters
        expected = cached(loaded_char_model, text, names)
        for name in names:
            assert item[name].dtype == torch.bfloat16
            want = expected[name][item["position"]].to(torch.bfloat16).float()
            torch.testing.assert_close(item[name].float(), want, atol=1e-5, rtol=1e-2)  # bfloat16's 8 bits


def test_dataloader_batches_rows(loaded_char_model, tmp_path):
    data = ll.store_activations(
        loaded_char_model, PROMPTS, hook_names="blocks.0.hook_resid_pre", out=tmp_path / "run", progress=False
    )
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    batches = list(loader)
    rows = torch.cat([b["blocks.0.hook_resid_pre"] for b in batches])
    assert rows.shape == (len(data), loaded_char_model.cfg.d_model)
    order = torch.cat([b["prompt"] * 1000 + b["position"] for b in batches]).argsort()
    in_order = torch.stack([data[i]["blocks.0.hook_resid_pre"] for i in range(len(data))])
    assert torch.equal(rows[order], in_order)


def test_refused_hooks_and_missing_store(loaded_char_model, tmp_path):
    with pytest.raises(ValueError, match="not one row per token"):
        ll.store_activations(
            loaded_char_model, PROMPTS, hook_names=["blocks.0.attn.hook_pattern"], out=tmp_path / "a", progress=False
        )
    with pytest.raises(UnknownNameError, match="did you mean 'blocks.0.hook_resid_post'"):
        ll.store_activations(
            loaded_char_model, PROMPTS, hook_names=["blocks.0.hook_resid_pots"], out=tmp_path / "a", progress=False
        )
    with pytest.raises(FileNotFoundError, match="index.json is missing"):
        ll.ActivationDataset(tmp_path / "nothing")
    ll.store_activations(loaded_char_model, PROMPTS[:2], hook_names=["hook_embed"], out=tmp_path / "b", progress=False)
    with pytest.raises(UnknownNameError, match="not in the activation store"):
        ll.ActivationDataset(tmp_path / "b", ["blocks.0.hook_resid_post"])
