"""GGUF files: header, config, dequantized reads in every quantization type, layer ranges, tokenizer, errors.

Tiny files are written with the `gguf` package's own writer (`gguf.GGUFWriter`) and read back independently with
`gguf.GGUFReader` + `gguf.quants.dequantize`; logits are compared with the same weights as a Hugging Face
checkpoint (and with transformers' own GGUF loader on the embedded model).
"""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch
from support.llama_cpp import llama_cpp_permute, write_gguf
from support.models import tiny_config

import llama_lens as ll
import llama_lens.io.gguf as gguf_io
import llama_lens.io.gguf_quants as gguf_quants
from llama_lens.errors import CheckpointError, ConfigError
from llama_lens.io.names import param_shapes, permute_qk_to_rotate_half
from llama_lens.testing import random_state_dict, write_hf_checkpoint

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QTYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]

LLAMA3_ROPE = ll.RopeScaling(
    kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
)


def quant_config(**changes):
    """Rows of 256 values (K-quants' block size) in every matrix: d_model, n_heads * d_head and d_mlp."""
    return tiny_config(d_model=256, n_heads=4, n_kv_heads=2, d_head=64, d_mlp=256, **changes)


# ------------------------------------------------------------------------------------------------ reads
@pytest.mark.parametrize("qtype", QTYPES)
def test_every_quantization_type_reads_back_as_gguf_dequantizes_it(tmp_path, qtype):
    cfg = quant_config()
    state = random_state_dict(cfg)
    path = tmp_path / f"tiny.{qtype}.gguf"
    write_gguf(path, cfg, state, qtype=qtype)
    ckpt = ll.Checkpoint(path)
    reader = gguf.GGUFReader(str(path))  # the package's own header parsing, independent of ours
    assert sorted(ckpt.tensors()["name"]) == sorted(t.name for t in reader.tensors)
    for tensor in reader.tensors:
        expected = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).copy())
        got = ckpt.load_tensor(tensor.name)  # as stored: llama.cpp's q/k order
        stored_type = qtype if got.dim() == 2 else "F32"
        assert got.dtype == {"F16": torch.float16, "BF16": torch.bfloat16}.get(stored_type, torch.float32)
        assert torch.equal(got.float(), expected.reshape(got.shape)), tensor.name
    # Under our names, q/k are back in rotate-half order, and the rest as stored.
    params = ckpt.state_dict(dtype=torch.float32)
    for layer in range(cfg.n_layers):
        q = ckpt.load_tensor(f"blk.{layer}.attn_q.weight").float()
        assert torch.equal(params[f"blocks.{layer}.attn.q_proj.weight"], permute_qk_to_rotate_half(q, cfg.n_heads))
        assert torch.equal(llama_cpp_permute(params[f"blocks.{layer}.attn.q_proj.weight"], cfg.n_heads), q)
        up = ckpt.load_tensor(f"blk.{layer}.ffn_up.weight").float()
        assert torch.equal(params[f"blocks.{layer}.mlp.up_proj.weight"], up)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("qtype", ["Q4_1", "Q6_K"])
def test_reads_in_small_chunks_match_a_whole_read(tmp_path, monkeypatch, qtype, threads):
    cfg = quant_config()
    path = tmp_path / "tiny.gguf"
    write_gguf(path, cfg, random_state_dict(cfg), qtype=qtype)
    monkeypatch.setattr(gguf_io, "CHUNK_VALUES", 10**9)  # each tensor in one piece
    whole = ll.Checkpoint(path).state_dict()
    monkeypatch.setattr(gguf_io, "CHUNK_VALUES", 300)  # one row (or one head's rows for q/k) at a time
    torch.set_num_threads(threads)  # chunks dequantized by this many threads (the module runs on one)
    try:
        chunked = ll.Checkpoint(path).state_dict(dtype=torch.bfloat16)
    finally:
        torch.set_num_threads(1)
    for name, tensor in whole.items():
        assert torch.equal(chunked[name], tensor.to(torch.bfloat16)), name


