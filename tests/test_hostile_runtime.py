"""Runtime cases of a careless user and a shared server: threads, one-shot iterables, NaN activations, memory,
lost output, and small argument traps. Each test states the behaviour and checks it against an independent
computation (a single-threaded run, a hand-written rank, the cache's own bytes)."""

from __future__ import annotations

import gc
import importlib
import subprocess
import sys
import threading
import warnings
import weakref

import pytest
import torch
from helpers import char_model, tiny_config, tiny_model

import llama_lens as ll
from llama_lens.errors import NotEnoughMemoryError

plan_module = importlib.import_module("llama_lens.plan")  # `ll.plan` is also callable: see plan.CallableModule

RESID_0 = "blocks.0.hook_resid_post"


@pytest.fixture
def model():
    return char_model(seed=5)


def _zero(tensor, *, hook):
    return torch.zeros_like(tensor)


def _run_threads(*targets, timeout: float = 60.0) -> None:
    """Runs each target in its own thread and re-raises the first error any of them hit."""
    errors: list[BaseException] = []

    def wrap(target):
        def run():
            try:
                target()
            except BaseException as err:  # noqa: BLE001 - handed back to the test thread
                errors.append(err)

        return run

    threads = [threading.Thread(target=wrap(t)) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
        assert not thread.is_alive(), "a thread did not finish"
    if errors:
        raise errors[0]


# ------------------------------------------------------------------------------------------- 3. threads
def test_hooks_in_one_thread_do_not_reach_another_threads_forward(model):
    tokens = model.to_tokens("threads share a model")
    with torch.no_grad():
        clean = model(tokens)
        with model.hooks([(RESID_0, _zero)]):
            ablated_alone = model(tokens)
    assert not torch.allclose(clean, ablated_alone)  # the ablation matters, so a leak would show
    inside, other_done = threading.Event(), threading.Event()
    results = {}

    def ablating():
        with torch.no_grad(), model.hooks([(RESID_0, _zero)]):
            inside.set()
            assert other_done.wait(30)  # the other thread's whole forward runs while these hooks are on
            results["ablated"] = model(tokens)

    def plain():
        assert inside.wait(30)
        with torch.no_grad():
            results["plain"] = model(tokens)
        other_done.set()

    _run_threads(ablating, plain)
    torch.testing.assert_close(results["plain"], clean, rtol=0, atol=1e-6)
    torch.testing.assert_close(results["ablated"], ablated_alone, rtol=0, atol=1e-6)
    assert not any(point.has_hooks for point in model.hook_dict.values())


def test_two_threads_run_with_cache_at_once_keep_their_own_activations(model):
    texts = ["first thread's prompt", "other thread's words!"]  # same length, different tokens
    token_sets = [model.to_tokens(t) for t in texts]
    assert token_sets[0].shape == token_sets[1].shape
    with torch.no_grad():
        alone = [model.run_with_cache(tokens) for tokens in token_sets]
    # Both threads stop at layer 0 until the other is there too: their forwards truly overlap.
    meet = threading.Barrier(2, timeout=30)
    met = threading.local()

    def wait_for_the_other(tensor, *, hook):
        if not getattr(met, "done", False):
            met.done = True
            meet.wait()

    results: dict[int, tuple] = {}

    def run(index):
        def target():
            with torch.no_grad():
                results[index] = model.run_with_cache(
                    token_sets[index], fwd_hooks=[("blocks.0.hook_resid_mid", wait_for_the_other)]
                )

        return target

    _run_threads(run(0), run(1))
    for index in (0, 1):
        logits, cache = results[index]
        expected_logits, expected = alone[index]
        torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-6)
        assert list(cache.keys()) == list(expected.keys())
        for name in expected:
            torch.testing.assert_close(cache[name], expected[name], rtol=0, atol=1e-6, msg=name)


def test_backward_hooks_stay_with_their_thread(model):
    tokens = model.to_tokens("gradients")
    calls = {"a": 0, "b": 0}
    inside, other_done = threading.Event(), threading.Event()

    def count(key):
        def fn(grad, *, hook):
            calls[key] += 1

        return fn

    def with_hook():
        with model.hooks(bwd_hooks=[("hook_embed", count("a"))]):
            inside.set()
            assert other_done.wait(30)
            model(tokens, return_type="loss").backward()

    def without():
        assert inside.wait(30)
        model(tokens, return_type="loss").backward()
        other_done.set()

    _run_threads(with_hook, without)
    model.zero_grad()
    assert calls == {"a": 1, "b": 0}


def test_add_hook_is_persistent_for_every_thread(model):
    # TransformerLens' semantics: add_hook puts the hook on the model, for every thread, until reset_hooks().
    tokens = model.to_tokens("persistent")
    with torch.no_grad(), model.hooks([(RESID_0, _zero)]):
        ablated = model(tokens)
    model.add_hook(RESID_0, _zero)
    results = {}

    def other():
        with torch.no_grad():
            results["other"] = model(tokens)

    try:
        _run_threads(other)
    finally:
        model.reset_hooks()
    torch.testing.assert_close(results["other"], ablated, rtol=0, atol=1e-6)
    assert not model.hook_dict[RESID_0].has_hooks


def test_reset_hooks_inside_a_block_removes_that_blocks_hooks(model):
    tokens = model.to_tokens("reset")
    with torch.no_grad():
        clean = model(tokens)
        with model.hooks([(RESID_0, _zero)]):
            model.reset_hooks()
            after_reset = model(tokens)
    torch.testing.assert_close(after_reset, clean, rtol=0, atol=0)


