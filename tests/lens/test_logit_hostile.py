"""The logit lens makes the model's logits at the asked-for positions only: a long prompt asked at one position
never holds [pos, d_vocab] logits."""

from __future__ import annotations

import pytest
import torch
from support.models import tiny_config, tiny_model

import llama_lens as ll


def test_only_the_asked_positions_are_unembedded_and_the_answer_is_unchanged():
    model = tiny_model()
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 40))
    rows = []
    handle = model.unembed.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[:-1].numel()))
    try:
        last = ll.logit_lens(model, tokens, positions=[-1], keep_logits=True)
    finally:
        handle.remove()
    assert max(rows) == 2  # batch x 1 position: never batch x 40
    every = ll.logit_lens(model, tokens, keep_logits=True)
    torch.testing.assert_close(last.logits[:, :, 0], every.logits[:, :, -1])
    torch.testing.assert_close(last.top_probs[:, :, 0], every.top_probs[:, :, -1])


# ------------------------------------------------------------------------- hook_logits in the lens
@pytest.mark.parametrize("positions", [None, [-1], [0, 2]])
def test_hook_logits_fires_in_the_lens_at_the_asked_positions(positions):
    model = tiny_model(tiny_config(), embed_scale=20.0)
    tokens = torch.tensor([[1, 40, 50, 60, 70]])
    seen = []

    def boost(logits, *, hook):
        seen.append(tuple(logits.shape))
        logits = logits.clone()
        logits[..., 33] += 100.0  # every final read-out now predicts 33
        return logits

    model.add_hook("hook_logits", boost)
    try:
        result = ll.logit_lens(model, tokens, positions=positions)
    finally:
        model.reset_hooks()
    n_pos = 5 if positions is None else len(positions)
    assert seen == [(1, n_pos, model.cfg.d_vocab)]
    assert (result.top_ids[:, -1, :, 0] == 33).all()  # the last read-out is what the hook returned
