"""The API reference has an entry for every public name, the guides and figures are in the site, and the site
builds with `mkdocs build --strict`.

The public names are computed here from the imported package (`ll.__all__` and the faces' `__all__` or
attributes), not from the reference generator (docs/gen_reference.py, which reads the source), so a public name
the generator does not reach fails here.
"""

import __future__

import importlib
import importlib.util
import inspect
import os
import re
import subprocess
import sys
import types
import zlib
from pathlib import Path

import pytest

import llama_lens as ll

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"

# The faces a user imports from (README's public paths); each has a page of the reference.
FACES = (
    "llama_lens.plot",
    "llama_lens.patching",
    "llama_lens.widgets",
    "llama_lens.utils",
    "llama_lens.testing",
    "llama_lens.config",
    "llama_lens.tokenizer",
)
# The ground modules: what a face imports from them is its tooling (config.py's errors and key tables), not its face.
GROUND = ("llama_lens.errors", "llama_lens.validate", "llama_lens.files", "llama_lens.config_keys")


def _generator():
    spec = importlib.util.spec_from_file_location("gen_reference", DOCS / "gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def _face_names(module: types.ModuleType) -> list[str]:
    """A face's public names: its `__all__`, else every public attribute that is the package's own (not a
    submodule, not `from __future__`, not from the standard library or a dependency, not a ground module's)."""
    if hasattr(module, "__all__"):
        return list(module.__all__)
    ground = [importlib.import_module(name) for name in GROUND if name != module.__name__]
    names = []
    for name, value in vars(module).items():
        if name.startswith("_") or isinstance(value, types.ModuleType | type(__future__.annotations)):
            continue
        if (inspect.isclass(value) or callable(value)) and not getattr(value, "__module__", "").startswith(
            "llama_lens"
        ):
            continue
        if any(getattr(other, name, None) is value for other in ground):
            continue
        names.append(name)
    return names


def _public_entries() -> list[tuple[str, str]]:
    """(how a user spells it, the dotted path its reference entry must document) for every public name."""
    entries = []
    for name in ll.__all__:
        value = getattr(ll, name)
        if isinstance(value, types.ModuleType):
            continue  # a face: its names are listed below
        entries.append((f"ll.{name}", f"{value.__module__}.{name}"))  # where it is defined
    for face in FACES:
        module = importlib.import_module(face)
        entries += [(f"{face}.{name}", f"{face}.{name}") for name in _face_names(module)]
    return entries


def _documented(pages: dict[str, str]) -> set[str]:
    return {match for text in pages.values() for match in re.findall(r"^::: (\S+)$", text, flags=re.M)}


def test_every_public_name_has_a_reference_entry():
    pages = _generator().pages()
    documented = _documented(pages)
    entries = _public_entries()
    assert len(entries) > 100  # ll.*, the 23 patching names, ... : the walk found the faces' names
    missing = [spelling for spelling, path in entries if path not in documented]
    assert not missing, f"public names without an entry in the API reference: {missing}"
    # Each ll.* name is on the ll page, as an entry or as a link to the module page that documents it.
    ll_page = pages["reference/index.md"]
    for spelling, path in entries:
        if spelling.startswith("ll."):
            assert f"::: {path}\n" in ll_page or f"][{path}]" in ll_page, spelling


def test_a_name_added_to_ll_gets_an_entry(monkeypatch):
    generator = _generator()
    lazy = generator.lazy_names()
    monkeypatch.setattr(generator, "lazy_names", lambda: {**lazy, "choose_unembed": "loading.plan"})
    page = generator.pages()["reference/index.md"]
    assert "::: llama_lens.loading.plan.choose_unembed\n" in page
    assert page.index("## From `llama_lens.loading`") < page.index("choose_unembed")


def test_every_guide_and_figure_is_in_the_site():
    config = (ROOT / "mkdocs.yml").read_text()
    nav = set(re.findall(r"^\s+- (?:[^:\n]+: )?(\S+\.md)$", config, flags=re.M))
    guides = {path.name for path in DOCS.glob("*.md")}
    assert guides <= nav, f"docs pages missing from mkdocs.yml's nav: {sorted(guides - nav)}"
    pages = "\n".join(path.read_text() for path in DOCS.glob("*.md"))
    figures = {path.name for path in DOCS.glob("*.png")}
    shown = set(re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", pages))
    assert figures and figures <= shown, f"figures no page shows: {sorted(figures - shown)}"


def _inventory(path: Path) -> set[str]:
    """The object names of a Sphinx objects.inv (4 header lines, then zlib)."""
    header_end = 0
    data = path.read_bytes()
    for _ in range(4):
        header_end = data.index(b"\n", header_end) + 1
    body = zlib.decompress(data[header_end:]).decode()
    return {line.split(" ", 1)[0] for line in body.splitlines()}


@pytest.mark.slow
def test_the_site_builds_strictly_with_an_object_for_every_public_name(tmp_path):
    site = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert build.returncode == 0, build.stdout + build.stderr
    inventory = _inventory(site / "objects.inv")
    missing = [spelling for spelling, path in _public_entries() if path not in inventory]
    assert not missing, f"public names the built reference has no object for: {missing}"
    for page in ("index.html", "reference/index.html", "reference/patching.html", "logit_lens_paris.png"):
        assert (site / page).is_file(), page
    # Signatures, arguments, returns and raises are rendered from the Google-style docstrings.
    load = (site / "reference/index.html").read_text()
    assert 'id="llama_lens.loading.load.load"' in load
    for section in ("Parameters:", "Returns:", "Raises:"):
        assert section in load, section
