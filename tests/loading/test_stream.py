"""Streaming: a StreamedLlama must compute exactly what a loaded model computes, and hold no layer after."""

import gc
import mmap
import os
import shutil
import threading
import weakref
from pathlib import Path

import pytest
import torch
from support.loader_watch import count_torch_loads, shard_pages_in_memory
from support.models import tiny_config

import llama_lens as ll
import llama_lens.loading.host_memory as host_memory
from llama_lens.io.safetensors import read_safetensors_header
from llama_lens.loading.plan import layer_param_count
from llama_lens.loading.stream import LayerStream, StreamedLlama
from llama_lens.testing import random_state_dict, write_hf_checkpoint, write_meta_checkpoint


def write_checkpoint(folder, layout, cfg):
    state = random_state_dict(cfg, seed=1)
    if layout == "hf":
        return write_hf_checkpoint(folder, cfg, state, shards=2)
    return write_meta_checkpoint(folder, cfg, state, mp=2)


@pytest.fixture(scope="module", params=["hf", "meta"])
def ckpt_path(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("stream") / request.param
    return write_checkpoint(folder, request.param, tiny_config(n_layers=3))


def load_pair(path, **kwargs):
    loaded = ll.load(path, index_cache=False, progress=False, **kwargs)
    streamed = ll.load(path, stream=True, index_cache=False, progress=False, **kwargs)
    return loaded, streamed


def assert_no_layer_resident(model):
    for name, param in model.named_parameters():
        if name.startswith("blocks."):
            assert param.is_meta, f"{name} still holds real weights"
    assert not [t for t in threading.enumerate() if t.name.startswith("llama_lens-stream")]


def tokens_for(batch=2, pos=9):
    return torch.randint(0, 128, (batch, pos), generator=torch.Generator().manual_seed(5))


def test_streamed_model_holds_only_norm_and_unembedding(ckpt_path):
    _, streamed = load_pair(ckpt_path)
    assert isinstance(streamed, StreamedLlama)
    real = sorted({name for name, param in streamed.named_parameters(remove_duplicate=False) if not param.is_meta})
    # The embedding is read by rows at each pass (test_stream_vocab.py); plenty of memory: the unembedding held.
    assert real == ["ln_final.weight", "unembed.weight"]
    assert_no_layer_resident(streamed)


def test_logits_identical(ckpt_path, device):
    loaded, streamed = load_pair(ckpt_path, device=device)
    tokens = tokens_for()
    assert torch.equal(streamed(tokens), loaded(tokens))
    assert_no_layer_resident(streamed)


def test_logits_identical_with_left_padding_and_bfloat16(ckpt_path):
    loaded, streamed = load_pair(ckpt_path, dtype=torch.bfloat16)
    tokens = tokens_for(batch=3)
    mask = torch.ones_like(tokens)
    mask[0, :4] = 0
    mask[2, :1] = 0
    expected = loaded(tokens, attention_mask=mask)
    assert expected.dtype == torch.bfloat16
    assert torch.equal(streamed(tokens, attention_mask=mask), expected)


def test_tied_embeddings_stay_tied(tmp_path):
    path = write_checkpoint(tmp_path / "tied", "hf", tiny_config(tie_embeddings=True))
    loaded, streamed = load_pair(path)
    assert streamed.unembed.weight is streamed.embed.weight
    tokens = tokens_for()
    assert torch.equal(streamed(tokens), loaded(tokens))


def test_run_with_cache_identical(ckpt_path):
    loaded, streamed = load_pair(ckpt_path)
    tokens = tokens_for()
    for names_filter in (None, lambda name: name.endswith(("resid_pre", "hook_pattern", "mlp.hook_post"))):
        logits_l, cache_l = loaded.run_with_cache(tokens, names_filter=names_filter)
        logits_s, cache_s = streamed.run_with_cache(tokens, names_filter=names_filter)
        assert torch.equal(logits_s, logits_l)
        assert list(cache_s.keys()) == list(cache_l.keys())
        for name in cache_l:
            assert torch.equal(cache_s[name], cache_l[name]), name
    assert_no_layer_resident(streamed)


def test_partial_runs_identical(ckpt_path):
    loaded, streamed = load_pair(ckpt_path)
    tokens = tokens_for()
    resid = loaded(tokens, stop_at_layer=1)
    assert torch.equal(streamed(tokens, stop_at_layer=1), resid)
    assert torch.equal(streamed(resid=resid, start_at_layer=1), loaded(resid=resid, start_at_layer=1))
    assert_no_layer_resident(streamed)


def test_layer_subset_identical(ckpt_path):
    loaded = ll.load(ckpt_path, layers=range(0, 2), index_cache=False, progress=False)
    streamed = ll.load(ckpt_path, layers=range(0, 2), stream=True, index_cache=False, progress=False)
    assert list(streamed.blocks) == ["0", "1"]
    tokens = tokens_for()
    assert torch.equal(streamed(tokens), loaded(tokens))


def test_replacing_hook_has_the_same_effect(ckpt_path):
    loaded, streamed = load_pair(ckpt_path)
    tokens = tokens_for()

    def zero_head_1(z, *, hook):
        z = z.clone()
        z[:, :, 1] = 0
        return z

    hooks = [("blocks.1.attn.hook_z", zero_head_1), ("blocks.0.hook_mlp_out", lambda t, *, hook: 2 * t)]
    expected = loaded.run_with_hooks(tokens, fwd_hooks=hooks)
    assert not torch.allclose(expected, loaded(tokens))  # the hook does change the output
    assert torch.equal(streamed.run_with_hooks(tokens, fwd_hooks=hooks), expected)
    assert_no_layer_resident(streamed)


def test_hook_reading_weights_sees_the_real_layer(ckpt_path):
    loaded, streamed = load_pair(ckpt_path)
    seen = {}

    def read_weight(tensor, *, hook):
        layer = hook.name.split(".")[1]
        seen[layer] = streamed.blocks[layer].attn.q_proj.weight.clone()

    streamed.run_with_hooks(tokens_for(), fwd_hooks=[(lambda name: name.endswith("attn.hook_q"), read_weight)])
    assert sorted(seen) == ["0", "1", "2"]
    for layer, weight in seen.items():
        assert torch.equal(weight, loaded.blocks[layer].attn.q_proj.weight)


def counting_reader(model):
    calls = []
    reader = model.reader

    def counted(layer):
        calls.append(layer)
        return reader(layer)

    model.reader = counted
    return calls


def test_each_layer_read_once_per_forward_whatever_the_batch(ckpt_path):
    _, streamed = load_pair(ckpt_path)
    calls = counting_reader(streamed)
    streamed(tokens_for(batch=5))
    assert calls == [0, 1, 2]
    streamed(tokens_for(batch=1), stop_at_layer=2)
    assert calls == [0, 1, 2, 0, 1]  # a pass that stops early reads only the layers it runs


def test_next_layer_is_read_while_the_current_one_computes(ckpt_path):
    _, streamed = load_pair(ckpt_path)
    reader = streamed.reader
    read_started = {layer: threading.Event() for layer in range(3)}
    overlapped = {}

    def instrumented(layer):
        read_started[layer].set()
        return reader(layer)

    def wait_for_next_read(tensor, *, hook):
        layer = int(hook.name.split(".")[1])
        # Still inside layer `layer`'s compute: the loader must already be reading layer + 1. Without a
        # prefetch this wait times out (the read would only start after this block returns).
        overlapped[layer] = read_started[layer + 1].wait(timeout=10)

    streamed.reader = instrumented
    hooks = [("blocks.0.hook_resid_post", wait_for_next_read), ("blocks.1.hook_resid_post", wait_for_next_read)]
    streamed.run_with_hooks(tokens_for(), fwd_hooks=hooks)
    assert overlapped == {0: True, 1: True}


def test_layer_stream_reads_ahead_in_order():
    order = []
    read_7_started = threading.Event()

    def reader(layer):
        order.append(layer)
        if layer == 7:
            read_7_started.set()
        return {"w": torch.full((2,), float(layer))}, 8

    stream = LayerStream(reader, [5, 7, 9], progress=False)
    try:
        assert torch.equal(stream.take(5)["w"], torch.full((2,), 5.0))
        # take(5) queued layer 7 by itself: nothing else asks for it before this wait.
        assert read_7_started.wait(timeout=10)
        assert stream.take(7)["w"][0] == 7
        assert stream.take(9)["w"][0] == 9
    finally:
        stream.close()
    assert order == [5, 7, 9]
    assert stream.read_bytes == 24


def test_error_in_a_hook_leaves_no_layer_resident(ckpt_path):
    _, streamed = load_pair(ckpt_path)

    def boom(tensor, *, hook):
        raise RuntimeError("hook failed")

    with pytest.raises(RuntimeError, match="hook failed"):
        streamed.run_with_hooks(tokens_for(), fwd_hooks=[("blocks.1.attn.hook_v", boom)])
    assert_no_layer_resident(streamed)
    streamed(tokens_for())  # and the model still works


def test_read_error_reaches_the_caller(ckpt_path):
    _, streamed = load_pair(ckpt_path)
    reader = streamed.reader

    def failing(layer):
        if layer == 1:
            raise ValueError("shard for layer 1 is corrupt")
        return reader(layer)

    streamed.reader = failing
    with pytest.raises(ValueError, match="layer 1 is corrupt"):
        streamed(tokens_for())
    assert_no_layer_resident(streamed)


def test_generate_matches_loaded(ckpt_path, device):
    loaded, streamed = load_pair(ckpt_path, device=device)
    prompt = tokens_for(batch=1, pos=4)
    expected = loaded.generate(prompt, max_new_tokens=4, temperature=0, stop_at_eos=False)
    calls = counting_reader(streamed)
    got = streamed.generate(prompt, max_new_tokens=4, temperature=0, stop_at_eos=False)
    assert got.tokens == expected.tokens
    # The prompt, then each new token but the last (no pass for a token that will not be sampled): every
    # step re-reads every layer.
    assert calls == [0, 1, 2] * 4
    assert_no_layer_resident(streamed)


def test_weights_do_not_require_grad(ckpt_path):
    _, streamed = load_pair(ckpt_path)
    assert not any(param.requires_grad for param in streamed.parameters())
    logits = streamed(tokens_for())
    assert logits.grad_fn is None  # no graph holding on to every layer's weights


def test_dtype_and_device_are_fixed(ckpt_path):
    _, streamed = load_pair(ckpt_path)
    with pytest.raises(ValueError, match="stream=True"):
        streamed.to(torch.float16)


def test_logit_lens_tables_identical(ckpt_path):
    import pandas as pd

    loaded, streamed = load_pair(ckpt_path)
    tokens = tokens_for()
    kwargs = dict(target=[7, 11], readout=["embed", "resid_mid", "resid_post"], top_k=3)
    expected = ll.logit_lens(loaded, tokens, **kwargs)
    calls = counting_reader(streamed)
    got = ll.logit_lens(streamed, tokens, **kwargs)
    assert calls == [0, 1, 2]  # one pass over the layers for the whole batch
    for kind in ("summary", "top_k"):
        pd.testing.assert_frame_equal(got.to_frame(kind), expected.to_frame(kind))
    assert torch.equal(got.kl_to_final, expected.kl_to_final)
    assert_no_layer_resident(streamed)


def test_direct_logit_attribution_identical(ckpt_path):
    loaded, streamed = load_pair(ckpt_path)
    tokens = tokens_for()
    expected = ll.direct_logit_attribution(loaded, tokens, target=7)
    got = ll.direct_logit_attribution(streamed, tokens, target=7)
    assert torch.equal(got.components, expected.components)
    assert torch.equal(got.heads, expected.heads)


def test_dtype_none_keeps_the_stored_dtype(tmp_path):
    cfg = tiny_config()
    path = write_hf_checkpoint(tmp_path / "bf16", cfg, random_state_dict(cfg), dtype=torch.bfloat16)
    loaded, streamed = load_pair(path, dtype=None)
    tokens = tokens_for()
    logits = streamed(tokens)
    assert logits.dtype == torch.bfloat16
    assert torch.equal(logits, loaded(tokens))


def test_forward_inside_a_hook_is_refused(ckpt_path):
    _, streamed = load_pair(ckpt_path)
    tokens = tokens_for()

    def nested(tensor, *, hook):
        streamed(tokens)

    with pytest.raises(RuntimeError, match="inside one of its own hooks"):
        streamed.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_resid_pre", nested)])
    assert_no_layer_resident(streamed)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc/self/maps")
def test_no_file_mapping_is_added_per_layer(ckpt_path):
    _, streamed = load_pair(ckpt_path)

    def mapped_files():
        lines = Path("/proc/self/maps").read_text().splitlines()
        return sorted(line.split()[-1] for line in lines if str(ckpt_path) in line)

    # Meta shards stay mapped from the load on (by the layer reader, and for resident weights used as stored).
    before = mapped_files()
    during = []
    streamed.run_with_hooks(
        tokens_for(), fwd_hooks=[("blocks.2.hook_resid_post", lambda t, *, hook: during.append(mapped_files()))]
    )
    assert during == [before]  # layers 0 and 1 (read and run) and the mappings of their reads are gone
    assert mapped_files() == before


def test_a_shard_truncated_after_loading_is_named(tmp_path):
    cfg = tiny_config(n_layers=3)
    path = write_checkpoint(tmp_path / "hf", "hf", cfg)
    streamed = ll.load(path, stream=True, index_cache=False, progress=False, dtype=torch.bfloat16)
    last_shard = sorted(path.glob("*.safetensors"))[-1]
    with open(last_shard, "r+b") as handle:
        header_bytes = 8 + int.from_bytes(handle.read(8), "little")
        handle.truncate(header_bytes + 16)  # the header survives, the weights of its layers do not
    with pytest.raises(ValueError, match=last_shard.name):
        streamed(tokens_for())
    assert_no_layer_resident(streamed)


def test_meta_shards_are_opened_at_load_not_per_tensor(tmp_path, monkeypatch):
    path = write_checkpoint(tmp_path / "meta", "meta", tiny_config(n_layers=3))  # 2 model-parallel shards
    opened = count_torch_loads(monkeypatch)
    streamed = ll.load(path, stream=True, index_cache=False, progress=False)
    at_load = dict(opened)
    # Once each: the index, the resident weights, and the reader that keeps the shards open.
    assert at_load == {"consolidated.00.pth": 3, "consolidated.01.pth": 3}
    streamed(tokens_for())
    streamed.run_with_cache(tokens_for(), names_filter=lambda name: name.endswith("resid_post"))
    assert dict(opened) == at_load  # forward passes read from the shards already open


@pytest.mark.parametrize(
    ("mp", "changes", "dtype"),
    [(1, {}, torch.float32), (2, dict(n_kv_heads=1), torch.float32), (2, {}, torch.bfloat16)],
    ids=["one_shard", "kv_head_split_over_shards", "bfloat16"],
)
def test_meta_layouts_stream_identically(tmp_path, mp, changes, dtype):
    cfg = tiny_config(n_layers=3, **changes)
    path = write_meta_checkpoint(tmp_path / "meta", cfg, random_state_dict(cfg, seed=3), mp=mp)
    loaded, streamed = load_pair(path, dtype=dtype)
    tokens = tokens_for()
    assert torch.equal(streamed(tokens), loaded(tokens))
    assert_no_layer_resident(streamed)


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads Linux's /proc/self/smaps")
def test_meta_shards_kept_open_do_not_fill_memory(tmp_path):
    # Large enough that most of a tensor's pages lie wholly under it (only those can be released).
    cfg = tiny_config(d_model=256, n_heads=4, d_head=64, d_mlp=1024)
    path = write_meta_checkpoint(tmp_path / "meta", cfg, random_state_dict(cfg), mp=2)
    streamed = ll.load(path, stream=True, index_cache=False, progress=False, dtype=torch.bfloat16)
    before = shard_pages_in_memory(path)
    streamed(tokens_for())
    layer_bytes = layer_param_count(cfg) * 4  # as stored, float32
    # Without releasing the pages each copy touched, both layers would stay in memory: 2 * layer_bytes.
    assert shard_pages_in_memory(path) - before < layer_bytes // 8


def test_a_meta_shard_changed_after_loading_is_named(tmp_path):
    path = write_checkpoint(tmp_path / "meta", "meta", tiny_config(n_layers=3))
    streamed = ll.load(path, stream=True, index_cache=False, progress=False)
    shard = path / "consolidated.01.pth"
    with open(shard, "ab") as handle:  # grown, not truncated: the pages already mapped stay readable
        handle.write(b"\0" * 10)
    with pytest.raises(ValueError, match=r"consolidated\.01\.pth changed since the checkpoint was opened"):
        streamed(tokens_for())
    assert_no_layer_resident(streamed)


def test_a_safetensors_shard_replaced_after_loading_is_named(tmp_path):
    cfg = tiny_config(n_layers=3)
    path = write_checkpoint(tmp_path / "hf", "hf", cfg)
    streamed = ll.load(path, stream=True, index_cache=False, progress=False)
    other = write_hf_checkpoint(tmp_path / "other", cfg, random_state_dict(cfg, seed=2), shards=2)
    shard = sorted(path.glob("*.safetensors"))[-1]
    shutil.copyfile(other / shard.name, shard)  # the same size and offsets, other weights
    assert shard.stat().st_size == (other / shard.name).stat().st_size
    with pytest.raises(ValueError, match=rf"{shard.name} changed since the checkpoint was opened"):
        streamed(tokens_for())
    assert_no_layer_resident(streamed)


def test_a_failed_read_keeps_no_layer_alive(tmp_path, monkeypatch):
    cfg = tiny_config(n_layers=3)
    path = write_checkpoint(tmp_path / "hf", "hf", cfg)
    streamed = ll.load(path, stream=True, index_cache=False, progress=False)
    last_shard = sorted(path.glob("*.safetensors"))[-1]
    (start, _) = read_safetensors_header(last_shard)["model.layers.2.mlp.gate_proj.weight"]["offsets"]
    os.truncate(last_shard, start + 100)  # layer 2's attention reads, its MLP does not
    # Recorded as it now is, so that the read fails midway through layer 2 (as a disk error would) rather
    # than when the changed shard is opened.
    ckpt = streamed.reader.ckpt
    ckpt.file_stamps.stamps[last_shard.name] = [last_shard.stat().st_size, last_shard.stat().st_mtime_ns]

    layer_maps = []  # each layer is read into a memory map of its own (see host_memory.empty_cpu_tensors)

    class RecordingMmap:
        def __getattr__(self, name):
            return getattr(mmap, name)

        def mmap(self, *args, **kwargs):
            layer_map = mmap.mmap(*args, **kwargs)
            layer_maps.append(weakref.ref(layer_map))
            return layer_map

    monkeypatch.setattr(host_memory, "mmap", RecordingMmap())
    with pytest.raises(ValueError, match=last_shard.name) as info:
        streamed(tokens_for())
    assert info.value.__traceback__ is not None  # the error, traceback and all, is still held here
    gc.collect()
    assert len(layer_maps) >= 3 and [ref for ref in layer_maps if ref() is not None] == []
    assert_no_layer_resident(streamed)