def test_tensors_lists_the_stored_type_and_bytes(tmp_path):
    cfg = quant_config()
    path = tmp_path / "tiny.gguf"
    write_gguf(path, cfg, random_state_dict(cfg), qtype="Q4_K", tensor_types={"embed.weight": "Q8_0"})
    frame = ll.Checkpoint(path).tensors().set_index("name")
    reader = gguf.GGUFReader(str(path))
    for tensor in reader.tensors:
        row = frame.loc[tensor.name]
        assert row["dtype"] == tensor.tensor_type.name
        assert row["bytes"] == tensor.n_bytes
        assert row["numel"] == tensor.n_elements
        assert row["file"] == "tiny.gguf"
    assert frame.loc["token_embd.weight", "dtype"] == "Q8_0"
    assert frame.loc["blk.1.ffn_down.weight", "param"] == "blocks.1.mlp.down_proj.weight"
    assert frame.loc["blk.1.ffn_down.weight", "dtype"] == "Q4_K"


# ------------------------------------------------------------------------------------------- config, logits
@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"tie_embeddings": True},
        {"n_kv_heads": 1},
        {"rope_scaling": ll.RopeScaling(kind="linear", factor=2.0)},
        {"rope_scaling": LLAMA3_ROPE, "max_position_embeddings": 32768},
    ],
    ids=["untied_gqa", "tied", "mqa", "linear_rope", "llama3_rope"],
)
def test_an_f32_gguf_gives_the_logits_of_the_same_weights_in_hf_layout(tmp_path, changes):
    cfg = tiny_config(**changes)
    state = random_state_dict(cfg, seed=3)
    path = tmp_path / "tiny.F32.gguf"
    write_gguf(path, cfg, state)
    hf_folder = write_hf_checkpoint(tmp_path / "hf", cfg, state)

    ckpt = ll.Checkpoint(path)
    for key in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_head", "d_mlp", "d_vocab", "tie_embeddings"):
        assert getattr(ckpt.config, key) == getattr(cfg, key), key
    assert ckpt.config.rope_scaling == cfg.rope_scaling
    assert ckpt.config.norm_eps == cfg.norm_eps  # 1e-5, though stored as float32
    from_gguf = ll.load(path, progress=False)
    from_hf = ll.load(hf_folder, progress=False)
    for name, param in from_hf.state_dict().items():
        assert torch.equal(from_gguf.state_dict()[name], param), name
    tokens = torch.randint(0, cfg.d_vocab, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = from_gguf(tokens)
        from transformers import LlamaForCausalLM

        reference = LlamaForCausalLM.from_pretrained(hf_folder, dtype=torch.float32).eval()(tokens).logits
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=0)


def test_a_folder_holding_one_gguf_opens_like_the_file(tmp_path):
    cfg = tiny_config()
    folder = tmp_path / "model"
    folder.mkdir()
    write_gguf(folder / "tiny.Q8_0.gguf", cfg, random_state_dict(cfg), qtype="Q8_0")
    by_folder, by_file = ll.Checkpoint(folder), ll.Checkpoint(folder / "tiny.Q8_0.gguf")
    assert by_folder.format == by_file.format == "gguf"
    assert by_folder.files == by_file.files == [folder / "tiny.Q8_0.gguf"]
    assert "tiny.Q8_0.gguf" in repr(by_folder)
    assert torch.equal(by_folder.load_tensor("blk.0.attn_v.weight"), by_file.load_tensor("blk.0.attn_v.weight"))

    write_gguf(folder / "other.gguf", cfg, random_state_dict(cfg))
    with pytest.raises(CheckpointError, match=r"holds 2 GGUF files \(other.gguf, tiny.Q8_0.gguf\); pass the one"):
        ll.Checkpoint(folder)


