"""`ll.evaluate_dictionary` on tiny models: its metrics equal a plain three-run computation of sae-lens'
definitions, an exact dictionary scores perfectly, sums merge exactly across batches and padding, transcoders
work, and bad input is refused by name. (Parity with sae-lens itself: test_evaluate_parity.py.)"""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from support.dictionaries import write_saelens
from support.models import char_model, tiny_model

import llama_lens as ll
from llama_lens.errors import ArgumentError, ArgumentTypeError, UnknownNameError
from llama_lens.features.evaluate_sums import EvaluationSums, merge

SITE = "blocks.1.hook_resid_pre"
TEXTS = ["the cat sat on the mat", "a dog", "hello world, how are you today?"]


def identity_sae(folder, hook=SITE, d_in=64):
    """relu(x) - relu(-x) = x: a dictionary whose reconstruction is exact."""
    eye = torch.eye(d_in)
    folder.mkdir(parents=True)
    save_file(
        {"W_enc": torch.cat([eye, -eye], 1), "W_dec": torch.cat([eye, -eye], 0), "b_enc": torch.zeros(2 * d_in),
         "b_dec": torch.zeros(d_in)}, folder / "sae_weights.safetensors",
    )  # fmt: skip
    (folder / "cfg.json").write_text(
        f'{{"architecture": "standard", "d_in": {d_in}, "d_sae": {2 * d_in}, "apply_b_dec_to_input": true, '
        f'"metadata": {{"hook_name": "{hook}"}}}}'
    )
    return ll.load_dictionary(folder)


