"""The streamed lens at the CPU's arithmetic limit: a bfloat16 checkpoint streamed and multiplied in float32 (each
weight cast once per pass, in cache-sized blocks), the read-out sweeping the unembedding once per batch, and
ll.plan's FLOPs and wall time from a read rate and a GEMM rate (llama_lens.loading.roofline)."""

import pytest
import torch
import torch.nn.functional as F
from support.models import assert_same_top_k, tiny_config

import llama_lens as ll
import llama_lens.loading.stream_vocab as stream_vocab
import llama_lens.model.cpu_matmul as cpu_matmul
from llama_lens.errors import ArgumentError
from llama_lens.loading import roofline
from llama_lens.loading.plan import plan
from llama_lens.model import idle
from llama_lens.testing import random_state_dict, write_meta_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BLOCK_ROWS = 48  # rows per block of the streamed unembedding: three blocks over the tiny vocabulary (128)


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(stream_vocab, "UNEMBED_BLOCK_ROWS", BLOCK_ROWS)


@pytest.fixture
def float32_products(monkeypatch):
    """As on a CPU without bfloat16 units ("auto" with no native support): half-precision products of at least
    MIN_ROWS rows in float32, here every one (MIN_ROWS 1), as the tiny prompts are short."""
    monkeypatch.setattr(cpu_matmul, "has_native_support", lambda dtype: False)
    monkeypatch.setattr(cpu_matmul, "MIN_ROWS", 1)
    monkeypatch.setenv(cpu_matmul.ENV_VAR, "auto")
    cpu_matmul.mode.cache_clear()
    yield
    monkeypatch.undo()
    cpu_matmul.mode.cache_clear()


@pytest.fixture(scope="module")
def bf16_path(tmp_path_factory):
    cfg = tiny_config(n_layers=3)
    state = {name: tensor.bfloat16() for name, tensor in random_state_dict(cfg, seed=3).items()}
    return write_meta_checkpoint(tmp_path_factory.mktemp("roofline") / "meta", cfg, state, mp=2)


def load(path, **kwargs):
    return ll.load(path, index_cache=False, progress=False, dtype=torch.bfloat16, **kwargs)


def tokens_for(batch=2, pos=9):
    return torch.randint(0, 128, (batch, pos), generator=torch.Generator().manual_seed(6))