# ------------------------------------------------------------------------------------- layers, stream, plan
def test_a_layer_range_reads_only_those_layers_bytes(tmp_path, monkeypatch):
    cfg = quant_config(n_layers=5)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, cfg, random_state_dict(cfg), qtype="Q4_K", tensor_types={"embed.weight": "Q8_0"})
    ckpt = ll.Checkpoint(path)
    read_names, read_bytes = [], []
    read_tensor, read_exactly = gguf_io.read_gguf_into, gguf_quants.read_exactly_into

    def spy_tensor(*args, what, **kwargs):
        read_names.append(what.strip("'"))
        return read_tensor(*args, what=what, **kwargs)

    def spy_bytes(file, tensor, what):  # every byte taken from the file
        read_bytes.append(tensor.numel() * tensor.element_size())
        return read_exactly(file, tensor, what)

    monkeypatch.setattr(gguf_io, "read_gguf_into", spy_tensor)  # the GGUFReader's reads
    monkeypatch.setattr(gguf_quants, "read_exactly_into", spy_bytes)
    model = ll.load(ckpt, layers=range(1, 3), progress=False)

    sizes = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors}
    wanted = [n for n in sizes if n.startswith(("blk.1.", "blk.2.")) or not n.startswith("blk.")]
    assert sorted(read_names) == sorted(wanted)
    assert sum(read_bytes) == sum(sizes[n] for n in wanted) < sum(sizes.values()) // 2
    assert model.layer_indices == [1, 2]
    full = ll.load(ckpt, progress=False)
    assert torch.equal(model.blocks["2"].attn.k_proj.weight, full.blocks["2"].attn.k_proj.weight)


def test_streaming_a_gguf_computes_what_a_full_load_computes(tmp_path):
    cfg = quant_config(n_layers=3)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, cfg, random_state_dict(cfg), qtype="Q5_1")
    loaded = ll.load(path, progress=False)
    streamed = ll.load(path, stream=True, progress=False)
    tokens = torch.randint(0, cfg.d_vocab, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(streamed(tokens), loaded(tokens))


def test_plan_counts_the_stored_bytes_of_a_quantized_file(tmp_path):
    from llama_lens.loading.plan import plan

    cfg = quant_config(n_layers=3)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, cfg, random_state_dict(cfg), qtype="Q4_0")
    ckpt = ll.Checkpoint(path)
    estimate = plan(ckpt, tokens=0, cache=None)
    # Q4_0: 18 bytes per 32 values; norms are float32.
    assert estimate.read_bytes == sum(t.n_bytes for t in gguf.GGUFReader(str(path)).tensors)
    n_params = sum(int(np.prod(shape)) for shape in param_shapes(cfg).values())
    assert estimate.read_bytes < n_params * 0.6
    assert estimate.weights_resident_bytes == n_params * 4  # dequantized into float32


# ------------------------------------------------------------------------------------------------ errors
def test_an_unsupported_architecture_names_the_file_and_the_value(tmp_path):
    cfg = tiny_config()
    path = tmp_path / "gemma.gguf"
    write_gguf(path, cfg, random_state_dict(cfg), arch="gemma2")
    with pytest.raises(ConfigError, match=r"gemma.gguf: general.architecture is 'gemma2'; .* 'qwen3' architectures"):
        ll.Checkpoint(path)


def test_an_unknown_llama_key_is_refused(tmp_path):
    cfg = tiny_config()
    path = tmp_path / "tiny.gguf"
    extra = {"llama.attention.sliding_window": (4096, gguf.GGUFValueType.UINT32)}
    write_gguf(path, cfg, random_state_dict(cfg), extra_metadata=extra)
    with pytest.raises(ConfigError, match=r"tiny.gguf: unsupported metadata key\(s\) \['llama.attention.sliding_wi"):
        ll.Checkpoint(path)


