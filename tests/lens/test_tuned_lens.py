"""The tuned lens: identity = logit lens, training lowers the KL, saving and loading (ours and the tuned-lens
package's format), and the texts it trains on."""

from __future__ import annotations

import json

import pytest
import torch
from support.models import CharTokenizer, assert_same_top_k

import llama_lens as ll
from llama_lens.data.texts import generated_texts, read_texts
from llama_lens.errors import ArgumentError, ArgumentTypeError
from llama_lens.lens.logit import tuned_lens_readout
from llama_lens.lens.train import kl_sums, mean_kl, token_rows
from llama_lens.lens.tuned import TunedLens, translator_labels
from llama_lens.testing import write_hf_checkpoint

PROMPTS = ["The cat sat on the mat.", "Paris is in France"]
ALL_READOUTS = ("embed", "resid_pre", "resid_mid", "resid_post")
TRAIN = dict(tokens_per_step=64, seq_len=32, batch_tokens=32, chunk_size=16, progress=False)


@pytest.fixture(scope="module")
def model(char_model):
    return char_model(seed=3, n_layers=3)


def random_lens(model, readout=("embed", "resid_post"), seed=0):
    lens = TunedLens.for_model(model, readout)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in lens.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return lens


def test_labels_follow_the_package_layout():
    assert translator_labels(3) == ["embed", "0_post", "1_post"]
    assert translator_labels(2, ("resid_mid", "resid_post")) == ["0_mid", "0_post", "1_mid"]
    assert translator_labels(2, "resid_pre") == ["embed", "0_post"]
    with pytest.raises(ValueError, match="unknown read-out"):
        translator_labels(2, "resid_postt")


def test_identity_translators_return_the_residual_stream_bit_for_bit(model):
    lens = TunedLens.for_model(model, ALL_READOUTS)
    _, cache = model.run_with_cache(model.to_tokens(PROMPTS))
    for name in ["hook_embed"] + [f"blocks.{i}.hook_resid_{k}" for i in range(3) for k in ("pre", "mid", "post")]:
        assert torch.equal(lens.translate_hook(cache[name], name), cache[name]), name
    bf16 = cache["blocks.1.hook_resid_post"].bfloat16()
    assert torch.equal(lens.translate(bf16, 1), bf16)


def test_identity_lens_reads_out_what_the_logit_lens_does(model):
    lens = TunedLens.for_model(model, ALL_READOUTS)
    readout = ["embed", "resid_mid", "resid_post"]
    ours = ll.logit_lens(model, PROMPTS, target="e", lens=lens, readout=readout, top_k=5)
    ref = ll.logit_lens(model, PROMPTS, target="e", readout=readout, top_k=5, keep_logits=True)
    assert ours.labels == ref.labels and ours.layers == ref.layers and ours.readouts == ref.readouts
    assert torch.equal(ours.tokens, ref.tokens) and ours.str_tokens == ref.str_tokens
    # Same vectors, same ln_final and unembedding; the logit lens multiplies in vocabulary blocks, so values
    # agree to float rounding and ids wherever values are not tied.
    assert_same_top_k(
        ours.top_ids, ours.top_logits, ref.top_logits, expected_ids=ref.top_ids, scores=ref.logits, atol=1e-4
    )
    for name in ("top_probs", "entropy", "kl_to_final", "target_probs", "target_logits"):
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name), atol=1e-4, rtol=1e-4, msg=name)
    # Ranks may differ only by logits within rounding of the target's.
    near = ((ref.logits - ref.target_logits).abs() < 1e-4).sum(-1, keepdim=True) - 1
    assert bool(((ours.target_ranks - ref.target_ranks).abs() <= near).all())
    # The last read-out is the model's own output in both.
    assert torch.equal(ours.top_logits[:, -1], ref.top_logits[:, -1])
    assert bool((ours.kl_to_final[:, -1] == 0).all())
    assert ours.lens_kind == "tuned" and ref.lens_kind == "logit"
    # The old entry point is the same call, with a DeprecationWarning.
    with pytest.warns(DeprecationWarning, match="tuned_lens_readout is deprecated"):
        again = tuned_lens_readout(model, PROMPTS, target="e", lens=lens, readout=readout, top_k=5)
    assert torch.equal(again.top_ids, ours.top_ids)
    with pytest.warns(DeprecationWarning, match="LensResult.lens is deprecated"):
        assert again.lens == "tuned"


