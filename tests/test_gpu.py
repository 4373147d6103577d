"""The CUDA paths: loading onto a GPU, parity with transformers there, streaming, the lens and generation.

Every test here is marked `gpu` and skipped without a CUDA device (see conftest.py). They use tiny random
checkpoints written to tmp_path, so they need no download.
"""

import pytest
import torch
from helpers import assert_same_top_k, tiny_config
from reference import reference_pair

import llama_lens as ll
from llama_lens.testing import random_state_dict, write_hf_checkpoint, write_meta_checkpoint

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _exact_fp32_matmuls():
    # TF32 would trade float32 precision for speed; parity is checked at full float32 precision.
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.fixture(scope="module", params=["hf", "meta"])
def ckpt_path(request, tmp_path_factory):
    cfg = tiny_config(n_layers=3)
    state = random_state_dict(cfg, seed=3)
    folder = tmp_path_factory.mktemp("gpu") / request.param
    if request.param == "hf":
        return write_hf_checkpoint(folder, cfg, state, shards=2, dtype=torch.bfloat16)
    return write_meta_checkpoint(folder, cfg, state, mp=2, dtype=torch.bfloat16)


def tokens_for(batch=2, pos=11):
    return torch.randint(3, 128, (batch, pos), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("shape", ["gqa", "mqa", "tied_bias_llama3"])
def test_parity_with_transformers_on_cuda(shape):
    changes = {
        "gqa": {},
        "mqa": {"n_kv_heads": 1},
        "tied_bias_llama3": {
            "tie_embeddings": True,
            "attention_bias": True,
            "mlp_bias": True,
            "rope_scaling": ll.RopeScaling(
                kind="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        },
    }[shape]
    hf, ours = reference_pair(tiny_config(**changes))
    hf, ours = hf.cuda(), ours.cuda()
    tokens = tokens_for(pos=100).cuda()
    with torch.no_grad():
        expected = hf(tokens, output_hidden_states=True)
        logits, cache = ours.run_with_cache(tokens)
    assert logits.device.type == "cuda"
    assert (logits - expected.logits).abs().max().item() <= 1e-4
    for layer in range(ours.cfg.n_layers):
        resid = cache[f"blocks.{layer}.hook_resid_post"]
        if layer < ours.cfg.n_layers - 1:  # the last hidden_states entry is already normed
            torch.testing.assert_close(resid, expected.hidden_states[layer + 1], atol=1e-5, rtol=1e-5)


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
    atol = 1e-4 if dtype == torch.float32 else 0.1
    assert (gpu_logits - cpu_logits).abs().max().item() <= atol


def test_streamed_onto_cuda_equals_loaded(ckpt_path):
    loaded = ll.load(ckpt_path, device="cuda", index_cache=False, progress=False)
    streamed = ll.load(ckpt_path, device="cuda", stream=True, index_cache=False, progress=False)
    tokens = tokens_for().cuda()
    with torch.no_grad():
        assert torch.equal(streamed(tokens), loaded(tokens))
    on_gpu = [name for name, p in streamed.named_parameters() if name.startswith("blocks.") and not p.is_meta]
    assert on_gpu == []  # no layer left on the GPU after the pass


def test_lens_on_cuda_reads_out_the_models_own_logits_last(ckpt_path):
    model = ll.load(ckpt_path, device="cuda", index_cache=False, progress=False)
    tokens = tokens_for(batch=1).cuda()
    target = int(tokens[0, -1])
    lens = ll.logit_lens(model, tokens, target=target)
    assert lens.labels[-1] == f"{model.cfg.n_layers - 1}_post"
    with torch.no_grad():
        logits = model(tokens).float()  # [batch, pos, d_vocab]
    probs = logits.softmax(-1)
    torch.testing.assert_close(
        lens.target_probs[0, -1, :, 0].cpu(), probs[0, lens.positions, target].cpu(), atol=1e-6, rtol=1e-4
    )
    scores = logits[0, lens.positions].cpu()  # [n_pos, d_vocab]
    top = scores.topk(1, dim=-1)
    found = lens.top_ids[0, -1, :, :1].cpu(), lens.top_logits[0, -1, :, :1].cpu()
    assert_same_top_k(*found, top.values, scores=scores, expected_ids=top.indices, atol=1e-4)
    assert lens.kl_to_final[0, -1].abs().max().item() < 1e-5


def test_greedy_generation_on_cuda_with_and_without_kv_cache(ckpt_path):
    model = ll.load(ckpt_path, device="cuda", index_cache=False, progress=False)
    prompt = tokens_for(batch=1, pos=6).cuda()
    cached = model.generate(prompt, max_new_tokens=8, temperature=0, stop_at_eos=False)
    uncached = model.generate(prompt, max_new_tokens=8, temperature=0, stop_at_eos=False, use_kv_cache=False)
    tokens = prompt
    with torch.no_grad():
        for _ in range(8):
            next_token = model(tokens)[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, next_token], dim=1)
    assert cached.tokens == uncached.tokens == [tokens[0, 6:].tolist()]
