"""The package's layering rule (LAYOUT.md §6.2), checked on the source with ast: every import between llama_lens's
rooms goes down the table, none runs up or sideways, and no modules import each other in a circle.

Every import counts: at module level, under `if TYPE_CHECKING:` and inside functions. A type-only or deferred
import that runs up still ties the rooms together; deferred imports are for optional heavy third-party packages
(pandas, matplotlib, pyarrow, ray, transformers), which the table does not restrict. pyproject.toml's
import-linter contracts state the same rule for `lint-imports`; the last tests show both checks fail on an import
added against it.
"""

from __future__ import annotations

import ast
import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

import llama_lens

Graph = dict[str, list[tuple[str, int]]]
PACKAGE_DIR = Path(llama_lens.__file__).parent
REPO = PACKAGE_DIR.parent

GROUND = {"errors", "validate", "files", "config", "config_read", "config_keys"}
FACES = {"__init__", "plot", "utils", "testing"}
ROOMS = {
    "io", "tokenizer", "model", "viz", "data", "loading", "lens", "patching", "dictionaries", "features", "graphs",
    "runs", "widgets",
}  # fmt: skip

# Which rooms each room may import (its own included). "face" is the four faces; no module imports one.
BELOW_FACES = {"ground"} | ROOMS
ALLOWED: dict[str, set[str]] = {
    "ground": {"ground"},
    "io": {"ground", "io"},
    "model": {"ground", "model"},
    "viz": {"ground", "viz"},
    "data": {"ground", "data"},
    "tokenizer": {"ground", "io", "tokenizer"},
    "loading": {"ground", "io", "tokenizer", "model", "loading"},
    "lens": {"ground", "model", "viz", "data", "lens"},
    "patching": {"ground", "model", "viz", "patching"},
    "dictionaries": {"ground", "io", "model", "data", "dictionaries"},
    "features": {"ground", "io", "model", "viz", "data", "lens", "patching", "dictionaries", "features"},
    "graphs": {"ground", "io", "model", "viz", "data", "lens", "dictionaries", "features", "graphs"},
    "runs": {"ground", "io", "tokenizer", "model", "loading", "lens", "data", "dictionaries", "features", "runs"},
    "widgets": {"ground", "model", "viz", "lens", "dictionaries", "features", "graphs", "widgets"},
    "cli": BELOW_FACES,
    "face": BELOW_FACES,
}


# ---------------------------------------------------------------------------------------------- the checker
def package_sources(package_dir: Path = PACKAGE_DIR) -> dict[str, str]:
    """{dotted module name: source} of every module of the package (`llama_lens.io` for io/__init__.py)."""
    sources = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        sources[name] = path.read_text(encoding="utf-8")
    return sources


@functools.cache  # the package is parsed once; a test that edits one module parses that one
def imports_of(name: str, source: str, modules: frozenset[str]) -> list[tuple[str, int]]:
    """(imported module, line) for each import of a package module in `source`, wherever it stands (module level,
    `if TYPE_CHECKING:`, inside a function). `from .x import y` names module x.y when there is one, else x."""
    root = name.split(".")[0]
    is_package = any(other.startswith(name + ".") for other in modules)
    package = name if is_package else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if alias.name.split(".")[0] == root]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            elif (node.module or "").split(".")[0] == root:
                target = node.module
            else:
                continue  # a third-party or standard-library import: not the table's business
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                found.append((submodule if submodule in modules else target, node.lineno))
    return found


def import_graph(sources: Mapping[str, str]) -> Graph:
    """{module: [(imported module, line), ...]} of the package."""
    graph, modules = {}, frozenset(sources)
    for name, source in sources.items():
        graph[name] = imports_of(name, source, modules)
    return graph


def room_of(module: str) -> str:
    """The room of a dotted module name: "ground", "face", "cli" or a subpackage's name."""
    parts = module.split(".")[1:]
    if not parts or parts[0] in FACES:
        return "face"
    if parts[0] in GROUND:
        return "ground"
    return parts[0]


def layering_violations(graph: Mapping[str, list[tuple[str, int]]]) -> list[tuple[str, str, int]]:
    """(importer, imported, line) of every import the table does not allow, faces included."""
    bad = []
    for importer, imports in graph.items():
        source_room = room_of(importer)
        if source_room not in ALLOWED:
            bad.append((importer, f"<{source_room} is in no row of the table>", 0))
            continue
        for imported, line in imports:
            if room_of(imported) not in ALLOWED[source_room]:
                bad.append((importer, imported, line))
    return bad