# ------------------------------------------------------------------------------------- 4. one-shot iterables
def test_names_filter_generator_caches_the_names(model):
    tokens = model.to_tokens("generator")
    names = ["hook_embed", RESID_0]
    _, cache = model.run_with_cache(tokens, names_filter=(name for name in names))
    assert list(cache.keys()) == names
    _, expected = model.run_with_cache(tokens, names_filter=names)
    for name in names:
        torch.testing.assert_close(cache[name], expected[name], rtol=0, atol=0)


def test_hooks_given_generators_call_the_hook(model):
    tokens = model.to_tokens("generator")
    seen = []

    def record(tensor, *, hook):
        seen.append(hook.name)

    names = (name for name in ["hook_embed", RESID_0])
    with model.hooks((names, record) for _ in range(1)):
        model(tokens)
    assert seen == ["hook_embed", RESID_0]
    seen.clear()
    model.run_with_hooks(tokens, fwd_hooks=[((n for n in [RESID_0]), record)])
    assert seen == [RESID_0]


def test_names_filter_of_another_kind_is_a_clear_error(model):
    with pytest.raises(ValueError, match="names_filter must be"):
        model.run_with_cache(model.to_tokens("x"), names_filter=3)


# ------------------------------------------------------------------------------------------ 7. memory
def _cache_bytes(cache) -> int:
    return sum(cache[name].numel() * cache[name].element_size() for name in cache)


def test_run_with_cache_estimate_is_the_cache_size(model, monkeypatch):
    tokens = model.to_tokens(["a batch of two", "prompts of text"])
    _, cache = model.run_with_cache(tokens)
    actual = _cache_bytes(cache)
    monkeypatch.setattr(plan_module, "available_memory", lambda device="cpu": actual)
    model.run_with_cache(tokens)  # exactly fits
    monkeypatch.setattr(plan_module, "available_memory", lambda device="cpu": actual - 1)
    with pytest.raises(NotEnoughMemoryError):
        model.run_with_cache(tokens)
    # A filter and a position slice shrink the estimate as they shrink the cache.
    names = lambda name: name.endswith(("hook_pattern", "hook_z", "hook_scale"))  # noqa: E731
    _, sliced = model.run_with_cache(tokens, names_filter=names, pos_slice=slice(2, 6), check_memory=False)
    monkeypatch.setattr(plan_module, "available_memory", lambda device="cpu": _cache_bytes(sliced))
    model.run_with_cache(tokens, names_filter=names, pos_slice=slice(2, 6))
    monkeypatch.setattr(plan_module, "available_memory", lambda device="cpu": _cache_bytes(sliced) - 1)
    with pytest.raises(NotEnoughMemoryError):
        model.run_with_cache(tokens, names_filter=names, pos_slice=slice(2, 6))


def test_run_with_cache_that_cannot_fit_raises_before_any_layer_runs(model, monkeypatch):
    monkeypatch.setattr(plan_module, "available_memory", lambda device="cpu": 200_000)
    layers_run = []
    tokens = model.to_tokens("x" * 200)
    with pytest.raises(NotEnoughMemoryError, match=r"about [\d.]+ GiB .* available .* names_filter=") as err:
        model.run_with_cache(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", lambda t, hook: layers_run.append(1))])
    assert layers_run == []
    assert "check_memory=False" in str(err.value)
    # The suggested filter does fit, and so does turning the check off.
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_resid_post"))
    assert _cache_bytes(cache) <= 200_000
    assert len(model.run_with_cache(tokens, check_memory=False)[1]) == len(model.hook_names)


def test_failed_run_with_cache_lets_the_partial_cache_go(model):
    seen: list[weakref.ref] = []

    def remember(tensor, *, hook):
        seen.append(weakref.ref(tensor))

    def boom(tensor, *, hook):
        raise RuntimeError("boom in layer 1")

    tokens = model.to_tokens("partial cache")
    caught = None
    with torch.no_grad():
        try:
            model.run_with_cache(
                tokens,
                detach=False,  # the cache holds the very tensors the hook saw
                fwd_hooks=[("blocks.0.hook_mlp_out", remember), ("blocks.1.hook_resid_mid", boom)],
            )
        except RuntimeError as err:
            caught = err  # kept, with its traceback, as a notebook keeps the last error
    assert caught is not None and caught.__traceback__ is not None
    gc.collect()
    assert len(seen) == 1 and seen[0]() is None


def test_prompt_past_the_context_length_warns_once():
    model = tiny_model(tiny_config(max_position_embeddings=16))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(torch.randint(3, 128, (1, 16)))
        assert not caught
        model(torch.randint(3, 128, (1, 20)))
        model(torch.randint(3, 128, (1, 24)))
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "20 positions" in messages[0] and "max_position_embeddings 16" in messages[0]


# ------------------------------------------------------------------------------------- 10. smaller ones
@pytest.mark.parametrize("first", ["import llama_lens.loading", "ll.plan", "import llama_lens.plan as pm"])
def test_ll_plan_is_callable_whatever_was_imported_first(first):
    # A fresh interpreter: which module was imported first is the point.
    code = (
        "import llama_lens as ll\n"
        f"{first}\n"
        "import llama_lens.loading\n"  # what ll.load(...) imports
        "from llama_lens.config import LlamaConfig\n"
        "cfg = LlamaConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_head=16, d_mlp=128, d_vocab=128)\n"
        "estimate = ll.plan(cfg, tokens=8)\n"
        "from llama_lens.plan import plan\n"
        "assert estimate.peak_bytes == plan(cfg, tokens=8).peak_bytes, estimate\n"
        "import llama_lens.plan as pm\n"
        "assert callable(pm.available_memory)\n"
        "print(type(estimate).__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Plan"
    assert ll.plan(tiny_config(), tokens=8).tokens == 8