def test_a_trained_translator_changes_the_readout_as_its_formula_says(model):
    lens = random_lens(model)
    result = ll.logit_lens(model, PROMPTS[0], lens=lens, top_k=3, positions=[-1])
    _, cache = model.run_with_cache(model.to_tokens(PROMPTS[0]))
    x = cache["blocks.0.hook_resid_post"][0, -1]
    translator = lens.translators["0_post"]
    expected = model.unembed(model.ln_final(x + x @ translator.weight.T + translator.bias))  # [d_vocab]
    row = result.labels.index("0_post")
    assert_same_top_k(
        result.top_ids[0, row, 0], result.top_logits[0, row, 0], expected.topk(3).values, scores=expected, atol=1e-5
    )


def test_readout_refuses_what_the_lens_lacks(model, char_model):
    lens = TunedLens.for_model(model)
    with pytest.raises(ValueError, match="no translator for resid_mid of layer 0"):
        ll.logit_lens(model, PROMPTS[0], lens=lens, readout="resid_mid")
    with pytest.raises(ValueError, match="d_model=64 and 3 layers"):
        ll.logit_lens(char_model(n_layers=2), PROMPTS[0], lens=lens)


def test_loss_is_the_logit_lens_kl(model):
    # kl_sums with an identity lens against logit_lens's kl_to_final: two implementations of the same KL.
    rows = token_rows(model.tokenizer, generated_texts(4, seed=2), seq_len=24, max_rows=2)
    lens = TunedLens.for_model(model)
    ref = ll.logit_lens(model, rows)
    expected = ref.kl_to_final.mean(dim=(0, 2))  # [n_readouts]: embed, 0_post, 1_post, 2_post
    got = mean_kl(lens, model, texts=generated_texts(4, seed=2), seq_len=24, max_rows=2)
    torch.testing.assert_close(torch.tensor([got[label] for label in lens.labels]), expected[:-1], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_training_lowers_the_held_out_kl(model):
    texts = generated_texts(40, seed=0)
    lens = TunedLens.train(model, texts, max_steps=30, **TRAIN)
    assert len(lens.losses) == 30 and lens.info["steps"] == 30
    assert sum(lens.losses[-5:]) < 0.8 * sum(lens.losses[:5])
    held_out = generated_texts(10, seed=1)
    before = mean_kl(TunedLens.for_model(model), model, texts=held_out, seq_len=32, max_rows=4)
    after = mean_kl(lens, model, texts=held_out, seq_len=32, max_rows=4)
    for label in lens.labels:
        assert after[label] < 0.8 * before[label], (label, before[label], after[label])
    assert not any(p.requires_grad for p in lens.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_one_step_moves_the_translators_as_sgd_says(model):
    # One step from the identity: momentum buffers start at the gradient, so Nesterov SGD with weight decay 0
    # moves each parameter by -lr * (1 - momentum) * (1 + momentum) * grad (after clipping, here not reached).
    texts = generated_texts(4, seed=5)
    lens = TunedLens.train(model, texts, max_steps=1, weight_decay=0.0, max_grad_norm=1e9, **TRAIN)
    rows = token_rows(model.tokenizer, texts, seq_len=32, max_rows=2)
    fresh = TunedLens.for_model(model)
    fresh.translators.requires_grad_(True)
    from llama_lens.lens.train import collect_streams

    resid, final = collect_streams(model, rows, labels=fresh.labels)
    kl_sums(fresh, model, resid=resid, final_logits=final, chunk_size=16, scale=1.0 / rows.numel())
    for name, param in fresh.translators.named_parameters():
        expected = -1.0 * (1 - 0.9) * (1 + 0.9) * param.grad
        torch.testing.assert_close(lens.state_dict()[name], expected, atol=1e-6, rtol=1e-4, msg=name)


def test_streamed_model_trains_the_same_lens(model, tmp_path):
    path = write_hf_checkpoint(tmp_path / "ckpt", model.cfg, {k: v.detach() for k, v in model.state_dict().items()})
    streamed = ll.load(path, stream=True, index_cache=False, progress=False)
    streamed.tokenizer = CharTokenizer()
    texts = generated_texts(8, seed=0)
    ours = TunedLens.train(model, texts, max_steps=3, **TRAIN)
    theirs = TunedLens.train(streamed, texts, max_steps=3, **TRAIN)
    for name, tensor in ours.state_dict().items():
        torch.testing.assert_close(theirs.state_dict()[name], tensor, atol=1e-5, rtol=1e-4, msg=name)


def test_training_refuses_a_partial_model_and_bad_settings(model, tmp_path):
    path = write_hf_checkpoint(tmp_path / "ckpt", model.cfg, {k: v.detach() for k, v in model.state_dict().items()})
    partial = ll.load(path, layers=range(0, 2), index_cache=False, progress=False)
    partial.tokenizer = CharTokenizer()
    with pytest.raises(ValueError, match="load it whole"):
        TunedLens.train(partial, ["some text here"], max_steps=1)
    with pytest.raises(ValueError, match="max_steps must be an integer > 0"):
        TunedLens.train(model, ["some text here"], max_steps=0)
    with pytest.raises(ValueError, match="momentum"):
        TunedLens.train(model, ["some text here"], momentum=1.0)
    with pytest.raises(ValueError, match="fewer than seq_len=256"):
        TunedLens.train(model, ["short"], max_steps=1, progress=False)


def test_save_and_load_round_trip_bit_for_bit(model, tmp_path):
    lens = random_lens(model, ("embed", "resid_mid", "resid_post"))
    lens.losses = [3.5, 2.25]
    lens.info = {"note": "x"}
    folder = lens.save(tmp_path / "lens")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "params.safetensors"]
    loaded = TunedLens.load(folder)
    assert loaded.labels == lens.labels and loaded.losses == lens.losses and loaded.info == lens.info
    for name, tensor in lens.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert TunedLens.load(folder / "config.json").labels == lens.labels


def write_package_lens(folder, n_layers, d_model, seed=0, dtype=torch.float32):
    """A lens as the tuned-lens package's TunedLens.save writes it: a ModuleList of Linear translators (one per
    hidden_states[k], k < num_hidden_layers) saved with torch.save(state_dict) as params.pt, and its
    TunedLensConfig as config.json."""
    torch.manual_seed(seed)
    translators = torch.nn.ModuleList([torch.nn.Linear(d_model, d_model, dtype=dtype) for _ in range(n_layers)])
    folder.mkdir(parents=True)
    torch.save(translators.state_dict(), folder / "params.pt")
    config = {
        "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M",
        "d_model": d_model,
        "num_hidden_layers": n_layers,
        "bias": True,
        "base_model_revision": None,
        "unembed_hash": "0123abcd",
        "lens_type": "linear_tuned_lens",
    }
    (folder / "config.json").write_text(json.dumps(config))
    return translators


def test_a_tuned_lens_package_file_loads_and_translates_the_same(model, tmp_path):
    translators = write_package_lens(tmp_path / "pkg", 3, 64)
    lens = TunedLens.load(tmp_path / "pkg")
    assert lens.labels == ["embed", "0_post", "1_post"]
    assert lens.info["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M"
    _, cache = model.run_with_cache(model.to_tokens(PROMPTS))
    # The package's transform_hidden: h + translator_k(h), k over hidden_states (0 = embedding, i + 1 = layer i).
    streams = [cache["hook_embed"], cache["blocks.0.hook_resid_post"], cache["blocks.1.hook_resid_post"]]
    with torch.no_grad():
        for k, stream in enumerate(streams):
            expected = stream + translators[k](stream)
            got = (
                lens.translate(stream, 0, readout="embed")
                if k == 0
                else lens.translate(stream, k - 1, readout="resid_post")
            )
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
            assert torch.equal(lens.translate_hook(stream, f"blocks.{k}.hook_resid_pre"), got)
    # Saved again in our format, it reloads identical.
    again = TunedLens.load(lens.save(tmp_path / "ours"))
    for name, tensor in lens.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor)


def test_package_lens_in_half_precision_is_cast_to_float32(tmp_path):
    translators = write_package_lens(tmp_path / "pkg", 2, 8, dtype=torch.bfloat16)
    lens = TunedLens.load(tmp_path / "pkg")
    assert torch.equal(lens.translators["embed"].weight, translators[0].weight.float())
    assert lens.translators["embed"].weight.dtype == torch.float32


def test_bad_lens_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        TunedLens.load(tmp_path)
    write_package_lens(tmp_path / "pkg", 2, 8)
    (tmp_path / "pkg" / "params.pt").unlink()
    with pytest.raises(FileNotFoundError, match="params.pt is missing"):
        TunedLens.load(tmp_path / "pkg")
    translators = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(3)])
    torch.save(translators.state_dict(), tmp_path / "pkg" / "params.pt")
    with pytest.raises(ll.LensFileError, match="unexpected key '2.weight'"):
        TunedLens.load(tmp_path / "pkg")
    torch.save({"0.weight": torch.zeros(8, 4)}, tmp_path / "pkg" / "params.pt")
    with pytest.raises(ll.LensFileError, match=r"'embed.weight' is \(8, 4\), expected \(8, 8\)|missing tensors"):
        TunedLens.load(tmp_path / "pkg")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text('{"hidden": 3}')
    with pytest.raises(ll.LensFileError, match="neither a llama_lens tuned lens"):
        TunedLens.load(tmp_path / "odd")
    (tmp_path / "odd" / "config.json").write_text("{not json")
    with pytest.raises(ll.LensFileError, match="not valid JSON"):
        TunedLens.load(tmp_path / "odd")