@pytest.mark.parametrize("value", [math.inf, math.nan, 2.5])
def test_a_non_integer_count_is_named(tmp_path, value):
    cfg = tiny_config()
    path = tmp_path / "tiny.gguf"
    extra = {"llama.expert_count": (value, gguf.GGUFValueType.FLOAT32)}
    write_gguf(path, cfg, random_state_dict(cfg), extra_metadata=extra)
    with pytest.raises(ConfigError, match=r"tiny.gguf: llama.expert_count must be an integer, got"):
        ll.Checkpoint(path)


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("llama.rope.freq_base", "need a finite rope_theta > 0"),
        ("llama.attention.layer_norm_rms_epsilon", "a finite norm_eps >= 0"),
        ("llama.rope.scaling.factor", "the rope scaling factor must be positive and finite, got inf"),
    ],
)
def test_an_infinite_float_is_refused(tmp_path, key, message):
    # Each would load and run: an infinite RoPE base zeroes all frequencies but the first, an infinite epsilon
    # every normalized activation.
    cfg = tiny_config()
    path = tmp_path / "tiny.gguf"
    extra = {"llama.rope.scaling.type": ("linear", gguf.GGUFValueType.STRING)} if "scaling" in key else {}
    write_gguf(path, cfg, random_state_dict(cfg), extra_metadata=extra | {key: (math.inf, gguf.GGUFValueType.FLOAT32)})
    with pytest.raises(ConfigError, match=rf"tiny.gguf: .*{message}"):
        ll.Checkpoint(path)


def test_rope_factors_that_llama3_scaling_does_not_give_are_refused(tmp_path):
    cfg = tiny_config(rope_scaling=LLAMA3_ROPE)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, cfg, random_state_dict(cfg), rope_factors_scale=1.5)
    with pytest.raises(ConfigError, match="tiny.gguf: rope_freqs.weight holds RoPE factors that Llama 3.1's"):
        ll.Checkpoint(path)


def test_a_tensor_of_the_wrong_shape_is_named(tmp_path):
    cfg = tiny_config()
    path = tmp_path / "tiny.gguf"
    write_gguf(path, cfg.replace(d_vocab=130), random_state_dict(cfg))  # llama.vocab_size says 130, rows are 128
    with pytest.raises(CheckpointError, match=r"tensor 'token_embd.weight' .* has shape \[128, 64\], but its metadata"):
        ll.Checkpoint(path)


def test_an_unsupported_quantization_type_names_tensor_type_and_file(tmp_path):
    cfg = tiny_config()
    path = tmp_path / "tiny.gguf"
    write_gguf(path, cfg, random_state_dict(cfg), tensor_types={"blocks.1.mlp.up_proj.weight": "I8"})
    with pytest.raises(CheckpointError, match=r"tiny.gguf: tensor 'blk.1.ffn_up.weight' is stored as I8, which"):
        ll.Checkpoint(path)


@pytest.mark.parametrize("cut", ["in_the_data", "in_the_header", "to_nothing"])
def test_a_truncated_file_is_named(tmp_path, cut):
    cfg = tiny_config()
    path = tmp_path / "tiny.gguf"
    write_gguf(path, cfg, random_state_dict(cfg))
    content = path.read_bytes()
    keep = {"in_the_data": len(content) - 100, "in_the_header": 200, "to_nothing": 10}[cut]
    path.write_bytes(content[:keep])
    message = {
        "in_the_data": r"tiny.gguf: tensor 'output.weight' ends at byte \d+, past the end of the file",
        "in_the_header": r"tiny.gguf: the GGUF header ends early .* truncated",
        "to_nothing": r"tiny.gguf: 10 bytes, too short for a GGUF file",
    }[cut]
    with pytest.raises(CheckpointError, match=message):
        ll.Checkpoint(path)


def test_deeply_nested_metadata_arrays_are_a_corrupt_file_not_a_recursion_error(tmp_path):
    # Magic, version 3, no tensors, one key whose value is an array of one array of one array ... (12 bytes a level).
    key = b"general.nested"
    level = struct.pack("<IQ", 9, 1)  # item type: array, count 1
    body = struct.pack("<Q", len(key)) + key + struct.pack("<I", 9) + level * 100_000 + struct.pack("<IQ", 4, 0)
    path = tmp_path / "nested.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + body)
    with pytest.raises(CheckpointError, match=r"nested.gguf: metadata key 'general.nested' nests arrays more than"):
        gguf_io.read_gguf_header(path)


