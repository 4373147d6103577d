"""The metric forms a sweep runs batched (TransformerLens-style scalar metrics on lazy logits, BatchedMetric), what a
sweep computes for them, its progress bar, and the old call forms kept for one release."""

import pytest
import torch
from support.models import char_model
from support.patching_loop import naive_sweep

import llama_lens as ll
from llama_lens.patching import sweep as sweep_module
from llama_lens.patching.lazy_logits import LogitSource

N, E = ord("n"), ord("e")


@pytest.fixture(scope="module")
def model():
    return char_model(seed=4)


@pytest.fixture(scope="module")
def pair(model):
    """An equal-length pair that differs from position 5 on, and the clean cache of every hook point (the
    attention written out at every layer, as `run_with_cache(clean)` leaves it)."""
    clean = model.to_tokens("abc Paris", prepend_bos=True)
    corrupted = model.to_tokens("abc Tokyo", prepend_bos=True)
    assert clean.shape == corrupted.shape == (1, 10)
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean)
    return clean, corrupted, clean_cache


def tl_metric(logits):
    """A metric written the TransformerLens way: batch 0, the last position, a scalar."""
    return logits[0, -1, N] - logits[0, -1, E]


@pytest.mark.parametrize(
    ("function", "site", "by_pos"),
    [
        (ll.patching.get_act_patch_resid_pre, "resid_pre", True),
        (ll.patching.get_act_patch_attn_head_out_by_pos, "z", True),
        (ll.patching.get_act_patch_attn_head_v_all_pos, "v", False),
    ],
)
def test_a_transformer_lens_metric_gives_the_loops_scores(model, pair, function, site, by_pos):
    _, corrupted, clean_cache = pair
    expected = naive_sweep(model, corrupted, clean_cache, tl_metric, site, by_pos)
    got = function(model, corrupted, clean_cache, tl_metric, progress=False, max_batch=5)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def _count_unembedded_positions(model, monkeypatch) -> list[int]:
    rows = []
    forward = model.unembed.forward

    def counting(resid):
        rows.append(resid.shape[:-1].numel())
        return forward(resid)

    monkeypatch.setattr(model.unembed, "forward", counting)
    return rows


def test_a_scalar_metric_unembeds_only_the_position_it_reads(model, pair, monkeypatch):
    _, corrupted, clean_cache = pair
    rows = _count_unembedded_positions(model, monkeypatch)
    calls = []

    def metric(logits):
        calls.append(type(logits))
        return tl_metric(logits)

    scores = ll.patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric, progress=False)
    n_layers, pos = scores.shape
    # The shared positions 0..4 are skipped (the same bits in both runs); each patched run calls the metric once,
    # on a tensor; the last position is unembedded once for the corrupted run and once per patched run.
    runs = n_layers * (pos - 5)
    assert len(calls) == runs + 1 and all(issubclass(kind, torch.Tensor) for kind in calls)
    assert sum(rows) == runs + 1


def test_a_metric_that_reads_everything_gets_whole_logits(model, pair):
    _, corrupted, clean_cache = pair

    def every_position(logits):
        return logits.log_softmax(-1)[..., N].mean() + torch.nn.functional.softmax(logits, -1)[0, :, E].sum()

    expected = naive_sweep(model, corrupted, clean_cache, every_position, "resid_pre", True)
    got = ll.patching.get_act_patch_resid_pre(model, corrupted, clean_cache, every_position, progress=False)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_a_batched_metric_is_called_once_per_group(model, pair):
    _, corrupted, clean_cache = pair
    shapes = []

    @ll.patching.BatchedMetric
    def batched(logits):  # [runs, batch, pos, d_vocab] -> [runs]
        shapes.append(tuple(logits.shape))
        return logits[:, 0, -1, N] - logits[:, 0, -1, E]

    expected = naive_sweep(model, corrupted, clean_cache, tl_metric, "resid_pre", True)
    assert float(batched(torch.zeros(1, 10, 128))) == 0.0  # one run's logits: a metric as any other
    shapes.clear()
    got = ll.patching.get_act_patch_resid_pre(model, corrupted, clean_cache, batched, progress=False)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    n_layers = model.cfg.n_layers
    # The corrupted run, then one call per start position 5..9 with every layer's run
    assert shapes == [(1, 1, 10, 128)] + [(n_layers, 1, 10, 128)] * 5
    with pytest.raises(ll.LlamaLensError, match="one score per run"):
        one_number = ll.patching.BatchedMetric(lambda logits: logits[:, 0, -1, N].sum())
        ll.patching.get_act_patch_resid_pre(model, corrupted, clean_cache, one_number, progress=False)


