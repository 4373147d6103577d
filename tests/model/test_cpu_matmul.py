"""Half-precision matmuls computed in float32 on CPUs without half-precision units (llama_lens/model/cpu_matmul.py).

The float32 path and PyTorch's native bfloat16 kernel both accumulate in float32 and round the output once, so
each is compared with a float64 product within bfloat16's rounding, and with the other within one rounding
step, never exactly (their summation orders differ).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from support.models import assert_same_top_k, tiny_config, tiny_model

import llama_lens as ll
from llama_lens.lens.readout import read_out
from llama_lens.model import cpu_matmul

# bfloat16 keeps 8 significant bits (7 stored): rounding to nearest is off by at most 2**-8 of the value.
BF16_HALF_ULP = 2.0**-8


@pytest.fixture
def matmul_mode(monkeypatch):
    """set(mode): LLAMA_LENS_CPU_MATMUL for this test only (the setting is read once per process, so the cache
    is cleared on the way in and out)."""

    def set_mode(value: str) -> None:
        monkeypatch.setenv(cpu_matmul.ENV_VAR, value)
        cpu_matmul.mode.cache_clear()

    yield set_mode
    monkeypatch.undo()
    cpu_matmul.mode.cache_clear()


def rounding_bound(reference: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per element: bfloat16's half-ulp of the exact value plus float32's accumulation error over d_in terms."""
    accumulation = x.shape[-1] * 2.0**-24 * (x.double().abs() @ w.double().abs().transpose(-1, -2))
    return BF16_HALF_ULP * reference.abs() + accumulation + 1e-30


def test_linear_in_float32_is_the_exact_product_rounded_once(matmul_mode):
    x = torch.randn(96, 256).bfloat16()
    weight = torch.randn(384, 256).bfloat16()
    bias = torch.randn(384).bfloat16()
    exact = F.linear(x.double(), weight.double(), bias.double())  # bfloat16 values are exact in float64
    bound = rounding_bound(exact, torch.cat([x, torch.ones(96, 1)], 1), torch.cat([weight, bias[:, None]], 1))

    matmul_mode("float32")
    in_float32 = cpu_matmul.linear(x, weight, bias)
    matmul_mode("native")
    native = cpu_matmul.linear(x, weight, bias)

    assert in_float32.dtype == native.dtype == torch.bfloat16
    assert bool(((in_float32.double() - exact).abs() <= bound).all())
    assert bool(((native.double() - exact).abs() <= bound).all())
    # Both round a float32 sum once: at most one rounding step (2 half-ulps) apart, now and then.
    assert bool(((in_float32.double() - native.double()).abs() <= 2 * bound).all())
    # And no farther from the exact product than the native kernel, over the whole matrix.
    error, native_error = (in_float32.double() - exact).abs().max(), (native.double() - exact).abs().max()
    assert error <= native_error * (1 + 2**-7)


def test_batched_matmul_in_float32_matches_the_exact_product(matmul_mode):
    a = torch.randn(2, 3, 64, 16).bfloat16()  # [batch, n_heads, q_pos, d_head]
    b = torch.randn(2, 3, 16, 64).bfloat16()
    exact = a.double() @ b.double()
    matmul_mode("float32")
    product = cpu_matmul.matmul(a, b)
    assert product.dtype == torch.bfloat16 and product.shape == exact.shape
    assert bool(((product.double() - exact).abs() <= rounding_bound(exact, a, b.transpose(-1, -2))).all())


def test_the_path_follows_dtype_device_mode_and_rows(matmul_mode, monkeypatch):
    rows = cpu_matmul.MIN_ROWS
    half = torch.zeros(rows, 8, dtype=torch.bfloat16)
    matmul_mode("float32")
    assert cpu_matmul.computes_in_float32(half)
    assert cpu_matmul.computes_in_float32(half.half())
    assert cpu_matmul.computes_in_float32(half[:1])  # forced: whatever the rows
    assert not cpu_matmul.computes_in_float32(half.float())  # float32 stays as it is
    assert not cpu_matmul.computes_in_float32(torch.zeros(rows, 8, dtype=torch.bfloat16, device="meta"))
    matmul_mode("native")
    assert not cpu_matmul.computes_in_float32(half)

    matmul_mode("auto")
    monkeypatch.setattr(cpu_matmul, "has_native_support", lambda dtype: False)
    assert cpu_matmul.computes_in_float32(half)
    assert not cpu_matmul.computes_in_float32(half[: rows - 1])  # too few rows to pay for the weight's cast
    assert cpu_matmul.computes_in_float32(half[: rows - 1], rows=rows)
    monkeypatch.setattr(cpu_matmul, "has_native_support", lambda dtype: True)
    assert not cpu_matmul.computes_in_float32(half)


def test_a_bad_setting_names_the_variable(matmul_mode):
    matmul_mode("fast")
    with pytest.raises(ValueError, match=r"LLAMA_LENS_CPU_MATMUL='fast' .* auto, native, float32"):
        cpu_matmul.computes_in_float32(torch.zeros(64, 8, dtype=torch.bfloat16))


def test_native_support_is_asked_of_the_cpu():
    assert cpu_matmul.has_native_support(torch.bfloat16) == bool(
        torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    )
    assert not cpu_matmul.has_native_support(torch.float32)


def linear_input_dtypes(monkeypatch) -> list[torch.dtype]:
    """Records the dtype of every F.linear input from now on."""
    seen, original = [], F.linear

    def spy(x, weight, bias=None):
        seen.append(x.dtype)
        return original(x, weight, bias)

    monkeypatch.setattr(F, "linear", spy)
    return seen


