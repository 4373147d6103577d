"""Streaming at the memory floor: the embedding read by rows of the prompt's ids, the unembedding held or read a
vocabulary block at a time (`ll.load(..., stream=True, unembed=...)`), and what ll.plan says of both."""

import threading

import pytest
import torch
from support.models import assert_same_top_k, tiny_config

import llama_lens as ll
import llama_lens.io.pth as pth_io
import llama_lens.loading.plan as plan_module
import llama_lens.loading.stream_vocab as stream_vocab
import llama_lens.model.cpu_matmul as cpu_matmul
from llama_lens.io.safetensors import SafetensorsFiles, read_safetensors_header
from llama_lens.loading.plan import GIB, plan
from llama_lens.loading.stream_vocab import OnDiskWeight, StreamedEmbedding, StreamedUnembed
from llama_lens.testing import random_state_dict, write_hf_checkpoint, write_meta_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Rows per block of the streamed unembedding in these tests: several blocks over the tiny vocabulary (128), one
# of them across the boundary of two Meta shards that split the vocabulary at 64, and a short last one.
BLOCK_ROWS = 48


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(stream_vocab, "UNEMBED_BLOCK_ROWS", BLOCK_ROWS)


def write(folder, layout, cfg, **kwargs):
    state = random_state_dict(cfg, seed=4)
    if layout == "hf":
        return write_hf_checkpoint(folder, cfg, state, shards=2)
    return write_meta_checkpoint(folder, cfg, state, mp=2, **kwargs)


LAYOUTS = {
    "hf": ("hf", {}, {}),
    "hf_tied": ("hf", {"tie_embeddings": True}, {}),
    "meta_embed_split_d_model": ("meta", {}, {"vocab_parallel": False}),  # Llama 2's split
    "meta_embed_split_vocab": ("meta", {}, {"vocab_parallel": True}),  # Llama 3's split
    "meta_tied": ("meta", {"tie_embeddings": True}, {}),
}


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def ckpt_path(request, tmp_path_factory):
    layout, changes, kwargs = LAYOUTS[request.param]
    return write(tmp_path_factory.mktemp("vocab") / request.param, layout, tiny_config(n_layers=3, **changes), **kwargs)


def load(path, **kwargs):
    return ll.load(path, index_cache=False, progress=False, **kwargs)


def tokens_for(batch=2, pos=9, seed=5):
    return torch.randint(0, 128, (batch, pos), generator=torch.Generator().manual_seed(seed))


def real_params(model):
    return sorted({name for name, param in model.named_parameters(remove_duplicate=False) if not param.is_meta})


# --------------------------------------------------------------------------- results equal the in-memory model's
@pytest.mark.parametrize("unembed", ["memory", "stream"])
def test_logits_and_cache_equal_the_loaded_model(ckpt_path, unembed):
    loaded = load(ckpt_path)
    streamed = load(ckpt_path, stream=True, unembed=unembed)
    tokens = tokens_for()
    logits, cache = streamed.run_with_cache(tokens, names_filter=lambda name: name.endswith("resid_post"))
    expected_logits, expected_cache = loaded.run_with_cache(
        tokens, names_filter=lambda name: name.endswith("resid_post")
    )
    # The embedding rows are the stored values: the residual streams come out the same.
    for name in expected_cache:
        assert torch.equal(cache[name], expected_cache[name]), name
    # The unembedding block by block is a matmul in other pieces: equal to float rounding.
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(streamed.embed(tokens), loaded.embed(tokens))


@pytest.mark.parametrize("unembed", ["memory", "stream"])
def test_logit_lens_equals_the_loaded_model(ckpt_path, unembed):
    loaded = load(ckpt_path)
    streamed = load(ckpt_path, stream=True, unembed=unembed)
    tokens = tokens_for()
    kwargs = dict(target=[7, 100], readout=["embed", "resid_mid", "resid_post"], top_k=4, keep_logits=True)
    expected = ll.logit_lens(loaded, tokens, **kwargs)
    got = ll.logit_lens(streamed, tokens, **kwargs)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
    assert_same_top_k(got.top_ids, got.top_logits, expected.top_logits, scores=got.logits, atol=1e-5)
    torch.testing.assert_close(got.top_probs, expected.top_probs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.kl_to_final, expected.kl_to_final, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got.entropy, expected.entropy, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.target_probs, expected.target_probs, rtol=1e-5, atol=1e-7)


