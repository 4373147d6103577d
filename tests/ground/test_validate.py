"""The argument checks in llama_lens/validate.py: what each accepts and the message each gives."""

import warnings

import numpy as np
import pytest
import torch

from llama_lens import validate


def test_as_index_takes_integer_types_only():
    for value in (3, np.int64(3), torch.tensor(3), np.array(3)):
        assert validate.as_index(value) == 3
    for value in (3.0, True, torch.tensor(True), "3", None, torch.tensor([3])):
        assert validate.as_index(value) is None


def test_check_index_counts_from_the_end_and_names_the_range():
    assert validate.check_index("head", 2, 4, "heads") == 2
    assert validate.check_index("head", np.int64(-1), 4, "heads") == 3
    with pytest.raises(ValueError, match=r"^head=4 is out of range: there are 4 heads \(0..3\)$"):
        validate.check_index("head", 4, 4, "heads")
    with pytest.raises(
        ValueError, match=r"^batch_index=-3 is out of range: there are 2 prompts in the batch \(0..1\)$"
    ):
        validate.check_index("batch_index", -3, 2, "prompts in the batch")
    with pytest.raises(ValueError, match=r"^head must be an integer, got 1.5$"):
        validate.check_index("head", 1.5, 4, "heads")
    with pytest.raises(ValueError, match=r"^head must be an integer, got True$"):
        validate.check_index("head", True, 4, "heads")


def test_check_count_bounds():
    assert validate.check_count("top_k", np.int64(5), 1, 10) == 5
    with pytest.raises(ValueError, match=r"^top_k=0 is out of range: the vocabulary has 10 ids \(1..10\)$"):
        validate.check_count("top_k", 0, 1, 10, "the vocabulary has 10 ids")
    with pytest.raises(ValueError, match=r"^top_k=11 is out of range: it must lie in \(1..10\)$"):
        validate.check_count("top_k", 11, 1, 10)
    with pytest.raises(ValueError, match=r"^chunk_size=0 is out of range: it must be at least 1$"):
        validate.check_count("chunk_size", 0)
    with pytest.raises(ValueError, match=r"^top_k must be an integer, got 5.0$"):
        validate.check_count("top_k", 5.0)


def test_check_choice_lists_the_choices():
    assert validate.check_choice("metric", "kl", ["prob", "kl"]) == "kl"
    with pytest.raises(ValueError, match=r"^unknown metric 'loss': metric= takes one of \['prob', 'kl'\]$"):
        validate.check_choice("metric", "loss", ["prob", "kl"])
    with pytest.raises(ValueError, match=r"^unknown read-out \['x'\]: readout= takes one of \['embed'\]$"):
        validate.check_choice("readout", ["x"], ["embed"], "read-out")


def test_check_layers_keeps_its_contract():
    assert validate.check_layers(None, 3) == [0, 1, 2]
    assert validate.check_layers((2, 0, 2), 3) == [0, 2]
    assert validate.check_layers(np.array([1]), 3) == [1] == validate.check_layers(torch.tensor([1]), 3)
    with pytest.raises(ValueError, match=r"^layers=range\(0, 4\) is out of range: layer 3 is outside the model, which "
                                         r"has 3 layers \(0..2\); use layers within range\(0, 3\)$"):  # fmt: skip
        validate.check_layers(range(0, 4), 3)
    with pytest.raises(ValueError, match=r"^layers must hold ints, got 1.0$"):
        validate.check_layers([1.0], 3)
    for bad in (2, "0", 2.0):
        with pytest.raises(ValueError, match=r"^layers must be a range or a list of ints, got .*layers=range\(0, 3\)$"):
            validate.check_layers(bad, 3)


def test_check_loaded_layers_names_what_is_held():
    assert validate.check_loaded_layers(None, [2, 3]) == [2, 3]
    assert validate.check_loaded_layers({3, 2}, [2, 3]) == [2, 3]
    with pytest.raises(ValueError, match=r"^layers=\[1, 3\] is out of range: layers \[1\] are not loaded; this model "
                                         r"holds layers \(2..3\)$"):  # fmt: skip
        validate.check_loaded_layers([1, 3], [2, 3])
    with pytest.raises(ValueError, match=r"holds layers \(0, 4\)$"):
        validate.check_loaded_layers((1,), [0, 4])


def test_check_positions_and_position():
    assert validate.check_positions(None, 3) == [0, 1, 2]
    assert validate.check_positions(-1, 3) == [2]
    assert validate.check_positions(range(0, 3, 2), 3) == [0, 2] == validate.check_positions(torch.tensor([0, -1]), 3)
    with pytest.raises(ValueError, match=r"^positions=3 is out of range: the prompt has 3 tokens \(0..2, or -3..-1 "
                                         r"counting from the end\)$"):  # fmt: skip
        validate.check_positions([0, 3], 3)
    with pytest.raises(ValueError, match=r"^positions is empty; pass None for all positions$"):
        validate.check_positions([], 3)
    with pytest.raises(ValueError, match=r"^positions must be ints, got 1.5$"):
        validate.check_positions([1.5], 3)
    with pytest.raises(ValueError, match=r"^positions must be an int or a list of ints, got 'ab'$"):
        validate.check_positions("ab", 3)
    with pytest.raises(ValueError, match=r"^position=-4 is out of range: the prompt has 3 tokens"):
        validate.check_position(-4, 3)


