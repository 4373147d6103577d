"""Lone surrogates in prompts: every tokenizer backend, the chat template, the model and the lens raise one
ArgumentError naming the character and its position (not TypeError or UnicodeEncodeError from a backend)."""

import base64

import pytest
from support.models import char_model
from test_tokenizer import CORPUS, byte_level_tokenizer, metaspace_tokenizer, save, train_sentencepiece

import llama_lens as ll
from llama_lens.errors import ArgumentError
from llama_lens.tokenizer import HFTokenizer, TiktokenTokenizer, load_tokenizer


def _tokenizers(tmp_path):
    yield HFTokenizer(save(byte_level_tokenizer(), tmp_path / "bytes") / "tokenizer.json")
    yield HFTokenizer(save(metaspace_tokenizer(), tmp_path / "metaspace") / "tokenizer.json")
    (tmp_path / "sp").mkdir()
    (tmp_path / "sp" / "tokenizer.model").write_bytes(train_sentencepiece())
    yield load_tokenizer(tmp_path / "sp")
    ranks = tmp_path / "tiktoken.model"
    ranks.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    yield TiktokenTokenizer(ranks, layout="llama3")


@pytest.mark.parametrize("text, index", [("\ud800", 0), ("ab\udfffc", 2), ("naïve \udc80", 6)])
def test_every_backend_names_the_lone_surrogate(tmp_path, text, index):
    assert CORPUS  # the backends are trained on it
    for tokenizer in _tokenizers(tmp_path):
        with pytest.raises(ArgumentError, match=rf"lone surrogate U\+D[89A-F][0-9A-F]{{2}} at character {index} "):
            tokenizer.encode(text)
        assert tokenizer.encode("ok", bos=False)  # still usable afterwards


def test_a_surrogate_pair_is_refused_with_the_way_to_join_it():
    model = char_model()
    with pytest.raises(ArgumentError, match=r"U\+D83D at character 1 .*surrogatepass"):
        model.to_tokens("a\ud83d\ude00")


def test_model_lens_and_generate_refuse_a_lone_surrogate():
    model = char_model()
    for call in (
        lambda: model.to_tokens("x\ud800"),
        lambda: model.to_str_tokens(["fine", "x\ud800"]),
        lambda: model("x\ud800"),
        lambda: ll.logit_lens(model, "x\ud800", positions=[-1]),
        lambda: ll.logit_lens(model, "abc", target="\udc00"),
        lambda: model.generate("x\ud800", max_new_tokens=1),
    ):
        with pytest.raises(ArgumentError, match=r"lone surrogate U\+D[8C]00 at character"):
            call()


def test_chat_messages_name_the_message_and_key(tmp_path):
    folder = save(
        byte_level_tokenizer(),
        tmp_path,
        {"chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"},
    )
    tokenizer = load_tokenizer(folder)
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "ok \ud800"}]
    with pytest.raises(
        ArgumentError, match=r"messages\[1\]\['content'\] holds a lone surrogate U\+D800 at character 3"
    ):
        tokenizer.apply_chat_template(messages)
    with pytest.raises(ArgumentError, match=r"messages\[0\]\['role'\]"):
        tokenizer.apply_chat_template([{"role": "us\udc00er", "content": "x"}], tokenize=False)
