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
from support.models import tiny_config, tiny_model

import llama_lens as ll
from llama_lens.errors import NotEnoughMemoryError

memory_module = importlib.import_module("llama_lens.model.memory")

RESID_0 = "blocks.0.hook_resid_post"


@pytest.fixture
def model(char_model):
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
    batch, pos = tokens.shape

    def check_fits_exactly(cached_bytes: int, written_out: bool, **kwargs) -> None:
        # What the check adds for the forward pass itself; the rest must be the cache's own bytes.
        working = memory_module.forward_working_nbytes(
            model.cfg, batch=batch, pos=pos, itemsize=4, written_out=written_out
        )
        monkeypatch.setattr(memory_module, "available_memory", lambda device="cpu": cached_bytes + working)
        model.run_with_cache(tokens, **kwargs)  # exactly fits
        monkeypatch.setattr(memory_module, "available_memory", lambda device="cpu": cached_bytes + working - 1)
        with pytest.raises(NotEnoughMemoryError):
            model.run_with_cache(tokens, **kwargs)
        monkeypatch.undo()

    check_fits_exactly(_cache_bytes(model.run_with_cache(tokens)[1]), True)
    # A filter and a position slice shrink the estimate as they shrink the cache.
    names = lambda name: name.endswith(("hook_pattern", "hook_z", "hook_scale"))  # noqa: E731
    _, sliced = model.run_with_cache(tokens, names_filter=names, pos_slice=slice(2, 6))
    check_fits_exactly(_cache_bytes(sliced), True, names_filter=names, pos_slice=slice(2, 6))
    _, resid = model.run_with_cache(tokens, names_filter=lambda name: "resid" in name)
    check_fits_exactly(_cache_bytes(resid), False, names_filter=lambda name: "resid" in name)


