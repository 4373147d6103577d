"""Checkpoint reading: every layout gives the same tensors, reads are lazy, bad input is named."""

import contextlib
import gc
import json
import os
import pathlib
import struct
import types

import pandas as pd
import pytest
import torch
from support.loader_watch import count_torch_loads, shard_pages_in_memory
from support.models import tiny_config

import llama_lens.io.pth as pth_io
import llama_lens.io.safetensors as safetensors_io
from llama_lens.errors import CheckpointError
from llama_lens.io.checkpoint import Checkpoint
from llama_lens.io.names import (
    HF_TO_CANONICAL,
    META_TO_CANONICAL,
    inverse,
    param_shapes,
    permute_qk_to_interleaved,
    permute_qk_to_rotate_half,
    rename,
)
from llama_lens.io.pth import PthShards
from llama_lens.loading.load import load
from llama_lens.model.summary import module_summary
from llama_lens.testing import random_state_dict, write_hf_checkpoint, write_meta_checkpoint
from llama_lens.validate import resolve_dtype


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Index caches go to this test's folder, never to the user's cache."""
    monkeypatch.setenv("LLAMA_LENS_HOME", str(tmp_path / "home"))


def cache_files(tmp_path) -> list[pathlib.Path]:
    return sorted((tmp_path / "home" / "cache" / "index").glob("*.json"))


def opened_once(tmp_path, folder) -> tuple[pathlib.Path, dict]:
    """Opens the checkpoint (writing its index cache), then the cache file and the record it holds."""
    Checkpoint(folder)
    (cache,) = cache_files(tmp_path)
    return cache, json.loads(cache.read_text())


def assert_same(loaded: dict, expected: dict) -> None:
    assert list(loaded) == list(expected)
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype, name
        assert torch.equal(loaded[name], tensor), name


# ------------------------------------------------------------------------------------------ every layout
LAYOUTS = {
    "hf_single": lambda path, cfg, sd: write_hf_checkpoint(path, cfg, sd),
    "hf_3_shards": lambda path, cfg, sd: write_hf_checkpoint(path, cfg, sd, shards=3),
    "meta": lambda path, cfg, sd: write_meta_checkpoint(path, cfg, sd),
    # Llama 2 style: embedding split over d_model, vocab_size -1 in params.json, rope.freqs stored.
    "meta_mp2_llama2": lambda path, cfg, sd: write_meta_checkpoint(
        path, cfg, sd, mp=2, vocab_size_in_params=False, rope_freqs=True
    ),
    # Llama 3 style: embedding split over the vocabulary.
    "meta_mp2_llama3": lambda path, cfg, sd: write_meta_checkpoint(path, cfg, sd, mp=2, vocab_parallel=True),
}
SHAPES = {"gqa": {}, "mha": dict(n_kv_heads=4), "mqa": dict(n_kv_heads=1), "tied": dict(tie_embeddings=True)}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_reads_back_the_same_tensors(tmp_path, layout, shape):
    cfg = tiny_config(**SHAPES[shape])
    state = random_state_dict(cfg, seed=1)
    LAYOUTS[layout](tmp_path / "ckpt", cfg, state)

    ckpt = Checkpoint(tmp_path / "ckpt")
    loaded = ckpt.state_dict()

    assert ckpt.config.d_vocab == cfg.d_vocab and ckpt.config.tie_embeddings == cfg.tie_embeddings
    assert_same(loaded, state)
    if cfg.tie_embeddings:
        assert loaded["unembed.weight"] is loaded["embed.weight"]


@pytest.mark.parametrize("shape", ["gqa", "mqa"])  # mqa: the one KV head is split inside the head over 2 ranks
@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name.startswith("meta")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_open_shards_read_what_state_dict_reads(tmp_path, layout, shape, dtype):
    cfg = tiny_config(**SHAPES[shape])
    LAYOUTS[layout](tmp_path / "ckpt", cfg, random_state_dict(cfg, seed=1))
    ckpt = Checkpoint(tmp_path / "ckpt")
    expected = ckpt.state_dict(ckpt.params_for([1]), dtype=dtype)
    targets = {name: torch.full(shape, float("nan"), dtype=dtype) for name, shape in param_shapes(cfg).items()}
    targets = {name: targets[name] for name in expected if name.startswith("blocks.")}
    with ckpt.open_files(lazy=False) as files:
        read_bytes = ckpt.read_into(targets, files=files)
    assert read_bytes == sum(t.numel() * 4 for t in targets.values())  # written as float32
    for name, tensor in targets.items():
        assert torch.equal(tensor, expected[name]), name


# ------------------------------------------------------------------------------------------ read_into
@pytest.mark.parametrize("shape", ["gqa", "mqa", "tied"])
@pytest.mark.parametrize("layout", ["hf_3_shards", "meta_mp2_llama2", "meta_mp2_llama3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_loads_and_streamed_layers_read_the_same_tensors(tmp_path, layout, shape, dtype):
    from llama_lens.loading.stream import CheckpointLayerReader

    cfg = tiny_config(n_layers=3, **SHAPES[shape])
    state = random_state_dict(cfg, seed=4)
    LAYOUTS[layout](tmp_path / "ckpt", cfg, state)
    ckpt = Checkpoint(tmp_path / "ckpt", index_cache=False)
    loaded = ckpt.state_dict(dtype=dtype)
    # The weights written, cast: an oracle independent of the reader.
    assert_same(loaded, {name: tensor.to(dtype) for name, tensor in state.items()})

    reader = CheckpointLayerReader(ckpt, dtype, torch.device("cpu"))
    for layer in range(cfg.n_layers):
        streamed, read_bytes = reader(layer)
        prefix = f"blocks.{layer}."
        assert_same(
            {prefix + name: tensor for name, tensor in streamed.items()},
            ckpt.state_dict(ckpt.params_for([layer])[1:-2], dtype=dtype),
        )
        assert read_bytes == sum(state[prefix + name].nbytes for name in streamed)  # stored as written, float32

    # The same entry with tensors of our own: any dtype, every parameter at once.
    targets = {name: torch.full(shape, float("nan"), dtype=torch.float64) for name, shape in param_shapes(cfg).items()}
    read_bytes = ckpt.read_into(targets)
    assert_same(targets, {name: tensor.double() for name, tensor in state.items()})
    assert read_bytes == sum(tensor.nbytes for tensor in state.values())  # a tied embedding read twice here


def test_read_into_names_a_bad_target(tmp_path):
    cfg = tiny_config()
    folder = write_hf_checkpoint(tmp_path / "ckpt", cfg, random_state_dict(cfg))
    ckpt = Checkpoint(folder)
    with pytest.raises(KeyError, match="'blocks.0.attn.q_prj.weight' is not a parameter.*did you mean"):
        ckpt.read_into({"blocks.0.attn.q_prj.weight": torch.empty(64, 64)})
    with pytest.raises(ValueError, match=r"'ln_final.weight' must be a contiguous tensor of shape \[64\], got \[65\]"):
        ckpt.read_into({"ln_final.weight": torch.empty(65)})
    with pytest.raises(ValueError, match=r"'embed.weight' .* got \[128, 64\] \(not contiguous\)"):
        ckpt.read_into({"embed.weight": torch.empty(64, 128).T})


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name.startswith("meta")])
def test_meta_tensors_copied_a_few_rows_at_a_time_are_the_same(tmp_path, monkeypatch, layout):
    cfg = tiny_config(**SHAPES["tied"])
    state = random_state_dict(cfg, seed=1)
    LAYOUTS[layout](tmp_path / "ckpt", cfg, state)
    monkeypatch.setattr(pth_io, "READ_CHUNK_BYTES", 1000)  # parts of a few rows
    assert_same(Checkpoint(tmp_path / "ckpt").state_dict(), state)
    loaded = Checkpoint(tmp_path / "ckpt").state_dict(dtype=torch.bfloat16)
    assert_same(loaded, {name: tensor.bfloat16() for name, tensor in state.items()})


def test_biases_and_head_dim_read_back(tmp_path):
    cfg = tiny_config(attention_bias=True, mlp_bias=True, d_head=24)
    state = random_state_dict(cfg)
    write_hf_checkpoint(tmp_path / "ckpt", cfg, state, shards=2)
    loaded = Checkpoint(tmp_path / "ckpt").state_dict()
    assert "blocks.1.attn.o_proj.bias" in loaded and "blocks.0.mlp.down_proj.bias" in loaded
    assert_same(loaded, state)


def test_meta_and_hf_layouts_give_the_same_logits(tmp_path):
    cfg = tiny_config(n_layers=3)
    state = random_state_dict(cfg)
    write_hf_checkpoint(tmp_path / "hf", cfg, state, shards=2)
    write_meta_checkpoint(tmp_path / "meta", cfg, state, mp=2)
    tokens = torch.randint(0, cfg.d_vocab, (2, 11))
    with torch.no_grad():
        hf_logits = load(tmp_path / "hf")(tokens)
        meta_logits = load(tmp_path / "meta")(tokens)
    assert hf_logits.shape == (2, 11, cfg.d_vocab)
    assert torch.equal(hf_logits, meta_logits)


# --------------------------------------------------------------------------------- names and permutation
def test_rename_tables_round_trip():
    cfg = tiny_config(n_layers=12, attention_bias=True, mlp_bias=True)
    for table, biases in ((HF_TO_CANONICAL, True), (META_TO_CANONICAL, False)):
        back = inverse(table)
        assert len(back) == len(table)  # one-to-one
        for name in param_shapes(cfg):
            if name.endswith(".bias") and not biases:
                assert rename(name, back) is None
                continue
            stored = rename(name, back)
            assert stored is not None and rename(stored, table) == name
    assert rename("model.layers.11.mlp.gate_proj.weight", HF_TO_CANONICAL) == "blocks.11.mlp.gate_proj.weight"
    assert rename("layers.10.feed_forward.w3.weight", META_TO_CANONICAL) == "blocks.10.mlp.up_proj.weight"
    assert rename("layers.10.feed_forward.w2.weight", META_TO_CANONICAL) == "blocks.10.mlp.down_proj.weight"
    assert rename("model.layers.0.mlp.fc1.weight", HF_TO_CANONICAL) is None


def test_qk_permutation_round_trips():
    weight = torch.randn(4 * 16, 64)
    rotate_half = permute_qk_to_rotate_half(weight, n_heads=4)
    assert not torch.equal(rotate_half, weight)
    assert torch.equal(permute_qk_to_interleaved(rotate_half, n_heads=4), weight)
    assert torch.equal(permute_qk_to_rotate_half(permute_qk_to_interleaved(weight, 4), 4), weight)
    # within each head, Meta's pair (2j, 2j+1) lands on rows (j, j + d_head/2)
    assert torch.equal(rotate_half[16 + 3], weight[16 + 6]) and torch.equal(rotate_half[16 + 8 + 3], weight[16 + 7])


def _meta_reference_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Meta's apply_rotary_emb: consecutive pairs of [batch, pos, n_heads, d_head] rotated as complex numbers."""
    d_head = x.shape[-1]
    freqs = 1.0 / theta ** (torch.arange(0, d_head, 2)[: d_head // 2].float() / d_head)
    freqs_cis = torch.polar(torch.ones(x.shape[1], d_head // 2), torch.outer(torch.arange(x.shape[1]).float(), freqs))
    x_complex = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(x_complex * freqs_cis[None, :, None, :]).flatten(3)


def test_meta_q_after_meta_rope_equals_our_q_after_rotate_half_rope(tmp_path):
    """Independent of our writer: Meta's stored wq with Meta's RoPE gives the q our model computes."""
    from llama_lens.model.attention import apply_rope, rope_cos_sin

    cfg = tiny_config()
    write_meta_checkpoint(tmp_path / "meta", cfg, random_state_dict(cfg), mp=2)
    ckpt = Checkpoint(tmp_path / "meta")
    wq_meta = ckpt.load_tensor("layers.1.attention.wq.weight")  # as stored: interleaved pairs
    wq_ours = ckpt.state_dict(["blocks.1.attn.q_proj.weight"])["blocks.1.attn.q_proj.weight"]
    x = torch.randn(1, 7, cfg.d_model)
    meta_q = _meta_reference_rope((x @ wq_meta.T).view(1, 7, cfg.n_heads, cfg.d_head), cfg.rope_theta)
    cos, sin = rope_cos_sin(cfg, torch.arange(7)[None], dtype=torch.float32)
    our_q = apply_rope((x @ wq_ours.T).view(1, 7, cfg.n_heads, cfg.d_head), cos, sin)
    # Meta keeps (real, imag) pairs next to each other; rotate-half puts all reals first.
    order = torch.cat([torch.arange(0, cfg.d_head, 2), torch.arange(1, cfg.d_head, 2)])
    torch.testing.assert_close(meta_q[..., order], our_q, atol=1e-6, rtol=0)


def test_meta_shards_are_split_like_meta_and_merged_on_read(tmp_path):
    cfg = tiny_config()
    write_meta_checkpoint(tmp_path / "meta", cfg, random_state_dict(cfg), mp=2)
    rank0 = torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True)
    d_q = cfg.n_heads * cfg.d_head
    assert rank0["layers.0.attention.wq.weight"].shape == (d_q // 2, cfg.d_model)  # column parallel
    assert rank0["layers.0.attention.wo.weight"].shape == (cfg.d_model, d_q // 2)  # row parallel
    assert rank0["layers.0.feed_forward.w2.weight"].shape == (cfg.d_model, cfg.d_mlp // 2)
    assert rank0["tok_embeddings.weight"].shape == (cfg.d_vocab, cfg.d_model // 2)  # Llama 2 ParallelEmbedding
    assert rank0["norm.weight"].shape == (cfg.d_model,)  # replicated
    rank1 = torch.load(tmp_path / "meta" / "consolidated.01.pth", weights_only=True)
    merged = Checkpoint(tmp_path / "meta").load_tensor("layers.0.attention.wo.weight")
    wo = "layers.0.attention.wo.weight"
    assert torch.equal(merged, torch.cat([rank0[wo], rank1[wo]], dim=1))


# ------------------------------------------------------------------------------------------ lazy reading
@pytest.mark.parametrize("layout", ["hf_3_shards", "meta_mp2_llama2"])
def test_a_layer_range_reads_only_its_tensors(tmp_path, monkeypatch, layout):
    cfg = tiny_config(n_layers=5)
    state = random_state_dict(cfg)
    LAYOUTS[layout](tmp_path / "ckpt", cfg, state)
    ckpt = Checkpoint(tmp_path / "ckpt")
    read = []
    if layout.startswith("hf"):  # every tensor read, by stored name: from its file's offsets, or its shards
        original = safetensors_io.SafetensorsFiles.read_into

        def spy(self, file_name, start, stored_dtype, target, what):
            read.append(what.strip("'"))
            return original(self, file_name, start, stored_dtype, target, what)

        monkeypatch.setattr(safetensors_io.SafetensorsFiles, "read_into", spy)
    else:
        original = PthShards.copy_into

        def spy(self, name, *args, **kwargs):
            read.append(name)
            return original(self, name, *args, **kwargs)

        monkeypatch.setattr(PthShards, "copy_into", spy)
    model = load(ckpt, layers=range(1, 3))

    table = inverse(HF_TO_CANONICAL if layout.startswith("hf") else META_TO_CANONICAL)
    wanted = ["embed.weight", *[n for n in param_shapes(cfg) if n.startswith(("blocks.1.", "blocks.2."))]]
    wanted += ["ln_final.weight", "unembed.weight"]
    assert sorted(read) == sorted(rename(name, table) for name in wanted)
    assert model.layer_indices == [1, 2] and list(model.blocks) == ["1", "2"]
    assert torch.equal(model.blocks["2"].mlp.up_proj.weight, state["blocks.2.mlp.up_proj.weight"])


@pytest.mark.parametrize("n_layers", [2, 6])
def test_a_meta_load_opens_each_shard_once_whatever_the_number_of_layers(tmp_path, monkeypatch, n_layers):
    cfg = tiny_config(n_layers=n_layers)
    state = random_state_dict(cfg)
    folder = write_meta_checkpoint(tmp_path / "meta", cfg, state, mp=2)
    shards = ["consolidated.00.pth", "consolidated.01.pth"]
    opened = count_torch_loads(monkeypatch)

    load(folder, progress=False)  # first open: the shard index is built from the shards too
    assert opened == dict.fromkeys(shards, 2)
    opened.clear()
    model = load(folder, progress=False)  # the index is cached
    assert opened == dict.fromkeys(shards, 1)
    for name, param in model.named_parameters():
        assert torch.equal(param, state[name]), name
    opened.clear()
    load(folder, layers=range(1, 2), progress=False)
    assert opened == dict.fromkeys(shards, 1)
    opened.clear()
    Checkpoint(folder).load_tensor("norm.weight")  # replicated: read from the first shard only
    assert opened == {"consolidated.00.pth": 1}


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads Linux's /proc/self/smaps")
def test_a_meta_load_keeps_no_shard_pages(tmp_path, monkeypatch):
    # Shards are read, never mapped: a mapped page of a file truncated since would kill the process (SIGBUS),
    # and the pages read through a map would count towards the process beside the loaded weights.
    cfg = tiny_config(n_layers=4, d_model=256, n_heads=4, d_head=64, d_mlp=1024)
    folder = write_meta_checkpoint(tmp_path / "meta", cfg, random_state_dict(cfg), mp=2)
    ckpt = Checkpoint(folder)
    in_memory = []  # after each tensor read, while the shards are open
    copy_into = PthShards.copy_into

    def sampling(self, *args, **kwargs):
        read_bytes = copy_into(self, *args, **kwargs)
        in_memory.append(shard_pages_in_memory(folder))
        return read_bytes

    monkeypatch.setattr(PthShards, "copy_into", sampling)
    ckpt.state_dict(dtype=torch.bfloat16)
    stored_bytes = int(ckpt.tensors()["bytes"].sum())
    assert len(in_memory) == len(ckpt.param_names)
    assert stored_bytes > 0 and max(in_memory) == 0


def test_layer_state_dict_and_params_for(tmp_path):
    cfg = tiny_config(n_layers=4)
    state = random_state_dict(cfg)
    write_hf_checkpoint(tmp_path / "ckpt", cfg, state, shards=2)
    ckpt = Checkpoint(tmp_path / "ckpt")
    block = ckpt.layer_state_dict(3, dtype="bfloat16")
    assert_same(block, {k: v.bfloat16() for k, v in state.items() if k.startswith("blocks.3.")})
    names = ckpt.params_for([2, 0])
    assert names[0] == "embed.weight" and names[-2:] == ["ln_final.weight", "unembed.weight"]
    assert {n.split(".")[1] for n in names[1:-2]} == {"0", "2"}
    assert_same(ckpt.state_dict("ln_final.weight"), {"ln_final.weight": state["ln_final.weight"]})  # one name


# --------------------------------------------------------------------------------------- dtype and device
@pytest.mark.parametrize(
    ("stored", "wanted"),
    [
        (torch.bfloat16, torch.float32),
        (torch.float32, "bfloat16"),
        (torch.float32, "float16"),
        (torch.float16, torch.float32),
    ],
)
def test_dtype_conversion(tmp_path, stored, wanted):
    cfg = tiny_config()
    state = random_state_dict(cfg)
    write_hf_checkpoint(tmp_path / "ckpt", cfg, state, dtype=stored)
    model = load(tmp_path / "ckpt", dtype=wanted)
    target = getattr(torch, wanted) if isinstance(wanted, str) else wanted
    expected = state["blocks.0.attn.q_proj.weight"].to(stored).to(target)
    assert {p.dtype for p in model.parameters()} == {target}
    assert torch.equal(model.blocks["0"].attn.q_proj.weight, expected)


def test_bad_dtype_device_and_layers_are_refused(tmp_path, monkeypatch):
    cfg = tiny_config()
    write_hf_checkpoint(tmp_path / "ckpt", cfg, random_state_dict(cfg))
    with pytest.raises(ValueError, match="'int8' is not supported"):
        load(tmp_path / "ckpt", dtype="int8")
    with pytest.raises(ValueError, match="torch.int64 is not supported"):
        load(tmp_path / "ckpt", dtype=torch.int64)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        load(tmp_path / "ckpt", device="cuda")
    with pytest.raises(ValueError, match="not a torch device"):
        load(tmp_path / "ckpt", device="gpu0")
    with pytest.raises(ValueError, match=r"layer 2 is outside the model.*range\(0, 2\)"):
        load(tmp_path / "ckpt", layers=range(1, 3))
    with pytest.raises(ValueError, match=r"range\(0, 2\)"):
        Checkpoint(tmp_path / "ckpt").params_for([-1])
    with pytest.raises(ValueError, match="must hold ints"):
        load(tmp_path / "ckpt", layers=[0.5])
    with pytest.raises(ValueError, match=r"range or a list"):
        load(tmp_path / "ckpt", layers=1)


# ------------------------------------------------------------------------------------------- index cache
def test_index_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    cfg = tiny_config()
    state = random_state_dict(cfg)
    folder = write_hf_checkpoint(tmp_path / "ckpt", cfg, state, shards=2)
    calls = []
    parse = safetensors_io.read_safetensors_header

    def counting(path):
        calls.append(path.name)
        return parse(path)

    monkeypatch.setattr(safetensors_io, "read_safetensors_header", counting)
    Checkpoint(folder)
    assert len(calls) == 2 and len(cache_files(tmp_path)) == 1

    reopened = Checkpoint(folder)
    assert len(calls) == 2  # headers not parsed again
    assert_same(reopened.state_dict(), state)

    shard = folder / "model-00002-of-00002.safetensors"
    stat = shard.stat()
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    Checkpoint(folder)
    assert len(calls) == 4  # a changed mtime rebuilds the index

    cache_files(tmp_path)[0].write_text("{not json")
    Checkpoint(folder)
    assert len(calls) == 6  # a damaged cache is rebuilt, not trusted


def _damage(record: dict, damage: str) -> None:
    tensors = record["tensors"]
    if damage == "no_shapes":
        for pieces in tensors.values():
            del pieces[0]["shape"]
    elif damage == "shape_not_a_list":
        tensors["model.norm.weight"][0]["shape"] = 64
    elif damage == "piece_not_a_dict":
        tensors["model.norm.weight"] = ["model-00002-of-00002.safetensors"]
    elif damage == "no_pieces":
        tensors["model.norm.weight"] = []
    elif damage == "unknown_file":
        tensors["model.norm.weight"][0]["file"] = "model-00009-of-00009.safetensors"
    elif damage == "unknown_dtype":
        tensors["model.norm.weight"][0]["dtype"] = "float99"
    elif damage == "offsets_not_a_pair":
        tensors["model.norm.weight"][0]["offsets"] = 12
    elif damage == "shape_disagreeing_with_config":  # well-formed, but not what config.json implies
        tensors["model.norm.weight"][0]["shape"] = [65]
    elif damage == "tensors_missing":
        del tensors["model.layers.1.mlp.up_proj.weight"]


@pytest.mark.parametrize(
    "damage",
    [
        "no_shapes",
        "shape_not_a_list",
        "piece_not_a_dict",
        "no_pieces",
        "unknown_file",
        "unknown_dtype",
        "offsets_not_a_pair",
        "shape_disagreeing_with_config",
        "tensors_missing",
    ],
)
def test_a_damaged_index_cache_that_is_still_json_is_rebuilt(tmp_path, monkeypatch, damage):
    cfg = tiny_config()
    state = random_state_dict(cfg)
    cache, good = opened_once(tmp_path, write_hf_checkpoint(tmp_path / "ckpt", cfg, state, shards=2))
    damaged = json.loads(cache.read_text())
    _damage(damaged, damage)
    cache.write_text(json.dumps(damaged))
    calls = []
    parse = safetensors_io.read_safetensors_header
    monkeypatch.setattr(safetensors_io, "read_safetensors_header", lambda path: calls.append(path) or parse(path))

    ckpt = Checkpoint(tmp_path / "ckpt")
    assert len(calls) == 2  # both headers read again
    assert_same(ckpt.state_dict(), state)
    assert json.loads(cache.read_text()) == good  # and the cache written afresh


def test_a_damaged_meta_index_cache_is_rebuilt(tmp_path):
    cfg = tiny_config()
    state = random_state_dict(cfg)
    folder = write_meta_checkpoint(tmp_path / "meta", cfg, state, mp=2)
    cache, record = opened_once(tmp_path, folder)
    record["tensors"]["tok_embeddings.weight"][0]["offsets"] = [0, 10]  # .pth pieces have none
    for pieces in record["tensors"].values():
        del pieces[-1]["shape"]
    cache.write_text(json.dumps(record))
    assert_same(Checkpoint(folder).state_dict(), state)


def test_index_cache_file_of_the_users_choice_and_none(tmp_path, monkeypatch):
    cfg = tiny_config()
    folder = write_hf_checkpoint(tmp_path / "ckpt", cfg, random_state_dict(cfg))
    Checkpoint(folder, index_cache=tmp_path / "mine.json")
    record = json.loads((tmp_path / "mine.json").read_text())
    assert record["tensors"]["model.norm.weight"][0]["shape"] == [cfg.d_model]
    assert record["files"]["model.safetensors"][0] == (folder / "model.safetensors").stat().st_size
    Checkpoint(folder, index_cache=False)
    assert cache_files(tmp_path) == []


def test_meta_index_cache_skips_torch_load_at_open(tmp_path, monkeypatch):
    cfg = tiny_config()
    state = random_state_dict(cfg)
    folder = write_meta_checkpoint(tmp_path / "meta", cfg, state, mp=2)
    Checkpoint(folder)
    loads = count_torch_loads(monkeypatch)
    ckpt = Checkpoint(folder)
    assert loads == {}
    assert_same(ckpt.state_dict(), state)
    assert set(loads) == {"consolidated.00.pth", "consolidated.01.pth"}


# ------------------------------------------------------------------------------------------- overview
def test_tensors_table(tmp_path):
    cfg = tiny_config()
    state = random_state_dict(cfg, dtype=torch.bfloat16)
    write_meta_checkpoint(tmp_path / "meta", cfg, state, mp=2, rope_freqs=True)
    ckpt = Checkpoint(tmp_path / "meta")
    frame = ckpt.tensors()
    assert list(frame.columns) == ["name", "param", "layer", "component", "shape", "dtype", "numel", "bytes", "file"]
    assert len(frame) == len(state) + 1  # + rope.freqs, shown but skipped
    assert str(frame["layer"].dtype) == "Int64"
    wq = frame.set_index("name").loc["layers.1.attention.wq.weight"]
    assert (wq["param"], wq["layer"], wq["component"]) == ("blocks.1.attn.q_proj.weight", 1, "attn")
    assert wq["shape"] == (cfg.n_heads * cfg.d_head, cfg.d_model) and wq["dtype"] == "bfloat16"
    assert wq["bytes"] == 2 * wq["numel"] and wq["file"] == "consolidated.00.pth,consolidated.01.pth"
    skipped = frame.set_index("name").loc["rope.freqs"]
    assert pd.isna(skipped["param"]) and pd.isna(skipped["component"]) and frame.iloc[-1]["name"] == "rope.freqs"
    assert frame.iloc[0]["component"] == "embed" and frame["layer"].isna().sum() == 4
    assert set(frame["component"].dropna()) == {"embed", "attn", "mlp", "norm", "head"}
    assert ckpt.num_params == sum(t.numel() for t in state.values()) == frame["numel"][frame["param"].notna()].sum()


def test_tied_checkpoint_counts_the_embedding_once(tmp_path):
    cfg = tiny_config(tie_embeddings=True)
    state = random_state_dict(cfg)
    write_hf_checkpoint(tmp_path / "ckpt", cfg, state)
    ckpt = Checkpoint(tmp_path / "ckpt")
    assert ckpt.num_params == sum(t.numel() for name, t in state.items() if name != "unembed.weight")
    assert len(ckpt.tensors()) == len(state) - 1
    model = load(ckpt)
    assert model.unembed.weight is model.embed.weight
    for depth in (1, 2, 3):  # depth 3 keeps the norms, which have no submodules, so the rows add up
        summary = module_summary(model, depth=depth)
        assert summary["parameters"].sum() == ckpt.num_params and summary["share"].sum() == pytest.approx(1.0)
    assert "blocks.0.ln1" in set(module_summary(model, depth=3).module)


def test_load_tensor_is_as_stored_and_names_unknown_tensors(tmp_path):
    cfg = tiny_config()
    state = random_state_dict(cfg)
    write_hf_checkpoint(tmp_path / "ckpt", cfg, state, dtype=torch.bfloat16)
    ckpt = Checkpoint(tmp_path / "ckpt")
    tensor = ckpt.load_tensor("model.layers.1.mlp.down_proj.weight")
    assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, state["blocks.1.mlp.down_proj.weight"].bfloat16())
    with pytest.raises(KeyError, match="did you mean.*model.layers.1.mlp.down_proj.weight"):
        ckpt.load_tensor("model.layers.1.mlp.down_prj.weight")
    with pytest.raises(KeyError, match="stored as 'model.norm.weight'"):
        ckpt.load_tensor("ln_final.weight")
    with pytest.raises(KeyError, match="'blocks.9.ln1.weight' is not a parameter"):
        ckpt.state_dict(["blocks.9.ln1.weight"])


def test_tokenizer_beside_the_weights_is_loaded(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    cfg = tiny_config()
    folder = write_hf_checkpoint(tmp_path / "ckpt", cfg, random_state_dict(cfg))
    assert Checkpoint(folder).tokenizer_path is None and load(folder).tokenizer is None
    vocab = {f"w{i}": i for i in range(cfg.d_vocab)}
    Tokenizer(WordLevel(vocab, unk_token="w0")).save(str(folder / "tokenizer.json"))
    assert Checkpoint(folder).tokenizer_path == folder / "tokenizer.json"
    model = load(folder)
    assert model.tokenizer is not None and model.tokenizer.vocab_size == cfg.d_vocab
    given = object.__new__(type(model.tokenizer))
    assert load(folder, tokenizer=given).tokenizer is given


# --------------------------------------------------------------------------------------------- bad input
@pytest.fixture
def hf_folder(tmp_path):
    cfg = tiny_config()
    return write_hf_checkpoint(tmp_path / "ckpt", cfg, random_state_dict(cfg), shards=2), cfg


def test_missing_folder_config_and_weights(tmp_path, hf_folder):
    folder, cfg = hf_folder
    with pytest.raises(FileNotFoundError, match="nowhere.*does not exist"):
        Checkpoint(tmp_path / "nowhere")
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        Checkpoint(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no weight files in .*empty.*pytorch_model\.bin"):
        Checkpoint(empty)
    meta = write_meta_checkpoint(tmp_path / "meta", cfg, random_state_dict(cfg), mp=2)
    (meta / "params.json").write_text("[4096, 32]")
    with pytest.raises(ValueError, match="params.json: expected a JSON object of config keys, got list"):
        Checkpoint(meta, index_cache=False)
    (meta / "params.json").unlink()
    with pytest.raises(FileNotFoundError, match="params.json is missing"):
        Checkpoint(meta)


def test_index_naming_a_missing_shard(hf_folder):
    folder, _ = hf_folder
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="shard 'model-00002-of-00002.safetensors' named by .*index.json"):
        Checkpoint(folder)


def test_index_disagreeing_with_the_shards(hf_folder):
    folder, _ = hf_folder
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00002.safetensors"
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="'model.norm.weight' is in model-00001-of-00002.safetensors, but it"):
        Checkpoint(folder)
    index_file.write_text("{")
    with pytest.raises(CheckpointError, match="index.json: not valid JSON"):
        Checkpoint(folder)


def _write_header(path, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncate", "ends at byte .* past the end of the file"),
        ("header_length", "header length .* runs past the end of the file"),
        ("bad_json", "not valid JSON"),
        ("tiny", "truncated"),
        ("wrong_byte_count", "holds 8 bytes but its shape"),
        ("overlap", "tensors 'a' and 'b' overlap in the file"),
    ],
)
def test_corrupt_safetensors_are_named(tmp_path, hf_folder, damage, message):
    folder, _ = hf_folder
    shard = folder / "model-00001-of-00002.safetensors"
    content = shard.read_bytes()
    if damage == "truncate":
        shard.write_bytes(content[: len(content) - 100])
    elif damage == "header_length":
        shard.write_bytes(struct.pack("<Q", 10**9) + content[8:])
    elif damage == "bad_json":
        (length,) = struct.unpack("<Q", content[:8])
        shard.write_bytes(content[:8] + b"!" * length + content[8 + length :])
    elif damage == "tiny":
        shard.write_bytes(content[:5])
    elif damage == "overlap":  # b's bytes are a's last half and 8 more: one would load the other's weights
        f32 = {"dtype": "F32", "shape": [4]}
        _write_header(shard, {"a": f32 | {"data_offsets": [0, 16]}, "b": f32 | {"data_offsets": [8, 24]}}, b"\0" * 24)
    else:
        _write_header(shard, {"model.norm.weight": {"dtype": "F32", "shape": [64], "data_offsets": [0, 8]}}, b"\0" * 8)
    with pytest.raises(CheckpointError, match=message) as err:
        Checkpoint(folder)
    assert "model-00001-of-00002.safetensors" in str(err.value)
    assert cache_files(tmp_path) == []  # nothing cached from a failed open


def _rewrite_hf(folder, change) -> None:
    """Rewrites a one-file HF checkpoint after `change(tensors)` edits its dict of tensors."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors")


def test_missing_unexpected_and_misshapen_tensors_are_named(tmp_path):
    cfg = tiny_config()
    folder = write_hf_checkpoint(tmp_path / "ckpt", cfg, random_state_dict(cfg))

    _rewrite_hf(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor: 'model.layers.1.mlp.up_proj.weight' \(for blocks.1"):
        Checkpoint(folder)

    _rewrite_hf(folder, lambda t: t.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(cfg.d_mlp, cfg.d_model)}))
    _rewrite_hf(folder, lambda t: t.update({"model.layers.7.mlp.up_proj.weight": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor: 'model.layers.7.mlp.up_proj.weight' .*n_layers=2"):
        Checkpoint(folder)

    _rewrite_hf(folder, lambda t: t.pop("model.layers.7.mlp.up_proj.weight"))
    _rewrite_hf(folder, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}))
    with pytest.raises(CheckpointError, match="'model.layers.0.self_attn.q_proj.bias' .*attention_bias=false"):
        Checkpoint(folder)

    _rewrite_hf(folder, lambda t: t.pop("model.layers.0.self_attn.q_proj.bias"))
    _rewrite_hf(folder, lambda t: t.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(CheckpointError, match=r"'model.norm.weight' in model.safetensors has shape \[65\], but config"):
        Checkpoint(folder)

    _rewrite_hf(folder, lambda t: t.update({"model.norm.weight": torch.ones(64, dtype=torch.int8)}))
    with pytest.raises(CheckpointError, match="'model.norm.weight' .* dtype int8"):
        Checkpoint(folder)

    _rewrite_hf(folder, lambda t: t.update({"model.norm.weight": torch.ones(64)}))
    _rewrite_hf(folder, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match="'lm_head.weight'.*tie_word_embeddings=false"):
        Checkpoint(folder)
    assert cache_files(tmp_path) == []


def test_config_shape_mismatch_is_named(hf_folder):
    folder, cfg = hf_folder
    config = json.loads((folder / "config.json").read_text()) | {"intermediate_size": 96}
    (folder / "config.json").write_text(json.dumps(config))
    gate = r"'model.layers.0.mlp.gate_proj.weight' in \S+ has shape \[128, 64\], but config.json implies \[96, 64\]"
    with pytest.raises(CheckpointError, match="6 wrong shapes: .*" + gate):
        Checkpoint(folder)


class Payload:
    """Would create a file if unpickling ran it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_pth_with_objects_is_not_executed(tmp_path):
    cfg = tiny_config()
    folder = write_meta_checkpoint(tmp_path / "meta", cfg, random_state_dict(cfg))
    marker = tmp_path / "executed"
    state = torch.load(folder / "consolidated.00.pth", weights_only=True)
    torch.save(state | {"extra": Payload(marker)}, folder / "consolidated.00.pth")
    message = "consolidated.00.pth: holds objects other than tensors, so it was not executed"
    with pytest.raises(CheckpointError, match=message):
        Checkpoint(folder)
    assert not marker.exists()

    torch.save([torch.zeros(1)], folder / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match="consolidated.00.pth: holds a list, expected a dict"):
        Checkpoint(folder)
    (folder / "consolidated.00.pth").write_bytes(b"PK\3\4 not a zip")
    with pytest.raises(CheckpointError, match="consolidated.00.pth: cannot be read"):
        Checkpoint(folder)


def test_meta_shard_gaps_and_mismatches_are_named(tmp_path):
    cfg = tiny_config()
    folder = write_meta_checkpoint(tmp_path / "meta", cfg, random_state_dict(cfg), mp=2)
    rank1 = torch.load(folder / "consolidated.01.pth", weights_only=True)
    del rank1["layers.1.ffn_norm.weight"]
    torch.save(rank1, folder / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match="'layers.1.ffn_norm.weight' is in .*consolidated.00.pth.* but not in"):
        Checkpoint(folder)
    (folder / "consolidated.00.pth").rename(folder / "consolidated.02.pth")
    with pytest.raises(CheckpointError, match="consolidated.00.pth is missing"):
        Checkpoint(folder)


def tensors_kept_by(error: BaseException) -> list[torch.Tensor]:
    """Tensors reachable from the locals of the frames `error` (and the errors it arose during) went through:
    what a caller that keeps the error keeps alive. Modules, classes and functions' globals are not followed."""
    todo, seen, found = [], set(), []
    while error is not None:
        tb = error.__traceback__
        while tb is not None:
            todo.extend(tb.tb_frame.f_locals.values())
            tb = tb.tb_next
        error = error.__context__
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, (types.ModuleType, type, types.FrameType)):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found.append(obj)
        elif isinstance(obj, types.FunctionType):
            for cell in obj.__closure__ or ():
                with contextlib.suppress(ValueError):  # an empty cell
                    todo.append(cell.cell_contents)
        else:
            todo.extend(gc.get_referents(obj))
    return found


def error_of(call) -> BaseException:
    try:
        call()
    except Exception as err:
        return err
    raise AssertionError("no error raised")


@pytest.mark.parametrize("when", ["before_the_read", "during_the_read"])
def test_a_read_that_fails_midway_keeps_nothing_it_read(tmp_path, monkeypatch, when):
    cfg = tiny_config(n_layers=3)
    folder = write_hf_checkpoint(tmp_path / "ckpt", cfg, random_state_dict(cfg), shards=2)
    ckpt = Checkpoint(folder, index_cache=False)
    last = folder / "model-00002-of-00002.safetensors"
    (start, _) = safetensors_io.read_safetensors_header(last)["model.layers.2.mlp.gate_proj.weight"]["offsets"]
    if when == "before_the_read":  # truncated after the checkpoint was opened: caught before the shard is read
        os.truncate(last, start + 100)
    else:  # truncated while it is open: caught by the read that comes up short, inside layer 2
        read = safetensors_io.SafetensorsFiles.read_into

        def truncating(self, file_name, tensor_start, *args, **kwargs):
            if tensor_start == start:
                os.truncate(last, start + 100)
            return read(self, file_name, tensor_start, *args, **kwargs)

        monkeypatch.setattr(safetensors_io.SafetensorsFiles, "read_into", truncating)

    error = error_of(lambda: ckpt.state_dict(dtype=torch.bfloat16))
    assert isinstance(error, CheckpointError) and last.name in str(error)
    assert ("changed since" if when == "before_the_read" else "truncated") in str(error)
    assert [tuple(t.shape) for t in tensors_kept_by(error)] == []  # the embedding and layers read so far are let go


@pytest.mark.parametrize("when", ["before_the_read", "during_the_read"])
def test_a_meta_read_that_fails_midway_keeps_nothing_it_read(tmp_path, monkeypatch, when):
    cfg = tiny_config(n_layers=3)
    folder = write_meta_checkpoint(tmp_path / "meta", cfg, random_state_dict(cfg), mp=2)
    ckpt = Checkpoint(folder, index_cache=False)
    shard = folder / "consolidated.01.pth"

    def grow():  # grown, not truncated: the read itself succeeds
        with open(shard, "ab") as handle:
            handle.write(b"\0" * 10)

    if when == "before_the_read":  # changed after the checkpoint was opened: caught when the shard is opened
        grow()
    else:  # changed while it is open: caught after the read, inside layer 2
        copy_into = PthShards.copy_into

        def growing(self, stored_name, *args, **kwargs):
            if stored_name == "layers.2.feed_forward.w1.weight":
                grow()
            return copy_into(self, stored_name, *args, **kwargs)

        monkeypatch.setattr(PthShards, "copy_into", growing)

    error = error_of(lambda: ckpt.state_dict(dtype=torch.bfloat16))
    assert isinstance(error, CheckpointError)
    assert f"{shard} changed since the checkpoint was opened" in str(error)
    assert [tuple(t.shape) for t in tensors_kept_by(error)] == []  # what was read is let go


def test_a_failed_load_leaves_no_model_and_no_cache(tmp_path, hf_folder):
    folder, _ = hf_folder
    (folder / "model-00002-of-00002.safetensors").write_bytes(b"\0" * 4)
    with pytest.raises(CheckpointError):
        load(folder)
    assert cache_files(tmp_path) == []


def test_dtype_must_be_one_the_forward_pass_runs_in():
    assert resolve_dtype("float64") is torch.float64 and resolve_dtype(torch.bfloat16) is torch.bfloat16
    # float8 has no kernels for the forward's ops: refused here, not by a NotImplementedError in RoPE.
    with pytest.raises(ValueError, match=r"dtype torch.float8_e4m3fn is not supported; use one of \['float32'"):
        resolve_dtype(torch.float8_e4m3fn)


def test_mixed_dtype_checkpoint_loads_in_its_main_dtype(tmp_path, tiny_cfg):
    # Norms in bfloat16 beside float32 matrices: dtype=None casts all to the dtype most weights are stored
    # in, so the forward pass runs (each tensor kept as stored failed in the first matmul).
    state = random_state_dict(tiny_cfg)
    state = {name: t.to(torch.bfloat16) if ".ln" in f".{name}" else t for name, t in state.items()}
    write_hf_checkpoint(tmp_path / "mixed", tiny_cfg, state)
    model = load(tmp_path / "mixed", dtype=None, index_cache=False, progress=False)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    tokens = torch.tensor([[3, 5, 7, 9]])
    expected = load(tmp_path / "mixed", dtype=torch.float32, index_cache=False, progress=False)(tokens)
    assert torch.equal(model(tokens), expected)


@pytest.mark.parametrize("mp", [2, 4])
def test_missing_last_meta_shards_are_named(tmp_path, tiny_cfg, mp):
    # Without them every split weight is 1/mp of what params.json implies (params.json does not say mp).
    folder = write_meta_checkpoint(tmp_path / "meta", tiny_cfg, random_state_dict(tiny_cfg), mp=mp)
    for rank in range(mp // 2, mp):
        (folder / f"consolidated.{rank:02d}.pth").unlink()
    found = mp // 2
    missing = r"consolidated\.01\.pth is missing" if mp == 2 else r"consolidated\.02\.pth to consolidated\.03\.pth are"
    with pytest.raises(CheckpointError, match=rf"so {mp} shards are expected but only {found} found; {missing}"):
        Checkpoint(folder, index_cache=False)
