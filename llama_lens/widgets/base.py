"""What both explorers share: the control table, background jobs, the static fallback and standalone pages.

An explorer is an `anywidget.AnyWidget`. Its controls live in the browser; each is one synced trait, declared
once in the explorer's `CONTROLS` table with its validator and what a change costs:

- "recompute": run the model again (prompt, read-out);
- "update": compute from what the last run kept, without the model (target, pins, a colouring token);
- "redraw": the browser redraws from the data it has (metric, zoom, selection, ...).

Changes made in the browser run in a worker thread when a kernel is running, so a newer request cancels an
older one (the forward pass checks between layers) and the page stays live; changes made from Python run at
once, so the state is ready when the assignment returns and bad values raise there.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anywidget
import traitlets

from ..errors import ArgumentError, LlamaLensError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

KINDS = ("recompute", "update", "redraw")


@dataclass(frozen=True)
class Control:
    """One control: its trait (same name), what a change costs, and the check of a new value.

    `check(explorer, value)` returns the value normalised or raises ArgumentError naming the control.
    """

    kind: str
    check: Callable[[Any, Any], Any]
    doc: str = ""


class Cancelled(Exception):
    """A newer request replaced the one running; raised inside the old one's forward pass."""


def asset(name: str) -> str:
    """The text of a file shipped beside this module (the explorers' JavaScript and CSS), as the page gets it:
    without its comment lines and indentation (see `compact`)."""
    return compact(resources.files(__package__).joinpath(name).read_text(encoding="utf-8"), name)


def compact(text: str, name: str = ".js") -> str:
    """Script or style text without whole-line comments, indentation and blank lines.

    Every explorer's widget state holds its script and style, and a notebook saved with its widget state holds
    one copy per explorer: the comment lines and indentation (a fifth of the text, 6 KB of the attention
    explorer's and 7 KB of the lens's) would cost a notebook of 25 explorers about 0.2 MB. Only whole lines are
    dropped and only leading spaces, so nothing in a statement changes; our scripts have no string spanning
    lines (tests/widgets/test_widget_views.py checks that the shipped scripts parse).
    """
    if name.endswith(".css"):
        text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    lines = (line.strip() for line in text.splitlines())
    if name.endswith(".js"):
        lines = (line for line in lines if not line.startswith("//"))
    return "\n".join(line for line in lines if line) + "\n"


def figure_png(fig: Figure, dpi: int = 100, *, palette: bool = False) -> bytes:
    """The figure rendered to PNG bytes (through the Agg canvas; pyplot is not involved).

    With `palette`, the picture is reduced to 256 colours (an indexed PNG): a heatmap's smooth colour ramp
    then costs a byte per pixel before compression instead of four, about a third of the file. The explorers'
    static pictures use it: a notebook stores one per explorer.
    """
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    if not palette:
        return buffer.getvalue()
    from PIL import Image

    with Image.open(buffer) as image:
        indexed = image.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE)
    out = io.BytesIO()
    indexed.save(out, format="png", optimize=True)
    return out.getvalue()


