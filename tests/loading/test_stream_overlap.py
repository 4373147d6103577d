"""The streamed lens reads out the layers already done while the model waits for the next one's read
(lens/early_readout.py, model/idle.py): the same metrics as the read-out after the pass, KL included."""

import time

import pytest
import torch
from support.models import tiny_config

import llama_lens as ll
import llama_lens.lens.early_readout as early_readout
import llama_lens.loading.stream_vocab as stream_vocab
from llama_lens.lens.tuned import TunedLens
from llama_lens.testing import random_state_dict, write_meta_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FIELDS = ("top_logits", "top_probs", "entropy", "kl_to_final", "target_probs", "target_logits", "logits")


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def ckpt_path(request, tmp_path_factory):
    cfg = tiny_config(n_layers=4)
    state = {name: tensor.to(request.param) for name, tensor in random_state_dict(cfg, seed=5).items()}
    return write_meta_checkpoint(tmp_path_factory.mktemp("overlap") / "meta", cfg, state, mp=2)


@pytest.fixture
def early_sweeps(monkeypatch):
    """Every early sweep's streams (how many), recorded; a sweep starts as soon as one stream is waiting."""
    monkeypatch.setattr(early_readout, "MIN_EARLY_VECTORS", 1)
    monkeypatch.setattr(stream_vocab, "UNEMBED_BLOCK_ROWS", 48)  # three blocks over the tiny vocabulary (128)
    sizes, start = [], early_readout.EarlyReadout._start

    def recorded(self):
        before = len(self.taken)
        started = start(self)
        if started:
            sizes.append(len(self.taken) - before)
        return started

    monkeypatch.setattr(early_readout.EarlyReadout, "_start", recorded)
    return sizes


def slow_streamed(path, unembed, seconds=0.03):
    """A streamed model whose layer reads take `seconds` more: its forward pass waits for each one."""
    model = ll.load(path, stream=True, unembed=unembed, index_cache=False, progress=False)
    reader = model.reader

    def slow(layer):
        time.sleep(seconds)
        return reader(layer)

    model.reader = slow
    return model


def lens_pair(model, tokens, **kwargs):
    """The lens with the read-out overlapped, and the same model's lens with it after the pass."""
    overlapped = ll.logit_lens(model, tokens, **kwargs)
    model.waits_for_reads = False  # the instance's flag: no idle work handed over
    try:
        sequential = ll.logit_lens(model, tokens, **kwargs)
    finally:
        del model.waits_for_reads
    return overlapped, sequential


def assert_same_lens(got, expected):
    assert got.labels == expected.labels
    assert torch.equal(got.top_ids, expected.top_ids)
    if expected.target_ranks is not None:
        assert torch.equal(got.target_ranks, expected.target_ranks)
    for field in FIELDS:
        if getattr(expected, field) is None:
            assert getattr(got, field) is None, field
            continue
        torch.testing.assert_close(getattr(got, field), getattr(expected, field), rtol=1e-5, atol=1e-5, msg=field)


def tokens_for(batch=2, pos=9):
    return torch.randint(0, 128, (batch, pos), generator=torch.Generator().manual_seed(6))


@pytest.mark.parametrize("unembed", ["memory", "stream"])
def test_overlapped_read_out_equals_the_read_out_after_the_pass(ckpt_path, early_sweeps, unembed):
    model = slow_streamed(ckpt_path, unembed)
    kwargs = dict(target=[[7, 100], [3, 127]], top_k=4, keep_logits=True, readout=("embed", "resid_mid", "resid_post"))
    overlapped, sequential = lens_pair(model, tokens_for(), **kwargs)
    # Read out early: the streams caught before the last layer's read came in, in more than one sweep.
    assert len(early_sweeps) >= 2 and sum(early_sweeps) >= 4
    assert_same_lens(overlapped, sequential)
    # KL is not left at what an early sweep had before the final distribution existed.
    assert bool((overlapped.kl_to_final[:, :-1] > 0).all()) and bool((overlapped.kl_to_final[:, -1] == 0).all())


