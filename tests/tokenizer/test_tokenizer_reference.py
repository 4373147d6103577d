"""Our tokenizers against the reference libraries on a corpus of ~2,700 strings (tests/support/corpus.py):
0 differing strings for ids and for decode, with each library's default call and with special tokens switched.

- SmolLM2's tokenizer.json (the embedded default model) against `tokenizers` and transformers (its tokenizer.json
  loader, `PreTrainedTokenizerFast`; `AutoTokenizer` in transformers 5 picks `GPT2Tokenizer` from
  tokenizer_config.json and rebuilds GPT-2's pre-tokenizer, dropping tokenizer.json's digit split, so it differs
  from both on a digit such as "١" after a space; the defaults and chat ids are also checked against it);
- Meta's Llama 3 and Llama 4 tokenizer.model against Meta's own reference code (`llama_models/llama3/tokenizer.py`
  and `llama4/tokenizer.py`, read from the `llama-models` wheel, which is downloaded, never installed);
- a sentencepiece model trained here with Llama 2's trainer settings against `sentencepiece`.
"""

from __future__ import annotations

import types
from pathlib import Path

import pytest
from support.corpus import SPECIAL_TEXT, corpus, long_runs, random_id_lists
from support.meta_reference import import_meta_tokenizer, meta_reference_folder, train_llama2_style

from llama_lens.tokenizer import SentencePieceTokenizer, load_tokenizer

CORPUS = corpus()


def differences(pairs, limit: int = 3) -> str:
    """'' when every (input, ours, reference) agrees, else the count and the first few differences."""
    bad = [(item, ours, ref) for item, ours, ref in pairs if ours != ref]
    shown = "; ".join(f"{item!r:.60}: ours {ours!r:.80} vs reference {ref!r:.80}" for item, ours, ref in bad[:limit])
    return f"{len(bad)} of {len(pairs)} differ: {shown}" if bad else ""


def test_corpus_is_big_and_varied():
    assert len(CORPUS) >= 2_000
    assert any(len(s) > 400_000 for s in CORPUS) and any(25_000 < len(s) < 400_000 for s in CORPUS)
    assert all(any(special in s for s in CORPUS) for special in SPECIAL_TEXT)


# ---------------------------------------------------------------------------------------------- tokenizer.json
@pytest.fixture(scope="module")
def smollm(demo_path):
    from tokenizers import Tokenizer as Backend
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    as_text = Backend.from_file(str(demo_path / "tokenizer.json"))
    as_text.encode_special_tokens = True
    return types.SimpleNamespace(
        ours=load_tokenizer(demo_path),
        backend=Backend.from_file(str(demo_path / "tokenizer.json")),
        backend_as_text=as_text,
        auto=AutoTokenizer.from_pretrained(demo_path),
        fast=PreTrainedTokenizerFast.from_pretrained(demo_path),
        fast_as_text=PreTrainedTokenizerFast.from_pretrained(demo_path, split_special_tokens=True),
    )


def test_smollm2_defaults_match_autotokenizer(smollm):
    ours, auto = smollm.ours, smollm.auto
    assert not ours.add_bos and ours.parse_special and not ours.skip_special
    assert ours.encode(" Paris") == auto.encode(" Paris") == [auto.convert_tokens_to_ids("ĠParis")]
    assert ours.eos_id == auto.eos_token_id and ours.bos_id == auto.bos_token_id
    assert ours.special_tokens_map == auto.special_tokens_map
    # A rendered chat template encodes to what transformers' apply_chat_template gives: one start token.
    messages = [{"role": "user", "content": "Hi"}]
    text = auto.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = auto.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ours.encode(text) == ids and ids[:2] != [ids[0], ids[0]]


def test_smollm2_encode_matches_tokenizers_and_transformers(smollm):
    defaults = [(s, smollm.ours.encode(s), smollm.backend.encode(s).ids) for s in CORPUS]
    assert not differences(defaults), differences(defaults)
    fast = [(s, ours, smollm.fast.encode(s)) for s, ours, _ in defaults]
    assert not differences(fast), differences(fast)
    as_text = [(s, smollm.ours.encode(s, parse_special=False), smollm.backend_as_text.encode(s).ids) for s in CORPUS]
    assert not differences(as_text), differences(as_text)
    fast_as_text = [(s, ours, smollm.fast_as_text.encode(s)) for s, ours, _ in as_text]
    assert not differences(fast_as_text), differences(fast_as_text)
    assert sum(a[1] != b[1] for a, b in zip(defaults, as_text)) > 50  # the switch does change something


