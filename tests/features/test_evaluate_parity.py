"""Dictionary evaluation against sae-lens 6.54.12's own metric functions: the fixture (written by
scripts/parity/record_eval.py in the parity environment) holds a StandardSAE saved by sae-lens, fixed tokens of
the embedded model, and what sae-lens' `get_sparsity_and_variance_metrics` and
`get_downstream_reconstruction_metrics` computed for them; ours must agree within 1e-3."""

import json
from pathlib import Path

import pytest
import torch

import llama_lens as ll
from llama_lens.features.evaluate import special_token_ids

FIXTURES = Path(__file__).parent / "fixtures"
RECORD = json.loads((FIXTURES / "eval_metrics.json").read_text())
# sae-lens' metrics that evaluate_dictionary reports under the same name (explained_variance_legacy, which
# depends on how tokens are cut into batches, is left out on purpose).
COMPARED = [
    "l0", "l1", "mse", "cossim", "l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias",
    "explained_variance", "ce_loss_without_sae", "ce_loss_with_sae", "ce_loss_with_ablation", "ce_loss_score",
    "kl_div_with_sae", "kl_div_with_ablation", "kl_div_score",
]  # fmt: skip


@pytest.fixture(scope="module")
def evaluation(demo_path):
    model = ll.load(demo_path, dtype=torch.float32, progress=False)
    sae = ll.load_dictionary(FIXTURES / "eval_sae")
    assert sae.hook_out == RECORD["hook"]
    assert special_token_ids(model.tokenizer, True) == RECORD["ignore_tokens"]
    return ll.evaluate_dictionary(model, sae, torch.tensor(RECORD["tokens"]), batch_size=2)


@pytest.mark.parametrize("metric", COMPARED)
def test_metric_matches_sae_lens(evaluation, metric):
    ours, theirs = evaluation[metric], RECORD["metrics"][metric]
    # 1e-3 absolute, or relative for the metrics sae-lens reports in the activations' units (mse ~ 5e4).
    assert abs(ours - theirs) <= 1e-3 * max(1.0, abs(theirs)), (metric, ours, theirs)


def test_positions_counted_and_feature_density_match_sae_lens(evaluation):
    tokens = torch.tensor(RECORD["tokens"])
    special = torch.isin(tokens, torch.tensor(RECORD["ignore_tokens"]))
    assert evaluation.sums.n_tokens == int((~special).sum())  # BOS and EOS positions are left out
    assert evaluation.sums.n_ce == int((~special[:, :-1]).sum())
    assert 20 <= evaluation["l0"] <= 40  # the fixture's SAE fires ~30 features per token
    torch.testing.assert_close(
        evaluation.feature_density.float(), torch.tensor(RECORD["feature_density"]), atol=1e-5, rtol=0
    )