def test_check_targets_shapes_and_ids():
    def id_of(text: str) -> int:
        return {" Paris": 7, " Rome": 9}[text]

    assert validate.check_targets(" Paris", 2, 10, id_of) == [[7], [7]]
    assert validate.check_targets([" Paris", np.int64(3)], 2, 10, id_of) == [[7], [3]]
    assert validate.check_targets([[" Paris", " Rome"], torch.tensor([1, 2])], 2, 10, id_of) == [[7, 9], [1, 2]]
    with pytest.raises(ValueError, match=r"^got 3 targets for 2 prompt\(s\)"):
        validate.check_targets([1, 2, 3], 2, 10, id_of)
    with pytest.raises(ValueError, match=r"^every prompt needs the same \(non-zero\) number of targets$"):
        validate.check_targets([[1], [2, 3]], 2, 10, id_of)
    with pytest.raises(ValueError, match=r"^target=10 is out of range: the vocabulary has 10 ids \(0..9\)$"):
        validate.check_targets(10, 1, 10, id_of)
    with pytest.raises(ValueError, match=r"^target=' Paris' is text but this model has no tokenizer; pass a token id$"):
        validate.check_targets(" Paris", 1, 10, None)
    with pytest.raises(ValueError, match=r"^a target is a token's text or id, got float 5.0$"):
        validate.check_targets(5.0, 1, 10, id_of)


def test_check_attention_mask_shape():
    mask = validate.check_attention_mask(torch.tensor([[0, 1, 1]]), 1, 3)
    assert mask.dtype == torch.bool and mask.tolist() == [[False, True, True]]
    with pytest.raises(ValueError, match=r"^attention_mask must be \[batch=2, pos=3\] like the cached pattern, got "
                                         r"\(1, 3\)$"):  # fmt: skip
        validate.check_attention_mask(torch.ones(1, 3), 2, 3)


def test_renamed_keywords_warn_once_per_call_and_forward_the_value():
    @validate.renamed_keywords(prompt="batch_index")
    def draw(result, *, batch_index=0):
        return batch_index

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new spelling does not warn
        assert draw(None, batch_index=2) == 2
    with pytest.warns(DeprecationWarning) as caught:
        assert draw(None, prompt=1) == 1
    assert len(caught) == 1 and caught[0].filename == __file__  # the warning points at the caller's line
    assert str(caught[0].message) == (
        "draw(prompt=...) is deprecated and will be removed in the next release; use batch_index= "
        "(`prompt` now always means the text or tokens to run)"
    )
    with pytest.raises(TypeError, match=r"^draw\(\) got both prompt= and batch_index=; pass batch_index= only$"):
        draw(None, prompt=1, batch_index=1)

    @validate.renamed_keywords(prompt_index="batch_index")
    def explore(*, batch_index=0):
        return batch_index

    with pytest.warns(DeprecationWarning, match=r"^explore\(prompt_index=...\) is deprecated .*; use batch_index=$"):
        assert explore(prompt_index=3) == 3


def test_every_check_raises_an_error_of_the_library_that_is_also_the_builtin():
    from llama_lens.errors import ArgumentError, ArgumentTypeError, LlamaLensError

    bad_calls = [
        lambda: validate.check_index("head", 4, 4, "heads"),
        lambda: validate.check_count("top_k", 0),
        lambda: validate.check_choice("metric", "loss", ["prob"]),
        lambda: validate.check_layers([7], 2),
        lambda: validate.check_positions([5], 3),
        lambda: validate.resolve_dtype("int8"),
        lambda: validate.resolve_device("nonsense"),
    ]
    for call in bad_calls:
        with pytest.raises(ArgumentError) as caught:
            call()
        assert isinstance(caught.value, (LlamaLensError, ValueError))

    @validate.renamed_keywords(old="new")
    def draw(new=None):
        return new

    with pytest.raises(ArgumentTypeError), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        draw(old=1, new=2)


def test_the_ground_io_and_loading_modules_raise_no_bare_builtin_errors():
    # `except ll.LlamaLensError` catches every error these raise on purpose (errors.py's contract).
    import ast
    from pathlib import Path

    import llama_lens

    package = Path(llama_lens.__file__).parent
    builtins = {"ValueError", "TypeError", "KeyError", "FileNotFoundError", "RuntimeError", "IndexError"}
    files = [package / f"{name}.py" for name in ("config", "config_keys", "config_read", "validate", "files")]
    files += sorted((package / "io").glob("*.py")) + sorted((package / "loading").glob("*.py"))
    bare = []
    for file in files:
        for node in ast.walk(ast.parse(file.read_text())):
            raised = node.exc.func if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) else None
            if isinstance(raised, ast.Name) and raised.id in builtins:
                bare.append(f"{file.relative_to(package)}:{node.lineno} {raised.id}")
    assert not bare