def test_a_file_changed_after_opening_is_not_read(tmp_path):
    cfg = tiny_config()
    path = tmp_path / "tiny.gguf"
    write_gguf(path, cfg, random_state_dict(cfg))
    ckpt = ll.Checkpoint(path)
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 100)
    with pytest.raises(CheckpointError, match="tiny.gguf changed since the checkpoint was opened"):
        ckpt.state_dict()


def test_header_parsing_agrees_with_gguf_reader(tmp_path):
    cfg = tiny_config()
    path = tmp_path / "tiny.gguf"
    write_gguf(path, cfg, random_state_dict(cfg), qtype="Q8_0", tokenizer=spm_tokenizer_writer(["a", "b"]))
    header = gguf_io.read_gguf_header(path)
    reader = gguf.GGUFReader(str(path))
    expected = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    assert header.metadata == expected
    for tensor in reader.tensors:
        ours = header.tensors[tensor.name]
        assert (ours.start, ours.end, ours.qtype) == (
            tensor.data_offset,
            tensor.data_offset + tensor.n_bytes,
            tensor.tensor_type.name,
        )
        assert ours.shape == tuple(reversed([int(n) for n in tensor.shape]))


# --------------------------------------------------------------------------------------------- tokenizer
def spm_tokenizer_writer(pieces, scores=None, types=None):
    def add(writer):
        writer.add_tokenizer_model("llama")
        writer.add_token_list(pieces)
        writer.add_token_scores(scores or [0.0] * len(pieces))
        writer.add_token_types(types or [1] * len(pieces))

    return add


def test_a_sentencepiece_vocabulary_tokenizes_as_sentencepiece_does(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    from support.corpus import PROSE, corpus

    # A small byte-fallback BPE model in Llama 2's settings: dummy prefix, no normalization, spaces kept.
    model_prefix = tmp_path / "spm"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(PROSE * 4),
        model_prefix=str(model_prefix),
        model_type="bpe",
        vocab_size=700,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        character_coverage=0.98,  # rarer characters go through byte fallback
        bos_id=1,
        eos_id=2,
        unk_id=0,
        minloglevel=2,
    )
    processor = spm.SentencePieceProcessor(model_file=f"{model_prefix}.model")
    pieces = [processor.id_to_piece(i) for i in range(processor.vocab_size())]
    scores = [processor.get_score(i) for i in range(processor.vocab_size())]
    # sentencepiece's piece types are llama.cpp's token types: 1 normal, 2 unknown, 3 control, 6 byte.
    types = [
        2 if processor.is_unknown(i) else 3 if processor.is_control(i) else 6 if processor.is_byte(i) else 1
        for i in range(processor.vocab_size())
    ]

    def tokenizer(writer):
        spm_tokenizer_writer(pieces, scores, types)(writer)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_unk_token_id(0)

    cfg = tiny_config(d_vocab=len(pieces))
    path = tmp_path / "tiny.gguf"
    write_gguf(path, cfg, random_state_dict(cfg), tokenizer=tokenizer)
    model = ll.load(path, progress=False)
    ours = model.tokenizer
    assert ours.add_bos and ours.bos_id == 1 and ours.eos_id == 2
    # sentencepiece reads "<s>" in the text as text: so does parse_special=False. The longest runs are left out
    # for time.
    for text in [t for t in corpus() if len(t) < 3000]:
        ids = ours.encode(text, bos=False, parse_special=False)
        assert ids == processor.encode(text), text
        assert ours.decode(ids) == processor.decode(ids), text
    assert model.to_tokens("Hello")[0].tolist() == [1, *processor.encode("Hello")]