@pytest.mark.parametrize("unembed", ["memory", "stream"])
def test_streamed_float32_lens_equals_the_loaded_model(bf16_path, float32_products, unembed):
    loaded, streamed = load(bf16_path), load(bf16_path, stream=True, unembed=unembed)
    assert cpu_matmul.computes_in_float32(torch.zeros(9, 64, dtype=torch.bfloat16))
    tokens = tokens_for()
    logits = streamed(tokens)
    assert logits.dtype == torch.bfloat16
    # The same float32 products rounded once to bfloat16 on both sides: equal to bfloat16 rounding at most.
    torch.testing.assert_close(logits, loaded(tokens), rtol=2**-7, atol=1e-3)
    kwargs = dict(target=[7, 100], top_k=4, keep_logits=True)
    expected, got = ll.logit_lens(loaded, tokens, **kwargs), ll.logit_lens(streamed, tokens, **kwargs)
    torch.testing.assert_close(got.logits, expected.logits, rtol=2**-7, atol=1e-3)
    assert_same_top_k(got.top_ids, got.top_logits, expected.top_logits, scores=got.logits.float(), atol=1e-2)
    torch.testing.assert_close(got.kl_to_final, expected.kl_to_final, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(got.entropy, expected.entropy, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(got.target_probs, expected.target_probs, rtol=1e-2, atol=1e-4)


def test_each_weight_row_is_cast_to_float32_once_per_pass(bf16_path, float32_products, monkeypatch):
    streamed = load(bf16_path, stream=True, unembed="stream")
    cfg = streamed.cfg
    products, original = [], F.linear

    def spy(x, weight, bias=None):
        products.append((x.dtype, weight.dtype, tuple(weight.shape)))
        return original(x, weight, bias)

    monkeypatch.setattr(F, "linear", spy)
    streamed(tokens_for(batch=2))  # one pass, a batch of two prompts
    monkeypatch.undo()
    assert {(x, w) for x, w, _ in products} == {(torch.float32, torch.float32)}  # every product in float32
    # Every row of every layer matrix, and of the unembedding, cast (and multiplied) once for the whole batch.
    cast = sum(rows * d_in for _, _, (rows, d_in) in products)
    assert cast == cfg.n_layers * roofline.layer_matmul_params(cfg) + cfg.d_vocab * cfg.d_model


def test_the_read_out_sweeps_the_unembedding_once_per_batch(bf16_path, float32_products, monkeypatch):
    model = load(bf16_path, stream=True, unembed="stream")
    reads, read_rows = [], ll.Checkpoint.read_rows

    def recording(self, name, start, target, **kwargs):
        reads.append((name, start, len(target)))
        return read_rows(self, name, start, target, **kwargs)

    monkeypatch.setattr(ll.Checkpoint, "read_rows", recording)
    mm_products, original_mm = [], torch.mm

    def mm_spy(a, b, **kwargs):
        mm_products.append((a.dtype, tuple(b.shape)))
        return original_mm(a, b, **kwargs)

    monkeypatch.setattr(torch, "mm", mm_spy)
    lens = ll.logit_lens(model, tokens_for(batch=3), target=[5, 6, 7])  # 3 prompts x 9 tokens x 3 read-outs
    monkeypatch.undo()
    blocks = [(name, start, n) for name, start, n in reads if name == "unembed.weight"]
    one_sweep = [("unembed.weight", 0, 48), ("unembed.weight", 48, 48), ("unembed.weight", 96, 32)]
    # Once for the model's own logits, once for every read-out of every prompt together: not once per prompt,
    # read-out or chunk.
    assert blocks == one_sweep * 2
    assert lens.n_readouts == 4
    # The read-out casts each vocabulary block of the sweep (readout.VOCAB_BLOCK wide: one over 128 ids) once,
    # and multiplies every read-out row of the batch by it in one float32 product.
    readout_products = [(dtype, shape) for dtype, shape in mm_products if shape == (64, 128)]  # block.t()
    assert readout_products == [(torch.float32, (64, 128))]


# -------------------------------------------------------------------------------- FLOPs and the predicted wall
def test_flops_are_counted_by_hand():
    cfg = tiny_config(n_layers=3)
    # q, k, v, o and the three MLP matrices: 64x64 + 2 x (32x64) + 64x64 + 3 x (128x64)
    assert roofline.layer_matmul_params(cfg) == 64 * 64 * 2 + 2 * 32 * 64 + 3 * 128 * 64
    per_layer = 2 * 10 * roofline.layer_matmul_params(cfg) + 4 * 2 * 4 * 5 * 5 * 16
    assert roofline.layer_flops(cfg, tokens=5, batch=2) == 3 * per_layer
    assert roofline.unembed_flops(cfg, rows=10, readouts=3) == 2 * 10 * 4 * 128 * 64


def test_plan_predicts_the_wall_from_the_read_and_gemm_rates(bf16_path):
    cfg = tiny_config(n_layers=3)
    kwargs = dict(tokens=5, dtype=torch.bfloat16, read_bandwidth=1e6, gemm_rate=1e8)
    layer_flops = roofline.layer_flops(cfg, tokens=5)
    head_flops = roofline.unembed_flops(cfg, rows=5, readouts=3)
    streamed = plan(bf16_path, stream=True, unembed="stream", readouts=3, **kwargs)
    assert streamed.flops == layer_flops + head_flops and streamed.gemm_rate == 1e8
    head_read = cfg.d_vocab * cfg.d_model * 2 / 1e6
    layer_read = streamed.read_bytes / 1e6 - head_read
    # Two phases one after the other, each the longer of its read and its compute.
    expected = max(layer_read, layer_flops / 1e8) + max(head_read, head_flops / 1e8)
    assert streamed.est_wall_seconds == pytest.approx(expected)
    held = plan(bf16_path, stream=True, unembed="memory", readouts=3, **kwargs)
    assert held.est_wall_seconds == pytest.approx(head_read + max(layer_read, layer_flops / 1e8) + head_flops / 1e8)
    whole = plan(bf16_path, readouts=3, **kwargs)  # read first, then computed
    assert whole.est_wall_seconds == pytest.approx(whole.read_bytes / 1e6 + (layer_flops + head_flops) / 1e8)
    assert "TFLOP" in repr(streamed)


def test_plan_holds_the_early_read_outs_logits_and_times_the_read_out_after_the_layers(bf16_path, monkeypatch):
    # 100 tokens x 3 read-outs: enough vectors for an early sweep (model/idle.py), whose logits the plan holds.
    cfg = tiny_config(n_layers=3)
    kwargs = dict(tokens=100, dtype=torch.bfloat16, read_bandwidth=1e5, gemm_rate=1e8, readouts=3)
    layer_s = roofline.layer_flops(cfg, tokens=100) / 1e8
    head_s = roofline.unembed_flops(cfg, rows=100, readouts=3) / 1e8
    head_read = cfg.d_vocab * cfg.d_model * 2 / 1e5
    for unembed in ("stream", "memory"):
        estimate = plan(bf16_path, stream=True, unembed=unembed, **kwargs)
        layer_read = estimate.read_bytes / 1e5 - head_read
        assert layer_read > layer_s  # the reads are the longer here: the lens reads out during their wait
        # The early read-outs' logits, in the weights' dtype, held until the final distribution exists.
        monkeypatch.setattr(idle, "MIN_EARLY_VECTORS", 10**9)
        none_early = plan(bf16_path, stream=True, unembed=unembed, **kwargs)
        monkeypatch.undo()
        assert estimate.peak_bytes - none_early.peak_bytes == 3 * 100 * cfg.d_vocab * 2
        # The wall is the schedule with the read-out after the layers (roofline.early_readouts says why).
        assert estimate.est_wall_seconds == none_early.est_wall_seconds
        if unembed == "memory":
            assert estimate.est_wall_seconds == pytest.approx(head_read + max(layer_read, layer_s) + head_s)
        else:
            assert estimate.est_wall_seconds == pytest.approx(max(layer_read, layer_s) + max(head_read, head_s))


def test_plan_refuses_a_negative_readout_count(bf16_path):
    with pytest.raises(ArgumentError, match="readouts"):
        plan(bf16_path, readouts=-1)


def test_the_gemm_rate_is_measured_here():
    rate = roofline.measure_gemm_rate(8, 32, 64, seconds=0.01)
    assert rate > 0 and rate != float("inf")
