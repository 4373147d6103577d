"""Feature attribution over a batch of prompts (left-padded texts, or equal-length ids) gives each prompt what
it gets alone, to rounding: the same nodes at the same positions, attributions, ablation effects and metric."""

import pandas as pd
import pytest
import torch
from support.dictionaries import write_clt, write_saelens
from support.models import char_model, tiny_model
from support.pass_counter import pass_counting_hooks

import llama_lens as ll

pytestmark = pytest.mark.usefixtures("one_torch_thread")

A, B = 5, 7


def logit_diff(logits):
    return logits[0, -1, A] - logits[0, -1, B]


def _dictionaries(tmp_path):
    sae = ll.load_dictionary(write_saelens(tmp_path / "sae", "blocks.0.hook_resid_post"), dtype=torch.float64)
    return [sae, ll.load_dictionary(write_clt(tmp_path / "clt"), dtype=torch.float64)]


def _sorted(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(["site", "position", "feature"]).reset_index(drop=True)


def _assert_batch_equals_each_prompt(model, prompts, batch_input, dictionaries):
    batch = ll.feature_attribution(model, batch_input, dictionaries, logit_diff, top_n=6, ablate_errors=True)
    frame = batch.to_frame()
    assert frame.prompt.tolist() == sorted(frame.prompt)  # grouped by prompt
    assert batch.n_prompts == len(prompts) and set(frame.prompt) == set(range(len(prompts)))
    for index, prompt in enumerate(prompts):
        alone = ll.feature_attribution(model, prompt, dictionaries, logit_diff, top_n=6, ablate_errors=True)
        mine = _sorted(frame[frame.prompt == index].drop(columns="prompt"))
        theirs = _sorted(alone.to_frame().drop(columns="prompt"))
        assert len(mine) > 10
        pd.testing.assert_frame_equal(
            mine[["site", "layer", "position", "token", "feature", "kind"]],
            theirs[["site", "layer", "position", "token", "feature", "kind"]],
        )
        for column in ("activation", "attribution", "effect"):
            torch.testing.assert_close(
                torch.tensor(mine[column].to_numpy()),
                torch.tensor(theirs[column].to_numpy()),
                rtol=1e-9,
                atol=1e-11,
                equal_nan=True,
            )
        assert mine.effect.notna().sum() == 6
        assert abs(float(batch.metrics[index]) - alone.metric) < 1e-11
        assert batch.prompt_tokens[index] == alone.tokens
    return batch


def test_a_padded_batch_of_texts_equals_each_text_alone(tmp_path):
    model = char_model(seed=1).double()
    texts = ["the cat sat", "abc", "hello wor"]
    batch = _assert_batch_equals_each_prompt(model, texts, texts, _dictionaries(tmp_path))
    # Positions count within each prompt: the short one's never reach the padding.
    frame = batch.to_frame()
    assert frame[frame.prompt == 1].position.max() == len(model.to_str_tokens("abc")) - 1
    with pytest.raises(ll.UsageError, match="3 prompts: read .metrics"):
        _ = batch.metric


def test_an_equal_length_batch_of_ids_equals_each_row_alone(tmp_path):
    model = tiny_model(seed=1).double()
    tokens = torch.randint(3, 128, (3, 6))
    _assert_batch_equals_each_prompt(model, list(tokens), tokens, _dictionaries(tmp_path))


def test_a_batch_takes_one_forward_and_one_backward_pass(tmp_path):
    model = tiny_model(seed=1).double()
    counts, hooks = pass_counting_hooks()
    with model.hooks(**hooks):
        result = ll.feature_attribution(
            model, torch.randint(3, 128, (4, 6)), _dictionaries(tmp_path), logit_diff, top_n=0
        )
    assert counts == {"fwd": 1, "bwd": 1} and result.n_prompts == 4