def test_run_with_cache_that_cannot_fit_raises_before_any_layer_runs(model, monkeypatch):
    tokens = model.to_tokens("x" * 200)
    resid_post = lambda name: name.endswith("hook_resid_post")  # noqa: E731
    resid_bytes = _cache_bytes(model.run_with_cache(tokens, names_filter=resid_post)[1])
    all_bytes = _cache_bytes(model.run_with_cache(tokens)[1])
    available = resid_bytes + memory_module.forward_working_nbytes(
        model.cfg, batch=1, pos=tokens.shape[1], itemsize=4, written_out=False
    )
    assert all_bytes > available
    monkeypatch.setattr(memory_module, "available_memory", lambda device="cpu": available)
    layers_run = []
    with pytest.raises(NotEnoughMemoryError, match=r"about [\d.]+ GiB .* available .* names_filter=") as err:
        model.run_with_cache(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", lambda t, hook: layers_run.append(1))])
    assert layers_run == []
    assert "check_memory=False" in str(err.value)
    # The suggested filter does fit, and so does turning the check off.
    assert len(model.run_with_cache(tokens, names_filter=resid_post)[1]) == 2
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
    model.allow_past_context = True  # without it, an error (tests/model/test_limits.py)
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
@pytest.mark.parametrize("first", ["import llama_lens.loading.load", "ll.plan", "import llama_lens.loading.plan as pm"])
def test_ll_plan_is_callable_whatever_was_imported_first(first):
    # A fresh interpreter: which module was imported first is the point.
    code = (
        "import llama_lens as ll\n"
        f"{first}\n"
        "import llama_lens.loading.load\n"  # what ll.load(...) imports
        "from llama_lens.config import LlamaConfig\n"
        "cfg = LlamaConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_head=16, d_mlp=128, d_vocab=128)\n"
        "estimate = ll.plan(cfg, tokens=8)\n"
        "from llama_lens.loading.plan import plan\n"
        "assert estimate.peak_bytes == plan(cfg, tokens=8).peak_bytes, estimate\n"
        "import llama_lens.loading.plan as pm\n"
        "assert callable(pm.available_memory)\n"
        "print(type(estimate).__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Plan"
    assert ll.plan(tiny_config(), tokens=8).tokens == 8


# ------------------------------------------------------------------------------------------ 5a. NaN
def test_lens_over_nan_activations_has_no_ranks_and_names_the_layer():
    model = tiny_model(tiny_config(n_layers=3), seed=2, embed_scale=20.0)
    with torch.no_grad():
        model.blocks[1].mlp.down_proj.weight[0, 0] = float("nan")
    tokens = torch.tensor([[1, 40, 50, 60, 70]])
    target = 33
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = ll.logit_lens(model, tokens, target=target, readout=["embed", "resid_mid", "resid_post"])
    messages = [str(w.message) for w in caught if "non-finite" in str(w.message)]
    assert len(messages) == 1, messages
    assert "'1_post'" in messages[0] and "layer 1" in messages[0]
    # Independently: each read-out's logits by hand, its rank the count of strictly larger logits.
    _, cache = model.run_with_cache(tokens)
    for r, label in enumerate(result.labels):
        hook = "hook_embed" if label == "embed" else f"blocks.{label[0]}.hook_resid_{label[2:]}"
        logits = model.unembed(model.ln_final(cache[hook]))[0]  # [pos, d_vocab]
        finite = torch.isfinite(logits).all(dim=-1)
        ranks = result.target_ranks[0, r, :, 0]
        assert label in ("embed", "0_mid", "0_post", "1_mid") or not finite.any(), label
        assert torch.equal(ranks[~finite], torch.full_like(ranks[~finite], -1)), label
        assert result.target_probs[0, r, :, 0][~finite].isnan().all(), label
        expected = (logits[finite] > logits[finite, target : target + 1]).sum(-1)
        assert torch.equal(ranks[finite], expected), label
    assert torch.equal(result.target_ranks[0, :4] >= 0, torch.ones_like(result.target_ranks[0, :4], dtype=torch.bool))
    frame = result.to_frame()
    assert frame["target_rank"].dtype == "float64"
    nan_rows = frame["label"].isin(["1_post", "2_mid", "2_post"])
    assert frame.loc[nan_rows, "target_rank"].isna().all() and frame.loc[nan_rows, "target_prob"].isna().all()
    assert frame.loc[~nan_rows, "target_rank"].notna().all()
    assert result.plot("rank") is not None


def test_lens_with_finite_values_does_not_warn_and_keeps_integer_ranks(model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frame = ll.logit_lens(model, "fine", target="e").to_frame()
    assert frame["target_rank"].dtype == "int64"


# ----------------------------------------------------------------------------------------- 9. lost output
def test_generate_keeps_ids_past_the_tokenizers_vocabulary(char_model):
    # d_vocab 160 with a 128-id tokenizer: the padded rows exist in the model, not in the tokenizer.
    model = tiny_model(tiny_config(d_vocab=160), seed=1, tokenizer=char_model().tokenizer)
    chosen = [70, 150, 71]  # "F", a padded id, "G"

    def choose(logits, *, hook):
        logits = logits.clone()
        logits[:, -1, chosen[min(choose.step, 2)]] = 1e4
        choose.step += 1
        return logits

    choose.step = 0
    with pytest.warns(RuntimeWarning, match=r"\[150\] are past the tokenizer's vocabulary \(vocab_size 128"):
        out = model.generate("ab", max_new_tokens=3, temperature=0, fwd_hooks=[("hook_logits", choose)])
    assert out.tokens == [chosen]
    assert out.text == "F<150>G"


def test_generate_rejects_a_negative_or_fractional_max_new_tokens(model):
    for bad in (-5, 2.5, True):
        with pytest.raises(ValueError, match="max_new_tokens"):
            model.generate("hi", max_new_tokens=bad)
    assert model.generate("hi", max_new_tokens=0).tokens == [[]]


def _cli_with(monkeypatch, model):
    from llama_lens import cli

    monkeypatch.setattr(cli, "_load_model", lambda args: model)
    return cli.main


def test_cli_generate_streams_and_keeps_the_continuation_on_ctrl_c(model, monkeypatch, capsys):
    main = _cli_with(monkeypatch, model)
    forwards = []

    def spell_then_interrupt(logits, *, hook):
        # Forward k (from 0) makes the model choose chr(ord("a") + k); the fourth forward is interrupted.
        if len(forwards) == interrupt_at[0]:
            raise KeyboardInterrupt
        logits = logits.clone()
        logits[:, -1, ord("a") + len(forwards)] = 1e4
        forwards.append(1)
        return logits

    interrupt_at = [3]
    model.add_hook("hook_logits", spell_then_interrupt)
    try:
        assert main(["generate", "stream me ", "--temperature", "0", "--max-new-tokens", "5"]) == 130
        captured = capsys.readouterr()
        assert captured.out == "stream me abc\n"  # the three tokens chosen before Ctrl-C
        assert "interrupted" in captured.err
        # Uninterrupted, the streamed text is the whole continuation, as before.
        forwards.clear()
        interrupt_at[0] = -1
        assert main(["generate", "stream me ", "--temperature", "0", "--max-new-tokens", "5"]) == 0
        assert capsys.readouterr().out == "stream me abcde\n"
    finally:
        model.reset_hooks()


@pytest.mark.parametrize("command", ["generate", "lens"])
def test_cli_non_utf8_prompt_is_a_one_line_error(command, monkeypatch, capsys):
    from llama_lens import cli

    monkeypatch.setattr(cli, "_load_model", lambda args: pytest.fail("the model was loaded"))
    prompt = b"caf\xe9 au lait".decode("utf-8", "surrogateescape")  # what Python makes of Latin-1 argv bytes
    assert cli.main([command, prompt]) == 1
    err = capsys.readouterr().err
    assert err.startswith("llama-lens: error: PROMPT is not valid UTF-8 (byte 0xe9 at position 3)")
    assert len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------- 10. smaller ones
def test_negative_stop_at_layer_counts_from_the_end():
    model = tiny_model(tiny_config(n_layers=3), seed=4)
    tokens = torch.randint(3, 128, (2, 6))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)  # every hook: the written-out attention, equal up to rounding
        torch.testing.assert_close(
            model(tokens, stop_at_layer=-1), cache["blocks.1.hook_resid_post"], rtol=0, atol=1e-6
        )
        torch.testing.assert_close(model(tokens, stop_at_layer=-3), cache["hook_embed"], rtol=0, atol=0)
        resumed = model(resid=cache["blocks.2.hook_resid_pre"], start_at_layer=-1)
        torch.testing.assert_close(resumed, cache["hook_logits"], rtol=0, atol=1e-6)
        for name, kwargs in (("stop_at_layer", {"stop_at_layer": 1.5}), ("stop_at_layer", {"stop_at_layer": -4})):
            with pytest.raises(ValueError, match=name):
                model(tokens, **kwargs)


def test_fractional_layers_are_refused_everywhere(model):
    with pytest.raises(ValueError, match="2.7"):
        ll.logit_lens(model, "hello", layers=[2.7])
    with pytest.raises(ValueError, match="0.7"):
        ll.patching.activation_patching(model, "hello", "jello", lambda logits: logits[0, -1, 5], layers=[0.7])
    with pytest.raises(ValueError, match="0.7"):
        ll.patching.attribution_patching(model, "hello", "jello", lambda logits: logits[0, -1, 5], layers=[0.7])
    with pytest.raises(ValueError, match="2.7"):
        ll.plan(tiny_config(), layers=[2.7])


def test_lens_explorer_layer_moves_the_selection(model):
    lx = ll.widgets.LogitLensExplorer(model, "hello world", threaded=False)
    assert lx.layer is None
    lx.layer = 1
    last = lx.result.positions[-1]
    assert lx.selection == {"panel": 0, "row": lx.result.labels.index("1_post"), "position": last} and lx.layer == 1
    lx.readout = "resid_mid"
    lx.selection = {"panel": 0, "row": 0, "position": 3}
    lx.layer = 0
    assert lx.result.labels[lx.selection["row"]] == "0_mid" and lx.selection["position"] == 3
    with pytest.raises(ValueError, match="loaded layer"):
        lx.layer = 2.7
    with pytest.raises(AttributeError, match="did you mean 'layer'"):
        lx.layr = 5
    assert not hasattr(lx, "layr")


def test_a_streamed_model_refuses_a_second_threads_forward_by_its_real_reason(tmp_path):
    import llama_lens as ll
    from llama_lens.testing import random_state_dict, write_hf_checkpoint

    cfg = tiny_config()
    folder = write_hf_checkpoint(tmp_path / "ckpt", cfg, random_state_dict(cfg))
    model = ll.load(folder, stream=True)
    inside, release = threading.Event(), threading.Event()

    def hold(tensor, *, hook):
        inside.set()
        release.wait(30)

    errors = []
    first = threading.Thread(
        target=lambda: model.run_with_hooks(torch.tensor([[1, 2]]), fwd_hooks=[("hook_embed", hold)])
    )
    first.start()
    try:
        assert inside.wait(30)
        try:
            model(torch.tensor([[3, 4]]))
        except RuntimeError as error:
            errors.append(str(error))
    finally:
        release.set()
        first.join(30)
    assert errors and "another thread" in errors[0]
    model(torch.tensor([[3, 4]]))  # free again once the first pass ended
