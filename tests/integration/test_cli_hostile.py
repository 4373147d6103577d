"""Every CLI failure is one line on stderr and a non-zero exit, an unforeseen one too."""

from __future__ import annotations

import pytest

import llama_lens.cli as cli


@pytest.mark.parametrize("error", [RuntimeError("CUDA out of memory\nTried to allocate"), RecursionError("deep")])
def test_an_unexpected_error_is_one_line_and_exit_1(monkeypatch, capsys, error):
    def run(args):
        raise error

    parser = cli.build_parser()
    real_parse = parser.parse_args
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    monkeypatch.setattr(parser, "parse_args", lambda argv: (lambda a: (setattr(a, "run", run), a)[1])(real_parse(argv)))
    monkeypatch.delenv("LLAMA_LENS_TRACEBACK", raising=False)
    assert cli.main(["inspect", "nowhere"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("llama-lens: error: ") and type(error).__name__ in err