def test_the_llama3_split_of_a_byte_level_vocabulary_is_meta_s_pattern():
    regex = pytest.importorskip("regex")
    from support.corpus import CODE, COMBINING, EMOJI, PROSE, RTL_AND_CONTROL, SPECIAL_TEXT

    from llama_lens.tokenizer.gguf import gguf_backend_tokenizer
    from llama_lens.tokenizer.hf import gpt2_byte_to_unicode
    from llama_lens.tokenizer.meta_tiktoken import LLAMA3_PATTERN

    bytes_only = list(gpt2_byte_to_unicode().values())
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.tokens": bytes_only}
    backend = gguf_backend_tokenizer(meta | {"tokenizer.ggml.merges": []}, "test")
    # Random code points are left out: the Rust and Python regex engines ship different Unicode versions.
    for text in PROSE + CODE + EMOJI + COMBINING + RTL_AND_CONTROL + SPECIAL_TEXT:
        pieces = [text[start:end] for _, (start, end) in backend.pre_tokenizer.pre_tokenize_str(text)]
        assert pieces == regex.findall(LLAMA3_PATTERN, text), text


def test_a_gguf_without_a_known_tokenizer_says_what_to_pass(tmp_path):
    cfg = tiny_config(d_vocab=4)

    def tokenizer(writer):
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("command-r")
        writer.add_token_list(["a", "b", "ab", "c"])
        writer.add_token_merges(["a b"])

    path = tmp_path / "tiny.gguf"
    write_gguf(path, cfg, random_state_dict(cfg), tokenizer=tokenizer)
    with pytest.raises(CheckpointError, match=r"tokenizer.ggml.pre is 'command-r', .* pass tokenizer="):
        ll.load(path, progress=False)
    assert ll.Checkpoint(path).config.d_vocab == 4  # the weights themselves are fine


# ------------------------------------------------------------------------------------- the embedded model
@pytest.fixture(scope="module")
def demo_model_from_gguf(demo_gguf):
    return ll.load(demo_gguf, progress=False)


@pytest.mark.slow  # transformers' GGUF loader parses and dequantizes the file in about a minute
def test_the_embedded_gguf_gives_the_logits_of_transformers_gguf_loader(demo_gguf, demo_model_from_gguf):
    from transformers import LlamaForCausalLM

    reference = LlamaForCausalLM.from_pretrained(demo_gguf.parent, gguf_file=demo_gguf.name, dtype=torch.float32)
    model = demo_model_from_gguf
    tokens = model.to_tokens("The Eiffel Tower is in the city of Paris, and the Colosseum is in Rome.")
    with torch.no_grad():
        expected = reference.eval()(tokens).logits
        ours = model(tokens)
    assert (ours - expected).abs().max().item() <= 1e-4


def test_the_embedded_gguf_tokenizes_the_corpus_as_the_converted_checkpoint(demo_gguf, demo_path):
    from support.corpus import corpus

    from_gguf, from_json = ll.load_tokenizer(demo_gguf), ll.load_tokenizer(demo_path)
    for text in corpus():
        assert from_gguf.encode(text) == from_json.encode(text), text
    for attribute in ("bos_id", "eos_id", "eos_ids", "pad_id", "vocab_size", "add_bos", "chat_template"):
        assert getattr(from_gguf, attribute) == getattr(from_json, attribute), attribute
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert from_gguf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True) == (
        from_json.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    )


def test_demo_gguf_path_keeps_the_verified_file_in_the_cache(demo_gguf, tmp_path, monkeypatch):
    import llama_lens.loading.demo as demo

    monkeypatch.setenv("LLAMA_LENS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LLAMA_LENS_DEMO_GGUF", str(demo_gguf))
    kept = demo.demo_gguf_path(progress=False)
    assert kept == tmp_path / "home" / "models" / demo_gguf.name
    assert kept.stat().st_size == demo_gguf.stat().st_size
    assert [p.name for p in kept.parent.iterdir() if not p.name.endswith(".lock")] == [demo_gguf.name]

    def fail(*args, **kwargs):
        raise AssertionError("a kept GGUF must not be fetched again")

    monkeypatch.setattr(demo, "_fetch_gguf", fail)
    assert demo.demo_gguf_path(progress=False) == kept
