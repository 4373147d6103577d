"""The logit lens makes the model's logits at the asked-for positions only: a long prompt asked at one position
never holds [pos, d_vocab] logits."""

from __future__ import annotations

import torch
from support.models import tiny_model

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
