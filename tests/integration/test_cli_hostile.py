"""Every CLI failure is one line on stderr and a non-zero exit, an unforeseen one too."""

from __future__ import annotations

import json

import pytest
from support.models import tiny_config

import llama_lens.cli as cli
from llama_lens.io.writer import write_hf_checkpoint
from llama_lens.testing import random_state_dict, write_meta_checkpoint


@pytest.mark.parametrize("error", [RuntimeError("CUDA out of memory\nTried to allocate"), RecursionError("deep")])
def test_an_unexpected_error_is_one_line_and_exit_1(monkeypatch, capsys, error):
    def run(args):
        raise error

    parser = cli.build_parser()
    real_parse = parser.parse_known_args

    def parse_known_args(argv):
        args, extra = real_parse(argv)
        args.run = run
        return args, extra

    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    monkeypatch.setattr(parser, "parse_known_args", parse_known_args)
    monkeypatch.delenv("LLAMA_LENS_TRACEBACK", raising=False)
    assert cli.main(["inspect", "nowhere"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("llama-lens: error: ") and type(error).__name__ in err


# ------------------------------------------------------------------ the five cases that printed a traceback
def _char_tokenizer(folder):
    """A tokenizer.json of one token per printable ASCII character (ids 3..97) and <unk>, <s>, </s>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {chr(c): 3 + i for i, c in enumerate(range(32, 127))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.save(str(folder / "tokenizer.json"))
    return len(vocab)


def _hf_folder(tmp_path, *, config=None, tokenizer_config=None):
    """A tiny Hugging Face folder with a tokenizer; `config` / `tokenizer_config` entries are written over the
    files' own."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    cfg = tiny_config(d_vocab=_char_tokenizer(folder), eos_token_ids=(2,))
    write_hf_checkpoint(folder, cfg, random_state_dict(cfg))
    if config:
        path = folder / "config.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | config))
    base = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(base | (tokenizer_config or {})))
    return folder


def _one_line_error(capsys, *parts):
    # The loader's progress bar may come first (carriage returns, then a newline); the error is the last line.
    err = capsys.readouterr().err
    if err.startswith("\rloading"):
        err = err.split("\n", 1)[1]
    assert err.count("\n") == 1 and err.startswith("llama-lens: error: "), err
    assert "Traceback" not in err and "unexpected" not in err, err
    for part in parts:
        assert part in err, (part, err)


@pytest.fixture(autouse=True)
def _no_traceback_asked(monkeypatch):
    monkeypatch.delenv("LLAMA_LENS_TRACEBACK", raising=False)


def test_a_folder_that_works_runs(tmp_path, capsys):
    folder = _hf_folder(tmp_path)
    assert cli.main(["generate", str(folder), "ab", "--max-new-tokens", "2", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("ab")


@pytest.mark.parametrize(
    ("config", "parts"),
    [
        ({"num_hidden_layers": "2"}, ["config.json", "num_hidden_layers"]),
        ({"rope_theta": [10000]}, ["config.json", "rope_theta"]),
    ],
)
def test_a_wrong_typed_config_json_value_is_one_line(tmp_path, capsys, config, parts):
    folder = _hf_folder(tmp_path, config=config)
    assert cli.main(["inspect", str(folder)]) == 1
    _one_line_error(capsys, *parts)


def test_a_wrong_typed_params_json_value_is_one_line(tmp_path, capsys):
    cfg = tiny_config()
    folder = write_meta_checkpoint(tmp_path / "meta", cfg, random_state_dict(cfg))
    params = json.loads((folder / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps(params | {"n_layers": "two"}))
    assert cli.main(["inspect", str(folder)]) == 1
    _one_line_error(capsys, "params.json", "n_layers")


@pytest.mark.parametrize(
    ("tokenizer_config", "parts"),
    [
        ({"add_bos_token": "yes"}, ["tokenizer_config.json", "'add_bos_token'", "expected true, false or null"]),
        ({"eos_token": 2}, ["tokenizer_config.json", "'eos_token'", "expected a token string"]),
    ],
)
def test_a_wrong_typed_tokenizer_config_value_is_one_line(tmp_path, capsys, tokenizer_config, parts):
    folder = _hf_folder(tmp_path, tokenizer_config=tokenizer_config)
    assert cli.main(["lens", str(folder), "ab"]) == 1
    _one_line_error(capsys, *parts)


@pytest.mark.parametrize(
    ("template", "part"),
    [
        ("{{ 1 / 0 }}", "the chat template failed on these messages: ZeroDivisionError"),
        ("{{ raise_exception('no user turns here') }}", "refused these messages: no user turns here"),
        ("{% for m in messages %}", "the chat template does not parse"),
    ],
)
def test_a_chat_template_that_fails_is_one_line(tmp_path, capsys, template, part):
    folder = _hf_folder(tmp_path, tokenizer_config={"chat_template": template})
    assert cli.main(["generate", str(folder), "hi", "--chat", "--max-new-tokens", "1"]) == 1
    _one_line_error(capsys, part)


@pytest.mark.parametrize(
    ("prompt", "part"),
    [
        ("caf\udce9", "PROMPT is not valid UTF-8 (byte 0xe9 at position 3)"),  # latin-1 bytes from a terminal
        ("x\ud800", "PROMPT is not valid UTF-8 (a lone surrogate U+D800 at character 1)"),
    ],
)
@pytest.mark.parametrize("command", ["lens", "generate"])
def test_a_prompt_that_is_not_utf8_is_one_line(tmp_path, capsys, monkeypatch, command, prompt, part):
    monkeypatch.setattr(cli, "_load_model", lambda args: pytest.fail("the model was loaded"))
    assert cli.main([command, str(tmp_path), prompt]) == 1
    _one_line_error(capsys, part)


def test_a_tiny_temperature_is_greedy_not_a_traceback(tmp_path, capsys):
    folder = _hf_folder(tmp_path)
    args = ["generate", str(folder), "ab", "--max-new-tokens", "6", "--seed", "1"]
    assert cli.main([*args, "--temperature", "0"]) == 0
    greedy = capsys.readouterr().out
    assert cli.main([*args, "--temperature", "1e-45"]) == 0
    assert capsys.readouterr().out == greedy


@pytest.mark.parametrize("value", ["nan", "-1"])
def test_a_temperature_that_cannot_be_is_one_line(tmp_path, capsys, value):
    folder = _hf_folder(tmp_path)
    assert cli.main(["generate", str(folder), "ab", "--temperature", value]) == 1
    _one_line_error(capsys, "temperature >= 0")


def test_a_prompt_past_the_context_length_is_one_line(tmp_path, capsys):
    folder = _hf_folder(tmp_path, config={"max_position_embeddings": 8})
    assert cli.main(["generate", str(folder), "abcdef", "--max-new-tokens", "8"]) == 1
    _one_line_error(capsys, "max_position_embeddings 8", "lower max_new_tokens to")
