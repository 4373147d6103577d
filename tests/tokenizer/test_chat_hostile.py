"""Hostile chat templates: a stranger's program, rendered within a time and output budget, every failure an
ArgumentError."""

from __future__ import annotations

import sys
import time

import pytest

import llama_lens.tokenizer.chat as chat
from llama_lens.errors import ArgumentError

MESSAGES = [{"role": "user", "content": "hi"}]


def render(template):
    return chat.render_chat_template(template, MESSAGES, add_generation_prompt=False, special_tokens_map={})


def test_nested_loops_writing_nothing_are_stopped_in_time(monkeypatch):
    monkeypatch.setattr(chat, "RENDER_SECONDS", 0.5)
    start = time.monotonic()
    with pytest.raises(ArgumentError, match=r"ran longer than 0.5 s"):
        render("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")
    assert time.monotonic() - start < 10


def test_nested_loops_writing_text_are_stopped_in_time(monkeypatch):
    monkeypatch.setattr(chat, "RENDER_SECONDS", 0.5)
    with pytest.raises(ArgumentError, match=r"ran longer than"):
        render("{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}")


def test_output_past_the_budget_is_stopped(monkeypatch):
    monkeypatch.setattr(chat, "RENDER_CHARS", 10_000)
    with pytest.raises(ArgumentError, match=r"more than 10000 characters"):
        render("{% for i in range(100000) %}{{ 'xxxxxxxxxx' }}{% endfor %}")


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", r"recurses without end"),
        ("{{ 1 / 0 }}", r"ZeroDivisionError"),
        ("{{ messages[0].content + 1 }}", r"TypeError|refused"),
        ("{{ raise_exception('no system role') }}", r"refused these messages: no system role"),
        ("{{ messages[7].content }}", r"refused|failed"),
    ],
    ids=["recursion", "division", "type", "raise_exception", "index"],
)
def test_a_failing_template_raises_an_argument_error(template, message):
    with pytest.raises(ArgumentError, match=message):
        render(template)


def test_the_trace_is_restored_after_a_render():
    before = sys.gettrace()
    assert render("{{ messages[0].content }}") == "hi"
    assert sys.gettrace() is before