def test_smollm2_decode_matches_tokenizers_and_transformers(smollm):
    ours, backend, fast = smollm.ours, smollm.backend, smollm.fast
    specials = list(range(17))  # <|endoftext|>, <|im_start|>, <|im_end|>, <repo_name>, ...
    id_lists = [ours.encode(s) for s in CORPUS] + random_id_lists(ours.vocab_size, 3_000, special_ids=specials)
    # transformers' default keeps special tokens; tokenizers' default (skip_special_tokens=True) drops them
    kept = [(ids, ours.decode(ids), fast.decode(ids)) for ids in id_lists]
    assert not differences(kept), differences(kept)
    kept_backend = [(ids, text, backend.decode(ids, skip_special_tokens=False)) for ids, text, _ in kept]
    assert not differences(kept_backend), differences(kept_backend)
    skipped = [(ids, ours.decode(ids, skip_special=True), backend.decode(ids)) for ids in id_lists]
    assert not differences(skipped), differences(skipped)
    skipped_fast = [(ids, text, fast.decode(ids, skip_special_tokens=True)) for ids, text, _ in skipped]
    assert not differences(skipped_fast), differences(skipped_fast)


# ---------------------------------------------------------------------------------------------- Meta's tiktoken
@pytest.fixture(scope="session")
def meta_reference() -> Path:
    return meta_reference_folder()


@pytest.fixture(scope="module", params=["llama3", "llama4"])
def meta(request, meta_reference):
    path = meta_reference / "llama_models" / request.param / "tokenizer.model"
    reference = import_meta_tokenizer(meta_reference, request.param).Tokenizer(path)
    return types.SimpleNamespace(version=request.param, ours=load_tokenizer(path), reference=reference)


@pytest.mark.demo
def test_meta_layout_matches_the_reference(meta):
    ours, reference = meta.ours, meta.reference
    assert ours.chat_format == meta.version
    assert ours.vocab_size == reference.n_words == {"llama3": 128_256, "llama4": 202_048}[meta.version]
    assert ours.special_tokens == reference.special_tokens
    assert ours.encoding._pat_str == reference.model._pat_str
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (reference.bos_id, reference.eos_id, reference.pad_id)
    assert ours.eos_ids == set(reference.stop_tokens)
    assert ours.add_bos and not ours.parse_special and not ours.skip_special
    names = [ours.token_strs([i])[0] for i in sorted(reference.special_tokens.values())]
    assert names == list(reference.special_tokens)


@pytest.mark.demo
def test_meta_encode_matches_the_reference(meta):
    ours, reference = meta.ours, meta.reference
    defaults = [(s, ours.encode(s), reference.encode(s, bos=True, eos=False)) for s in CORPUS]
    assert not differences(defaults), differences(defaults)
    parsed = [
        (
            s,
            ours.encode(s, bos=True, parse_special=True),
            reference.encode(s, bos=True, eos=False, allowed_special="all"),
        )
        for s in CORPUS
    ]
    assert not differences(parsed), differences(parsed)
    assert sum(a[1] != b[1] for a, b in zip(defaults, parsed)) > 100  # the switch does change something
    no_bos = [(s, ours.encode(s, bos=False), reference.encode(s, bos=False, eos=False)) for s in CORPUS[:500]]
    assert not differences(no_bos), differences(no_bos)


@pytest.mark.demo
def test_meta_decode_matches_the_reference(meta):
    ours, reference = meta.ours, meta.reference
    special_ids = sorted(reference.special_tokens.values())
    id_lists = [ours.encode(s, parse_special=True) for s in CORPUS]
    id_lists += random_id_lists(ours.vocab_size, 3_000, special_ids=special_ids)
    kept = [(ids, ours.decode(ids), reference.decode(ids)) for ids in id_lists]
    assert not differences(kept), differences(kept)
    n_base = min(special_ids)
    skipped = [
        (ids, ours.decode(ids, skip_special=True), reference.decode([i for i in ids if i < n_base])) for ids in id_lists
    ]
    assert not differences(skipped), differences(skipped)


@pytest.mark.demo
def test_default_bos_is_not_doubled_before_a_parsed_bos(meta):
    ours = meta.ours
    text = "<|begin_of_text|>Hello"
    ids = ours.encode(text, parse_special=True)
    assert ids == meta.reference.encode(text, bos=False, eos=False, allowed_special="all")
    assert ids.count(ours.bos_id) == 1
    assert ours.encode(text, bos=True, parse_special=True)[:2] == [ours.bos_id, ours.bos_id]  # asked for


