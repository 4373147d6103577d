"""The API reference pages, written at build time from the package's own lists of public names.

mkdocs runs this file as a hook (`hooks:` in mkdocs.yml): before the build it adds one page per face under
`reference/`, each a list of mkdocstrings `::: path` entries, so a name added to `llama_lens._LAZY` or to a
face's `__all__` gets its entry without anyone editing a page. `python docs/gen_reference.py` prints the pages.

Each entry names the object where it is defined (`ll.load` is `llama_lens.loading.load.load`), because `ll.*`
names are imported lazily through `__getattr__` and griffe reads source without running it. Nothing here
imports the package: `_LAZY`, `_SUBMODULES` and `__all__` are read from the source, so the build needs neither
torch nor the optional dependencies, and an imported face cannot hide a name.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "llama_lens"
REFERENCE = "reference"  # the pages' folder in the site
GROUND = ("errors", "validate", "files", "config_keys")  # the ground modules a face may import its tools from


@dataclass(frozen=True)
class Face:
    """One reference page: the public names of one module of the package, each with its own entry."""

    page: str  # file name under reference/
    title: str  # the page's heading, as a user spells the module
    module: str  # dotted path under llama_lens ("" for the package itself)
    source: str  # the module's file, relative to llama_lens/


# The faces of the package (README's public paths), in the order of the reference's navigation.
FACES = (
    Face("index.md", "ll", "", "__init__.py"),
    Face("plot.md", "ll.plot", "plot", "plot.py"),
    Face("patching.md", "ll.patching", "patching", "patching/__init__.py"),
    Face("widgets.md", "ll.widgets", "widgets", "widgets/__init__.py"),
    Face("utils.md", "ll.utils", "utils", "utils.py"),
    Face("testing.md", "ll.testing", "testing", "testing.py"),
    Face("config.md", "llama_lens.config", "config", "config.py"),
    Face("tokenizer.md", "llama_lens.tokenizer", "tokenizer", "tokenizer/__init__.py"),
)


def _tree(face: Face) -> ast.Module:
    return ast.parse((PACKAGE / face.source).read_text(encoding="utf-8"))


def _assigned(tree: ast.Module, name: str):
    """The literal value of a module-level `name = ...`, or None."""
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and node.value is not None:  # `__all__: list[str] = [...]`
            node = ast.Assign(targets=[node.target], value=node.value)
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    return None


def lazy_names() -> dict[str, str]:
    """`ll.*`: each lazily imported name -> the module under llama_lens that defines it (`_LAZY`)."""
    return dict(_assigned(_tree(FACES[0]), "_LAZY"))


def public_names(face: Face) -> list[str]:
    """The names a face exports: its `__all__`, else (plot, config) what it defines, and what it imports from the
    package's rooms, without a leading underscore. What it imports from the ground modules (config.py's errors and
    key tables) is its tooling. Submodules (`ll.plot` on the `ll` page) have pages of their own."""
    tree = _tree(face)
    if not face.module:
        return list(lazy_names())
    exported = _assigned(tree, "__all__")
    if exported is not None:
        return list(exported)
    names = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level > 0 and node.module not in GROUND:
            names += [alias.asname or alias.name for alias in node.names]
        elif isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.append(node.name)
        elif isinstance(node, ast.Assign):
            names += [target.id for target in node.targets if isinstance(target, ast.Name)]
    return [name for name in dict.fromkeys(names) if not name.startswith("_")]


def entry_path(face: Face, name: str) -> str:
    """The dotted path mkdocstrings documents `name` under: its defining module for `ll.*`, the face's own path
    otherwise (griffe follows the face's import to the definition)."""
    if not face.module:
        return f"llama_lens.{lazy_names()[name]}.{name}"
    return f"llama_lens.{face.module}.{name}"


def _entries(face: Face, names: list[str], heading_level: int) -> tuple[list[str], list[str]]:
    """The `::: path` blocks of `names`, and on the `ll` page links for those documented on another face's page
    under the same path (ll.LlamaConfig is llama_lens.config's): one object has one entry, or its
    cross-references would not know where to go."""
    elsewhere = set()
    if not face.module:  # the ll page gives way: the module's own page lists the rest of its module
        elsewhere = {entry_path(other, name) for other in FACES if other.module for name in public_names(other)}
    blocks, links = [], []
    for name in names:
        path = entry_path(face, name)
        if path in elsewhere:
            links.append(f"- [`{face.title}.{name}`][{path}]: the same object as `{path}`")
        else:
            blocks += [f"::: {path}", "    options:", f"      heading_level: {heading_level}", ""]
    return blocks, links


def page_source(face: Face) -> str:
    """The Markdown of one face's page: the module's docstring, then an entry per public name. The `ll` page has
    a section per room (the subpackage or ground module that defines the names)."""
    module = "llama_lens" + (f".{face.module}" if face.module else "")
    lines = [
        f"# `{face.title}`",
        "",
        f"::: {module}",
        "    options:",
        "      members: false",
        "      show_root_heading: false",
        "      show_root_toc_entry: false",
        "",
    ]
    if face.module:
        blocks, links = _entries(face, public_names(face), heading_level=2)
        lines += blocks
    else:
        rooms: dict[str, list[str]] = {}
        for name, defined_in in lazy_names().items():
            rooms.setdefault(defined_in.split(".")[0], []).append(name)
        links = []
        for room, names in rooms.items():
            blocks, room_links = _entries(face, sorted(names, key=str.lower), heading_level=3)
            links += room_links
            if blocks:
                lines += [f"## From `llama_lens.{room}`", "", *blocks]
    if links:
        lines += ["## Documented with their modules", "", *links, ""]
    return "\n".join(lines)


def pages() -> dict[str, str]:
    """Every reference page: its path in the site -> its Markdown."""
    return {f"{REFERENCE}/{face.page}": page_source(face) for face in FACES}


def on_files(files, config):
    """mkdocs hook: add the reference pages to the build (they exist only in the site, never in docs/)."""
    from mkdocs.structure.files import File

    for path, text in pages().items():
        files.append(File.generated(config, path, content=text))
    return files


if __name__ == "__main__":
    for path, text in pages().items():
        print(f"<!-- {path} -->\n{text}")
