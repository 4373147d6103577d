"""What only a CUDA device can show: weights placed on it in float32 and bfloat16, and its memory given back.

The forward pass, parity with transformers, the lens, streaming and generation run on the GPU as the same tests
as on the CPU, through the `device` fixture: `python -m pytest --device cuda` (see conftest.py). This file
holds the checks with no CPU counterpart. Every test here is marked `gpu` and skipped without a CUDA device;
they use tiny random checkpoints written to tmp_path, so they need no download.
"""

import gc

import pytest
import torch
from support.models import tiny_config

import llama_lens as ll
from llama_lens.io.checkpoint import param_shapes
from llama_lens.testing import random_state_dict, write_hf_checkpoint, write_meta_checkpoint

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", params=["hf", "meta"])
def ckpt_path(request, tmp_path_factory):
    # A wide MLP, so that each layer's weights outweigh the activations of the short prompts below.
    cfg = tiny_config(n_layers=8, d_mlp=1024)
    state = random_state_dict(cfg, seed=3)
    folder = tmp_path_factory.mktemp("gpu") / request.param
    if request.param == "hf":
        return write_hf_checkpoint(folder, cfg, state, shards=2, dtype=torch.bfloat16)
    return write_meta_checkpoint(folder, cfg, state, mp=2, dtype=torch.bfloat16)


def tokens_for(batch=2, pos=11):
    return torch.randint(3, 128, (batch, pos), generator=torch.Generator().manual_seed(7))


def allocated_after_collecting() -> int:
    """Bytes held by live tensors on the current CUDA device, once unreachable Python objects are collected."""
    gc.collect()
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def layer_bytes(cfg, dtype: torch.dtype) -> int:
    """Bytes of one block's weights."""
    shapes = [shape for name, shape in param_shapes(cfg).items() if name.startswith("blocks.0.")]
    return sum(torch.Size(shape).numel() for shape in shapes) * dtype.itemsize


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_onto_cuda_matches_cpu(ckpt_path, dtype):
    on_gpu = ll.load(ckpt_path, dtype=dtype, device="cuda", index_cache=False, progress=False)
    on_cpu = ll.load(ckpt_path, dtype=dtype, device="cpu", index_cache=False, progress=False)
    devices = {p.device.type for p in on_gpu.parameters()} | {b.device.type for b in on_gpu.buffers()}
    assert devices == {"cuda"}
    assert {p.dtype for p in on_gpu.parameters()} == {dtype}
    tokens = tokens_for()
    with torch.no_grad():
        gpu_logits = on_gpu(tokens.cuda()).float().cpu()
        cpu_logits = on_cpu(tokens).float()
    # Two devices, two kernels: the same sums in different orders, so equal up to rounding in `dtype`.
    atol = 1e-4 if dtype == torch.float32 else 0.1
    assert (gpu_logits - cpu_logits).abs().max().item() <= atol


def test_dropped_model_gives_its_cuda_memory_back(ckpt_path):
    def load_and_run():
        model = ll.load(ckpt_path, dtype=torch.bfloat16, device="cuda", index_cache=False, progress=False)
        weights = sum(p.nbytes for p in model.parameters())
        assert allocated_after_collecting() - before >= weights  # the weights really are on the device
        logits, cache = model.run_with_cache(tokens_for().cuda())
        lens = ll.logit_lens(model, tokens_for(batch=1).cuda(), target=5)
        assert logits.is_cuda and cache["blocks.0.hook_resid_post"].is_cuda
        assert lens.target_probs is not None  # the lens ran on the device too (its results come back on the CPU)

    # The first pass also sets up cuBLAS workspaces, which torch keeps for the life of the process.
    before = allocated_after_collecting()
    load_and_run()
    before = allocated_after_collecting()
    load_and_run()
    assert allocated_after_collecting() == before  # nothing kept a device tensor: no cache, no hook, no closure


def test_streamed_model_holds_at_most_a_few_layers_on_cuda(ckpt_path):
    model = ll.load(ckpt_path, dtype=torch.bfloat16, device="cuda", stream=True, index_cache=False, progress=False)
    one_layer = layer_bytes(model.cfg, torch.bfloat16)
    tokens = tokens_for().cuda()
    with torch.no_grad():
        model(tokens)  # sets up cuBLAS workspaces, kept for the life of the process
        after_load = allocated_after_collecting()
        torch.cuda.reset_peak_memory_stats()
        logits = model(tokens)
    peak = torch.cuda.max_memory_allocated() - after_load
    # The layer running and the one read ahead, plus small activations; never the model's 8 layers at once.
    assert peak < 4 * one_layer, f"{peak} bytes at the peak, {one_layer} bytes a layer"
    del logits
    assert allocated_after_collecting() == after_load  # every layer went back to the meta device


def test_a_dictionary_left_on_the_cpu_splices_into_a_model_on_cuda():
    # The dictionary computes where it lives; what it writes back goes to the model's device (it raised a device
    # mismatch from inside torch).
    from pathlib import Path

    from support.models import tiny_model

    from llama_lens.dictionaries.dictionary import Dictionary, TensorRef

    model = tiny_model(tiny_config()).to("cuda")
    d_model, d_sae = model.cfg.d_model, 32
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "W_enc": torch.randn(d_model, d_sae, generator=generator) * d_model**-0.5,
        "b_enc": torch.zeros(d_sae),
        "W_dec": torch.randn(d_sae, d_model, generator=generator) * 0.3,
        "b_dec": torch.zeros(d_model),
    }
    transcoder = Dictionary(
        format="test",
        architecture="relu",
        path=Path("random/layer_1"),
        hook_in="blocks.1.mlp.hook_in",
        hook_out="blocks.1.hook_mlp_out",
        d_in=d_model,
        d_sae=d_sae,
        d_out=d_model,
        params={name: TensorRef(None, name) for name in tensors},
        activation="relu",
        dtype=torch.float32,
        _loaded=tensors,
    )
    tokens = tokens_for().cuda()
    with torch.no_grad():
        plain = model(tokens)
        with ll.spliced(model, transcoder, use_error_term=True):
            spliced = model(tokens)
        with ll.spliced(model, transcoder):
            replaced = model(tokens)
    assert spliced.device == plain.device and (spliced - plain).abs().max() <= 1e-4
    assert replaced.device == plain.device and (replaced - plain).abs().max() > 1e-3