def test_texts_from_lists_files_and_parquet(tmp_path):
    assert read_texts(["a b", " ", "c"]) == ["a b", "c"]
    (tmp_path / "t.txt").write_text("First  paragraph\nwraps here.\n\nSecond one.\n\n\n")
    assert read_texts(tmp_path / "t.txt") == ["First paragraph wraps here.", "Second one."]
    assert read_texts(str(tmp_path / "t.txt")) == ["First paragraph wraps here.", "Second one."]
    import pandas as pd

    pd.DataFrame({"body": ["one", None, "two"], "n": [1, 2, 3]}).to_parquet(tmp_path / "t.parquet")
    assert read_texts(tmp_path / "t.parquet", column="body") == ["one", "two"]
    with pytest.raises(ValueError, match="no column 'text'"):
        read_texts(tmp_path / "t.parquet")
    with pytest.raises(ValueError, match="holds int64, not text"):
        read_texts(tmp_path / "t.parquet", column="n")
    with pytest.raises(ValueError, match="not a path: wrap a single text in a list"):
        read_texts("just one text")
    with pytest.raises(FileNotFoundError):
        read_texts(tmp_path / "missing.txt")


def test_generated_texts_are_deterministic_and_ascii():
    assert generated_texts(5, seed=1) == generated_texts(5, seed=1)
    assert generated_texts(5, seed=1) != generated_texts(5, seed=2)
    assert all(text.isascii() for text in generated_texts(50, seed=0))