def test_float32_models_are_untouched(matmul_mode, monkeypatch):
    model = tiny_model()
    tokens = torch.randint(0, 128, (2, 40))
    matmul_mode("native")
    native = model(tokens)
    matmul_mode("float32")
    seen = linear_input_dtypes(monkeypatch)
    assert torch.equal(model(tokens), native)  # the very same kernels: bit-identical
    assert seen and set(seen) == {torch.float32}


def test_bfloat16_model_in_float32_keeps_hooks_in_bfloat16_and_logits_close(matmul_mode, monkeypatch):
    model = tiny_model(tiny_config(n_layers=3)).to(torch.bfloat16)
    tokens = torch.randint(0, 128, (2, 40))
    exact = copy.deepcopy(model).to(torch.float64)(tokens)  # the same bfloat16 weights, exact in float64

    runs = {}
    for mode in ("native", "float32"):
        matmul_mode(mode)
        seen = linear_input_dtypes(monkeypatch)
        logits, cache = model.run_with_cache(tokens)  # every hook point, the written-out attention too
        runs[mode] = logits, {name: value.dtype for name, value in cache.items()}, set(seen)
        monkeypatch.undo()
    (native, native_dtypes, native_seen), (logits, hook_dtypes, seen) = runs["native"], runs["float32"]
    assert seen == {torch.float32} and native_seen == {torch.bfloat16}  # every linear, one way or the other
    assert hook_dtypes == native_dtypes and hook_dtypes["blocks.0.attn.hook_pattern"] == torch.bfloat16
    assert logits.dtype == torch.bfloat16

    # Through 3 layers the roundings compound: both paths lie about as far from the float64 model.
    error, native_error = (logits.double() - exact).abs().max(), (native.double() - exact).abs().max()
    assert error <= 2 * native_error + 1e-3
    torch.testing.assert_close(logits.float(), native.float(), rtol=0.05, atol=0.05)


def test_bfloat16_lens_top_k_is_the_native_one(matmul_mode):
    model = tiny_model(tiny_config(d_vocab=3000, n_layers=3), embed_scale=20.0).to(torch.bfloat16)
    tokens = torch.randint(0, 3000, (1, 24))  # 24 positions x 4 read-outs = 96 rows in one chunk
    results = {}
    for mode in ("native", "float32"):
        matmul_mode(mode)
        results[mode] = ll.logit_lens(model, tokens, target=7, top_k=5)
    ours, native = results["float32"], results["native"]
    # bfloat16 logits one rounding step apart at most: ties and near-ties may swap.
    step = float(native.top_logits.float().abs().max()) * 2**-7
    assert_same_top_k(ours.top_ids, ours.top_logits.float(), native.top_logits.float(), atol=step,
                      expected_ids=native.top_ids)  # fmt: skip
    torch.testing.assert_close(ours.kl_to_final, native.kl_to_final, rtol=0.02, atol=0.02)


def test_read_out_casts_each_vocabulary_block_once_for_every_read_out(matmul_mode, monkeypatch):
    normed = torch.randn(16, 6, 64).bfloat16()  # 96 rows in one chunk
    weight = torch.randn(2500, 64).bfloat16()
    exact = normed.double() @ weight.double().T  # [n_rows, n_readouts, d_vocab]
    final_logits = torch.randn(16, 2500)
    casts = []
    original_mm = torch.mm

    def spy(a, b, *, out=None):
        casts.append((a.dtype, b.dtype))
        return original_mm(a, b, out=out)

    matmul_mode("float32")
    monkeypatch.setattr(torch, "mm", spy)
    _, metrics = read_out(normed, weight, final_logits=final_logits, top_k=4, keep_logits=True)
    monkeypatch.undo()
    n_blocks = -(-2500 // 1024)
    assert casts == [(torch.float32, torch.float32)] * n_blocks  # one product per block, all read-outs at once
    assert metrics.logits.dtype == torch.bfloat16
    bound = rounding_bound(exact, normed, weight)
    assert bool(((metrics.logits.double() - exact).abs() <= bound).all())
    values, ids = exact.topk(4, dim=-1)
    assert_same_top_k(metrics.top_ids, metrics.top_logits.double(), values, atol=float(bound.max()),
                      expected_ids=ids)  # fmt: skip


def test_a_large_weight_is_cast_in_blocks_of_rows(matmul_mode, monkeypatch):
    monkeypatch.setattr(cpu_matmul, "WEIGHT_BLOCK_ELEMENTS", 100 * 64)  # 100 rows of d_in 64 at a time
    x = torch.randn(3, 70, 64).bfloat16()
    weight, bias = torch.randn(250, 64).bfloat16(), torch.randn(250).bfloat16()
    casts, original = [], F.linear

    def spy(x, weight, bias=None):
        casts.append(tuple(weight.shape))
        return original(x, weight, bias)

    matmul_mode("float32")
    monkeypatch.setattr(F, "linear", spy)
    product = cpu_matmul.linear(x, weight, bias)
    assert cpu_matmul.cast_elements(250, 64) == 100 * 64  # what ll.plan counts
    monkeypatch.undo()
    assert casts == [(100, 64), (100, 64), (50, 64)]
    exact = F.linear(x.double(), weight.double(), bias.double())
    bound = rounding_bound(exact, torch.cat([x, torch.ones(3, 70, 1)], -1), torch.cat([weight, bias[:, None]], 1))
    assert product.shape == (3, 70, 250) and bool(((product.double() - exact).abs() <= bound).all())
