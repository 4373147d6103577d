"""Checks before a forward pass: the context length and the memory it needs, in forward, the lens and generate."""

from __future__ import annotations

import warnings

import pytest
import torch
from support.models import tiny_config, tiny_model

import llama_lens as ll
from llama_lens.errors import ArgumentError, NotEnoughMemoryError
from llama_lens.model import limits, memory


@pytest.fixture
def short_model():
    return tiny_model(tiny_config(max_position_embeddings=16))


def test_forward_past_the_context_length_names_length_limit_and_the_way_out(short_model):
    short_model(torch.randint(3, 128, (1, 16)))  # at the limit: fine
    with pytest.raises(ArgumentError, match=r"20 positions.*max_position_embeddings 16") as err:
        short_model(torch.randint(3, 128, (1, 20)))
    message = str(err.value)
    assert "tokens[:, -16:]" in message and "allow_past_context = True" in message


def test_forward_past_the_context_length_counts_the_kv_cache(short_model):
    from llama_lens.model.kv_cache import KVCache

    cache = KVCache()
    short_model(torch.randint(3, 128, (1, 14)), kv_cache=cache)
    short_model(torch.randint(3, 128, (1, 2)), kv_cache=cache)  # 16 in all
    with pytest.raises(ArgumentError, match="17 positions"):
        short_model(torch.randint(3, 128, (1, 1)), kv_cache=cache)


def test_generate_checks_prompt_plus_new_tokens_before_it_runs(short_model):
    prompt = torch.randint(3, 128, (1, 10))
    ran = []
    with pytest.raises(ArgumentError, match=r"10 tokens \+ max_new_tokens=8.*17 positions.*lower max_new_tokens to 7"):
        short_model.generate(
            prompt, max_new_tokens=8, temperature=0, fwd_hooks=[("hook_embed", lambda t, hook: ran.append(1))]
        )
    assert ran == []  # refused before the prompt ran
    out = short_model.generate(prompt, max_new_tokens=7, temperature=0, stop_at_eos=False)
    assert len(out.tokens[0]) == 7


def test_logit_lens_past_the_context_length_is_an_argument_error(short_model):
    with pytest.raises(ArgumentError, match=r"logit_lens would run 20 positions.*max_position_embeddings 16"):
        ll.logit_lens(short_model, torch.randint(3, 128, (1, 20)), positions=[-1])


def test_allow_past_context_warns_once_and_runs(short_model):
    short_model.allow_past_context = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        short_model(torch.randint(3, 128, (1, 20)))
        short_model.generate(torch.randint(3, 128, (1, 15)), max_new_tokens=4, temperature=0)
    assert [str(w.message) for w in caught if "context length" in str(w.message)].__len__() == 1
    assert caught[0].filename == __file__  # pointed at the caller's line


def test_dynamic_rope_scaling_runs_past_the_length_silently():
    from llama_lens.config import RopeScaling

    model = tiny_model(
        tiny_config(
            max_position_embeddings=16,
            rope_scaling=RopeScaling(kind="dynamic", factor=2.0, original_max_position_embeddings=16),
        )
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.randint(3, 128, (1, 24)))


@pytest.fixture
def tight_memory(monkeypatch):
    """Checks every size (no floor) against an available memory the test sets: `tight_memory(n_bytes)`."""
    monkeypatch.setattr(limits, "CHECK_FLOOR_BYTES", 0)

    def set_available(n_bytes: int | None) -> None:
        monkeypatch.setattr(memory, "available_memory", lambda device="cpu": n_bytes)

    return set_available


def test_forward_that_cannot_fit_names_need_and_available_bytes(tight_memory):
    model = tiny_model()
    tokens = torch.randint(3, 128, (2, 12))
    need = limits.forward_nbytes(model.cfg, batch=2, pos=12, itemsize=4, written_out=False)
    tight_memory(need)
    model(tokens)  # exactly fits
    tight_memory(need - 1)
    ran = []
    with pytest.raises(NotEnoughMemoryError, match=rf"about [\d.]+ GiB \({need} bytes\).*\({need - 1} bytes\)") as err:
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", lambda t, hook: ran.append(1))])
    assert ran == [] and "fewer prompts" in str(err.value)
    assert isinstance(err.value, MemoryError)
    tight_memory(None)  # unknown: not checked
    model(tokens)


def test_forward_estimate_grows_with_a_hooked_pattern_and_shrinks_without_logits(tight_memory):
    model = tiny_model()
    tokens = torch.randint(3, 128, (1, 12))
    need = limits.forward_nbytes(model.cfg, batch=1, pos=12, itemsize=4, written_out=False)
    tight_memory(need)
    model(tokens)
    with pytest.raises(NotEnoughMemoryError, match="attention pattern of fewer layers"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_pattern", lambda t, hook: None)])
    tight_memory(limits.forward_nbytes(model.cfg, batch=1, pos=12, itemsize=4, written_out=False, logits_pos=0))
    model(tokens, stop_at_layer=2)  # no logits made: fits in less
    with pytest.raises(NotEnoughMemoryError):
        model(tokens)


def test_logit_lens_that_cannot_fit_says_what_to_read_out_instead(tight_memory):
    model = tiny_model()
    tokens = torch.randint(3, 128, (1, 12))
    tight_memory(limits.forward_nbytes(model.cfg, batch=1, pos=12, itemsize=4, written_out=False))
    with pytest.raises(NotEnoughMemoryError, match=r"logit_lens over 1 x 12 positions.*positions=\[-1\]"):
        ll.logit_lens(model, tokens, keep_logits=True)


def test_generate_that_cannot_fit_counts_the_kv_cache(tight_memory):
    model = tiny_model()
    prompt = torch.randint(3, 128, (1, 8))
    tight_memory(limits.forward_nbytes(model.cfg, batch=1, pos=8, itemsize=4, written_out=False))
    with pytest.raises(NotEnoughMemoryError, match=r"generate over 1 x 107 positions \(KV cache"):
        model.generate(prompt, max_new_tokens=100, temperature=0)


def test_small_runs_do_not_read_the_available_memory(monkeypatch):
    def fail(device="cpu"):
        raise AssertionError("read for a small run")

    monkeypatch.setattr(memory, "available_memory", fail)
    model = tiny_model()
    model(torch.randint(3, 128, (1, 12)))
    model.generate(torch.randint(3, 128, (1, 4)), max_new_tokens=3, temperature=0)