def test_generate_and_attribution_equal_the_loaded_model(tmp_path):
    path = write(tmp_path / "meta", "meta", tiny_config(n_layers=2))
    loaded, streamed = load(path), load(path, stream=True, unembed="stream")
    prompt = tokens_for(batch=1, pos=4)
    expected = loaded.generate(prompt, max_new_tokens=3, temperature=0, stop_at_eos=False)
    assert streamed.generate(prompt, max_new_tokens=3, temperature=0, stop_at_eos=False).tokens == expected.tokens
    tokens = tokens_for()
    got, want = (
        ll.direct_logit_attribution(streamed, tokens, target=7),
        ll.direct_logit_attribution(loaded, tokens, target=7),
    )
    torch.testing.assert_close(got.components, want.components, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ what is held, read
def test_what_each_mode_holds(ckpt_path):
    tied = ll.Checkpoint(ckpt_path, index_cache=False).config.tie_embeddings
    held = load(ckpt_path, stream=True, unembed="memory")
    assert real_params(held) == (["embed.weight"] if tied else []) + ["ln_final.weight", "unembed.weight"]
    assert isinstance(held.embed, torch.nn.Embedding if tied else StreamedEmbedding)
    streamed = load(ckpt_path, stream=True, unembed="stream")
    assert real_params(streamed) == ["ln_final.weight"]
    assert isinstance(streamed.embed, StreamedEmbedding) and isinstance(streamed.unembed, StreamedUnembed)
    if tied:  # one reader of the one stored tensor
        assert streamed.unembed.weight is streamed.embed.weight


def test_hf_embedding_reads_only_the_prompt_rows(tmp_path, monkeypatch):
    cfg = tiny_config(n_layers=1)
    path = write(tmp_path / "hf", "hf", cfg)
    model = load(path, stream=True, unembed="memory")
    # Where the embedding's bytes lie, from the file header (not from the loader's index).
    headers = {f.name: read_safetensors_header(f) for f in path.glob("*.safetensors")}
    (file_name, entry), *_ = [
        (f, h["model.embed_tokens.weight"]) for f, h in headers.items() if "model.embed_tokens.weight" in h
    ]
    row_bytes = cfg.d_model * 4
    reads = []
    read_into = SafetensorsFiles.read_into

    def recording(self, name, start, stored_dtype, target, what):
        reads.append((name, start, target.numel() * stored_dtype.itemsize))
        return read_into(self, name, start, stored_dtype, target, what)

    monkeypatch.setattr(SafetensorsFiles, "read_into", recording)
    ids = torch.tensor([[5, 6, 7, 90, 5, 3], [3, 3, 120, 6, 90, 127]])
    rows = model.embed(ids)
    # Byte ranges read: exactly the distinct ids' rows (runs of consecutive ids in one read), nothing else.
    read_rows = set()
    for name, start, nbytes in reads:
        assert name == file_name and (start - entry["offsets"][0]) % row_bytes == 0 and nbytes % row_bytes == 0
        first = (start - entry["offsets"][0]) // row_bytes
        read_rows |= set(range(first, first + nbytes // row_bytes))
    assert sum(nbytes for _, _, nbytes in reads) == len(read_rows) * row_bytes  # each row once
    assert read_rows == set(ids.flatten().tolist())
    assert len(reads) == 5  # 3, 5-7, 90, 120, 127
    expected = torch.nn.functional.embedding(
        ids, ll.Checkpoint(path, index_cache=False).load_tensor("model.embed_tokens.weight")
    )
    assert torch.equal(rows, expected)


@pytest.mark.parametrize("vocab_parallel", [False, True], ids=["embed_split_d_model", "embed_split_vocab"])
def test_meta_embedding_reads_only_the_prompt_rows_from_each_shard(tmp_path, monkeypatch, vocab_parallel):
    cfg = tiny_config(n_layers=1)
    path = write(tmp_path / "meta", "meta", cfg, vocab_parallel=vocab_parallel)
    model = load(path, stream=True, unembed="memory")
    # The shards as stored, read whole here, to tell which rows each part read holds.
    shards = [torch.load(path / f"consolidated.0{k}.pth", weights_only=True)["tok_embeddings.weight"] for k in (0, 1)]
    copied = []
    read_pth_tensor = pth_io.read_pth_tensor

    def recording(fd, meta, destination, file_path, what):
        read_pth_tensor(fd, meta, destination, file_path, what)
        copied.append(destination.clone())

    monkeypatch.setattr(pth_io, "read_pth_tensor", recording)
    ids = torch.tensor([[5, 6, 7, 90, 5, 3], [3, 3, 120, 6, 90, 127]])
    rows = model.embed(ids)
    distinct = sorted(set(ids.flatten().tolist()))
    # Every part copied is rows of one shard's piece, and together they are the distinct ids' rows, once.
    found = []
    for part in copied:
        for k, shard in enumerate(shards):
            matches = [
                r for r in range(len(shard)) if part.shape[1] == shard.shape[1] and torch.equal(shard[r], part[0])
            ]
            if matches:
                first = matches[0]
                assert torch.equal(shard[first : first + len(part)], part)
                offset = first + (k * len(shards[0]) if vocab_parallel else 0)
                found += [(k, row) for row in range(offset, offset + len(part))]
                break
        else:
            raise AssertionError("a copied part is not rows of the embedding")
    per_shard = 1 if vocab_parallel else 2  # a d_model split: each row has a part in each shard
    assert sorted(row for _, row in found) == sorted(distinct * per_shard)
    assert sum(part.nbytes for part in copied) == len(distinct) * cfg.d_model * 4
    expected = torch.nn.functional.embedding(
        ids, ll.Checkpoint(path, index_cache=False).state_dict(["embed.weight"])["embed.weight"]
    )
    assert torch.equal(rows, expected)


def test_unembedding_is_read_once_per_pass_block_by_block(tmp_path, monkeypatch):
    path = write(tmp_path / "meta", "meta", tiny_config(n_layers=2), vocab_parallel=True)
    model = load(path, stream=True, unembed="stream")
    calls = []
    read_rows = ll.Checkpoint.read_rows

    def recording(self, name, start, target, **kwargs):
        calls.append((name, start, len(target)))
        return read_rows(self, name, start, target, **kwargs)

    monkeypatch.setattr(ll.Checkpoint, "read_rows", recording)
    model(tokens_for())
    unembed_reads = [(start, n) for name, start, n in calls if name == "unembed.weight"]
    assert unembed_reads == [(0, 48), (48, 48), (96, 32)]  # every row once, in blocks of BLOCK_ROWS
    assert model.unembed.weight._block is None and model.unembed.weight._pool is None  # nothing kept after
    lens = ll.logit_lens(model, tokens_for())  # the lens's sweeps take the blocks from disk too
    assert [n for name, _, n in calls if name == "unembed.weight"][3:] == [48, 48, 32, 48, 48, 32]  # logits, lens
    assert lens.n_readouts == 3
    assert not [t for t in threading.enumerate() if t.name.startswith("llama_lens-vocab")]  # none left waiting


def test_on_disk_weight_indexing_and_whole_matrix_errors(tmp_path):
    path = write(tmp_path / "hf", "hf", tiny_config(n_layers=1))
    model = load(path, stream=True, unembed="stream")
    weight = model.unembed.weight
    full = weight.read()
    assert full.shape == weight.shape == (128, 64)
    assert torch.equal(full, ll.Checkpoint(path, index_cache=False).load_tensor("lm_head.weight"))
    assert torch.equal(weight[40:100], full[40:100]) and torch.equal(weight[-1], full[-1])
    assert weight[128:].shape == (0, 64) and weight[7:7].shape == (0, 64)
    assert torch.equal(weight[torch.tensor([[3, 99], [3, 0]])], full[torch.tensor([[3, 99], [3, 0]])])
    weight.release()
    with pytest.raises(
        ll.LlamaLensError, match=r"unembed.weight of this streamed model.*weight\.read\(\).*unembed='memory'"
    ):
        model.W_U  # noqa: B018
    assert isinstance(model.embed.weight, OnDiskWeight) and not hasattr(model.embed.weight, "_not_there")
    with pytest.raises(ValueError, match="token ids must lie in"):
        weight[torch.tensor([128])]
    with pytest.raises(IndexError, match="out of range"):
        weight[128]


# -------------------------------------------------------------------------------------------- choosing the mode
def test_bad_unembed_values_are_refused(tmp_path):
    path = write(tmp_path / "hf", "hf", tiny_config(n_layers=1))
    with pytest.raises(
        ValueError, match=r"unknown unembedding mode 'disk': unembed= takes one of \['auto', 'memory', 'stream'\]"
    ):
        load(path, stream=True, unembed="disk")
    with pytest.raises(ValueError, match="unembed='stream'.*pass stream=True"):
        load(path, unembed="stream")
    with pytest.raises(ValueError, match="unknown unembedding mode"):
        plan(tiny_config(), stream=True, unembed=None)
    assert isinstance(load(path, unembed="memory").unembed, torch.nn.Linear)  # without streaming: as ever


def test_auto_streams_the_unembedding_when_memory_is_short(tmp_path, monkeypatch):
    cfg = tiny_config(n_layers=2)
    path = write(tmp_path / "hf", "hf", cfg)
    held = plan(cfg, tokens=0, cache=None, stream=True, unembed="memory").peak_bytes
    streamed = plan(cfg, tokens=0, cache=None, stream=True, unembed="stream").peak_bytes
    assert streamed < held
    monkeypatch.setattr(plan_module, "available_memory", lambda device: 2 * held)  # the held load: half of it
    assert plan(path, stream=True).unembed == "memory"
    assert isinstance(load(path, stream=True).unembed, torch.nn.Linear)
    monkeypatch.setattr(plan_module, "available_memory", lambda device: 2 * held - 1)
    assert plan(path, stream=True).unembed == "stream"
    assert isinstance(load(path, stream=True).unembed, StreamedUnembed)
    assert isinstance(load(path, stream=True, unembed="memory").unembed, torch.nn.Linear)  # forced
    assert plan(path).unembed == "memory"  # not streaming: always held
    # Too short even for the held one: the refusal suggests streaming the unembedding.
    monkeypatch.setattr(plan_module, "available_memory", lambda device: (held + streamed) // 2)
    with pytest.raises(ll.NotEnoughMemoryError, match="unembed='stream'"):
        load(path, stream=True, unembed="memory")


def test_plan_reports_the_modes_by_hand(tiny_cfg):
    # tiny: d_model 64, vocab 128, untied; one layer 36_992 values, the largest tensor 128 * 64.
    layers = 36_992 * 2 * 2 + 128 * 64 * 2
    held = plan(tiny_cfg, tokens=0, stream=True, dtype=torch.bfloat16, cache=None, unembed="memory")
    assert (held.embed, held.unembed) == ("rows", "memory")
    assert held.weights_resident_bytes == (64 + 128 * 64) * 2  # final norm + unembedding, no embedding
    assert held.unembed_in_flight_bytes == 0 and held.peak_bytes == held.weights_resident_bytes + layers
    streamed = plan(tiny_cfg, tokens=10, stream=True, dtype=torch.bfloat16, cache=None, unembed="stream")
    assert (streamed.embed, streamed.unembed) == ("rows", "stream")
    assert streamed.weights_resident_bytes == 64 * 2
    assert streamed.unembed_in_flight_bytes == 2 * 48 * 64 * 2  # two blocks of BLOCK_ROWS rows
    assert "unembed='stream'" in repr(streamed) and "unembed in flight" in repr(streamed)
    assert streamed.to_frame().loc["unembed in flight", "bytes"] == 2 * 48 * 64 * 2
    # The prompt's embedding rows and the unembedding are read each pass, with the layers.
    assert streamed.read_bytes == (10 * 64 + 64 + 128 * 64 + 2 * 36_992) * 2
    tied = plan(tiny_config(tie_embeddings=True), tokens=0, stream=True, cache=None, unembed="memory")
    assert tied.embed == "memory"  # the held unembedding is the embedding
    full = plan(tiny_cfg, tokens=0, cache=None)
    assert (full.embed, full.unembed) == ("memory", "memory")
    assert plan(tiny_cfg, stream=True, layers=iter([0])).n_layers == 1  # "auto" looks at the layers first
    assert full.process_bytes is None or full.peak_rss_bytes == full.process_bytes + full.peak_bytes


LLAMA_3_1_70B = dict(
    d_model=8192,
    n_layers=80,
    n_heads=64,
    n_kv_heads=8,
    d_head=128,
    d_mlp=28672,
    d_vocab=128256,
    rope_theta=500000.0,
    norm_eps=1e-5,
    tie_embeddings=False,
    checkpoint_dtype="bfloat16",
)


@pytest.mark.parametrize("matmul", ["native", "float32"])
def test_a_70b_model_streams_in_8_gib(monkeypatch, request, matmul):
    cfg = ll.LlamaConfig(**LLAMA_3_1_70B)
    monkeypatch.setattr(stream_vocab, "UNEMBED_BLOCK_ROWS", 4096)  # the real block size
    monkeypatch.setenv(cpu_matmul.ENV_VAR, matmul)
    cpu_matmul.mode.cache_clear()
    request.addfinalizer(cpu_matmul.mode.cache_clear)  # the setting is read once per process
    # An 8 GiB laptop: "auto" streams the unembedding too.
    monkeypatch.setattr(plan_module, "available_memory", lambda device: 8 * GIB)
    estimate = plan(cfg, tokens=128, stream=True, dtype=None)
    assert (estimate.embed, estimate.unembed, estimate.dtype) == ("rows", "stream", torch.bfloat16)
    assert estimate.peak_bytes <= 8 * GIB and estimate.fits
    # By hand: two layers in flight (bf16) and the largest tensor being copied (gate/up/down, 8192 x 28672)
    layer = 8192 + 8192 * 8192 * 2 + 2 * 1024 * 8192 + 8192 + 3 * 8192 * 28672
    # On CPUs without bfloat16 units the layers multiply in float32: 6 MB of weight cast at a time (192 rows of
    # q_proj, o_proj or gate/up, 54 of down_proj), and the unembedding block in use (4096 x 8192) cast too.
    cast = 192 * 8192 * 4 if matmul == "float32" else 0
    assert estimate.layer_in_flight_bytes == (2 * layer + 8192 * 28672) * 2 + cast
    unembed_cast = 4096 * 8192 * 4 if matmul == "float32" else 0
    assert estimate.unembed_in_flight_bytes == 2 * 4096 * 8192 * 2 + unembed_cast
    assert estimate.weights_resident_bytes == 8192 * 2
    for unembed in ("memory", "stream"):  # either way under 8 GiB
        assert plan(cfg, tokens=128, stream=True, dtype=torch.bfloat16, unembed=unembed).peak_bytes <= 8 * GIB


def test_plan_is_callable_after_a_load_imports_its_module(tmp_path):
    path = write(tmp_path / "hf", "hf", tiny_config(n_layers=1))
    load(path, stream=True)  # imports llama_lens.loading.plan, which becomes the package's attribute `plan`
    assert ll.plan(path, stream=True, unembed="stream").unembed == "stream"


def test_on_disk_weight_reads_follow_the_block_size(tmp_path):
    path = write(tmp_path / "meta", "meta", tiny_config(n_layers=1), vocab_parallel=True)
    ckpt = ll.Checkpoint(path, index_cache=False)
    weight = OnDiskWeight(ckpt, "unembed.weight", torch.float32, torch.device("cpu"), block_rows=40)
    full = ckpt.state_dict(["unembed.weight"])["unembed.weight"]
    # A block across the two shards' boundary (64), and a range across two blocks.
    assert torch.equal(weight[60:70], full[60:70]) and torch.equal(weight[35:45], full[35:45])
    assert weight.read_bytes > 0
    weight.release()


@pytest.mark.parametrize("unembed", ["memory", "stream"])
def test_streamed_vocabulary_on_the_device(tmp_path, device, unembed):
    path = write(tmp_path / "meta", "meta", tiny_config(n_layers=2))
    loaded = load(path, device=device)
    streamed = load(path, device=device, stream=True, unembed=unembed)
    tokens = tokens_for()
    logits = streamed(tokens)
    assert logits.device.type == torch.device(device).type
    torch.testing.assert_close(logits, loaded(tokens), rtol=1e-5, atol=1e-5)
    got, expected = ll.logit_lens(streamed, tokens, target=7), ll.logit_lens(loaded, tokens, target=7)
    torch.testing.assert_close(got.target_probs, expected.target_probs, rtol=1e-5, atol=1e-7)
