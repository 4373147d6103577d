"""Sampling at extreme temperatures: a tiny one is greedy in the limit, never NaN probabilities."""

from __future__ import annotations

import pytest
import torch

from llama_lens.model.generate import Sampling


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1e-45, 1e-30, 1e-8])
def test_a_tiny_temperature_picks_the_greedy_token(dtype, temperature):
    logits = (torch.randn(3, 50) * 10).to(dtype)
    picked = Sampling(temperature=temperature, seed=0).pick(logits, torch.Generator().manual_seed(0))
    assert torch.equal(picked, logits.float().argmax(dim=-1))