def test_without_kept_logits_and_at_some_positions(ckpt_path, early_sweeps):
    model = slow_streamed(ckpt_path, "stream")
    overlapped, sequential = lens_pair(model, tokens_for(batch=3), target=5, positions=[0, -1], readout="resid_pre")
    assert early_sweeps
    assert overlapped.logits is None
    assert_same_lens(overlapped, sequential)


def test_the_kept_logits_stay_within_the_idle_work_budget(ckpt_path, early_sweeps, monkeypatch):
    model = slow_streamed(ckpt_path, "memory")
    tokens = tokens_for()
    per_stream = tokens.numel() * model.cfg.d_vocab * model.unembed.weight.dtype.itemsize
    monkeypatch.setattr(early_readout, "IDLE_WORK_BYTES", 2 * per_stream)
    overlapped, sequential = lens_pair(model, tokens, target=9)
    assert sum(early_sweeps) == 2  # two streams read out early, the other three after the pass
    assert overlapped.n_readouts == 5
    assert_same_lens(overlapped, sequential)


def test_hooks_on_ln_final_fire_for_every_stream_and_change_the_read_out_alike(ckpt_path, early_sweeps):
    model = slow_streamed(ckpt_path, "stream")
    seen = []

    def scaled(tensor, *, hook):
        seen.append(tuple(tensor.shape))
        return tensor * 1.5

    model.add_hook("ln_final.hook_normalized", scaled)
    try:
        overlapped = ll.logit_lens(model, tokens_for(), target=4)
        calls = list(seen)
        seen.clear()
        model.waits_for_reads = False
        sequential = ll.logit_lens(model, tokens_for(), target=4)
        del model.waits_for_reads
    finally:
        model.reset_hooks()
    assert_same_lens(overlapped, sequential)
    # The model's own output [batch, pos, d_model] once, and the streams [batch * pos, streams, d_model]: in one
    # call after the pass, or one per sweep (several early ones, then the rest); every stream once either way.
    assert seen.count((2, 9, 64)) == calls.count((2, 9, 64)) == 1
    assert len(seen) == 2 and len(calls) > 2
    streams = [[shape[1] for shape in shapes if shape[0] == 18] for shapes in (calls, seen)]
    assert sum(streams[0]) == sum(streams[1]) == overlapped.n_readouts - 1


def test_tuned_lens_overlapped_equals_after_the_pass(ckpt_path, early_sweeps):
    model = slow_streamed(ckpt_path, "memory")
    lens = TunedLens.for_model(model, ("embed", "resid_post"))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in lens.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    overlapped, sequential = lens_pair(model, tokens_for(), target=11, lens=lens)
    assert early_sweeps
    assert overlapped.lens_kind == "tuned"
    assert_same_lens(overlapped, sequential)


def test_a_model_held_in_memory_runs_no_idle_work(ckpt_path, early_sweeps):
    model = ll.load(ckpt_path, index_cache=False, progress=False)
    ll.logit_lens(model, tokens_for(), target=3)
    assert early_sweeps == []


def test_a_pass_that_raises_leaves_no_sweep_or_unembedding_block_behind(ckpt_path, early_sweeps):
    model = slow_streamed(ckpt_path, "stream")

    def boom(tensor, *, hook):
        raise ValueError("boom at the last layer")

    model.add_hook(f"blocks.{model.cfg.n_layers - 1}.hook_resid_mid", boom)
    try:
        with pytest.raises(ValueError, match="boom at the last layer"):
            ll.logit_lens(model, tokens_for(), target=3)
    finally:
        model.reset_hooks()
    assert early_sweeps  # a sweep had started before the error
    weight = model.unembed.weight
    assert weight._block is None and weight._next is None and weight._pool is None
    overlapped, sequential = lens_pair(model, tokens_for(), target=3)
    assert_same_lens(overlapped, sequential)
