"""FeatureExplorer: the feature lens as an instrument in the browser.

The model runs once per prompt and target (`ll.feature_lens`); the page gets every site's top features at
every position, packed (feature_data.py: about 1 MB for 30 sites x 300 positions x top-10), and draws a
site x position grid. Hovering a cell shows its top features with their read-out tokens and DLA; clicking a
cell lists them, and clicking one of them (or Enter) follows that feature: the cells of its site where it is
among the top features are outlined and listed. Everything after the model run happens in the browser.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import traitlets

from ..errors import ArgumentError
from ..features.lens import feature_lens
from ..features.lens_result import FeatureLensResult
from .base import Control, Explorer, asset, number, one_of
from .feature_data import pack

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from ..dictionaries.dictionary import Dictionary

METRICS = ("activation", "dla", "l0")


def _check_prompt(explorer: Any, value: Any) -> str:
    if explorer.model is None:
        raise ArgumentError("this explorer shows a fixed result; build it from a model to change the prompt")
    if not isinstance(value, str) or not value:
        raise ArgumentError(f"prompt must be a non-empty text, got {value!r}")
    return value


def _check_target(explorer: Any, value: Any) -> str:
    if explorer.model is None:
        raise ArgumentError("this explorer shows a fixed result; build it from a model to change the target")
    if not isinstance(value, str):
        raise ArgumentError(f"target takes a token's text (' Paris') or an id as '#1712', got {value!r}")
    return value


def _check_cell(explorer: Any, value: Any) -> dict[str, int]:
    if value == {}:
        return {}
    if not isinstance(value, dict) or set(value) != {"site", "position"}:
        raise ArgumentError(f'selection is {{"site": s, "position": p}} or {{}}, got {value!r}')
    result = explorer.result
    if not isinstance(value["site"], int) or not 0 <= value["site"] < len(result.sites):
        raise ArgumentError(f"selection site {value['site']!r} is out of range: there are {len(result.sites)} sites")
    if value["position"] not in result.positions:
        raise ArgumentError(f"selection position {value['position']!r} was not read; positions are {result.positions}")
    return {"site": value["site"], "position": value["position"]}


def _check_feature(explorer: Any, value: Any) -> dict[str, int]:
    if value == {}:
        return {}
    if not isinstance(value, dict) or set(value) != {"site", "feature"}:
        raise ArgumentError(f'feature is {{"site": s, "feature": f}} or {{}}, got {value!r}')
    result = explorer.result
    if not isinstance(value["site"], int) or not 0 <= value["site"] < len(result.sites):
        raise ArgumentError(f"feature site {value['site']!r} is out of range: there are {len(result.sites)} sites")
    if not (result.feature_ids[value["site"]] == value["feature"]).any():
        raise ArgumentError(
            f"feature {value['feature']!r} is not among the top features of site {result.labels[value['site']]!r}"
        )
    return {"site": value["site"], "feature": int(value["feature"])}


class FeatureExplorer(Explorer):
    """The feature lens of a prompt in the browser: a site x position grid, hover for a cell's top features
    (read-out tokens and DLA), click a feature to see where it fires; arrow keys move the selected cell and
    Enter follows its top feature.

    Args:
        model_or_result: a FeatureLensResult (`ll.feature_lens(...)`, fixed), or a HookedLlama with a tokenizer
            (then `dictionaries` too; the prompt and target can be changed from the page).
        prompt: the prompt (model only).
        dictionaries: the dictionaries to read (model only).
        target: the target token (model only): its text or an id as "#1712"; "" for none.
        top_k: features per site and position (model only).
        n_readout: read-out tokens shown per feature.
        metric: what colours the cells, one of METRICS.
        threaded: run browser-driven work in a worker thread (default: when a kernel runs).
    """

    _esm = asset("common.js") + asset("features.js")
    _css = asset("widgets.css")

    CONTROLS = {
        "prompt": Control("recompute", _check_prompt, "the prompt (model only)"),
        "target": Control("recompute", _check_target, "the target token (text or #id), '' for none (model only)"),
        "metric": Control("redraw", one_of("metric", METRICS), "what colours the cells"),
        "selection": Control("redraw", _check_cell, "the clicked cell {site, position}"),
        "feature": Control("redraw", _check_feature, "the followed feature {site, feature}"),
        "zoom": Control("redraw", number("zoom", low=2, high=120), "cell width in pixels"),
    }

    prompt = traitlets.Unicode("").tag(sync=True)
    target = traitlets.Unicode("").tag(sync=True)
    metric = traitlets.Unicode("activation").tag(sync=True)
    selection = traitlets.Dict({}).tag(sync=True)
    feature = traitlets.Dict({}).tag(sync=True)
    zoom = traitlets.Float(0.0).tag(sync=True)  # 0: fit the positions in about 900 px
    live = traitlets.Bool(False).tag(sync=True)  # a model behind it: the prompt and target boxes work

    meta = traitlets.Dict({}).tag(sync=True)
    payload = traitlets.Bytes(b"").tag(sync=True)  # feature_data.pack's deflated arrays

    def __init__(
        self,
        model_or_result: Any,
        prompt: str | None = None,
        dictionaries: Dictionary | Iterable[Dictionary] | None = None,
        *,
        target: str | int | None = None,
        top_k: int = 10,
        n_readout: int = 3,
        metric: str = "activation",
        threaded: bool | None = None,
    ) -> None:
        self.n_readout = n_readout
        self.top_k = top_k
        if isinstance(model_or_result, FeatureLensResult):
            if prompt is not None or dictionaries is not None or target is not None:
                raise ArgumentError("prompt=, dictionaries= and target= are for a model; this is a fixed result")
            self.model, self.dictionaries, self.result = None, None, model_or_result
        elif hasattr(model_or_result, "run_with_cache") and hasattr(model_or_result, "cfg"):
            if dictionaries is None or prompt is None:
                raise ArgumentError("FeatureExplorer(model, prompt, dictionaries): a model needs both")
            self.model, self.dictionaries, self.result = model_or_result, dictionaries, None
        else:
            raise ArgumentError(
                f"FeatureExplorer takes a FeatureLensResult or a HookedLlama, got {type(model_or_result).__name__}"
            )
        super().__init__(threaded=threaded)
        self.live = self.model is not None
        if isinstance(target, int) and not isinstance(target, bool):
            target = f"#{target}"
        self._quiet = True
        try:
            self.metric = one_of("metric", METRICS)(self, metric)
            if self.model is not None:
                self.prompt, self.target = prompt, target or ""
        finally:
            self._quiet = False
        if self.model is not None:
            self._submit(self._recompute)
        else:
            self._ship()

    # ------------------------------------------------------------------ reading
    def to_frame(self) -> pd.DataFrame:
        """The result's table (`FeatureLensResult.to_frame()`)."""
        return self.result.to_frame()

    def save_csv(self, path: str | Path) -> Path:
        """Writes `to_frame()` as CSV; returns the path."""
        path = Path(path)
        self.to_frame().to_csv(path, index=False)
        return path

    def to_figure(self) -> Figure:
        """The matplotlib heatmap of the result, coloured by the current metric (DLA needs a target)."""
        metric = "activation" if self.metric == "dla" and self.result.dla is None else self.metric
        n_cells = len(self.result.sites) * len(self.result.positions)
        return self.result.plot(metric, annotate=n_cells <= 1500)

    def page_state(self) -> dict[str, Any]:
        state = super().page_state()
        state["payload"] = base64.b64encode(self.payload).decode("ascii")  # the page decodes it
        return state

    # ------------------------------------------------------------------ computing
    def _recompute(self, check: Callable[[], None]) -> None:
        target: str | int | None = self.target or None
        if isinstance(target, str) and target.startswith("#") and target[1:].isdigit():
            target = int(target[1:])
        self.status = "running the model…"
        result = feature_lens(self.model, self.prompt, self.dictionaries, target=target, top_k=self.top_k)
        check()
        self.result = result
        self._quiet = True
        try:  # places the new prompt may not have
            self.selection, self.feature = {}, {}
        finally:
            self._quiet = False
        self._ship()

    def _ship(self) -> None:
        meta, data = pack(self.result, n_readout=self.n_readout)
        with self.hold_sync():
            self.meta, self.payload = meta, data
            n_sites, n_pos = len(self.result.sites), len(self.result.positions)
            self.status = f"{n_sites} sites x {n_pos} positions, top {self.result.top_k} ({len(data) / 1e3:.0f} kB)"
        self._data_changed()
