"""Chat formats: a checkpoint's Jinja chat template, rendered as transformers renders it, or Meta's own formats.

Hugging Face folders carry a Jinja template in tokenizer_config.json (`chat_template`). Templates come from
strangers, so they run in jinja2's `ImmutableSandboxedEnvironment` with the settings and helpers transformers
gives them (`trim_blocks`, `lstrip_blocks`, the `loopcontrols` extension, `raise_exception`, `strftime_now`, a
`tojson` that keeps non-ASCII characters); the text is then encoded with special tokens parsed and no BOS added,
as transformers' `apply_chat_template` does.

Meta folders have no template; their chat formats are Meta's code (`llama` `generation.py` for Llama 2,
`llama_models/llama3/chat_format.py` and `llama4/chat_format.py`), encoded piece by piece as Meta encodes them:

    Llama 2:  <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {assistant} </s><s>[INST] {user} [/INST]
    Llama 3:  <|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>...
    Llama 4:  <|begin_of_text|><|header_start|>{role}<|header_end|>\\n\\n{content}<|eot|>...
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from ..errors import ArgumentError
from .unicode import check_text

LLAMA2_B_INST, LLAMA2_E_INST = "[INST]", "[/INST]"
LLAMA2_B_SYS, LLAMA2_E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
# A template is a stranger's program: its render is stopped past these (nested loops can run for hours without
# writing a character; the sandbox only bounds each range() to 100k items).
RENDER_SECONDS = 10.0
RENDER_CHARS = 2**24  # 16M characters: thousands of times a real chat
# Meta's header and end-of-turn tokens per format; Meta writes the "tool" role as "ipython".
META_HEADERS = {
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "llama4": ("<|header_start|>", "<|header_end|>", "<|eot|>"),
}


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """`messages` as a list of dicts, each with a str "role" and "content"; a clear error otherwise."""
    if isinstance(messages, (str, dict)) or not isinstance(messages, Sequence):
        raise ArgumentError(
            f"messages must be a list of dicts like {{'role': 'user', 'content': 'Hi'}}, got {type(messages).__name__}"
        )
    if len(messages) == 0:
        raise ArgumentError("messages is empty: give at least one {'role': ..., 'content': ...} dict")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ArgumentError(f"messages[{index}] must be a dict with a 'role' string, got {message!r:.80}")
        for key, value in message.items():
            if isinstance(value, str):
                check_text(value, f"messages[{index}][{key!r}]")
        checked.append({key: value for key, value in message.items() if value is not None})
    return checked


# ---------------------------------------------------------------------------------------------- Jinja templates
@lru_cache(maxsize=16)
def compile_chat_template(template: str) -> Any:
    """The compiled Jinja template, in the sandbox transformers uses (`chat_template_utils.py`)."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
        # Jinja's own tojson escapes HTML characters ("<" -> "\u003c"); chat templates expect plain JSON.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format_string: str) -> str:
        return datetime.now().strftime(format_string)

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks the assistant's text for transformers' assistant mask;
        rendering keeps the text as it is."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("render_body"), [], [], body).set_lineno(lineno)

        def render_body(self, caller):
            return caller()

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = strftime_now
    try:
        return environment.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as error:
        raise ArgumentError(f"the chat template does not parse (line {error.lineno}): {error.message}") from None


