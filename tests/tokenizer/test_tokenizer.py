"""Tokenizers built in tmp_path in every on-disk form a Llama checkpoint uses, checked against the libraries
that define them."""

import base64
import io
import json
import subprocess
import sys

import pytest
import torch

from llama_lens.errors import CheckpointError
from llama_lens.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    TransformersTokenizer,
    as_tokenizer,
    llama3_special_tokens,
    load_tokenizer,
)

CORPUS = [
    "The capital of France is Paris.",
    "Paris is a city in France, and the Eiffel Tower is in Paris.",
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Tokens, numbers like 1234 and new\nlines.",
] * 20
TEXT = "The capital of France is Paris"
UNSEEN = "naïve € café"  # characters absent from CORPUS: byte fallback / single bytes


# ---------------------------------------------------------------------------------------------- builders
def byte_level_tokenizer(bos_template: str | None = None):
    """A byte-level BPE like SmolLM2's (no post-processor) or, with `bos_template`, Llama 3's."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    if bos_template is not None:
        specials += [bos_template, "<|eot_id|>"]
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer)
    if bos_template is not None:
        backend.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{bos_template} $A", special_tokens=[(bos_template, backend.token_to_id(bos_template))]
                ),
            ]
        )
    return backend


def metaspace_tokenizer():
    """A sentencepiece-style BPE like Llama 2's tokenizer.json: "▁" for spaces, <0xXX> byte fallback, a
    post-processor that adds <s>."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

    trained = Backend(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trained.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, show_progress=False))
    model = json.loads(trained.to_str())["model"]
    # Llama 2's layout: <unk>, <s>, </s>, the 256 byte pieces, then the learned pieces.
    vocab = {token: i for i, token in enumerate(["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)])}
    for token in sorted(model["vocab"], key=model["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(merge) for merge in model["merges"]]
    backend = Backend(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.add_special_tokens(["<unk>", "<s>", "</s>"])
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return backend


def save(backend, folder, config: dict | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def train_sentencepiece() -> bytes:
    """A small sentencepiece BPE with Llama 2's settings (byte fallback, dummy prefix, no normalization)."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=model,
        vocab_size=330,
        model_type="bpe",
        byte_fallback=True,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        minloglevel=2,
    )
    return model.getvalue()


# Ranks for the tiktoken test: all 256 bytes, then merges. b"34" ranks below b"123" so that "1234" gives
# ["12", "34"] as one chunk but ["123", "4"] when the pattern splits digits in threes, as Llama 3's does.
TIKTOKEN_MERGES = [b" P", b"ar", b"is", b" Par", b" Paris", b"12", b"34", b"123", b"Th", b"The"]


@pytest.fixture(scope="module")
def tiktoken_path(tmp_path_factory):
    """A tiny ranks file: too small for any known layout, so it is opened with layout="llama3"."""
    path = tmp_path_factory.mktemp("llama3") / "tokenizer.model"
    tokens = [bytes([b]) for b in range(256)] + TIKTOKEN_MERGES
    path.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens)))
    return path


@pytest.fixture
def tiktoken_tokenizer(tiktoken_path):
    return TiktokenTokenizer(tiktoken_path, layout="llama3")


@pytest.fixture(scope="module")
def sentencepiece_proto():
    return train_sentencepiece()


# ---------------------------------------------------------------------------------------------- tokenizer.json
def test_byte_level_json_matches_tokenizers_and_names_tokens(tmp_path):
    backend = byte_level_tokenizer()
    tokenizer = load_tokenizer(save(backend, tmp_path))
    assert isinstance(tokenizer, HFTokenizer)
    assert tokenizer.vocab_size == backend.get_vocab_size()

    ids = tokenizer.encode(TEXT, bos=False)
    assert ids == backend.encode(TEXT).ids
    assert tokenizer.decode(ids) == TEXT
    strs = tokenizer.token_strs(ids)
    assert "".join(strs) == TEXT
    assert " Paris" in strs
    assert tokenizer.id_of(" Paris") == backend.token_to_id("ĠParis")
    assert tokenizer.id_of("<|im_end|>") == backend.token_to_id("<|im_end|>")

    unseen = tokenizer.encode(UNSEEN, bos=False)
    assert tokenizer.decode(unseen) == UNSEEN
    euro = tokenizer.token_strs(tokenizer.encode("€", bos=False))
    assert euro == ["<0xE2>", "<0x82>", "<0xAC>"]


def test_bos_eos_pad_come_from_tokenizer_config(tmp_path):
    backend = byte_level_tokenizer()  # no post-processor, no usual BOS name: nothing to guess from
    bare = load_tokenizer(save(backend, tmp_path / "bare") / "tokenizer.json")
    assert bare.bos_id is None and not bare.add_bos
    assert bare.encode(TEXT) == bare.encode(TEXT, bos=True) == backend.encode(TEXT).ids

    config = {
        "bos_token": {"content": "<|im_start|>", "__type": "AddedToken"},
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "add_bos_token": False,
    }
    tokenizer = load_tokenizer(save(backend, tmp_path / "configured", config))
    im_start, im_end, endoftext = (backend.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"))
    # eos_ids: the configured EOS and every end-of-turn token of the vocabulary (<|endoftext|> here)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (im_start, im_end, endoftext)
    assert tokenizer.eos_ids == {im_end, endoftext}
    assert tokenizer.add_bos is False
    assert tokenizer.encode(TEXT) == backend.encode(TEXT).ids  # add_bos_token false: no BOS, as transformers
    assert tokenizer.encode(TEXT, bos=True) == [im_start] + backend.encode(TEXT).ids
    assert tokenizer.token_strs(tokenizer.encode("Paris", bos=True))[0] == "<|im_start|>"


def test_unknown_token_in_tokenizer_config_is_named(tmp_path):
    folder = save(byte_level_tokenizer(), tmp_path, {"bos_token": "<s>"})
    with pytest.raises(ValueError, match=r"tokenizer_config\.json.*bos_token '<s>'"):
        load_tokenizer(folder)


def test_post_processor_bos_is_added_once(tmp_path):
    backend = byte_level_tokenizer(bos_template="<|begin_of_text|>")
    tokenizer = load_tokenizer(save(backend, tmp_path))
    bos = backend.token_to_id("<|begin_of_text|>")
    assert tokenizer.bos_id == bos and tokenizer.add_bos
    # The library's own encode adds BOS through the post-processor; ours adds exactly one, and only on request.
    assert backend.encode(TEXT).ids[0] == bos
    assert tokenizer.encode(TEXT) == backend.encode(TEXT).ids
    assert tokenizer.encode(TEXT, bos=False) == backend.encode(TEXT, add_special_tokens=False).ids
    # A text that already starts with BOS (a rendered chat template) does not get a second one by default.
    assert tokenizer.encode("<|begin_of_text|>" + TEXT) == backend.encode(TEXT).ids
    assert tokenizer.encode("<|begin_of_text|>" + TEXT, bos=True)[:2] == [bos, bos]
    # No tokenizer_config.json: EOS falls back on the Llama 3 names present in the vocabulary, and every
    # end-of-turn token there stops a generation.
    assert tokenizer.eos_id == backend.token_to_id("<|eot_id|>")
    assert tokenizer.eos_ids == {backend.token_to_id(t) for t in ("<|eot_id|>", "<|im_end|>", "<|endoftext|>")}


def test_metaspace_json_like_llama2(tmp_path):
    backend = metaspace_tokenizer()
    tokenizer = load_tokenizer(save(backend, tmp_path))
    assert tokenizer.bos_id == 1 and tokenizer.eos_ids == {2}

    text = TEXT + "\n" + UNSEEN
    assert tokenizer.encode(text) == backend.encode(text).ids  # the post-processor's <s> and ours agree
    ids = tokenizer.encode(text, bos=False)
    assert tokenizer.decode(ids) == backend.decode(ids) == text
    strs = tokenizer.token_strs(ids)
    assert " Paris" in strs and "\n" in strs
    # ï, € and é are not in the learned pieces: they fall back to their UTF-8 bytes
    byte_pieces = [s for s in strs if s.startswith("<0x")]
    assert byte_pieces == ["<0xC3>", "<0xAF>", "<0xE2>", "<0x82>", "<0xAC>", "<0xC3>", "<0xA9>"]
    assert tokenizer.id_of(" Paris") == backend.token_to_id("▁Paris")
    assert tokenizer.id_of("\t") == backend.token_to_id("<0x09>")  # a byte piece stands for its ASCII character
    assert tokenizer.token_strs(tokenizer.encode("a\tb", bos=False)) == [" a", "\t", "b"]


# ---------------------------------------------------------------------------------------------- sentencepiece
def test_sentencepiece_model_matches_sentencepiece(tmp_path, sentencepiece_proto):
    import sentencepiece

    (tmp_path / "tokenizer.model").write_bytes(sentencepiece_proto)
    tokenizer = load_tokenizer(tmp_path)
    sp = sentencepiece.SentencePieceProcessor(model_proto=sentencepiece_proto)
    assert isinstance(tokenizer, SentencePieceTokenizer)
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_ids, tokenizer.pad_id) == (330, 1, {2}, None)

    text = TEXT + "\n" + UNSEEN
    ids = tokenizer.encode(text, bos=False)
    assert ids == sp.encode(text)
    assert tokenizer.encode(text) == [1] + ids
    assert tokenizer.decode(ids) == sp.decode(ids) == text
    assert tokenizer.decode([1] + ids + [2]) == sp.decode([1] + ids + [2]) == text  # sentencepiece drops them
    assert tokenizer.decode([1] + ids + [2], skip_special=False) == "<s>" + text + "</s>"
    # "</s>" in the text stays text by default (Meta's encode), is the control token with parse_special
    assert tokenizer.encode("a</s>", bos=False) == sp.encode("a</s>")
    assert tokenizer.encode("a</s>", bos=False, parse_special=True) == sp.encode("a") + [2]
    strs = tokenizer.token_strs(ids)
    assert " Paris" in strs and "\n" in strs and "<0xE2>" in strs
    assert strs[0] == sp.id_to_piece(ids[0]).replace("▁", " ")
    assert tokenizer.id_of(" Paris") == sp.piece_to_id("▁Paris")
    assert tokenizer.id_of("</s>") == 2


# ---------------------------------------------------------------------------------------------- tiktoken
def test_llama3_special_tokens_follow_meta():
    specials = llama3_special_tokens()
    assert len(specials) == len(set(specials)) == 256
    assert specials[:2] == ["<|begin_of_text|>", "<|end_of_text|>"]
    assert specials[9:13] == ["<|eot_id|>", "<|python_tag|>", "<|image|>", "<|reserved_special_token_2|>"]
    assert specials[-1] == "<|reserved_special_token_245|>"  # ids run to base + 255


def test_tiktoken_ranks_file(tiktoken_path, tiktoken_tokenizer):
    tokenizer = tiktoken_tokenizer
    n_base = 256 + len(TIKTOKEN_MERGES)
    special = {t: n_base + i for i, t in enumerate(llama3_special_tokens())}
    assert tokenizer.vocab_size == n_base + 256
    assert tokenizer.bos_id == special["<|begin_of_text|>"] and tokenizer.add_bos
    assert tokenizer.eos_ids == {special[t] for t in ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>")}

    rank = {t: 256 + i for i, t in enumerate(TIKTOKEN_MERGES)}
    assert tokenizer.encode("The Paris", bos=False) == [rank[b"The"], rank[b" Paris"]]
    assert tokenizer.encode("1234", bos=False) == [rank[b"123"], ord("4")]  # digits split in threes
    paris = [special["<|begin_of_text|>"], ord("P"), rank[b"ar"], rank[b"is"]]
    # Meta's encode keeps special-token text as text; parse_special=True reads it as the special token
    assert tokenizer.encode("Paris<|eot_id|>") == paris + [ord(c) for c in "<|"] + tokenizer.encode(
        "eot_id|>", bos=False
    )
    assert tokenizer.encode("Paris<|eot_id|>", parse_special=True) == paris + [special["<|eot_id|>"]]
    text = TEXT + "\n" + UNSEEN
    assert tokenizer.decode(tokenizer.encode(text, bos=False)) == text
    assert tokenizer.decode(tokenizer.encode(text)) == "<|begin_of_text|>" + text
    assert tokenizer.decode(tokenizer.encode(text), skip_special=True) == text
    euro = tokenizer.token_strs(tokenizer.encode(" Paris €", bos=False))
    assert euro == [" Paris", " ", "<0xE2>", "<0x82>", "<0xAC>"]
    assert tokenizer.id_of(" Paris") == rank[b" Paris"]
    assert tokenizer.id_of("<|eot_id|>") == special["<|eot_id|>"]


def test_tiktoken_file_of_unknown_size_is_refused(tiktoken_path):
    with pytest.raises(CheckpointError, match=r"tiktoken ranks file with 266 tokens.*Llama 3 \(128,000\)"):
        load_tokenizer(tiktoken_path)
    with pytest.raises(ValueError, match=r"layout must be one of \['llama3', 'llama4'\]"):
        TiktokenTokenizer(tiktoken_path, layout="llama5")


def test_bad_tiktoken_line_is_named(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_text("IQ== 0\nIg== 1\nnot-base64 x\n")
    with pytest.raises(ValueError, match=r"line 3"):
        load_tokenizer(path)


# ---------------------------------------------------------------------------------------------- id_of, batches
def test_id_of_names_the_pieces_of_a_multi_token_string(tiktoken_tokenizer):
    tokenizer = tiktoken_tokenizer
    with pytest.raises(ValueError, match=r"'Paris' is not a single token.*'P'.*'ar'.*'is'.*first piece \('P'\)"):
        tokenizer.id_of("Paris")


def test_id_of_does_not_swap_in_a_different_token(sentencepiece_proto):
    # sentencepiece encodes "Paris" as "▁Paris" (its dummy prefix): that token is " Paris", not "Paris".
    tokenizer = SentencePieceTokenizer(model_proto=sentencepiece_proto)
    assert tokenizer.encode("Paris", bos=False) == [tokenizer.id_of(" Paris")]
    with pytest.raises(ValueError, match=r"'Paris' is not a single token: it encodes to \[' Paris' \(id \d+\)\]"):
        tokenizer.id_of("Paris")
    # A word-internal piece and its word-initial twin are told apart.
    assert tokenizer.token_strs([tokenizer.id_of("is"), tokenizer.id_of(" is")]) == ["is", " is"]
    assert tokenizer.id_of("is") != tokenizer.id_of(" is")


def test_batch_encode_pads_on_the_left(tiktoken_tokenizer):
    tokenizer = tiktoken_tokenizer
    short, long = tokenizer.encode("Paris"), tokenizer.encode("The capital of France is Paris")
    tokens, mask = tokenizer.batch_encode(["Paris", "The capital of France is Paris"])
    assert tokens.dtype == mask.dtype == torch.long
    assert tokens.shape == mask.shape == (2, len(long))
    n_pad = len(long) - len(short)
    assert tokens[0].tolist() == [tokenizer.pad_id] * n_pad + short
    assert mask[0].tolist() == [0] * n_pad + [1] * len(short)
    assert tokens[1].tolist() == long and bool(mask[1].all())

    texts = ["Paris", "The capital"]  # the first is the shorter one
    tokenizer.pad_id = None  # falls back on EOS
    assert tokenizer.batch_encode(texts)[0][0, 0] == tokenizer.eos_id
    assert tokenizer.batch_encode(texts, pad_id=7)[0][0, 0] == 7
    tokenizer.eos_id = None
    assert tokenizer.batch_encode(texts)[0][0, 0] == 0
    with pytest.raises(ValueError, match="at least one"):
        tokenizer.batch_encode([])


def test_out_of_range_ids_are_named(tmp_path, sentencepiece_proto, tiktoken_tokenizer):
    hf = load_tokenizer(save(byte_level_tokenizer(), tmp_path))
    for tokenizer in (SentencePieceTokenizer(model_proto=sentencepiece_proto), tiktoken_tokenizer, hf):
        n = tokenizer.vocab_size
        for skip_special in (False, True):
            with pytest.raises(ValueError, match=rf"\[{n}\].*vocab_size {n}"):
                tokenizer.decode([5, n], skip_special=skip_special)
            with pytest.raises(ValueError, match=r"\[-1\]"):
                tokenizer.decode(torch.tensor([-1, 5]), skip_special=skip_special)
        with pytest.raises(ValueError, match=r"\[-1\]"):
            tokenizer.token_strs([-1])
        assert tokenizer.decode(torch.tensor([5, 6])) == tokenizer.decode([5, 6])


# ---------------------------------------------------------------------------------------------- overrides
def test_transformers_tokenizer_is_wrapped():
    from transformers import PreTrainedTokenizerFast

    backend = byte_level_tokenizer()
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>")
    tokenizer = as_tokenizer(fast)
    assert isinstance(tokenizer, TransformersTokenizer)
    assert (tokenizer.bos_id, tokenizer.eos_id) == (fast.bos_token_id, fast.eos_token_id)
    assert tokenizer.eos_ids == {fast.eos_token_id, fast.convert_tokens_to_ids("<|endoftext|>")}
    assert tokenizer.vocab_size == len(fast)

    text = TEXT + " " + UNSEEN
    assert tokenizer.encode(text) == fast.encode(text)  # BOS as the wrapped tokenizer adds it (here: none)
    ids = tokenizer.encode(text, bos=True)
    assert ids == [fast.bos_token_id] + fast.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == fast.decode(ids) == "<|im_start|>" + text
    assert tokenizer.token_strs(ids) == HFTokenizer(backend=fast.backend_tokenizer).token_strs(ids)
    assert tokenizer.id_of(" Paris") == fast.convert_tokens_to_ids("ĠParis")


def test_as_tokenizer_accepts_paths_backends_and_our_own(tmp_path, tiktoken_tokenizer, sentencepiece_proto):
    ours = tiktoken_tokenizer
    assert as_tokenizer(ours) is ours
    (tmp_path / "tokenizer.model").write_bytes(sentencepiece_proto)
    assert isinstance(as_tokenizer(str(tmp_path / "tokenizer.model")), SentencePieceTokenizer)
    backend = byte_level_tokenizer(bos_template="<|begin_of_text|>")
    wrapped = as_tokenizer(backend)
    assert isinstance(wrapped, HFTokenizer) and wrapped.bos_id == backend.token_to_id("<|begin_of_text|>")
    with pytest.raises(ValueError, match=r"cannot use a dict as a tokenizer"):
        as_tokenizer({})


# ---------------------------------------------------------------------------------------------- errors, imports
def test_missing_and_unreadable_files_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json or tokenizer\.model in .*empty"):
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no tokenizer file"):
        load_tokenizer(tmp_path / "nope.model")
    garbage = tmp_path / "tokenizer.model"
    garbage.write_bytes(b"\x00\x01not a tokenizer\xff" * 10)
    with pytest.raises(ValueError, match=r"tokenizer\.model is not a tokenizer\.json, a sentencepiece model"):
        load_tokenizer(garbage)


def test_backends_are_imported_lazily():
    heavy = ("tokenizers", "sentencepiece", "tiktoken", "transformers", "torch", "jinja2")
    imports = "import sys, llama_lens.tokenizer, llama_lens.tokenizer.chat"
    code = f"{imports}\nprint(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_minimal_subclass_still_works():
    """A Tokenizer subclass that implements only _encode(text) / _decode(ids) (as users and tests/support/models.py
    write them) keeps working: BOS by default, ids checked before its _decode sees them."""
    from support.models import CharTokenizer

    tokenizer = CharTokenizer()
    assert tokenizer.encode("Hi") == [1, ord("H"), ord("i")]
    assert tokenizer.encode("Hi", bos=False, parse_special=True) == [ord("H"), ord("i")]
    assert tokenizer.decode([1, ord("H")]) == "<s>H"
    with pytest.raises(ValueError, match=r"\[128\].*vocab_size 128"):
        tokenizer.decode([5, 128])