def in_kernel() -> bool:
    """Whether an IPython kernel runs this code (then browser-driven work goes to a worker thread)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


class Explorer(anywidget.AnyWidget):
    """Base class: the control table, jobs, `.state`, the static picture and `.save_html`."""

    CONTROLS: dict[str, Control] = {}

    busy = traitlets.Bool(False).tag(sync=True)
    status = traitlets.Unicode("").tag(sync=True)
    error = traitlets.Unicode("").tag(sync=True)
    # Marks this explorer's static picture, which the live view hides (see `_ipython_display_`).
    static_id = traitlets.Unicode("").tag(sync=True)
    # Seconds since the epoch when the data last changed; the page measures its first render from here.
    data_time = traitlets.Float(0.0).tag(sync=True)

    def __init__(self, *, threaded: bool | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.static_id = uuid.uuid4().hex[:12]
        self._threaded = in_kernel() if threaded is None else threaded
        self._from_frontend = False
        self._generation = 0
        self._job_lock = threading.Lock()
        self._static_handle: Any = None
        self.observe(self._on_control, names=list(self.CONTROLS))

    # ------------------------------------------------------------------ state
    @property
    def state(self) -> dict[str, Any]:
        """Every control's value, JSON-serialisable: `json.dumps(explorer.state)` works."""
        return {name: _plain(getattr(self, name)) for name in self.CONTROLS}

    @state.setter
    def state(self, values: dict[str, Any]) -> None:
        unknown = sorted(set(values) - set(self.CONTROLS))
        if unknown:
            raise ArgumentError(f"unknown state key(s) {unknown}; the state holds {sorted(self.CONTROLS)}")
        # Model runs first, then the rest: pins and selections are checked against the new run's positions.
        first = {name: v for name, v in values.items() if self.CONTROLS[name].kind == "recompute"}
        for phase in (first, {name: v for name, v in values.items() if name not in first}):
            checked = {name: self.CONTROLS[name].check(self, value) for name, value in phase.items()}
            changed = {name: v for name, v in checked.items() if _plain(getattr(self, name)) != _plain(v)}
            self._quiet = True
            try:
                with self.hold_trait_notifications():
                    for name, value in changed.items():
                        setattr(self, name, value)
            finally:
                self._quiet = False
            self._react({self.CONTROLS[name].kind for name in changed}, sorted(changed))

    _quiet = False

    def _on_control(self, change: dict[str, Any]) -> None:
        if self._quiet:
            return
        name = change["name"]
        control = self.CONTROLS[name]
        try:
            value = control.check(self, change["new"])
        except (LlamaLensError, ValueError) as error:
            self._quiet = True
            try:
                setattr(self, name, change["old"])  # keep the last good value
            finally:
                self._quiet = False
            if self._from_frontend:
                self.error = str(error)
                return
            raise
        if _plain(value) != _plain(change["new"]):
            self._quiet = True
            try:
                setattr(self, name, value)  # the normalised form (e.g. a tuple as a list)
            finally:
                self._quiet = False
        self._react({control.kind}, [name])

    def _react(self, kinds: set[str], names: list[str]) -> None:
        """Runs what the changed controls need: a model run, an update, or nothing (the page redraws)."""
        if "recompute" in kinds:
            self._submit(self._recompute)
        elif "update" in kinds:
            self._submit(lambda check: self._update(names, check))

    def set_state(self, sync_data: dict[str, Any]) -> None:
        # Changes from the browser arrive here; remember where they came from (see the module docstring).
        self._from_frontend = True
        try:
            super().set_state(sync_data)
        finally:
            self._from_frontend = False

    # ------------------------------------------------------------------ jobs
    def _submit(self, job: Callable[[Callable[[], None]], None]) -> None:
        """Runs `job(check)`, where `check()` raises Cancelled once a newer job has been submitted."""
        self._generation += 1
        generation = self._generation

        def check() -> None:
            if generation != self._generation:
                raise Cancelled

        def run() -> None:
            with self._job_lock:
                if generation != self._generation:
                    return  # a newer request came while this one waited
                self.busy = True
                try:
                    job(check)
                    self.error = ""
                except Cancelled:
                    return
                except (LlamaLensError, ValueError) as error:
                    if not background:
                        raise
                    self.error = str(error)
                finally:
                    if generation == self._generation:
                        self.busy = False

        background = self._threaded and self._from_frontend
        if background:
            threading.Thread(target=run, name="llama-lens-explorer", daemon=True).start()
        else:
            run()

    def _recompute(self, check: Callable[[], None]) -> None:
        raise NotImplementedError

    def _update(self, names: list[str], check: Callable[[], None]) -> None:
        raise NotImplementedError

    def _data_changed(self) -> None:
        self.data_time = time.time()
        if self._static_handle is not None:
            self._static_handle.update(self.static_bundle(), raw=True)

    # ------------------------------------------------------------------ pictures and pages
    def to_figure(self) -> Figure:
        """The matplotlib Figure of what the explorer shows (for PNG/SVG/PDF: `.savefig(path)`)."""
        raise NotImplementedError

    def static_bundle(self) -> dict[str, Any]:
        """The static picture as a display bundle: HTML holding the PNG, which the live view hides, and a text.

        The PNG is sent once, inside the HTML: an "image/png" entry beside it would be stored (and exported) a
        second time, and the HTML is what carries the marker the live view hides.
        """
        png = base64.b64encode(figure_png(self.to_figure(), dpi=80, palette=True)).decode("ascii")
        marker = f"llama-lens-static llama-lens-static-{self.static_id}"
        alt = html.escape(f"{type(self).__name__} (static picture)")
        page = f'<div class="{marker}"><img alt="{alt}" style="max-width:100%" src="data:image/png;base64,{png}"></div>'
        return {"text/html": page, "text/plain": alt}

    def _ipython_display_(self) -> None:
        # Two outputs: the live view, then a static picture. The live view hides the picture by a CSS rule on
        # its marker class, so where the view renders (JupyterLab, Notebook 7, VS Code) only the view shows and
        # where it cannot (nbconvert HTML offline, GitHub) the picture does. The picture comes second so the
        # view starts rendering while it is drawn.
        from IPython.display import display

        bundle = self._repr_mimebundle_()
        data, metadata = bundle if isinstance(bundle, tuple) else (bundle, {})
        display(data, metadata=metadata, raw=True)
        self._static_handle = display(self.static_bundle(), raw=True, display_id=True)

    def page_state(self) -> dict[str, Any]:
        """The synced traits a standalone page starts from."""
        names = [name for name in self.trait_names(sync=True) if not name.startswith("_")]
        skip = {"layout", "tabbable", "tooltip", "comm", "keys", "log", "busy"}
        values = {name: getattr(self, name) for name in names if name not in skip}
        return {name: _plain(value) for name, value in values.items() if not isinstance(value, bytes)}

    def save_html(self, path: str | Path, *, title: str | None = None) -> Path:
        """Writes a standalone page (script, style and data inlined; nothing fetched) that works offline.

        Hover, click, pins, zoom and colouring work on the page; changing the prompt needs the kernel, so the
        prompt box is read-only there.

        Returns:
            The path written.
        """
        path = Path(path)
        if not path.parent.is_dir():
            raise ArgumentError(f"save_html: the folder {str(path.parent)!r} does not exist")
        script = self._esm if isinstance(self._esm, str) else str(self._esm)
        if "export default" not in script:
            raise LlamaLensError("the explorer's script has no default export")
        script = script.replace("export default", "const explorerModule =", 1)
        state = script_json(self.page_state())
        css = self._css if isinstance(self._css, str) else str(self._css)
        name = html.escape(title or type(self).__name__)
        path.write_text(PAGE.format(title=name, css=css, state=state, script=script), encoding="utf-8")
        return path


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body {{ margin: 16px; font-family: system-ui, sans-serif; }}
{css}</style></head>
<body><div id="llama-lens-root"></div>
<script type="module">
{script}
const state = {state};
// A stand-in for the widget model: the page has no kernel, so set() only tells the page's own listeners.
const listeners = {{}};
const model = {{
  get: (name) => (name === "offline" ? true : state[name]),
  set: (name, value) => {{ const old = state[name]; state[name] = value;
    for (const cb of listeners["change:" + name] || []) cb({{ name, old, new: value }}); }},
  save_changes: () => {{}},
  on: (event, cb) => {{ (listeners[event] = listeners[event] || []).push(cb); }},
  off: (event, cb) => {{ if (listeners[event]) listeners[event] = listeners[event].filter((f) => f !== cb); }},
  send: () => {{}},
}};
explorerModule.render({{ model, el: document.getElementById("llama-lens-root") }});
</script></body></html>
"""


# Characters that could end or change an inline <script> ("</script", "<!--", "<script") or a JavaScript line
# (U+2028, U+2029 before ES2019), written as JSON escapes: the parsed value is the same.
_SCRIPT_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def script_json(value: Any) -> str:
    """JSON of `value` that is safe inside an inline <script> whatever text it holds.

    Only JSON strings can hold these characters, and in a string each escape reads back as the character itself,
    so `JSON.parse` (or a JavaScript literal) gives `value` unchanged.
    """
    text = json.dumps(value)
    return text.translate(str.maketrans(_SCRIPT_ESCAPES))


def _plain(value: Any) -> Any:
    """A JSON-serialisable copy (tuples as lists), so states compare equal whatever their origin."""
    return json.loads(json.dumps(value))


def one_of(name: str, options: tuple[str, ...]) -> Callable[[Any, Any], str]:
    def check(_: Any, value: Any) -> str:
        if value not in options:
            raise ArgumentError(f"{name}={value!r} is not one of {list(options)}")
        return value

    return check


def boolean(name: str) -> Callable[[Any, Any], bool]:
    def check(_: Any, value: Any) -> bool:
        if not isinstance(value, bool):
            raise ArgumentError(f"{name} must be True or False, got {value!r}")
        return value

    return check


def number(name: str, *, low: float, high: float, integer: bool = False) -> Callable[[Any, Any], float]:
    def check(_: Any, value: Any) -> float:
        kind = int if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
            what = "an integer" if integer else "a number"
            raise ArgumentError(f"{name} must be {what} in [{low}, {high}], got {value!r}")
        return value

    return check