def test_token_rows_start_with_bos():
    tokenizer = CharTokenizer()
    rows = token_rows(tokenizer, ["abcdef", "ghij"], seq_len=4)
    # stream: <s> a b c d e f <s> g h i j -> [<s> a b c] [<s> d e f] [<s> g h i]; "j" is left over
    assert rows.tolist() == [[1, 97, 98, 99], [1, 100, 101, 102], [1, 103, 104, 105]]


def test_token_rows_train_as_the_texts_they_come_from(model):
    texts = generated_texts(6, seed=4)
    rows = token_rows(model.tokenizer, texts, seq_len=32, max_rows=4)
    settings = TRAIN | dict(shuffle=False)
    from_texts = TunedLens.train(model, texts, max_steps=2, **settings)
    from_rows = TunedLens.train(model, rows, max_steps=2, **settings)
    for name, tensor in from_texts.state_dict().items():
        assert torch.equal(from_rows.state_dict()[name], tensor), name
    with pytest.raises(ValueError, match=r"LongTensor \[n_rows, seq_len=32\]"):
        TunedLens.train(model, rows[:, :16], max_steps=1, **settings)


def test_train_config_holds_the_settings_once(model):
    from llama_lens.lens.train import TrainConfig

    with pytest.raises(ArgumentTypeError, match="unknown training option 'max_step'; did you mean 'max_steps'"):
        TunedLens.train(model, ["some text here"], max_step=1)
    with pytest.raises(ValueError, match="unknown read-out"):
        TrainConfig(readout="resid_postt")
    with pytest.raises(ArgumentError, match="momentum must lie in"):
        TrainConfig(momentum=1.0)
    rows = torch.randint(0, model.cfg.d_vocab, (4, 16))
    lens = TunedLens.train(model, rows, max_steps=2, seq_len=16, tokens_per_step=32, batch_tokens=32, progress=False)
    assert lens.info["max_steps"] == 2 and lens.info["readout"] == ["embed", "resid_post"] and lens.info["lr"] == 1.0
    assert lens.info["steps"] == 2 and lens.info["tokens_per_step"] == 32


def test_readout_labels_and_hooks_name_each_other():
    from llama_lens.lens.readouts import READOUTS, hook_readout, label_readout, readout_hook, readout_label

    for layer in (0, 3):
        for kind in READOUTS:
            layer_of = 0 if kind == "embed" else layer
            assert label_readout(readout_label(layer_of, kind)) == (layer_of, kind)
            assert hook_readout(readout_hook(layer_of, kind)) == (layer_of, kind)
    with pytest.raises(ArgumentError, match="not a residual stream hook"):
        hook_readout("blocks.0.attn.hook_z")
