"""LogitLensExplorer: the logit lens as an instrument in the browser.

The model runs once per prompt and read-out; the page gets every cell's top token and the top-k of the first
positions (about 0.2 MB for 30 layers x 300 positions x top-10), asks for the rest as it scrolls, hovers or
changes the colouring (`lens_data.answer`, through the widget's message channel), and answers hover, click,
zoom, stride and colouring by itself; a saved page carries all of it. The target, a colouring token and pinned
tokens are read from the residual streams that run kept (no new forward pass). With a tuned lens the "lens"
control switches between the logit lens and the tuned lens (a model run, like the read-out).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import traitlets

from ..errors import ArgumentError, UnknownAttributeError, did_you_mean
from ..model.protocols import LanguageModel
from ..validate import as_index
from .base import Control, Explorer, asset, boolean, number, one_of
from .lens_checks import check_pins, check_positions, check_selection
from .lens_data import LensRun, answer, frame, parse_target, payload, prompt_tokens, run_lens, spaced_hint, token_values

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from ..lens.tuned import TunedLens

READOUTS = ("resid_post", "resid_pre", "resid_mid")
LENSES = ("logit", "tuned")
METRICS = ("prob", "logit", "target_prob", "target_rank", "token_prob", "token_rank", "entropy", "kl")
# The cells' colour maps (matplotlib's, sampled in common.js); the difference view keeps its diverging map.
COLORMAPS = ("viridis", "magma", "cividis", "greys", "blues")
TRAJECTORY = ("prob", "rank")


def _check_prompt(explorer: Any, value: Any) -> Any:
    if isinstance(value, str):
        if not value:
            raise ArgumentError("prompt is empty; type a prompt")
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(m, dict) for m in value):
        if not all({"role", "content"} <= set(m) for m in value):
            raise ArgumentError('prompt: every chat message needs "role" and "content"')
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in value]
    raise ArgumentError(f'prompt must be a text or a list of {{"role", "content"}} messages, got {value!r}')


def _check_lens(explorer: Any, value: Any) -> str:
    one_of("lens", LENSES)(explorer, value)
    if value == "tuned":
        if explorer.tuned_lens is None:
            raise ArgumentError(
                'lens="tuned" needs a tuned lens: LogitLensExplorer(..., tuned_lens=ll.TunedLens.load(path))'
            )
        _check_translators(explorer.tuned_lens, explorer.model, explorer.readout)
    return value


def _check_readout(explorer: Any, value: Any) -> str:
    one_of("readout", READOUTS)(explorer, value)
    if explorer.lens == "tuned":
        _check_translators(explorer.tuned_lens, explorer.model, value)
    return value


def _check_translators(tuned_lens: TunedLens, model: LanguageModel, readout: str) -> None:
    """Raises ValueError, naming the read-out, where the tuned lens has no translator for one of its streams."""
    tuned_lens.translator(0, "embed")  # the first row of every read-out
    for layer in model.layer_indices:
        tuned_lens.translator(layer, readout)


def _check_compare(explorer: Any, value: Any) -> Any:
    return None if value is None or value == "" else _check_prompt(explorer, value)


def _check_token_box(name: str) -> Callable[[Any, Any], str]:
    def check(explorer: Any, value: Any) -> str:
        if not isinstance(value, str):
            raise ArgumentError(f"{name} takes a token's text (' Paris') or an id as '#1712', got {value!r}")
        parse_target(explorer.model, value)  # raises for a text that is not one token
        return value

    return check


class LogitLensExplorer(Explorer):
    """The logit lens of a prompt in the browser: hover, click, pin, colour, zoom, compare.

    Hover a cell for its read-out, position, token, the current metric and its top-k; click a cell for its
    top-k list; click a token there to pin its trajectory across read-outs (shift-click adds it to the last
    pin, whose line is the sum); click an input token to pin its position. `compare=` puts a second prompt
    (or `compare_model=` a second model) beside the first, on one colour scale, with a difference mode.

    Args:
        model: a HookedLlama with a tokenizer.
        prompt: a text, or chat messages [{"role", "content"}, ...] (through the tokenizer's chat template).
        target: the target token: its text (" Paris", with its leading space) or an id as "#1712".
        metric: the colouring, one of METRICS ("prob" of the top token, "logit" its raw logit (not normalised:
            how strongly a read-out predicts, on the scale of the logits shown), the target's or a chosen
            token's probability or rank, entropy, KL to the final read-out).
        colormap: the cells' colour map, one of COLORMAPS.
        readout: "resid_post", "resid_pre" or "resid_mid" (each with the embedding).
        top_k: top tokens kept per cell.
        compare: a second prompt shown beside the first (None: one panel).
        compare_model: a second model for the second panel (default `model`; the prompt is `compare` or
            `prompt`). Not with a tuned lens, which is trained for one model.
        tuned_lens: a `ll.TunedLens` trained for `model`: adds the logit/tuned switch.
        lens: "logit" or "tuned" (default: "tuned" when a tuned lens is given).
        state: a saved `.state` (or part of one) to start from; its keys win over the arguments above.
        threaded: run browser-driven work in a worker thread (default: when a kernel runs).
    """

    # The view, in parts with one job each (lens.js: the controls, heatmaps, tooltip and keys; lens_parts.js: the
    # data as it comes; lens_values.js: values and colours; lens_pins.js: top-k list and chart; lens_export.js).
    _esm = "".join(
        asset(name)
        for name in ("common.js", "lens_parts.js", "lens_values.js", "lens_pins.js", "lens_export.js", "lens.js")
    )
    _css = asset("widgets.css")

    CONTROLS = {
        "prompt": Control("recompute", _check_prompt, "the prompt (text or chat messages)"),
        "compare_prompt": Control("recompute", _check_compare, "the second panel's prompt, or None"),
        "readout": Control("recompute", _check_readout, "which residual streams are read out"),
        "lens": Control("recompute", _check_lens, '"logit", or "tuned" (through the tuned_lens= translators)'),
        "target": Control("update", _check_token_box("target"), "the target token (text or #id), '' for none"),
        "token": Control("update", _check_token_box("token"), "a token to colour by (text or #id)"),
        "pins": Control("update", check_pins, "pinned token groups, one chart line each"),
        "metric": Control("redraw", one_of("metric", METRICS), "what colours the cells"),
        "colormap": Control("redraw", one_of("colormap", COLORMAPS), "the cells' colour map"),
        "trajectory": Control("redraw", one_of("trajectory", TRAJECTORY), "the chart's y axis"),
        "pinned_positions": Control("redraw", check_positions, "input positions pinned"),
        "selection": Control("redraw", check_selection, "the clicked cell"),
        "stride": Control("redraw", number("stride", low=1, high=64, integer=True), "show every stride-th read-out"),
        "zoom": Control("redraw", number("zoom", low=6, high=160), "cell width in pixels"),
        "diff": Control("redraw", boolean("diff"), "colour by the first panel minus the second"),
    }

    prompt = traitlets.Any("").tag(sync=True)
    compare_prompt = traitlets.Any(None, allow_none=True).tag(sync=True)
    readout = traitlets.Unicode("resid_post").tag(sync=True)
    lens = traitlets.Unicode("logit").tag(sync=True)
    target = traitlets.Unicode("").tag(sync=True)
    token = traitlets.Unicode("").tag(sync=True)
    pins = traitlets.List([]).tag(sync=True)
    metric = traitlets.Unicode("prob").tag(sync=True)
    colormap = traitlets.Unicode("viridis").tag(sync=True)
    trajectory = traitlets.Unicode("prob").tag(sync=True)
    pinned_positions = traitlets.List([]).tag(sync=True)
    selection = traitlets.Dict({}).tag(sync=True)
    stride = traitlets.Int(1).tag(sync=True)
    zoom = traitlets.Float(36.0).tag(sync=True)
    diff = traitlets.Bool(False).tag(sync=True)

    # Data, computed in Python: panels per model run, the target's and token's values, the pins' lines.
    panels = traitlets.List([]).tag(sync=True)
    target_data = traitlets.Dict({}).tag(sync=True)
    token_data = traitlets.Dict({}).tag(sync=True)
    traces = traitlets.List([]).tag(sync=True)
    titles = traitlets.List([]).tag(sync=True)
    has_tuned_lens = traitlets.Bool(False).tag(sync=True)  # the page shows the lens switch only then

    def __init__(
        self,
        model: LanguageModel,
        prompt: str | Sequence[dict[str, str]] = "The Eiffel Tower is in the city of",
        *,
        target: str | int | None = None,
        metric: str = "prob",
        colormap: str = "viridis",
        readout: str = "resid_post",
        top_k: int = 10,
        compare: str | Sequence[dict[str, str]] | None = None,
        compare_model: LanguageModel | None = None,
        tuned_lens: TunedLens | None = None,
        lens: str | None = None,
        state: dict[str, Any] | None = None,
        threaded: bool | None = None,
    ) -> None:
        if not (hasattr(model, "run_with_cache") and hasattr(model, "cfg")):
            raise ArgumentError(f"LogitLensExplorer needs a HookedLlama, got {type(model).__name__}")
        if not list(model.layer_indices):
            raise ArgumentError("this model holds no layers; load at least one to use the lens")
        if compare_model is not None and compare_model.cfg.d_vocab != model.cfg.d_vocab:
            raise ArgumentError("compare_model= must share the vocabulary of model= (same d_vocab and tokenizer)")
        if tuned_lens is not None:
            if compare_model is not None:
                raise ArgumentError(
                    "compare_model= and tuned_lens= do not go together: a tuned lens is trained for one model; "
                    "compare prompts with compare= instead, or open one explorer per model"
                )
            tuned_lens.check_model(model)
        self.model = model
        self.compare_model = compare_model
        self.tuned_lens = tuned_lens
        self.top_k = int(top_k)
        self.runs: list[LensRun] = []
        self._run_id = 0  # names the runs a page's request is about
        super().__init__(threaded=threaded)
        self.on_msg(lambda _, request, buffers: self.send(answer(self.runs, self._run_id, request)))
        self.has_tuned_lens = tuned_lens is not None
        if isinstance(target, int) and not isinstance(target, bool):
            target = f"#{target}"
        if target is not None and not isinstance(target, str):
            raise ArgumentError(f"target= takes a token's text (' Paris') or an id, got {type(target).__name__}")
        if compare is None and compare_model is not None:
            compare = prompt
        self._quiet = True  # set before the first run, whose frame carries the metric's matrix
        self.metric = one_of("metric", METRICS)(self, metric)
        self._quiet = False
        self.state = {
            "prompt": prompt,
            "compare_prompt": compare,
            "readout": readout,
            "lens": lens or ("logit" if tuned_lens is None else "tuned"),
            "target": target or "",
            "metric": metric,
            "colormap": colormap,
        }
        if not self.runs:  # the state above equalled the defaults: nothing triggered the first run
            self._submit(self._recompute)
        if state:
            self.state = state
        self._attributes_fixed = True

    def __setattr__(self, name: str, value: Any) -> None:
        # A misspelt or invented setting (`lx.layr = 5`) would otherwise be a new attribute that changes nothing.
        if (
            self.__dict__.get("_attributes_fixed")
            and not name.startswith("_")
            and name not in self.__dict__
            and not hasattr(type(self), name)
        ):
            settings = sorted([*self.CONTROLS, "layer"])
            hint = f"its settings are {settings} (see .state)"
            raise UnknownAttributeError(
                f"{type(self).__name__} has no setting {name!r}{did_you_mean(name, settings, hint=hint)}"
            )
        super().__setattr__(name, value)

    @property
    def layer(self) -> int | None:
        """The layer of the selected cell, None when no cell is selected. Setting it selects that layer's
        read-out (of the current `readout`) at the selected position, or at the last one: `lx.layer = 5`."""
        if not self.selection or not self.runs:
            return None
        return self.runs[self.selection["panel"]].result.layers[self.selection["row"]]

    @layer.setter
    def layer(self, value: int) -> None:
        if not self.runs:
            raise ArgumentError("the lens has not run yet; set layer once it shows")
        panel = self.selection.get("panel", 0)
        result = self.runs[panel].result
        layer = as_index(value)
        loaded = list(self.model.layer_indices)
        if layer not in loaded:
            raise ArgumentError(f"layer must be a loaded layer ({loaded[0]}..{loaded[-1]}), got {value!r}")
        rows = [
            row for row, (at, kind) in enumerate(zip(result.layers, result.readouts)) if at == layer and kind != "embed"
        ]
        position = self.selection.get("position", result.positions[-1])
        self.selection = {"panel": panel, "row": rows[-1], "position": position}

    # ------------------------------------------------------------------ results
    @property
    def result(self) -> Any:
        """The LensResult of the first panel."""
        return self.runs[0].result

    @property
    def results(self) -> list[Any]:
        """The LensResult of every panel."""
        return [run.result for run in self.runs]

    @property
    def target_id(self) -> int | None:
        return parse_target(self.model, self.target)

    def to_frame(self) -> pd.DataFrame:
        """One row per panel x read-out x position: top token and probability, entropy, KL, and the target's
        probability and rank when there is a target (the table the CSV button saves)."""
        import pandas as pd

        frames = []
        for panel, run in enumerate(self.runs):
            frame = run.result.to_frame()
            frame.insert(0, "panel", panel)
            target_data = self._filled("target", ranks=True)
            if target_data.get("panels"):
                values = target_data["panels"][panel]
                frame["target"] = target_data["text"]
                frame["target_prob"] = values["probs"]
                frame["target_rank"] = values["ranks"]
            frames.append(frame)
        return pd.concat(frames, ignore_index=True)

    def save_csv(self, path: str | Path) -> Path:
        """Writes `to_frame()` as CSV; returns the path."""
        path = Path(path)
        self.to_frame().to_csv(path, index=False)
        return path

    def page_state(self) -> dict[str, Any]:
        # A saved page has no kernel to rank a token when its colouring switches to a rank: it carries the ranks.
        status = self.status
        for which in ("target", "token"):
            self._fill_ranks(which, lambda: None)
        self.status = status
        return super().page_state() | {"panels": [self.full_panel(panel) for panel in range(len(self.runs))]}

    def full_panel(self, panel: int = 0) -> dict[str, Any]:
        """All of a panel's data (every cell's top-k, every metric), as a saved page carries it; the live page
        starts from less (`lens_data.frame`) and asks for the rest."""
        return payload(self.runs[panel])

    def to_figure(self, panel: int = 0) -> Figure:
        """The matplotlib heatmap of one panel, coloured by the current metric (`ll.plot.lens_heatmap`)."""
        result = self._result_with_token(panel)
        # The target's or the colouring token's values are filled in as the LensResult's target.
        # The static plot has no raw-logit colouring: a "logit" page pictures the top token's probability.
        metric = {"token_prob": "target_prob", "target_rank": "rank", "token_rank": "rank", "logit": "prob"}.get(
            self.metric, self.metric
        )
        if metric in ("target_prob", "rank") and result.target_ids is None:
            metric = "prob"  # no token chosen yet: the top token's probability
        n_cells = result.n_readouts * len(result.positions)
        return result.plot(metric, annotate=n_cells <= 1500, max_figsize=(16.0, 12.0))

    def _result_with_token(self, panel: int) -> Any:
        """The panel's LensResult with the target (or the colouring token) filled in as its target."""
        run = self.runs[panel]
        which = "token" if self.metric.startswith("token") else "target"
        data = self._filled(which, ranks=self.metric.endswith("rank"))
        if not data.get("panels"):
            return run.result
        n_readouts, n_pos = run.logsumexp.shape
        probs = torch.tensor(data["panels"][panel]["probs"]).reshape(n_readouts, n_pos)
        ranks = data["panels"][panel]["ranks"]
        ranks = torch.zeros_like(probs, dtype=torch.long) if ranks is None else torch.tensor(ranks).reshape(probs.shape)
        inputs = dataclasses.replace(
            run.result.inputs, target_ids=torch.tensor([[data["id"]]]), target_strs=[[data["text"]]]
        )
        return dataclasses.replace(
            run.result,
            inputs=inputs,
            target_probs=probs[None, :, :, None],
            target_logits=(probs.log() + run.logsumexp)[None, :, :, None],
            target_ranks=ranks[None, :, :, None],
        )

    def _filled(self, which: str, *, ranks: bool) -> dict[str, Any]:
        """target_data or token_data, with the ranks computed first when asked for and missing."""
        if ranks:
            self._fill_ranks(which, lambda: None)
        return self.target_data if which == "target" else self.token_data

    # ------------------------------------------------------------------ computing
    def _panel_model(self, panel: int) -> Any:
        return self.compare_model if panel == 1 and self.compare_model is not None else self.model

    def _token_text(self, token_id: int) -> str:
        tokenizer = self.model.tokenizer
        return tokenizer.token_strs([token_id])[0] if tokenizer is not None else f"#{token_id}"

    def _recompute(self, check: Callable[[], None]) -> None:
        prompts = [self.prompt] if self.compare_prompt is None else [self.prompt, self.compare_prompt]
        runs = []
        for panel, prompt in enumerate(prompts):
            model = self._panel_model(panel)
            tokens = prompt_tokens(model, prompt)
            what = f"panel {panel + 1}: " if len(prompts) > 1 else ""

            def progress(done: int, total: int) -> None:
                self.status = f"{what}running {tokens.shape[1]} tokens: layer {done} / {total}…"

            tuned = self.tuned_lens if self.lens == "tuned" else None
            options = dict(readout=self.readout, top_k=self.top_k, check=check, progress=progress, lens=tuned)
            runs.append(run_lens(model, tokens, **options))
        check()
        self._run_id += 1  # first: a request read with the new runs but the old id is answered as stale
        self.runs = runs
        with self.hold_sync():
            self.panels = [frame(run, run_id=self._run_id, metric=self.metric) for run in runs]
            self.titles = [self._title(panel, prompt) for panel, prompt in enumerate(prompts)]
            self._quiet = True
            try:  # places that the new prompt may not have
                self.selection, self.pins, self.pinned_positions = {}, [], []
            finally:
                self._quiet = False
            self.traces = []
            self._update(["target", "token"], check)
            seconds = sum(run.seconds for run in runs)
            n = [len(run.result.positions) for run in runs]
            readouts = runs[0].result.n_readouts
            self.status = (
                f"{' + '.join(map(str, n))} tokens, {readouts} read-outs, {self.lens} lens, in {seconds:.2f} s"
            )
        self._data_changed()

    def _title(self, panel: int, prompt: Any) -> str:
        model = self._panel_model(panel)
        name = getattr(model.cfg, "name", None) or ("model 2" if model is self.compare_model else "model")
        text = prompt if isinstance(prompt, str) else " | ".join(m["content"] for m in prompt)
        return f"{name}, {self.lens} lens: {text[:80]}"

    def _react(self, kinds: set[str], names: list[str]) -> None:
        super()._react(kinds, names)
        # Ranks cost a sweep over the vocabulary at every cell, so they are computed when a rank colouring
        # first asks for them.
        which = self.metric.split("_")[0]
        if "metric" in names and self.metric.endswith("rank") and _missing_ranks(self._data(which)):
            self._submit(lambda check: self._fill_ranks(which, check))

    def _data(self, which: str) -> dict[str, Any]:
        return self.target_data if which == "target" else self.token_data

    def _update(self, names: list[str], check: Callable[[], None]) -> None:
        if not self.runs:
            return
        if "target" in names:
            ranks = self.metric == "target_rank"
            self.target_data = self._token_data(self.target, check, hint=True, ranks=ranks)
        if "token" in names:
            self.token_data = self._token_data(self.token, check, hint=False, ranks=self.metric == "token_rank")
        if "target" in names or "token" in names or "pins" in names:
            self.traces = [self._trace(group) for group in self.pins]

    def _fill_ranks(self, which: str, check: Callable[[], None]) -> None:
        data = self._data(which)
        if not _missing_ranks(data):
            return
        self.status = f"ranking the {which} at every cell…"
        panels = []
        for panel, (run, values) in enumerate(zip(self.runs, data["panels"])):
            check()
            ranks = token_values(self._panel_model(panel), run, token_id=data["id"])[1]
            panels.append({**values, "ranks": ranks.reshape(-1).tolist()})
        filled = {**data, "panels": panels}
        if which == "target":
            self.target_data = filled
        else:
            self.token_data = filled
        self.status = f"ranked the {which} ({data['text']!r})"

    def _token_data(self, box: str, check: Callable[[], None], *, hint: bool, ranks: bool) -> dict[str, Any]:
        token_id = parse_target(self.model, box) if box else None
        suggestion = None
        if hint and box and self.model.tokenizer is not None:
            suggestion = spaced_hint(self.model, self.runs[0], text=box, token_id=token_id)
        if token_id is None:
            return {"hint": suggestion} if suggestion else {}
        panels = []
        for panel, run in enumerate(self.runs):
            check()
            probs, rank_values = token_values(self._panel_model(panel), run, token_id=token_id, ranks=ranks)
            rank_list = None if rank_values is None else rank_values.reshape(-1).tolist()
            panels.append({"probs": _round(probs.reshape(-1)), "ranks": rank_list})
        return {"id": token_id, "text": self._token_text(token_id), "panels": panels, "hint": suggestion}

    def _trace(self, group: dict[str, Any]) -> dict[str, Any]:
        """A pin's line: the summed probability of its tokens, and their best rank, at every read-out."""
        panel = group["panel"]
        run = self.runs[panel]
        column = run.result.positions.index(group["position"])
        total, best = None, None
        for token_id in group["ids"]:
            probs, ranks = token_values(self._panel_model(panel), run, token_id=token_id, positions=[column])
            total = probs[:, 0] if total is None else total + probs[:, 0]
            best = ranks[:, 0] if best is None else torch.minimum(best, ranks[:, 0])
        texts = [self._token_text(i) for i in group["ids"]]
        return {**group, "texts": texts, "probs": _round(total.clamp(max=1.0)), "ranks": best.tolist()}


def _missing_ranks(data: dict[str, Any]) -> bool:
    return bool(data.get("panels")) and any(values["ranks"] is None for values in data["panels"])


def _round(values: torch.Tensor, digits: int = 5) -> list[float]:
    return [round(v, digits) for v in values.float().tolist()]
