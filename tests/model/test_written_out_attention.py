"""The written-out attention's fused pieces give the tensors of the plain formulas they replace."""

from __future__ import annotations

import math

import pytest
import torch

from llama_lens.model.attention import causal_scores, head_results


@pytest.mark.parametrize(("q_pos", "k_pos", "d_head"), [(7, 7, 16), (3, 10, 16), (5, 5, 12)])
def test_causal_scores_are_the_scaled_product_masked_after_the_diagonal(q_pos, k_pos, d_head):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, q_pos, d_head, generator=generator)
    k = torch.randn(2, 4, k_pos, d_head, generator=generator)
    # The queries are the last q_pos positions (a KV cache holds the earlier ones): each sees keys up to itself.
    allowed = torch.ones(q_pos, k_pos, dtype=torch.bool).tril(k_pos - q_pos)
    expected = (q @ k.transpose(-1, -2) / math.sqrt(d_head)).masked_fill(~allowed, float("-inf"))
    scores = causal_scores(q, k, 1 / math.sqrt(d_head))
    assert scores.shape == (2, 4, q_pos, k_pos)
    assert torch.equal(scores.isinf(), ~allowed.expand_as(scores))
    torch.testing.assert_close(scores, expected, rtol=1e-6, atol=1e-6)


def test_causal_scores_keep_a_half_precision_dtype():
    q, k = torch.randn(1, 2, 40, 8).bfloat16(), torch.randn(1, 2, 40, 8).bfloat16()
    scores = causal_scores(q, k, 1 / math.sqrt(8))
    assert scores.dtype == torch.bfloat16
    expected = (q.float() @ k.float().transpose(-1, -2) / math.sqrt(8)).masked_fill(
        ~torch.ones(40, 40, dtype=torch.bool).tril(), float("-inf")
    )
    torch.testing.assert_close(scores.float(), expected, rtol=1e-2, atol=1e-2)


def test_head_results_are_each_heads_slice_of_the_output_projection():
    generator = torch.Generator().manual_seed(1)
    batch, pos, n_heads, d_head, d_model = 2, 5, 3, 4, 6
    z = torch.randn(batch, pos, n_heads, d_head, generator=generator)
    w_o = torch.randn(d_model, n_heads * d_head, generator=generator)
    result = head_results(z, w_o)
    assert result.shape == (batch, pos, n_heads, d_model)
    expected = torch.einsum("bphd,mhd->bphm", z, w_o.view(d_model, n_heads, d_head))
    assert torch.equal(result, expected)
    torch.testing.assert_close(result.sum(dim=2), z.reshape(batch, pos, -1) @ w_o.T)
