"""The error contract of llama_lens/errors.py: every error the library raises on bad input or misuse is a
LlamaLensError (and still the builtin a caller expects), so `except ll.LlamaLensError` catches all of them.

Two checks: the package's source raises no bare builtin error (a walk of its ast), and every error the hostile
tests provoke (tests/integration/test_hostile_*.py, tests/**/test_*_hostile.py) is a LlamaLensError: a
`pytest.raises` there that names a LlamaLensError class proves it already; each one that names a builtin is
provoked again here and caught as LlamaLensError.
"""

from __future__ import annotations

import ast
import builtins
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from support.models import tiny_config

import llama_lens as ll
from llama_lens import errors

PACKAGE_DIR = Path(ll.__file__).parent
TESTS_DIR = Path(__file__).parents[1]

# The builtins a caller catches; raising one of them bare bypasses `except ll.LlamaLensError`. Each has a
# LlamaLensError subclass in errors.py that is also that builtin.
BARE = {
    "ValueError": "ArgumentError, ConfigError, CheckpointError, ...",
    "TypeError": "ArgumentTypeError",
    "KeyError": "UnknownNameError",
    "FileNotFoundError": "MissingFileError",
    "IndexError": "OutOfRangeError",
    "RuntimeError": "UsageError",
}


def bare_raises(path: Path) -> list[tuple[int, str]]:
    """(line, builtin) of each `raise ValueError(...)` / `raise ValueError` (and the others of BARE) in a file.
    A bare `raise` that re-raises a caught exception, and `raise ... from`, of a LlamaLensError class, pass."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Raise) and node.exc is not None:
            raised = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(raised, ast.Name) and raised.id in BARE:
                found.append((node.lineno, raised.id))
    return sorted(found)


def test_the_walk_finds_a_bare_raise(tmp_path):
    module = tmp_path / "module.py"
    module.write_text(
        "from llama_lens.errors import ArgumentError\n"
        "def f(x):\n"
        "    if x:\n"
        "        raise ValueError(f'bad {x}')\n"
        "    try:\n"
        "        g()\n"
        "    except KeyError:\n"
        "        raise\n"
        "    raise ArgumentError('fine') from None\n"
        "def g():\n"
        "    raise RuntimeError\n"
    )
    assert bare_raises(module) == [(4, "ValueError"), (11, "RuntimeError")]


def test_the_package_raises_no_bare_builtin_error():
    found = {
        path.relative_to(PACKAGE_DIR.parent).as_posix(): hits
        for path in sorted(PACKAGE_DIR.rglob("*.py"))
        if (hits := bare_raises(path))
    }
    lines = [f"  {path}:{line}: raise {name}" for path, hits in found.items() for line, name in hits]
    instead = "; ".join(f"{name} -> {classes}" for name, classes in BARE.items())
    assert not found, (
        f"{len(lines)} bare builtin raises in {len(found)} files escape `except ll.LlamaLensError`; raise the "
        f"errors.py class instead ({instead}):\n" + "\n".join(lines)
    )


def test_every_error_class_is_a_llama_lens_error_and_a_builtin():
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, Exception)]
    for cls in classes:
        if cls is errors.LlamaLensError:
            continue
        assert issubclass(cls, errors.LlamaLensError), cls
        builtin = [b for b in cls.__mro__ if b.__module__ == "builtins" and b not in (Exception, BaseException, object)]
        assert builtin, f"{cls.__name__} derives from no builtin a caller would catch (ValueError, KeyError, ...)"


# ---------------------------------------------------------------------------------------------- hostile inputs
def hostile_modules() -> list[Path]:
    return sorted({*TESTS_DIR.glob("integration/test_hostile_*.py"), *TESTS_DIR.glob("**/test_*_hostile.py")})


def raises_sites(path: Path) -> list[tuple[list[str], str, int]]:
    """(classes named, first statement inside the `with`, line) of each `with pytest.raises(Class, ...)`. A
    variable (`error = ConfigError if ... else CheckpointError`) names the classes of its assignment."""
    sites = []
    for function in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(function, ast.FunctionDef):
            continue
        assigned = {
            target.id: node.value
            for node in ast.walk(function)
            if isinstance(node, ast.Assign)
            for target in node.targets
            if isinstance(target, ast.Name)
        }
        for node in ast.walk(function):
            if not isinstance(node, ast.With):
                continue
            for item in node.items:
                call = item.context_expr
                if isinstance(call, ast.Call) and ast.unparse(call.func) == "pytest.raises" and call.args:
                    expected = call.args[0]
                    if isinstance(expected, ast.Name) and expected.id in assigned:
                        expected = assigned[expected.id]
                    # Every name in the expression; those that are no exception class are dropped later.
                    names = [n.id if isinstance(n, ast.Name) else n.attr for n in ast.walk(expected)
                             if isinstance(n, (ast.Name, ast.Attribute))]  # fmt: skip
                    sites.append((names, ast.unparse(node.body[0]), node.lineno))
    return sites


def _explorer(model):
    return ll.widgets.LogitLensExplorer(model, "hello world", threaded=False)


def _patch(sweep: str):
    return lambda model: getattr(ll.patching, sweep)(
        model, "hello", "jello", lambda logits: logits[0, -1, 5], layers=[0.7]
    )


# The hostile cases whose `pytest.raises` names a builtin, keyed by the statement inside their `with`: each is
# provoked again with the hostile module's model (char_model(seed=5)) and must be caught as LlamaLensError.
PROVOKE: dict[str, list[Callable]] = {
    'model.run_with_cache(model.to_tokens("x"), names_filter=3)': [
        lambda model: model.run_with_cache(model.to_tokens("x"), names_filter=3)
    ],
    'model.generate("hi", max_new_tokens=bad)': [
        lambda model, bad=bad: model.generate("hi", max_new_tokens=bad) for bad in (-5, 2.5, True)
    ],
    "model(tokens, **kwargs)": [
        lambda model, at=at: model(torch.randint(3, 128, (2, 6)), stop_at_layer=at) for at in (1.5, -4)
    ],
    'll.logit_lens(model, "hello", layers=[2.7])': [lambda model: ll.logit_lens(model, "hello", layers=[2.7])],
    'll.patching.activation_patching(model, "hello", "jello", lambda logits: logits[0, -1, 5], layers=[0.7])': [
        _patch("activation_patching")
    ],
    'll.patching.attribution_patching(model, "hello", "jello", lambda logits: logits[0, -1, 5], layers=[0.7])': [
        _patch("attribution_patching")
    ],
    "ll.plan(tiny_config(), layers=[2.7])": [lambda model: ll.plan(tiny_config(), layers=[2.7])],
    "lx.layer = 2.7": [lambda model: setattr(_explorer(model), "layer", 2.7)],
    "lx.layr = 5": [lambda model: setattr(_explorer(model), "layr", 5)],
}


def builtin_sites() -> list[str]:
    """`file:line: statement` of each hostile `pytest.raises` that names a class outside the LlamaLensError tree."""
    found = []
    for path in hostile_modules():
        for names, statement, line in raises_sites(path):
            classes = [getattr(errors, name, None) or getattr(builtins, name, None) for name in names]
            classes = [cls for cls in classes if isinstance(cls, type) and issubclass(cls, BaseException)]
            if not classes or not all(issubclass(cls, errors.LlamaLensError) for cls in classes):
                found.append((f"{path.relative_to(TESTS_DIR).as_posix()}:{line}", statement))
    return found


def test_the_hostile_tests_are_found():
    assert hostile_modules(), "no hostile test modules under tests/"
    assert any(raises_sites(path) for path in hostile_modules())


def test_every_hostile_raises_names_a_llama_lens_error_or_is_provoked_here():
    provoked = {ast.unparse(ast.parse(statement)) for statement in PROVOKE}  # written as ast.unparse writes it
    missing = [f"  {where}: {statement}" for where, statement in builtin_sites() if statement not in provoked]
    assert not missing, (
        "hostile cases that expect a builtin error and are not provoked in PROVOKE "
        "(tests/ground/test_error_contract.py); add each there, or name the LlamaLensError class it raises:\n"
        + "\n".join(missing)
    )


@pytest.mark.parametrize(
    "case",
    [pytest.param(call, id=f"{statement}#{i}") for statement, calls in PROVOKE.items() for i, call in enumerate(calls)],
)
def test_a_hostile_input_raises_a_llama_lens_error(case, char_model):
    model = char_model(seed=5)
    with pytest.raises(ll.LlamaLensError):
        case(model)