def render_chat_template(
    template: str,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool,
    special_tokens_map: dict[str, Any],
    **template_kwargs: Any,
) -> str:
    """The text a Jinja chat template makes of `messages`; the template sees `messages`, `add_generation_prompt`,
    the special-token strings (`bos_token`, `eos_token`, ...) and `template_kwargs`, as in transformers."""
    import jinja2

    variables = {**special_tokens_map, **template_kwargs}
    variables.setdefault("tools", None)
    variables.setdefault("documents", None)
    compiled = compile_chat_template(template)
    try:
        return _render_within_budget(
            compiled, dict(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        )
    except ArgumentError:
        raise
    except jinja2.exceptions.TemplateError as error:
        raise ArgumentError(f"the chat template refused these messages: {error}") from None
    except RecursionError:
        raise ArgumentError("the chat template recurses without end (RecursionError while rendering it)") from None
    except (TypeError, ValueError, ArithmeticError, LookupError, AttributeError, OverflowError) as error:
        raise ArgumentError(f"the chat template failed on these messages: {type(error).__name__}: {error}") from None


class _OverBudget(Exception):
    pass


def _render_within_budget(compiled: Any, variables: dict[str, Any]) -> str:
    """Renders chunk by chunk, stopping past RENDER_SECONDS or RENDER_CHARS with an ArgumentError.

    Time is checked on the template's own lines (a trace on frames of the compiled "<template>" code only, so
    the rest runs untraced): a loop that writes nothing is stopped as surely as one that writes too much.
    """
    deadline = time.monotonic() + RENDER_SECONDS
    counter = [0]

    def on_line(frame: Any, event: str, arg: Any) -> Any:
        counter[0] += 1
        if counter[0] % 1024 == 0 and time.monotonic() > deadline:
            raise _OverBudget
        return on_line

    def on_call(frame: Any, event: str, arg: Any) -> Any:
        return on_line if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    chunks, size = [], 0
    try:
        for chunk in compiled.generate(**variables):
            chunks.append(chunk)
            size += len(chunk)
            if size > RENDER_CHARS:
                raise ArgumentError(
                    f"the chat template wrote more than {RENDER_CHARS} characters for these messages; it was stopped"
                )
            if time.monotonic() > deadline:
                raise _OverBudget
    except _OverBudget:
        raise ArgumentError(
            f"the chat template ran longer than {RENDER_SECONDS:g} s on these messages and was stopped (a loop "
            "without end?)"
        ) from None
    finally:
        sys.settrace(previous)
    return "".join(chunks)


# ---------------------------------------------------------------------------------------------- Meta formats
def llama2_segments(messages: list[dict[str, Any]]) -> list[tuple[str, bool, bool]]:
    """Meta's Llama 2 dialog as (text, bos, eos) pieces, each encoded on its own (`chat_completion`)."""
    if messages[0]["role"] == "system":
        if len(messages) < 2:
            raise ArgumentError("a Llama 2 chat needs a user message after the system message")
        first = messages[1]
        content = LLAMA2_B_SYS + str(messages[0].get("content", "")) + LLAMA2_E_SYS + str(first.get("content", ""))
        messages = [{"role": first["role"], "content": content}, *messages[2:]]
    for index, message in enumerate(messages):
        expected = "user" if index % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise ArgumentError(
                f"Llama 2 chats alternate user and assistant (an optional system message first); message {index} "
                f"after the system message has role {message['role']!r}, expected {expected!r}"
            )
    segments = []
    for prompt, answer in zip(messages[::2], messages[1::2]):
        text = f"{LLAMA2_B_INST} {str(prompt['content']).strip()} {LLAMA2_E_INST} {str(answer['content']).strip()} "
        segments.append((text, True, True))
    if len(messages) % 2 == 1:
        segments.append((f"{LLAMA2_B_INST} {str(messages[-1]['content']).strip()} {LLAMA2_E_INST}", True, False))
    return segments


def meta_header_pieces(chat_format: str, role: str) -> list[tuple[str, bool]]:
    """The header of one Llama 3/4 message as (text, is_special_token) pieces."""
    start, end, _ = META_HEADERS[chat_format]
    return [(start, True), ("ipython" if role == "tool" else role, False), (end, True), ("\n\n", False)]


def meta_pieces(
    chat_format: str, messages: list[dict[str, Any]], *, add_generation_prompt: bool
) -> list[tuple[str, bool]]:
    """Meta's Llama 3/4 dialog (`encode_dialog_prompt`) as (text, is_special_token) pieces."""
    _, _, end_of_turn = META_HEADERS[chat_format]
    pieces = [("<|begin_of_text|>", True)]
    for message in messages:
        pieces += meta_header_pieces(chat_format, message["role"])
        content = message.get("content", "")
        if not isinstance(content, str):
            raise ArgumentError(f"message content must be a str for the {chat_format} format, got {content!r:.80}")
        if content:
            pieces.append((content, False))
        pieces.append((end_of_turn, True))
    if add_generation_prompt:
        pieces += meta_header_pieces(chat_format, "assistant")
    return pieces


def apply_chat_template(
    tokenizer: Any,
    messages: Any,
    *,
    add_generation_prompt: bool = False,
    tokenize: bool = True,
    chat_template: str | None = None,
    **template_kwargs: Any,
) -> list[int] | str:
    """`Tokenizer.apply_chat_template` (see there): a Jinja template if there is one, else Meta's format."""
    messages = check_messages(messages)
    template = chat_template if chat_template is not None else tokenizer.chat_template
    if template is not None:
        text = render_chat_template(
            template,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens_map=tokenizer.special_tokens_map,
            **template_kwargs,
        )
        return tokenizer.encode(text, bos=False, parse_special=True) if tokenize else text
    chat_format = tokenizer.chat_format
    if chat_format == "llama2":
        # The answer's place is the end of "[INST] ... [/INST]" itself: add_generation_prompt adds nothing.
        segments = llama2_segments(messages)
        bos_text = tokenizer.decode([tokenizer.bos_id], skip_special=False) if tokenizer.bos_id is not None else ""
        eos_text = tokenizer.decode([tokenizer.eos_id], skip_special=False) if tokenizer.eos_id is not None else ""
        if not tokenize:
            return "".join((bos_text if bos else "") + text + (eos_text if eos else "") for text, bos, eos in segments)
        ids = []
        for text, bos, eos in segments:
            ids += tokenizer.encode(text, bos=bos, parse_special=False)
            if eos and tokenizer.eos_id is not None:
                ids.append(tokenizer.eos_id)
        return ids
    if chat_format in META_HEADERS:
        pieces = meta_pieces(chat_format, messages, add_generation_prompt=add_generation_prompt)
        if not tokenize:
            return "".join(text for text, _ in pieces)
        ids = []
        for text, special in pieces:
            if special:
                ids.append(tokenizer.special_id(text))
            else:
                ids += tokenizer.encode(text, bos=False, parse_special=False)
        return ids
    raise ArgumentError(
        f"this tokenizer ({tokenizer.source}) has no chat template: its tokenizer_config.json names none. Pass "
        "chat_template= (a Jinja template, as in transformers) or format the prompt yourself"
    )