# ---------------------------------------------------------------------------------------------- sentencepiece
@pytest.fixture(scope="module")
def llama2_style():
    import sentencepiece

    # Prose, code, emoji and control-character strings (not the random Unicode: rare characters are left to byte
    # fallback, as in Llama 2), repeated so that merges have counts to work with.
    training = [s for s in CORPUS[:700] if 0 < len(s) < 2_000] * 3
    proto = train_llama2_style(training)
    return types.SimpleNamespace(
        ours=SentencePieceTokenizer(model_proto=proto), sp=sentencepiece.SentencePieceProcessor(model_proto=proto)
    )


def meta_llama2_encode(sp, text: str, bos: bool) -> list[int]:
    """Meta's Llama 2 `Tokenizer.encode(s, bos, eos=False)` (llama/tokenizer.py): sentencepiece, BOS first."""
    return ([sp.bos_id()] if bos else []) + sp.encode(text)


def test_sentencepiece_encode_matches_meta_llama2(llama2_style):
    ours, sp = llama2_style.ours, llama2_style.sp
    assert ours.add_bos and not ours.parse_special and ours.skip_special and ours.chat_format == "llama2"
    defaults = [(s, ours.encode(s), meta_llama2_encode(sp, s, bos=True)) for s in CORPUS]
    assert not differences(defaults), differences(defaults)
    no_bos = [(s, ours.encode(s, bos=False), sp.encode(s)) for s in CORPUS]
    assert not differences(no_bos), differences(no_bos)


def test_sentencepiece_parse_special_encodes_control_tokens_piece_by_piece(llama2_style):
    """With parse_special, "<s>"/"</s>" text is the control token and the text between is encoded on its own,
    as Meta's Llama 2 chat code encodes each "[INST] ... [/INST]" turn."""
    ours, sp = llama2_style.ours, llama2_style.sp
    pairs = []
    for s in CORPUS:
        if "<s>" not in s and "</s>" not in s:
            continue
        expected, rest = [], s
        while rest:  # an independent split: find the earliest control token, encode what precedes it
            hits = [(rest.find(t), t) for t in ("<s>", "</s>") if rest.find(t) >= 0]
            if not hits:
                expected += sp.encode(rest)
                break
            at, token = min(hits)
            expected += (sp.encode(rest[:at]) if at else []) + [sp.piece_to_id(token)]
            rest = rest[at + len(token) :]
        pairs.append((s, ours.encode(s, bos=False, parse_special=True), expected))
    assert len(pairs) > 20
    assert not differences(pairs), differences(pairs)


def test_sentencepiece_decode_matches_sentencepiece(llama2_style):
    ours, sp = llama2_style.ours, llama2_style.sp
    id_lists = [ours.encode(s) + [2] for s in CORPUS] + random_id_lists(ours.vocab_size, 5_000, special_ids=[0, 1, 2])
    defaults = [(ids, ours.decode(ids), sp.decode(ids)) for ids in id_lists]
    assert not differences(defaults), differences(defaults)
    # kept: control tokens written as their text, each stretch between them decoded by sentencepiece
    kept = []
    for ids in id_lists[:2_000]:
        expected, run = "", []
        for i in ids:
            if sp.is_control(i):
                expected += sp.decode(run) + sp.id_to_piece(i)
                run = []
            else:
                run.append(i)
        kept.append((ids, ours.decode(ids, skip_special=False), expected + sp.decode(run)))
    assert not differences(kept), differences(kept)
    # the two switches undo each other on Meta-style chat text
    chat = "<s>[INST] Hi [/INST] Hello </s><s>[INST] More [/INST]"
    assert ours.decode(ours.encode(chat, bos=False, parse_special=True), skip_special=False) == chat


@pytest.mark.demo
def test_long_texts_are_cut_where_metas_code_cuts_them(meta_reference):
    """Meta's 400k-character chunks and 25k-character run cuts, on runs just under, at and over the limit,
    whitespace classes Python counts as space (\\x1c-\\x1f), and many near-limit runs (a linear scan matters)."""
    import random

    from llama_lens.tokenizer.meta_tiktoken import meta_chunks

    split = import_meta_tokenizer(meta_reference, "llama3").Tokenizer._split_whitespaces_or_nonwhitespaces
    rng = random.Random(0)
    texts = [*long_runs(), ("x" * 24_999 + " ") * 17, " " * 25_001, "\x1c" * 30_000 + "a" * 30_000, "é" * 800_001]
    for _ in range(30):
        texts.append("".join(rng.choice("ab \n\x1fé") * rng.randint(1, 30_000) for _ in range(rng.randint(1, 40))))
    for text in texts:
        chunks = [text[i : i + 400_000] for i in range(0, len(text), 400_000)]
        assert meta_chunks(text) == [piece for chunk in chunks for piece in split(chunk, 25_000)], len(text)
