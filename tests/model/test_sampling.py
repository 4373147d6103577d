"""Sampling: generate's settings checked once, in one value, and the token choice it makes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support.models import char_model

from llama_lens.errors import ArgumentError, LlamaLensError
from llama_lens.model.generate import Sampling


def test_settings_are_checked_when_made():
    assert Sampling(top_k=np.int64(3)).top_k == 3 and type(Sampling(top_k=np.int64(3)).top_k) is int
    for bad in ({"temperature": -1.0}, {"top_p": 0.0}, {"top_p": float("nan")}, {"top_k": 0}, {"top_k": 2.5}):
        with pytest.raises(ArgumentError):
            Sampling(**bad)
    with pytest.raises(ValueError, match="max_new_tokens"):
        Sampling(max_new_tokens=-1)


def test_pick_is_greedy_at_temperature_zero_and_with_top_k_one():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9], [3.0, 0.0, 0.5, 2.9]])
    assert Sampling(temperature=0).pick(logits, None).tolist() == [1, 0]
    generator = torch.Generator().manual_seed(0)
    drawn = {tuple(Sampling(temperature=5.0, top_k=1).pick(logits, generator).tolist()) for _ in range(20)}
    assert drawn == {(1, 0)}


def test_seeded_sampling_repeats():
    logits = torch.zeros(1, 50)
    sampling = Sampling(temperature=1.0, top_p=1.0, seed=7)
    first = [sampling.pick(logits, g).item() for g in [sampling.generator(torch.device("cpu"))] for _ in range(5)]
    again = [sampling.pick(logits, g).item() for g in [sampling.generator(torch.device("cpu"))] for _ in range(5)]
    assert first == again and len(set(first)) > 1


def test_generate_raises_library_errors_for_bad_settings():
    model = char_model()
    with pytest.raises(LlamaLensError, match="top_k must be a positive integer"):
        model.generate("ab", top_k=0)
    with pytest.raises(LlamaLensError, match="need temperature >= 0"):
        model.generate("ab", temperature=-0.5)
