"""Every Python block of docs/coming_from_transformerlens.md runs, in order, in one namespace, on the embedded
SmolLM2 (the page's own `ll.load(ll.demo_model_path())`)."""

import re
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parents[2] / "docs" / "coming_from_transformerlens.md"


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_the_page_has_snippets():
    blocks = _python_blocks(PAGE.read_text())
    assert len(blocks) >= 8 and all(block.strip() for block in blocks)


def test_every_snippet_of_coming_from_transformerlens_runs(demo_path, capsys):
    namespace: dict = {}
    for number, block in enumerate(_python_blocks(PAGE.read_text()), start=1):
        try:
            exec(compile(block, f"{PAGE.name} block {number}", "exec"), namespace)
        except Exception as err:  # pragma: no cover - the message names the block
            pytest.fail(f"block {number} of {PAGE.name} failed: {type(err).__name__}: {err}\n{block}")
    out = capsys.readouterr().out
    assert "n_kv_heads=3" in out  # the grouped-heads error was printed, with its explanation
    scores = namespace["scores"]
    model = namespace["model"]
    assert scores.shape == (model.cfg.n_layers, namespace["corrupted"].shape[1])
    assert set(namespace["frame"].site) == {"attn_out", "mlp_out"}
    assert namespace["fig"].axes
