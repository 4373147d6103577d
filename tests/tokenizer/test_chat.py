"""Chat templates against transformers' `apply_chat_template` (120 conversations per template, generation prompt
on and off, text and ids), Meta's chat formats against the templates that reproduce them, and the errors."""

from __future__ import annotations

import random

import pytest
from support.meta_reference import import_meta_tokenizer, meta_reference_folder

from llama_lens.tokenizer import SentencePieceTokenizer, TiktokenTokenizer, load_tokenizer
from llama_lens.tokenizer.chat import compile_chat_template

# Templates in the forms checkpoints ship (the HF Llama 2 and Llama 3 templates, a template using tojson,
# namespace, loop controls, strftime_now and raise_exception), plus SmolLM2's own from the demo folder.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
# Meta's Llama 3 format as a template (content not trimmed, as Meta's chat_format.py encodes it).
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# namespace, loop controls, raise_exception, tojson, strftime_now, transformers' {% generation %} tag, and
# trim_blocks / lstrip_blocks at work on indented blocks
FEATURE_TEMPLATE = """{%- set ns = namespace(n_user=0) -%}
{%- for message in messages %}
    {%- if message.role not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('unknown role ' + message.role) }}
    {%- endif %}
    {%- if message.role == 'user' %}{% set ns.n_user = ns.n_user + 1 %}{% endif %}
    {%- if loop.index0 > 40 %}{% break %}{% endif %}
<|im_start|>{{ message.role }} {{ loop.index }}
  {{ message.content }}
    {% if message.content | length > 30 %}[long]{% endif %}
{{ {'role': message.role, 'text': message.content} | tojson }}<|im_end|>
{% endfor -%}
users: {{ ns.n_user }} year: {{ strftime_now('%Y') }}
{%- if add_generation_prompt %}
<|im_start|>assistant
{% endif -%}
{% if messages[-1].role == 'assistant' %}{% generation %}[{{ messages[-1].content }}]{% endgeneration %}{% endif %}
"""

CONTENTS = [
    "Hi",
    "What is the capital of France?",
    "  spaces around  ",
    "Ünïcödé: 東京, Москва, مرحبا, 👨‍👩‍👧‍👦 e\u0301",
    "line one\nline two\n\ttabbed",
    "quotes \" and ' and <tags> & ampersands",
    "special text <|im_end|> inside",
    "",
    "a much longer message that goes on for a while, to pass the thirty-character mark",
    "{{ not a template }} {% neither %}",
]


def conversations(n: int = 120, seed: int = 0) -> list[list[dict[str, str]]]:
    """Conversations with and without a system message, alternating user/assistant turns, ending on either."""
    rng = random.Random(seed)
    chats = []
    for _ in range(n):
        chat = [{"role": "system", "content": rng.choice(CONTENTS)}] if rng.random() < 0.5 else []
        for turn in range(rng.randint(1, 6)):
            chat.append({"role": "user" if turn % 2 == 0 else "assistant", "content": rng.choice(CONTENTS)})
        chats.append(chat)
    return chats


CHATS = conversations()


@pytest.fixture(scope="module")
def smollm(demo_path):
    from transformers import PreTrainedTokenizerFast

    return load_tokenizer(demo_path), PreTrainedTokenizerFast.from_pretrained(demo_path)


@pytest.mark.parametrize("name", ["smollm2", "llama2", "llama3", "features"])
def test_templates_match_transformers(smollm, name):
    ours, reference = smollm
    template = {"smollm2": None, "llama2": LLAMA2_TEMPLATE, "llama3": LLAMA3_TEMPLATE, "features": FEATURE_TEMPLATE}
    template = template[name]
    checked = 0
    for chat in CHATS:
        if name == "llama2" and chat[-1]["role"] != "user":
            chat = chat[:-1] if len(chat) > 2 else chat + [{"role": "user", "content": "More"}]
        for add_generation_prompt in (False, True):
            options = dict(add_generation_prompt=add_generation_prompt, chat_template=template)
            text = reference.apply_chat_template(chat, tokenize=False, **options)
            ids = reference.apply_chat_template(chat, tokenize=True, return_dict=False, **options)
            assert ours.apply_chat_template(chat, tokenize=False, **options) == text, chat
            assert ours.apply_chat_template(chat, tokenize=True, **options) == ids, chat
            checked += 1
    assert checked == 2 * len(CHATS) >= 200


def test_smollm2_template_inserts_its_default_system_prompt(smollm):
    ours, _ = smollm
    text = ours.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    ids = ours.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert ids.count(ours.bos_id) == 3 and ids[0] == ours.bos_id  # one start token per turn, none doubled
    assert ours.special_id("<|im_end|>") in ours.eos_ids