def test_the_progress_bar_counts_patched_runs(model, pair, monkeypatch):
    _, corrupted, clean_cache = pair
    bars = []

    class Bar:
        def __init__(self, total, enabled, desc):
            self.total, self.steps = total, []
            bars.append(self)

        def update(self, n):
            self.steps.append(n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

    monkeypatch.setattr(sweep_module, "_progress", Bar)
    scores = ll.patching.get_act_patch_resid_pre(model, corrupted, clean_cache, tl_metric)
    (bar,) = bars
    # Every (layer, position) is one step: the 5 shared positions at once (skipped), then each group's runs.
    n_layers = model.cfg.n_layers
    assert bar.total == sum(bar.steps) == scores.numel() == n_layers * 10
    assert bar.steps == [n_layers * 5] + [n_layers] * 5


def test_lazy_logits_index_like_the_whole_tensor():
    torch.manual_seed(0)
    w_u = torch.randn(4, 11)
    unembedded = []

    def unembed(resid):
        unembedded.append(resid.shape[:-1].numel())
        return resid @ w_u

    batch, pos, runs, start = 2, 6, 3, 2
    corrupted, finals = torch.randn(1, batch, pos, 4), torch.randn(runs, batch, pos - start, 4)
    source = LogitSource(unembed, finals, start, LogitSource(unembed, corrupted))
    whole = [torch.cat([(corrupted[0] @ w_u)[:, :start], finals[r] @ w_u], dim=1) for r in range(runs)]
    unembedded.clear()
    rows = torch.arange(batch)
    indices = [(0, -1, 3), (slice(None), -1), (slice(None), slice(1, 4), slice(2, 5)), (rows, torch.tensor([5, 0]))]
    indices += [(slice(None), torch.tensor([[1, -1], [3, 3]])), (1, 4)]
    for run in range(runs):
        logits = source.logits(run)
        assert isinstance(logits, torch.Tensor) and logits.shape == (batch, pos, 11)
        for index in indices:
            torch.testing.assert_close(logits[index], whole[run][index])
    # Positions 5, 2, 3 and 4 computed once for every run at once; 1 and 0 (before `start`) once, the corrupted run's.
    assert sorted(unembedded) == [batch] * 2 + [runs * batch] * 4
    logits = source.logits(1)
    for op in (lambda x: x.log_softmax(-1), lambda x: 3 - x * 2, lambda x: x[..., 3], lambda x: x[0], torch.exp):
        torch.testing.assert_close(op(logits), op(whole[1]))
    every = source.logits(None)
    assert every.shape == (runs, batch, pos, 11)
    torch.testing.assert_close(every[:, 0, -1, 3], torch.stack([w[0, -1, 3] for w in whole]))
    with pytest.raises(IndexError):
        source.logits(0)[0, pos]
    written = source.logits(0)
    written[0, 0, 0] = 5.0
    assert float(written[0, 0, 0]) == 5.0


def test_old_call_forms_warn_and_still_work(model, pair):
    clean, corrupted, clean_cache = pair
    expected = ll.patching.attribution_sweep(model, corrupted, clean_cache, tl_metric, ["resid_pre"])
    with pytest.warns(DeprecationWarning, match="TransformerLens' order"):
        old = ll.patching.attribution_sweep(model, clean_cache, corrupted, tl_metric, ["resid_pre"])
    torch.testing.assert_close(old["resid_pre"], expected["resid_pre"])
    with pytest.warns(DeprecationWarning, match="sites="):
        result = ll.patching.attribution_patching(model, clean, corrupted, tl_metric, "resid_pre")
    assert list(result.scores) == ["resid_pre"]
    logits = torch.randn(1, 10, 128)
    with pytest.warns(DeprecationWarning, match="answer=, wrong="):
        metric = ll.patching.logit_diff_metric(model, logits, -logits, "n", "e")
    torch.testing.assert_close(metric(logits), torch.tensor(1.0))
    with pytest.raises(TypeError, match="multiple values"):
        ll.patching.target_prob_metric(model, "n", -1, position=-1)


def test_errors_are_llama_lens_errors(model, pair):
    _, corrupted, clean_cache = pair
    with pytest.raises(ll.LlamaLensError, match="unknown patching site"):
        ll.patching.patch_sweep(model, corrupted, clean_cache, tl_metric, "resid")
    with pytest.raises(ll.LlamaLensError, match="has no 'blocks.0.hook_resid_pre'"):
        ll.patching.patch_sweep(
            model, corrupted, ll.ActivationCache({}, [0, 1]), tl_metric, "resid_pre", progress=False
        )
    with pytest.raises(ll.LlamaLensError, match="by_pos"):
        ll.patching.activation_patching(model, "ab", "ac", tl_metric, by_pos="dest_src")