def reference_metrics(model, sae, tokens, ignore):
    """sae-lens' definitions, written out plainly: three separate runs, means over the counted positions."""
    counted = ~torch.isin(tokens, torch.tensor(ignore))
    _, cache = model.run_with_cache(tokens, names_filter=SITE)
    x = cache[SITE]
    acts = sae.encode(x)
    x_hat = sae.decode(acts)

    def replace(act, *, hook):
        return torch.where(counted[..., None], sae(act), act)

    clean = model(tokens)
    with model.hooks([(SITE, replace)]):
        spliced = model(tokens)
    with model.hooks([(SITE, lambda act, *, hook: torch.zeros_like(act))]):
        ablated = model(tokens)
    xs, hs, a = x[counted], x_hat[counted], acts[counted]

    def ce(logits):
        losses = -F.log_softmax(logits[:, :-1], -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
        return losses[counted[:, :-1]].mean().item()

    def kl(logits):
        kl = F.kl_div(F.log_softmax(logits, -1), F.softmax(clean, -1), reduction="none").sum(-1)
        return kl[counted].mean().item()

    variance = (xs.pow(2).sum(-1).mean() - xs.mean(0).pow(2).sum()).item()
    mse = (xs - hs).pow(2).sum(-1).mean().item()
    out = {
        "l0": (a != 0).sum(-1).float().mean().item(),
        "mse": mse,
        "cossim": F.cosine_similarity(xs, hs, dim=-1).mean().item(),
        "explained_variance": 1 - mse / variance,
        "ce_loss_without_sae": ce(clean),
        "ce_loss_with_sae": ce(spliced),
        "ce_loss_with_ablation": ce(ablated),
        "kl_div_with_sae": kl(spliced),
        "kl_div_with_ablation": kl(ablated),
    }
    out["ce_loss_score"] = (out["ce_loss_with_ablation"] - out["ce_loss_with_sae"]) / (
        out["ce_loss_with_ablation"] - out["ce_loss_without_sae"]
    )
    out["kl_div_score"] = (out["kl_div_with_ablation"] - out["kl_div_with_sae"]) / out["kl_div_with_ablation"]
    return out


@pytest.fixture(scope="module")
def model():
    return char_model(seed=2, scale=1.0)


def test_metrics_equal_the_three_run_definitions(model, tmp_path):
    sae = ll.load_dictionary(write_saelens(tmp_path / "s", SITE, architecture="topk", k=6))
    tokens = torch.randint(3, 128, (3, 10))
    tokens[:, 0] = 1  # BOS, left out
    tokens[1, 5] = 2  # EOS inside a row, left out too
    result = ll.evaluate_dictionary(model, sae, tokens, batch_size=2)
    expected = reference_metrics(model, sae, tokens, [0, 1, 2])
    for name, value in expected.items():
        assert result[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
    assert result.sums.n_tokens == 3 * 10 - 4
    assert result["l0"] == 6


def test_an_exact_dictionary_scores_one(model, tmp_path):
    result = ll.evaluate_dictionary(model, identity_sae(tmp_path / "id"), TEXTS)
    assert result["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert result["mse"] == pytest.approx(0.0, abs=1e-8)
    assert result["ce_loss_score"] == pytest.approx(1.0, abs=1e-4)
    assert result["kl_div_score"] == pytest.approx(1.0, abs=1e-6)
    assert result["cossim"] == pytest.approx(1.0, abs=1e-6)


def test_sums_merge_exactly_across_batches_and_padding(model, tmp_path):
    sae = ll.load_dictionary(write_saelens(tmp_path / "s", SITE))
    together = ll.evaluate_dictionary(model, sae, TEXTS, batch_size=3)  # left-padded to the longest
    apart = merge(ll.evaluate_dictionary(model, sae, [text]).sums for text in TEXTS)
    assert together.sums.n_tokens == apart.n_tokens == sum(len(t) for t in TEXTS)  # BOS left out
    assert together.sums.n_ce == apart.n_ce
    for name, value in apart.metrics().items():
        assert together[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert torch.equal(together.sums.feature_counts, apart.feature_counts)
    row = EvaluationSums.from_row(together.sums.to_row(), d_sae=sae.d_sae)  # the dataset runner's rows
    assert row.metrics() == pytest.approx(together.metrics, nan_ok=True)


def test_counting_every_position_or_chosen_ids(model, tmp_path):
    sae = ll.load_dictionary(write_saelens(tmp_path / "s", SITE))
    tokens = torch.tensor([[1, 50, 51, 52, 2, 53]])
    assert ll.evaluate_dictionary(model, sae, tokens, exclude_special_tokens=False).sums.n_tokens == 6
    assert ll.evaluate_dictionary(model, sae, tokens, exclude_special_tokens=[50, 51]).sums.n_tokens == 4
    assert ll.evaluate_dictionary(model, sae, tokens).sums.n_tokens == 4


def test_transcoder_and_frame(tmp_path):
    model = tiny_model()
    transcoder = ll.load_dictionary(
        write_saelens(tmp_path / "t", "blocks.1.mlp.hook_in", architecture="skip_transcoder",
                      hook_out="blocks.1.hook_mlp_out")
    )  # fmt: skip
    result = ll.evaluate_dictionary(model, transcoder, torch.randint(3, 128, (2, 8)), exclude_special_tokens=False)
    frame = result.to_frame()
    assert list(frame.columns) == ["hook", "metric", "value"]
    assert set(frame["hook"]) == {"blocks.1.hook_mlp_out"}
    assert frame.set_index("metric")["value"]["n_tokens"] == 16
    assert result.feature_density.shape == (32,)
    assert result["kl_div_with_sae"] > 0 and result["kl_div_with_ablation"] > 0


def test_a_dictionary_at_hook_z_reads_the_heads_flattened(model, tmp_path):
    sae = ll.load_dictionary(write_saelens(tmp_path / "z", "blocks.0.attn.hook_z", architecture="topk", k=4))
    result = ll.evaluate_dictionary(model, sae, TEXTS)
    assert result["l0"] == 4 and result.sums.n_tokens == sum(len(t) for t in TEXTS)
    exact = ll.evaluate_dictionary(model, identity_sae(tmp_path / "id", "blocks.0.attn.hook_z"), TEXTS)
    assert exact["ce_loss_score"] == pytest.approx(1.0, abs=1e-4) and exact["mse"] == pytest.approx(0.0, abs=1e-8)


def test_hostile_input_is_refused_by_name(model, tmp_path):
    wide = ll.load_dictionary(write_saelens(tmp_path / "w", SITE, d_in=32))
    with pytest.raises(ArgumentError, match=r"blocks\.1\.hook_resid_pre with width 32, the model's is 64"):
        ll.evaluate_dictionary(model, wide, TEXTS)
    far = ll.load_dictionary(write_saelens(tmp_path / "f", "blocks.9.hook_resid_post"))
    with pytest.raises(UnknownNameError, match=r"blocks\.9\.hook_resid_post"):
        ll.evaluate_dictionary(model, far, TEXTS)
    sae = ll.load_dictionary(write_saelens(tmp_path / "s", SITE))
    with pytest.raises(ArgumentTypeError, match="Dictionary"):
        ll.evaluate_dictionary(model, [sae], TEXTS)
    with pytest.raises(ArgumentError, match="at least one prompt"):
        ll.evaluate_dictionary(model, sae, torch.zeros(0, 4, dtype=torch.long))
    with pytest.raises(ArgumentError, match="integers"):
        ll.evaluate_dictionary(model, sae, torch.zeros(2, 4))
    with pytest.raises(ArgumentError, match="of one length"):
        ll.evaluate_dictionary(model, sae, [[5, 6, 7], [5, 6]])
    with pytest.raises(UnknownNameError, match="explained_variance"):
        ll.evaluate_dictionary(model, sae, TEXTS)["explained_varaince"]
