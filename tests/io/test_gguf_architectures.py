"""GGUF files of Llama's relatives, written as llama.cpp's convert_hf_to_gguf.py writes them: "qwen2" (q/k/v biases,
q/k unpermuted), "qwen3" (q/k norms, key_length), Mistral written as "llama"; the qwen2 text split; errors.

The reference is transformers' model itself: the writer below maps its parameters to GGUF names with gguf's own
`TensorNameMap` (what the converter uses), and the logits of `ll.load(gguf)` are compared with transformers' on the
same weights, dequantized by `gguf.quants` for a quantized file.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support.llama_cpp import llama_cpp_permute
from support.models import tiny_transformers_model

import llama_lens as ll
from llama_lens.errors import CheckpointError, ConfigError

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize, quantize  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# transformers' model_type -> the general.architecture convert_hf_to_gguf.py writes (MistralForCausalLM is
# registered to its LlamaModel).
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
# Qwen2's Split regex as its tokenizer.json spells it (the reference for our copy of it).
QWEN2_TOKENIZER_JSON_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def round_trip(values: torch.Tensor, qtype: str) -> torch.Tensor:
    """What a reader of `values` stored as `qtype` gets back (gguf's own quantize and dequantize)."""
    ggml_type = gguf.GGMLQuantizationType[qtype]
    data = quantize(values.detach().float().numpy(), ggml_type)
    return torch.from_numpy(dequantize(data, ggml_type).copy()).reshape(values.shape)


def write_like_convert_hf_to_gguf(path, hf_model, qtype: str = "F32", *, add=None, leave_out=()) -> None:
    """The GGUF convert_hf_to_gguf.py writes for `hf_model` with `--outtype` `qtype` (F32 or Q8_0): TextModel's
    metadata (plus LlamaModel's vocab_size and rope dimensions for "llama"), tensor names from gguf's
    TensorNameMap, q/k permuted for "llama" only, matrices in `qtype` and 1-D tensors in F32.

    Args:
        add: called with the writer before the tensors are added (a vocabulary, more keys).
        leave_out: transformers parameter names whose tensors are not written.
    """
    config = hf_model.config
    hparams = config.to_dict()
    arch = GGUF_ARCH[config.model_type]
    n_layers, n_heads = config.num_hidden_layers, config.num_attention_heads
    n_kv_heads = config.num_key_value_heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(n_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv_heads)
    writer.add_rope_freq_base((hparams.get("rope_parameters") or {}).get("rope_theta", hparams.get("rope_theta")))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if hparams.get("head_dim") is not None:
        writer.add_key_length(hparams["head_dim"])
        writer.add_value_length(hparams["head_dim"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if qtype == "F32" else gguf.LlamaFileType.MOSTLY_Q8_0)
    if arch == "llama":
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(hparams.get("head_dim") or config.hidden_size // n_heads)
    if add is not None:
        add(writer)
    model_arch = {name: arch_id for arch_id, name in gguf.MODEL_ARCH_NAMES.items()}[arch]
    name_map = gguf.get_tensor_name_map(model_arch, n_layers)
    for name, param in hf_model.state_dict().items():
        if (name == "lm_head.weight" and config.tie_word_embeddings) or name in leave_out:
            continue  # a tied lm_head is not in the safetensors the converter reads
        values = param.detach().float()
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            values = llama_cpp_permute(values, n_heads)
        elif arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            values = llama_cpp_permute(values, n_kv_heads)
        gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, name
        if qtype == "F32" or values.dim() == 1:
            writer.add_tensor(gguf_name, values.numpy())
        else:
            ggml_type = gguf.GGMLQuantizationType[qtype]
            data = quantize(values.numpy(), ggml_type)
            writer.add_tensor(gguf_name, data, raw_shape=data.shape, raw_dtype=ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def dequantized_reference(hf_model, qtype: str):
    """`hf_model` with every matrix replaced by what its `qtype` copy in the file dequantizes to."""
    if qtype != "F32":
        with torch.no_grad():
            for param in hf_model.parameters():
                if param.dim() == 2:
                    param.copy_(round_trip(param, qtype))
    return hf_model


def tokens(batch: int = 2, pos: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (batch, pos), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------- logits
CASES = {
    "qwen2": ("qwen2", {}),
    "qwen2_tied": ("qwen2", {"tie_word_embeddings": True}),
    "qwen3": ("qwen3", {"head_dim": 32}),  # d_head 32, not d_model / n_heads = 16: read from key_length
    "qwen3_bias": ("qwen3", {"head_dim": 32, "attention_bias": True}),
    "mistral_no_window": ("mistral", {"sliding_window": None, "head_dim": 16}),
}


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_converted_file_gives_transformers_logits(case, qtype, tmp_path):
    model_type, changes = CASES[case]
    hf_model = tiny_transformers_model(model_type, seed=1, **changes)
    path = tmp_path / f"tiny.{qtype}.gguf"
    write_like_convert_hf_to_gguf(path, hf_model, qtype)

    cfg = ll.Checkpoint(path).config
    assert cfg.model_type == ("llama" if model_type == "mistral" else model_type)
    assert cfg.d_head == changes.get("head_dim", 16)
    assert (cfg.qkv_bias, cfg.qk_norm) == (model_type == "qwen2", model_type == "qwen3")
    assert cfg.attention_bias == changes.get("attention_bias", False)
    assert cfg.tie_embeddings == changes.get("tie_word_embeddings", False)
    model = ll.load(path, progress=False)
    reference = dequantized_reference(hf_model, qtype)
    with torch.no_grad():
        expected = reference(tokens()).logits
        ours = model(tokens())
    assert (ours - expected).abs().max().item() <= 1e-4


def test_qwen2_q_and_k_rows_are_read_as_stored(tmp_path):
    # llama.cpp runs qwen2 with rotate-half RoPE, so the converter does not permute: the rows (and biases) read
    # back are transformers' own, where a llama file's are put back from the interleaved order.
    hf_model = tiny_transformers_model("qwen2", seed=2)
    attn = hf_model.model.layers[1].self_attn
    path = tmp_path / "qwen2.gguf"
    write_like_convert_hf_to_gguf(path, hf_model)
    ckpt = ll.Checkpoint(path)
    assert torch.equal(ckpt.load_tensor("blk.1.attn_k.weight"), attn.k_proj.weight.detach())
    params = ckpt.state_dict()
    for name in ("q_proj", "k_proj", "v_proj"):
        for kind in ("weight", "bias"):
            stored = getattr(getattr(attn, name), kind).detach()
            assert torch.equal(params[f"blocks.1.attn.{name}.{kind}"], stored), (name, kind)
    assert "blocks.1.attn.o_proj.bias" not in params


def test_qwen3_q_norm_and_k_norm_hooks_match_transformers(tmp_path):
    hf_model = tiny_transformers_model("qwen3", seed=3, head_dim=32)
    path = tmp_path / "qwen3.Q8_0.gguf"
    write_like_convert_hf_to_gguf(path, hf_model, "Q8_0")
    reference = dequantized_reference(hf_model, "Q8_0")
    model = ll.load(path, progress=False)
    frame = ll.Checkpoint(path).tensors().set_index("name")
    assert frame.loc["blk.0.attn_q_norm.weight", "param"] == "blocks.0.attn.q_norm.weight"
    assert frame.loc["blk.0.attn_q_norm.weight", "dtype"] == "F32"

    caught = {}
    attn = reference.model.layers[1].self_attn
    handles = [
        module.register_forward_hook(lambda mod, args, out, key=key: caught.__setitem__(key, out))
        for key, module in (("q", attn.q_norm), ("k", attn.k_norm))
    ]
    try:
        with torch.no_grad():
            reference(tokens())
            _, cache = model.run_with_cache(tokens(), names_filter=lambda name: "_norm.hook_normalized" in name)
    finally:
        for handle in handles:
            handle.remove()
    ours = model.blocks[1].attn
    for key, norm in (("q", ours.q_norm), ("k", ours.k_norm)):
        normalized = cache[f"blocks.1.attn.{key}_norm.hook_normalized"]  # [batch, pos, heads, d_head]
        assert normalized.shape == caught[key].shape
        torch.testing.assert_close(norm.w * normalized, caught[key], atol=1e-5, rtol=0)
        torch.testing.assert_close(norm.w, getattr(attn, f"{key}_norm").weight, atol=0, rtol=0)


def test_mistral_is_read_as_llama_without_its_window(tmp_path):
    # convert_hf_to_gguf.py stores no sliding window for MistralForCausalLM: the file is a llama one, and the
    # model attends to every earlier token, as llama.cpp runs it (transformers' model agrees within the window).
    hf_model = tiny_transformers_model("mistral", seed=4, sliding_window=8, head_dim=16)
    path = tmp_path / "mistral.gguf"
    write_like_convert_hf_to_gguf(path, hf_model)
    model = ll.load(path, progress=False)
    assert model.cfg.model_type == "llama" and model.cfg.sliding_window is None
    with torch.no_grad():
        inside = tokens(pos=8)
        assert (model(inside) - hf_model(inside).logits).abs().max().item() <= 1e-4
        longer = tokens(pos=16)
        full_attention = tiny_transformers_model("mistral", seed=4, sliding_window=None, head_dim=16)
        assert (model(longer) - full_attention(longer).logits).abs().max().item() <= 1e-4
        # Past the window, transformers' windowed model computes something else.
        assert (model(longer) - hf_model(longer).logits).abs().max().item() > 1e-2


# ------------------------------------------------------------------------------------------------- errors
def small_file(path, arch: str) -> None:
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch", ["qwen2moe", "mistral3", "gemma3", "phi3"])
def test_other_architectures_are_refused_by_name(tmp_path, arch):
    path = tmp_path / "other.gguf"
    small_file(path, arch)
    with pytest.raises(ConfigError, match=rf"other.gguf: general.architecture is '{arch}'; .*'llama', 'qwen2', "):
        ll.Checkpoint(path)


def test_an_unknown_qwen2_key_is_named(tmp_path):
    path = tmp_path / "embedding.gguf"
    # An embedding model's file: Qwen2Model._try_set_pooling_type adds this key.
    write_like_convert_hf_to_gguf(
        path, tiny_transformers_model("qwen2"), add=lambda w: w.add_pooling_type(gguf.PoolingType.MEAN)
    )
    with pytest.raises(ConfigError, match=r"embedding.gguf: unsupported metadata key\(s\) \['qwen2.pooling_type'\]"):
        ll.Checkpoint(path)


def test_a_qwen2_file_without_a_bias_names_the_missing_tensor(tmp_path):
    path = tmp_path / "nobias.gguf"
    leave_out = ("model.layers.1.self_attn.k_proj.bias",)
    write_like_convert_hf_to_gguf(path, tiny_transformers_model("qwen2"), leave_out=leave_out)
    with pytest.raises(CheckpointError, match=r"missing tensor.*'blk.1.attn_k.bias' \(for blocks.1.attn.k_proj.bias\)"):
        ll.Checkpoint(path).state_dict()


# ---------------------------------------------------------------------------------------------- tokenizer
def test_the_qwen2_split_is_qwen2_s_tokenizer_json_regex():
    regex = pytest.importorskip("regex")
    from support.corpus import CODE, COMBINING, EMOJI, PROSE, RTL_AND_CONTROL, SPECIAL_TEXT

    from llama_lens.tokenizer.gguf import gguf_backend_tokenizer
    from llama_lens.tokenizer.hf import gpt2_byte_to_unicode

    bytes_only = list(gpt2_byte_to_unicode().values())
    for pre in ("qwen2", "deepseek-r1-qwen"):
        meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": bytes_only}
        backend = gguf_backend_tokenizer(meta | {"tokenizer.ggml.merges": []}, "test")
        # Random code points are left out: the Rust and Python regex engines ship different Unicode versions.
        for text in PROSE + CODE + EMOJI + COMBINING + RTL_AND_CONTROL + SPECIAL_TEXT + ["12345 x1y22", "I'M 'S"]:
            pieces = [text[start:end] for _, (start, end) in backend.pre_tokenizer.pre_tokenize_str(text)]
            assert pieces == regex.findall(QWEN2_TOKENIZER_JSON_REGEX, text), text


def qwen2_style_tokenizer():
    """A small byte-level BPE trained in the layout of Qwen2's tokenizer.json: NFC, the Split regex, ByteLevel
    without its own regex, and <|endoftext|>, <|im_start|>, <|im_end|> as special added tokens."""
    from support.corpus import CODE, PROSE
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_TOKENIZER_JSON_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        show_progress=False,
    )
    tokenizer.train_from_iterator(PROSE * 4 + CODE * 4, trainer=trainer)
    return tokenizer


def test_a_qwen2_gguf_vocabulary_tokenizes_as_its_tokenizer_json(tmp_path):
    import json

    from support.corpus import corpus

    reference = qwen2_style_tokenizer()
    vocab = reference.get_vocab()
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    special = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}
    merges = [" ".join(pair) for pair in json.loads(reference.to_str())["model"]["merges"]]

    def tokenizer(writer):  # what _set_vocab_gpt2 and gguf.SpecialVocab write
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("qwen2")
        writer.add_token_list(tokens)
        writer.add_token_types([3 if token in special else 1 for token in tokens])
        writer.add_token_merges(merges)
        writer.add_eos_token_id(vocab["<|im_end|>"])
        writer.add_bos_token_id(vocab["<|endoftext|>"])
        writer.add_add_bos_token(False)

    path = tmp_path / "qwen2.gguf"
    write_like_convert_hf_to_gguf(path, tiny_transformers_model("qwen2", vocab_size=len(tokens)), add=tokenizer)
    model = ll.load(path, progress=False)
    ours = model.tokenizer
    assert not ours.add_bos and ours.eos_id == vocab["<|im_end|>"]
    for text in [t for t in corpus() if len(t) < 3000]:
        ids = ours.encode(text)
        assert ids == reference.encode(text).ids, text
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=False), text
    # Composed and decomposed accents tokenize alike (NFC), as in transformers.
    assert ours.encode("cafe\u0301") == ours.encode("caf\u00e9")