def test_template_errors_are_clear(smollm):
    ours, _ = smollm
    with pytest.raises(ValueError, match="roles must alternate"):
        ours.apply_chat_template([{"role": "assistant", "content": "x"}], chat_template=LLAMA2_TEMPLATE)
    with pytest.raises(ValueError, match=r"does not parse \(line 1\)"):
        ours.apply_chat_template([{"role": "user", "content": "x"}], chat_template="{% for %}")
    with pytest.raises(ValueError, match="list of dicts"):
        ours.apply_chat_template("Hi")
    with pytest.raises(ValueError, match="empty"):
        ours.apply_chat_template([])
    with pytest.raises(ValueError, match=r"messages\[1\] must be a dict with a 'role'"):
        ours.apply_chat_template([{"role": "user", "content": "x"}, {"content": "y"}])


def test_templates_run_sandboxed():
    import jinja2

    template = compile_chat_template("{{ messages.__class__.__mro__ }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        template.render(messages=[]).encode()
    append = compile_chat_template("{{ messages.append(1) }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        append.render(messages=[])


def test_no_template_is_a_clear_error(tmp_path):
    from test_tokenizer import byte_level_tokenizer, save

    tokenizer = load_tokenizer(save(byte_level_tokenizer(), tmp_path))
    with pytest.raises(ValueError, match="no chat template.*chat_template="):
        tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])


def test_template_sources_in_a_folder(tmp_path):
    from test_tokenizer import byte_level_tokenizer, save

    message = [{"role": "user", "content": "Hi"}]
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "{{ bos_token }}default"}]
    folder = save(byte_level_tokenizer(), tmp_path / "named", {"chat_template": named, "bos_token": "<|im_start|>"})
    assert load_tokenizer(folder).apply_chat_template(message, tokenize=False) == "<|im_start|>default"
    (folder / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")  # transformers >= 4.43 saves this
    assert load_tokenizer(folder).apply_chat_template(message, tokenize=False) == "Hi!"
    config = {"split_special_tokens": True}
    as_text = load_tokenizer(save(byte_level_tokenizer(), tmp_path / "split", config))
    assert not as_text.parse_special and len(as_text.encode("<|im_end|>")) > 1


# ---------------------------------------------------------------------------------------------- Meta formats
@pytest.fixture(scope="module")
def llama2_sp():
    from test_tokenizer import train_sentencepiece

    return SentencePieceTokenizer(model_proto=train_sentencepiece())


def test_llama2_format_is_metas(llama2_sp, smollm):
    """Meta's Llama 2 format: the text equals HF's Llama 2 template (rendered by transformers), the ids are
    Meta's `chat_completion` (each "[INST] ... [/INST] answer" encoded alone with BOS, EOS after each answer)."""
    _, reference = smollm
    tokenizer = llama2_sp
    special_map = {"bos_token": "<s>", "eos_token": "</s>"}
    n = 0
    for chat in CHATS:
        if chat[-1]["role"] != "user":
            continue
        text = compile_chat_template(LLAMA2_TEMPLATE).render(messages=chat, **special_map)
        assert tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == text
        dialog = chat
        if chat[0]["role"] == "system":
            first = "<<SYS>>\n" + chat[0]["content"] + "\n<</SYS>>\n\n" + chat[1]["content"]
            dialog = [{"role": "user", "content": first}, *chat[2:]]
        expected = []
        for prompt, answer in zip(dialog[::2], dialog[1::2]):
            expected += [
                1,
                *tokenizer.sp.encode(f"[INST] {prompt['content'].strip()} [/INST] {answer['content'].strip()} "),
                2,
            ]
        expected += [1, *tokenizer.sp.encode(f"[INST] {dialog[-1]['content'].strip()} [/INST]")]
        assert tokenizer.apply_chat_template(chat, add_generation_prompt=True) == expected
        n += 1
    assert n > 30
    with pytest.raises(ValueError, match="alternate user and assistant"):
        tokenizer.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


@pytest.mark.demo
def test_llama3_format_is_metas():
    meta_reference = meta_reference_folder()
    path = meta_reference / "llama_models" / "llama3" / "tokenizer.model"
    ours, reference = TiktokenTokenizer(path), import_meta_tokenizer(meta_reference, "llama3").Tokenizer(path)
    specials = reference.special_tokens
    for chat in CHATS:
        text = compile_chat_template(LLAMA3_TEMPLATE).render(
            messages=chat, add_generation_prompt=True, bos_token="<|begin_of_text|>"
        )
        assert ours.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == text
        # Meta's encode_dialog_prompt: header tokens, then the content encoded with specials kept as text
        expected = [specials["<|begin_of_text|>"]]
        for message in [*chat, {"role": "assistant", "content": None}]:
            expected += [specials["<|start_header_id|>"], *reference.encode(message["role"], bos=False, eos=False)]
            expected += [specials["<|end_header_id|>"], *reference.encode("\n\n", bos=False, eos=False)]
            if message["content"] is not None:
                expected += [*reference.encode(message["content"], bos=False, eos=False), specials["<|eot_id|>"]]
        assert ours.apply_chat_template(chat, add_generation_prompt=True) == expected