def circles(edges: Mapping[str, Iterable[str]]) -> list[set[str]]:
    """The import circles of a graph: its strongly connected components of more than one node, or a node that
    imports itself (Tarjan's algorithm, iterative so that a deep graph does not hit the recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(set(edges.get(start, ())))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(set(edges.get(child, ()))))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1 or node in set(edges.get(node, ())):
                    found.append(component)
    return found


def module_edges(graph: Mapping[str, list[tuple[str, int]]]) -> dict[str, set[str]]:
    return {
        importer: {imported for imported, _ in imports if imported != importer} for importer, imports in graph.items()
    }


def room_edges(graph: Mapping[str, list[tuple[str, int]]]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for importer, imports in graph.items():
        rooms = {room_of(imported) for imported, _ in imports} - {room_of(importer)}
        edges.setdefault(room_of(importer), set()).update(rooms)
    return edges


def describe(violations: Iterable[tuple[str, str, int]]) -> str:
    return "\n".join(
        f"  {importer} ({room_of(importer)}) -> {imported} ({room_of(imported)}), line {line}"
        for importer, imported, line in violations
    )


# ---------------------------------------------------------------------------------------------- the package
@pytest.fixture(scope="module")
def graph() -> Graph:
    return import_graph(package_sources())


def test_every_module_belongs_to_a_row_of_the_table(graph):
    rooms = {room_of(module) for module in graph}
    assert rooms <= set(ALLOWED), f"modules outside the table: {sorted(rooms - set(ALLOWED))}; add them to a row"
    assert rooms >= ROOMS, f"rooms of the table that the package lacks: {sorted(ROOMS - rooms)}"


def test_no_import_runs_up_or_sideways(graph):
    violations = layering_violations(graph)
    assert not violations, "imports against the layering rule (LAYOUT.md §6.2):\n" + describe(violations)


def test_no_module_imports_a_face(graph):
    into_faces = [
        (importer, imported, line)
        for importer, imports in graph.items()
        for imported, line in imports
        if room_of(imported) == "face" and imported != importer
    ]
    assert not into_faces, "imports of a face (llama_lens, plot, utils, testing):\n" + describe(into_faces)


def test_no_import_circle_between_modules(graph):
    found = circles(module_edges(graph))
    assert not found, "modules that import each other in a circle:\n" + "\n".join(
        f"  {sorted(component)}" for component in found
    )


def test_no_import_circle_between_rooms(graph):
    found = circles(room_edges(graph))
    assert not found, f"rooms that import each other in a circle: {[sorted(c) for c in found]}"


# ---------------------------------------------------------------------------------------------- the checks fail
UPWARD = {
    "at module level": "from ..lens.logit import logit_lens\n",
    "under TYPE_CHECKING": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..lens import logit\n",
    "inside a function": "def late():\n    from ..lens.logit import logit_lens\n    return logit_lens\n",
    "as an absolute import": "import llama_lens.lens.logit\n",
}


@pytest.mark.parametrize("where", list(UPWARD))
def test_the_checker_finds_an_upward_import(where):
    sources = package_sources()
    sources["llama_lens.io.names"] += "\n" + UPWARD[where]  # io may import only ground
    bad = layering_violations(import_graph(sources))
    assert [(importer, imported) for importer, imported, _ in bad] == [("llama_lens.io.names", "llama_lens.lens.logit")]


def test_the_checker_finds_a_sideways_import_and_an_import_of_a_face():
    sources = package_sources()
    sources["llama_lens.lens.readout"] += "\nfrom ..patching import metrics\nimport llama_lens as ll\n"
    bad = [v[:2] for v in layering_violations(import_graph(sources))]
    assert bad == [
        ("llama_lens.lens.readout", "llama_lens.patching.metrics"),
        ("llama_lens.lens.readout", "llama_lens"),
    ]


def test_the_checker_finds_a_circle_inside_a_room():
    sources = {
        "pkg": "",
        "pkg.room": "",
        "pkg.room.a": "from . import b\n",
        "pkg.room.b": "def late():\n    from .c import thing\n",
        "pkg.room.c": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import other\n",
        "pkg.room.d": "from .a import other\n",
    }
    assert circles(module_edges(import_graph(sources))) == [{"pkg.room.a", "pkg.room.b", "pkg.room.c"}]


def test_lint_imports_fails_on_an_added_upward_import(tmp_path):
    """pyproject.toml's contracts catch what the ast check catches: the same upward import breaks them."""
    lint_imports = shutil.which("lint-imports") or shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint_imports is None:
        pytest.skip("lint-imports is not installed (pip install -e '.[dev]')")

    def run_on_copy(folder: Path, extra: str) -> str:
        folder.mkdir()
        shutil.copytree(PACKAGE_DIR, folder / "llama_lens", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(REPO / "pyproject.toml", folder / "pyproject.toml")
        with open(folder / "llama_lens" / "model" / "norm.py", "a", encoding="utf-8") as file:
            file.write(extra)
        # lint-imports reads the package from its working directory (first on sys.path), so the copy is checked.
        result = subprocess.run(
            [lint_imports, "--no-cache"], cwd=folder, capture_output=True, text=True, timeout=300, check=False
        )
        return result.returncode, result.stdout + result.stderr

    message = "llama_lens.model is not allowed to import llama_lens.widgets"
    _, clean = run_on_copy(tmp_path / "clean", "")
    assert message not in clean
    status, broken = run_on_copy(tmp_path / "broken", "\ndef late():\n    from ..widgets import base\n")
    assert status != 0
    assert message in broken and "llama_lens.model.norm -> llama_lens.widgets.base" in broken


def test_the_drawing_counts_no_arrow_back_up_and_no_circle():
    """scripts/draw_rooms.py (grimp's graph, the declared layers of pyproject.toml) finds the rule kept, and the
    drawing on docs/architecture.md is the one it draws today."""
    # The script imports `llama_lens` to find its modules: this checkout's, not whichever one is installed
    # (a second checkout sharing an editable install would otherwise draw the other one's graph).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "draw_rooms.py")], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip().endswith("0 back up, 0 circles"), done.stdout
    page = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    assert done.stdout.strip() in page, "docs/architecture.md: paste the output of `python scripts/draw_rooms.py`"
