"""Helpers shared by the tests: the tiny config, and comparisons that hold on every CPU.

Imported as `from helpers import ...` (pytest puts tests/ on sys.path); conftest.py holds fixtures only.
"""

from __future__ import annotations

import torch

from llama_lens.config import LlamaConfig


def tiny_config(**changes) -> LlamaConfig:
    """The unit-test model: 2 layers, d_model 64, 4 heads, 2 KV heads, vocab 128."""
    base = dict(
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_head=16,
        d_mlp=128,
        d_vocab=128,
        rope_theta=10000.0,
        norm_eps=1e-5,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_ids=(2,),
    )
    return LlamaConfig(**(base | changes))


def assert_same_top_k(
    ids: torch.Tensor,
    values: torch.Tensor,
    expected_values: torch.Tensor,
    *,
    scores: torch.Tensor | None = None,
    expected_ids: torch.Tensor | None = None,
    atol: float = 0.0,
) -> None:
    """Asserts that a top-k result agrees with a reference as far as ties allow.

    `torch.topk` promises no order among equal values, and which of two equal logits comes first differs
    between SIMD kernels (AVX2, AVX-512, none), so ids are never compared where values tie:
    - the values must equal the reference's (within `atol`; exactly by default);
    - with `scores` (the full rows the reference ranked, [..., d_vocab]), every id must point at a score equal to
      its value and the ids of a row must be distinct: together, exactly the top-k up to the order of ties;
    - with `expected_ids`, ids must be equal wherever the value is apart (by more than `atol`) from both its
      neighbours in the list; the last one only with `scores`, where the value after it is known.

    Args:
        ids, values: [..., k] the result under test.
        expected_values: [..., k] the reference's values, largest first.
        scores: [..., d_vocab] what was ranked, if at hand.
        expected_ids: [..., k] the reference's ids, if at hand.
        atol: how far two values may be apart and still count as tied or equal.
    """
    torch.testing.assert_close(values, expected_values, atol=atol, rtol=0)
    if scores is not None:
        torch.testing.assert_close(scores.gather(-1, ids), expected_values, atol=atol, rtol=0)
        sorted_ids = ids.sort(dim=-1).values
        assert bool((sorted_ids[..., 1:] != sorted_ids[..., :-1]).all()), "an id appears twice in one row"
    if expected_ids is None:
        return
    k = expected_values.shape[-1]
    gap = torch.full_like(expected_values, float("inf"))
    if k > 1:
        step = (expected_values[..., :-1] - expected_values[..., 1:]).abs()  # [..., k - 1]
        gap[..., :-1] = step
        gap[..., 1:] = torch.minimum(gap[..., 1:], step)
    if scores is not None:
        d_vocab = scores.shape[-1]
        after = scores.topk(k + 1, dim=-1).values[..., -1] if d_vocab > k else None
        if after is not None:
            gap[..., -1] = torch.minimum(gap[..., -1], (expected_values[..., -1] - after).abs())
    else:
        gap[..., -1] = 0.0  # the value after the last is unknown: it may tie
    apart = gap > atol
    assert torch.equal(ids[apart], expected_ids[apart]), "ids differ where the values are not tied"
