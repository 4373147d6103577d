"""ipywidgets explorers: the logit lens and attention patterns, redrawn as their controls move.

Both explorers are `ipywidgets.VBox`es whose state can be read and set from code (`.prompt`, `.layer`,
`.head`, ...; `.figure` is the last matplotlib Figure, `.table` the last pandas table), so they work in tests
and scripts as well as in JupyterLab, Notebook and VS Code. The figure is shown as PNG bytes in an
`ipywidgets.Image`: no JavaScript beyond ipywidgets' own, nothing fetched at render time.

Where no widget front-end runs (nbconvert to HTML, GitHub's viewer), the display falls back to a picture:
`_repr_mimebundle_` carries an image/png of the current figure next to the widget view, and front-ends that
cannot draw the view draw the PNG.

    ll.widgets.AttentionExplorer(model, "When Mary and John went to the store, John gave a drink to")
    ll.widgets.LogitLensExplorer(model, "The Eiffel Tower is in the city of", target=" Paris")
"""

from __future__ import annotations

import base64
import html
import io
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets
import torch

from . import plot_attention
from .errors import LlamaLensError

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

DEFAULT_PROMPT = "When Mary and John went to the store, John gave a drink to"
# Bytes of attention patterns AttentionExplorer keeps for every layer at once. Patterns grow with the square
# of the prompt: SmolLM2-135M's 30 layers x 9 heads take 1,080 MiB at 1,024 tokens in float32, 4,320 MiB at 2,048.
ATTENTION_CACHE_BUDGET = 256 * 2**20


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """The figure rendered to PNG bytes (through the Agg canvas; pyplot is not involved)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _is_model(obj: Any) -> bool:
    return hasattr(obj, "run_with_cache") and hasattr(obj, "cfg")


class _Explorer(widgets.VBox):
    """Shared plumbing: the figure image, the status line, batched updates and the static fallback."""

    # Least seconds between two progress updates of the status line during a forward pass. Each update is a
    # message to the front end; a prompt that computes faster than this shows none.
    PROGRESS_INTERVAL = 0.25

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._figure: Figure | None = None
        self._png = b""
        self._table: pd.DataFrame | None = None
        self.error: str | None = None
        self._error_stage: str | None = None  # "compute" or "draw": which step the error came from
        self._last_status = ""
        self._held = 0
        self._pending: set[str] = set()
        self._image = widgets.Image(format="png", layout=widgets.Layout(max_width="100%", height="auto"))
        self._status = widgets.HTML()

    # ------------------------------------------------------------------ state readable from code
    @property
    def figure(self) -> Figure | None:
        """The matplotlib Figure shown now."""
        return self._figure

    @property
    def table(self) -> pd.DataFrame | None:
        """The table shown under the figure."""
        return self._table

    @property
    def status(self) -> str:
        """The status line as plain text."""
        return html.unescape(_strip_tags(self._status.value))

    @property
    def png(self) -> bytes:
        """The figure shown now, as PNG bytes."""
        return self._png

    @contextmanager
    def hold(self) -> Iterator[_Explorer]:
        """Changes made inside `with explorer.hold():` recompute and redraw once, at the end."""
        self._held += 1
        try:
            yield self
        finally:
            self._held -= 1
            if not self._held:
                self._flush()

    # ------------------------------------------------------------------ updates
    def _request(self, what: str) -> None:
        """Asks for "compute" (new activations, then a redraw) or "draw"; runs now unless held."""
        self._pending.add(what)
        if not self._held:
            self._flush()

    def _flush(self, *, raise_errors: bool = False) -> None:
        pending, self._pending = self._pending, set()
        if not pending:
            return
        self._held += 1  # control changes made while updating (slider ranges) must not re-enter
        stage = "compute"
        try:
            if "compute" in pending:
                self._compute()
                self._error_stage = self.error = None
            stage = "draw"
            self._draw()
            if self._error_stage == "draw":
                # The figure is back; an earlier bad prompt's error (stage "compute") still stands.
                self._error_stage = self.error = None
                self._set_status(self._last_status)
        except (LlamaLensError, ValueError) as error:
            if raise_errors:
                raise
            # A bad prompt or target typed into a box: say so on the status line, keep the last figure.
            message = str(error)
            self.error, self._error_stage = message, stage
            self._set_status(f"error: {message}", error=True, remember=False)
        finally:
            self._held -= 1
            # Controls adjusted while updating (slider ranges) asked for a redraw that has just happened.
            self._pending.clear()

    def _compute(self) -> None:
        raise NotImplementedError

    def _draw(self) -> None:
        raise NotImplementedError

    def _show(self, fig: Figure) -> None:
        self._figure = fig
        self._png = figure_png(fig)
        self._image.value = self._png

    @contextmanager
    def _progress(self, model: Any, layers: Sequence[int], text: str, after: str | None = None) -> Iterator[None]:
        """While the block runs `model` forward, the status line says "{text}: layer i / n" as each of `layers`
        finishes, then `after` (the work left once the last layer is done), at most once per PROGRESS_INTERVAL."""
        self._set_status(f"{text}…")
        names = [f"blocks.{i}.hook_resid_post" for i in layers]
        done = 0
        last = time.perf_counter()

        def report(tensor: torch.Tensor, *, hook: Any) -> None:
            nonlocal done, last
            done += 1
            now = time.perf_counter()
            if now - last < self.PROGRESS_INTERVAL:
                return
            last = now
            step = after if after is not None and done == len(names) else f"layer {done} / {len(names)}"
            self._set_status(f"{text}: {step}…")

        with model.hooks([(names, report)]):
            yield

    def _set_status(self, text: str, *, error: bool = False, remember: bool = True) -> None:
        if remember:
            self._last_status = text
        colour = "#b00020" if error else "#555"
        self._status.value = f'<span style="color:{colour}">{html.escape(text)}</span>'

    # ------------------------------------------------------------------ display without a widget front-end
    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any] | None:
        bundle = super()._repr_mimebundle_(**kwargs)
        bundle = dict(bundle or {})
        if self._png:
            # Front-ends that cannot draw the widget view (nbconvert HTML without widget state, GitHub) draw this.
            bundle["image/png"] = base64.b64encode(self._png).decode("ascii")
        return bundle

    def _repr_png_(self) -> bytes | None:
        return self._png or None


# ================================================================================================ attention
class AttentionExplorer(_Explorer):
    """Attention patterns of a prompt, one head or all heads of a layer, with a query row highlighted.

    Controls: the prompt (when built from a model), layer and head sliders, "all heads", "scores"
    (pre-softmax), and query / key position sliders; the read-out under the figure names the query and key
    tokens and the weight between them, and the table lists the keys the query attends to most.

    Cells are picked with the query and key sliders, not the mouse: the figure is a PNG in an
    `ipywidgets.Image`, which sends no mouse events back to Python, so hovering over or clicking the heatmap
    does nothing.

    Args:
        model_or_cache: a HookedLlama (with a tokenizer, to type prompts), or an ActivationCache / dict /
            (logits, cache) pair holding `blocks.{i}.attn.hook_pattern`.
        prompt: the prompt to start with (model only; default: a sentence with a name to copy).
        tokens: text of each position, for a cache (`model.to_str_tokens(tokens)`); positions are numbered
            when omitted.
        layer: the layer to start on (default: the first held).
        head: the head to start on; None starts with all heads.
        prompt_index: which prompt of a cached batch to show.
        attention_mask: [batch, pos] 1 for real tokens, 0 for padding, for a cache of a padded batch (as
            `model.prepare_tokens` returns it): the prompt's padding is not drawn, nor offered by the sliders.
        max_positions: show only the last `max_positions` positions (long prompts).
        cache_budget: bytes of attention patterns to keep (model only). While every layer's patterns fit,
            all are kept and moving the layer slider only redraws; past it only the shown layer's are
            computed (the forward stops after that layer) and moving the layer slider reruns the model.
    """

    def __init__(
        self,
        model_or_cache: Any,
        prompt: str | None = None,
        *,
        tokens: Sequence[str] | None = None,
        layer: int | None = None,
        head: int | None = 0,
        prompt_index: int = 0,
        attention_mask: torch.Tensor | None = None,
        max_positions: int | None = None,
        cache_budget: int = ATTENTION_CACHE_BUDGET,
    ) -> None:
        super().__init__()
        self._model = model_or_cache if _is_model(model_or_cache) else None
        if self._model is not None and attention_mask is not None:
            raise ValueError("attention_mask= is for a cache of a padded batch; a typed prompt has no padding")
        self._attention_mask = attention_mask
        self._max_positions = max_positions
        self._cache_budget = cache_budget
        self._prompt_index = prompt_index
        self._past = 0  # cached keys before the first query (a KV-cache step); 0 for a whole prompt
        self._shown_tokens: list[str] | None = None  # the tokens the position sliders were set up for
        self._cache: Any = None
        self._tokens: list[str] | None = None
        if self._model is None:
            if prompt is not None:
                raise ValueError("prompt= needs a model; for a cache, pass tokens= (the text of each position)")
            self._cache = plot_attention.as_cache(model_or_cache)
            layers = plot_attention.attention_layers(self._cache)
            if not layers:
                plot_attention.attention_pattern(self._cache, 0)  # raises: says how to cache patterns
            n_heads = plot_attention.attention_pattern(self._cache, layers[0]).shape[1]
            self._tokens = None if tokens is None else list(tokens)
        else:
            layers = list(self._model.layer_indices)
            n_heads = self._model.cfg.n_heads

        self._prompt = widgets.Text(
            value=(prompt if prompt is not None else DEFAULT_PROMPT) if self._model is not None else "",
            placeholder="type a prompt and press Enter" if self._model is not None else "(a fixed cache)",
            description="prompt",
            continuous_update=False,
            disabled=self._model is None,
            layout=widgets.Layout(width="95%"),
        )
        start_layer = layers[0] if layer is None else layer
        if start_layer not in layers:
            raise ValueError(f"layer={layer} is not held; choose one of {layers}")
        if head is not None and not 0 <= head < n_heads:
            raise ValueError(f"head={head} is out of range: there are {n_heads} heads (0..{n_heads - 1})")
        self._layer = widgets.SelectionSlider(
            options=[(str(i), i) for i in layers], value=start_layer, description="layer"
        )
        self._head = widgets.IntSlider(value=head or 0, min=0, max=n_heads - 1, description="head")
        self._all_heads = widgets.Checkbox(value=head is None, description="all heads", indent=False)
        self._scores = widgets.Checkbox(value=False, description="scores (pre-softmax)", indent=False)
        self._query = widgets.IntSlider(value=0, min=0, max=0, description="query")
        self._key = widgets.IntSlider(value=0, min=0, max=0, description="key")
        self._readout = widgets.HTML()
        self._table_html = widgets.HTML()

        # One observer per control, so that each change redraws once (see _on_head and _on_query).
        self._prompt.observe(lambda _: self._request("compute"), names="value")
        for control in (self._layer, self._scores):
            control.observe(lambda _: self._request("compute" if self._needs_forward() else "draw"), names="value")
        for control in (self._all_heads, self._key):
            control.observe(lambda _: self._request("draw"), names="value")
        self._head.observe(self._on_head, names="value")
        self._query.observe(self._on_query, names="value")

        self.children = [
            self._prompt,
            widgets.HBox([self._layer, self._head, self._all_heads, self._scores]),
            widgets.HBox([self._query, self._key]),
            self._status,
            self._image,
            self._readout,
            self._table_html,
        ]
        # Bad arguments in code raise here; bad input typed later shows on the status line.
        self._pending.add("compute")
        self._flush(raise_errors=True)

    # ------------------------------------------------------------------ state
    @property
    def prompt(self) -> str:
        """The prompt text (a model explorer only)."""
        return self._prompt.value

    @prompt.setter
    def prompt(self, text: str) -> None:
        if self._model is None:
            raise ValueError("this explorer shows a fixed cache; build it from a model to change the prompt")
        self._prompt.value = text

    @property
    def layer(self) -> int:
        return self._layer.value

    @layer.setter
    def layer(self, value: int) -> None:
        options = [i for _, i in self._layer.options]
        if value not in options:
            raise ValueError(f"layer={value} is not held; choose one of {options}")
        self._layer.value = value

    @property
    def head(self) -> int | None:
        """The head shown, or None when all heads are."""
        return None if self._all_heads.value else self._head.value

    @head.setter
    def head(self, value: int | None) -> None:
        if value is None:
            self._all_heads.value = True
            return
        if not 0 <= value <= self._head.max:
            raise ValueError(f"head={value} is out of range: there are {self._head.max + 1} heads")
        with self.hold():
            self._head.value = value
            self._all_heads.value = False

    @property
    def scores(self) -> bool:
        """Whether the pre-softmax scores are shown instead of the pattern."""
        return self._scores.value

    @scores.setter
    def scores(self, value: bool) -> None:
        self._scores.value = bool(value)

    @property
    def query(self) -> int:
        """The query position whose row is highlighted."""
        return self._query.value

    @query.setter
    def query(self, value: int) -> None:
        self._set_position(self._query, value, "query")

    @property
    def key(self) -> int:
        """The key position whose weight the read-out shows."""
        return self._key.value

    @key.setter
    def key(self, value: int) -> None:
        self._set_position(self._key, value, "key")

    @property
    def controls(self) -> dict[str, widgets.Widget]:
        """The input widgets by name, to drive them as a user would (e.g. `controls["layer"].value = 2`)."""
        return {
            "prompt": self._prompt,
            "layer": self._layer,
            "head": self._head,
            "all_heads": self._all_heads,
            "scores": self._scores,
            "query": self._query,
            "key": self._key,
        }

    @property
    def tokens(self) -> list[str] | None:
        """Text of each position (None for a cache given without tokens)."""
        return self._tokens

    @property
    def cache(self) -> Any:
        """The activations the figures are drawn from."""
        return self._cache

    @property
    def readout(self) -> str:
        """The read-out line as plain text."""
        return html.unescape(_strip_tags(self._readout.value))

    def _set_position(self, slider: widgets.IntSlider, value: int, name: str) -> None:
        if not slider.min <= value <= slider.max:
            raise ValueError(f"{name}={value} is out of range {slider.min}..{slider.max}")
        slider.value = value

    # ------------------------------------------------------------------ updates
    def _needs_forward(self) -> bool:
        """Whether the cache lacks the shown layer's pattern, or its scores when they are shown: scores are
        cached only once someone asks for them, and past the cache budget only one layer is cached."""
        if self._model is None:
            return False
        return any(f"blocks.{self._layer.value}.{hook}" not in self._cache for hook in self._hooks_shown())

    def _hooks_shown(self) -> tuple[str, ...]:
        if self._scores.value:
            return (plot_attention.PATTERN_HOOK, plot_attention.SCORES_HOOK)
        return (plot_attention.PATTERN_HOOK,)

    def _on_head(self, change: dict) -> None:
        # Held, so that leaving "all heads" (whose observer asks for a draw too) and showing the head draw once.
        with self.hold():
            self._all_heads.value = False
            self._request("draw")

    def _on_query(self, change: dict) -> None:
        # Keys after the query are masked; keep the key slider to what the query can see. Held, because that
        # can clamp the key, whose observer asks for a draw too.
        with self.hold():
            self._key.max = change["new"] + self._past
            self._request("draw")

    def _compute(self) -> None:
        if self._model is not None:
            self._run_model()
        else:
            self._set_status("")
        pattern = plot_attention.attention_pattern(self._cache, self._layer.value)
        batch, _, q_pos, k_pos = pattern.shape
        if not 0 <= self._prompt_index < batch:
            raise ValueError(
                f"prompt_index={self._prompt_index} is out of range: the cache holds {batch} prompts (0..{batch - 1})"
            )
        if self._tokens is not None and len(self._tokens) != k_pos:
            raise ValueError(f"tokens= has {len(self._tokens)} entries but the cache covers {k_pos} positions")
        self._past = k_pos - q_pos
        first = 0 if self._max_positions is None else max(0, q_pos - self._max_positions)
        first_key = 0
        if self._attention_mask is not None:  # a left-padded prompt: its real tokens are the last ones
            real = plot_attention._checked_mask(self._attention_mask, pattern)[self._prompt_index]
            if not real.any():
                raise ValueError(f"prompt {self._prompt_index} is all padding in attention_mask")
            first_key = int(real.int().argmax())
            first = max(first, first_key - self._past)
        # A new prompt starts on its last query; recomputing the same prompt (to add scores) keeps the place.
        same_prompt = self._shown_tokens == self._tokens and self._tokens is not None
        query = self._query.value if same_prompt else q_pos - 1
        # Widen before narrowing so the slider never holds min > max.
        self._query.max = max(self._query.max, q_pos - 1)
        self._query.min = first
        self._query.max = q_pos - 1
        self._query.value = min(max(query, first), q_pos - 1)
        self._key.max = self._query.value + self._past
        self._key.min = first_key
        self._key.value = max(self._key.value, first_key)
        self._shown_tokens = self._tokens

    def _run_model(self) -> None:
        """Caches the prompt's attention patterns (and scores, when shown): every layer's while they fit in the
        cache budget, else the shown layer's only."""
        tokens = self._model.to_tokens(self._prompt.value)  # [1, pos]
        n_tokens = tokens.shape[1]
        hooks = self._hooks_shown()
        loaded = list(self._model.layer_indices)
        # Patterns and scores have the activations' dtype: [1, n_heads, pos, pos] per hook and layer.
        layer_bytes = len(hooks) * self._model.cfg.n_heads * n_tokens**2 * self._model.embed.weight.element_size()
        every_layer = layer_bytes * len(loaded) <= self._cache_budget
        layer = self._layer.value
        kept = loaded if every_layer else [layer]
        run = loaded if every_layer else [i for i in loaded if i <= layer]
        names = [f"blocks.{i}.{hook}" for i in kept for hook in hooks]
        started = time.perf_counter()
        with torch.no_grad(), self._progress(self._model, run, f"running the model on {n_tokens} tokens"):
            # Past the budget, the layers after the shown one are not needed: stop the forward there.
            stop = None if every_layer else layer + 1
            self._cache = self._model.run_with_cache(tokens, names_filter=names, stop_at_layer=stop)[1]
        self._tokens = self._model.to_str_tokens(tokens[0])
        self._prompt_index = 0
        seconds = time.perf_counter() - started
        if every_layer:
            self._set_status(f"{n_tokens} tokens, {len(loaded)} layers in {seconds:.2f} s")
        else:
            self._set_status(
                f"{n_tokens} tokens, layer {layer} in {seconds:.2f} s (one layer at a time: all {len(loaded)} "
                f"would take {_mib(layer_bytes * len(loaded))}, over the cache budget of {_mib(self._cache_budget)})"
            )

    def _draw(self) -> None:
        import pandas as pd

        head = self.head
        fig = plot_attention.attention(
            self._cache,
            self._layer.value,
            head,
            tokens=self._tokens,
            prompt=self._prompt_index,
            attention_mask=self._attention_mask,
            scores=self._scores.value,
            max_positions=self._max_positions,
            query=self._query.value,
            key=self._key.value,
        )
        self._show(fig)

        # The query's row of the pattern (weights, whatever the figure shows), for the read-out and table.
        query, key = self._query.value, self._key.value
        pattern = plot_attention.attention_pattern(self._cache, self._layer.value)[self._prompt_index]
        row = pattern[:, query].detach().float().cpu()  # [n_heads, k_pos]
        heads = range(row.shape[0]) if head is None else [head]
        line = f"query {query} {self._token_text(query + self._past)} → key {key} {self._token_text(key)}: "
        if head is None:
            line += "weights by head [" + ", ".join(f"{float(w):.3f}" for w in row[:, key]) + "]"
        else:
            line += f"weight {float(row[head, key]):.3f}"
            if self._scores.value:
                scores = plot_attention.attention_pattern(self._cache, self._layer.value, scores=True)
                line += f" (score {float(scores[self._prompt_index, head, query, key]):.3f})"
        # The keys this query attends to most (on average over the heads shown), among those it can see: not
        # later keys, nor padding (both masked, so of weight exactly 0).
        mean = row[list(heads)].mean(dim=0)[: query + self._past + 1]
        order = [k for k in mean.argsort(descending=True)[:8].tolist() if mean[k] > 0]
        columns = {"key": order, "token": [self._raw_token(k) for k in order]}
        for h in heads:
            columns["weight" if head is not None else f"head {h}"] = [float(row[h, k]) for k in order]
        self._readout.value = f"<code>{html.escape(line)}</code>"
        self._table = pd.DataFrame(columns)
        self._table_html.value = self._table.to_html(index=False, float_format="{:.3f}".format, escape=True)

    def _raw_token(self, position: int) -> str:
        return str(position) if self._tokens is None else self._tokens[position]

    def _token_text(self, position: int) -> str:
        return "" if self._tokens is None else repr(self._tokens[position])


# ================================================================================================ logit lens
# (label in the dropdown, the metric name `LensResult.plot` takes)
LENS_METRICS = (
    ("probability (top token)", "prob"),
    ("target probability", "target_prob"),
    ("target rank", "rank"),
    ("entropy", "entropy"),
    ("KL to final", "kl"),
)
_TARGET_METRICS = ("target_prob", "rank")
LENS_READOUTS = ("resid_pre", "resid_mid", "resid_post")


class LogitLensExplorer(_Explorer):
    """The logit lens of a prompt: what each layer would predict at each position, recomputed as you type.

    Controls: the prompt, a target token (optional; its text, e.g. " Paris" with the leading space), the
    metric that colours the heatmap, the read-out (resid_pre / resid_mid / resid_post), the range of layers,
    and a position whose read-outs the table lists (top tokens, entropy, KL and the target's probability and
    rank at every read-out).

    Args:
        model: a HookedLlama with a tokenizer.
        prompt: the prompt to start with.
        target: the target token's text, e.g. " Paris" (None: no target).
        metric: "prob", "target_prob", "rank", "entropy" or "kl" (the target metrics need a target).
        readout: "resid_pre", "resid_mid" or "resid_post".
        layers: (first, last) layers to read out, inclusive (default: all loaded layers).
        max_positions: read out only the last `max_positions` positions, so long prompts stay quick to draw
            (None: all positions).
        top_k: top tokens per read-out in the table.
    """

    def __init__(
        self,
        model: Any,
        prompt: str = "The Eiffel Tower is in the city of",
        target: str | None = None,
        *,
        metric: str = "prob",
        readout: str = "resid_post",
        layers: tuple[int, int] | None = None,
        max_positions: int | None = 48,
        top_k: int = 5,
    ) -> None:
        super().__init__()
        if not _is_model(model):
            raise ValueError(f"LogitLensExplorer needs a HookedLlama, got {type(model).__name__}")
        self._model = model
        self._max_positions = max_positions
        self._top_k = top_k
        self._result: Any = None
        self._shown_tokens: list[str] | None = None  # the prompt the position dropdown was set up for
        loaded = list(model.layer_indices)
        if not loaded:
            raise ValueError("this model holds no layers; load at least one to use the lens")
        metrics = [name for _, name in LENS_METRICS]
        if metric not in metrics:
            raise ValueError(f"unknown metric {metric!r}; choose one of {metrics}")
        if readout not in LENS_READOUTS:
            raise ValueError(f"unknown read-out {readout!r}; choose one of {list(LENS_READOUTS)}")
        first, last = (loaded[0], loaded[-1]) if layers is None else layers
        if not (first in loaded and last in loaded and first <= last):
            raise ValueError(f"layers={layers} must be (first, last) of the loaded layers {loaded[0]}..{loaded[-1]}")

        self._prompt = widgets.Text(
            value=prompt,
            description="prompt",
            continuous_update=False,
            layout=widgets.Layout(width="95%"),
            placeholder="type a prompt and press Enter",
        )
        if target is not None and not isinstance(target, str):
            raise ValueError(f"target= takes the text of a token (e.g. ' Paris'), got {type(target).__name__}")
        self._target = widgets.Text(
            value=target or "",
            description="target",
            continuous_update=False,
            placeholder="e.g. ' Paris' (one token, with its leading space)",
        )
        self._metric = widgets.Dropdown(options=LENS_METRICS, value=metric, description="metric")
        self._readout = widgets.Dropdown(options=LENS_READOUTS, value=readout, description="read-out")
        self._layers = widgets.IntRangeSlider(
            value=(first, last), min=loaded[0], max=loaded[-1], description="layers", continuous_update=False
        )
        self._position = widgets.Dropdown(options=[("-", 0)], description="position")
        self._table_html = widgets.HTML()

        for control in (self._prompt, self._target, self._readout, self._layers):
            control.observe(lambda _: self._request("compute"), names="value")
        for control in (self._metric, self._position):
            control.observe(lambda _: self._request("draw"), names="value")

        self.children = [
            self._prompt,
            widgets.HBox([self._target, self._metric]),
            widgets.HBox([self._readout, self._layers, self._position]),
            self._status,
            self._image,
            self._table_html,
        ]
        self._pending.add("compute")
        self._flush(raise_errors=True)

    # ------------------------------------------------------------------ state
    @property
    def prompt(self) -> str:
        return self._prompt.value

    @prompt.setter
    def prompt(self, text: str) -> None:
        self._prompt.value = text

    @property
    def target(self) -> str | None:
        """The target token's text, None when the box is empty."""
        return self._target.value or None

    @target.setter
    def target(self, value: str | None) -> None:
        self._target.value = value or ""

    @property
    def metric(self) -> str:
        return self._metric.value

    @metric.setter
    def metric(self, value: str) -> None:
        metrics = [name for _, name in LENS_METRICS]
        if value not in metrics:
            raise ValueError(f"unknown metric {value!r}; choose one of {metrics}")
        self._metric.value = value

    @property
    def readout(self) -> str:
        return self._readout.value

    @readout.setter
    def readout(self, value: str) -> None:
        if value not in LENS_READOUTS:
            raise ValueError(f"unknown read-out {value!r}; choose one of {list(LENS_READOUTS)}")
        self._readout.value = value

    @property
    def layers(self) -> tuple[int, int]:
        """(first, last) layers read out, inclusive."""
        return tuple(self._layers.value)

    @layers.setter
    def layers(self, value: tuple[int, int]) -> None:
        first, last = value
        if not self._layers.min <= first <= last <= self._layers.max:
            raise ValueError(f"layers must be (first, last) within {self._layers.min}..{self._layers.max}, got {value}")
        self._layers.value = (first, last)

    @property
    def position(self) -> int:
        """The token position the table shows."""
        return self._position.value

    @position.setter
    def position(self, value: int) -> None:
        options = [p for _, p in self._position.options]
        if value < 0:
            value += len(self._result.str_tokens[0]) if self._result is not None else 0
        if value not in options:
            raise ValueError(f"position {value} is not read out; choose one of {options[0]}..{options[-1]}")
        self._position.value = value

    @property
    def result(self) -> Any:
        """The LensResult shown now."""
        return self._result

    @property
    def controls(self) -> dict[str, widgets.Widget]:
        """The input widgets by name, to drive them as a user would (e.g. `controls["metric"].value = "kl"`)."""
        return {
            "prompt": self._prompt,
            "target": self._target,
            "metric": self._metric,
            "readout": self._readout,
            "layers": self._layers,
            "position": self._position,
        }

    # ------------------------------------------------------------------ updates
    def _compute(self) -> None:
        from .lens import logit_lens

        tokens = self._model.to_tokens(self._prompt.value)  # [1, pos]
        n_tokens = tokens.shape[1]
        positions = None
        if self._max_positions is not None and n_tokens > self._max_positions:
            positions = list(range(n_tokens - self._max_positions, n_tokens))
        first, last = self._layers.value
        layers = [i for i in self._model.layer_indices if first <= i <= last]
        started = time.perf_counter()
        # The forward pass runs every loaded layer whatever the range read out; reading out comes after it.
        text = f"computing the lens of {n_tokens} tokens"
        with self._progress(self._model, self._model.layer_indices, text, after="reading out"):
            result = logit_lens(
                self._model,
                tokens,
                self.target,
                readout=self._readout.value,
                positions=positions,
                top_k=self._top_k,
                layers=layers,
            )
        seconds = time.perf_counter() - started
        self._result = result
        shown = "" if positions is None else f" (the last {len(positions)} positions)"
        plural = "" if result.n_readouts == 1 else "s"
        self._set_status(f"{n_tokens} tokens{shown}, {result.n_readouts} read-out{plural} in {seconds:.2f} s")

        # A new prompt starts on its last position (where the next token is predicted); otherwise keep the place.
        str_tokens = result.str_tokens[0]
        same_prompt = str_tokens == self._shown_tokens
        keep = self._position.value if same_prompt else result.positions[-1]
        if keep not in result.positions:
            keep = result.positions[-1]
        self._position.options = [(f"{p}: {str_tokens[p]!r}", p) for p in result.positions]
        self._position.value = keep
        self._shown_tokens = str_tokens

    def _draw(self) -> None:
        metric = self._metric.value
        if metric in _TARGET_METRICS and self._result.target_ids is None:
            raise ValueError(f"the metric {metric!r} needs a target: type one into the target box")
        # The figure grows with the prompt; in a notebook cell it should stay about a screen wide.
        fig = self._result.plot(metric=metric, max_figsize=(16.0, 12.0))
        self._outline_position(fig)
        self._show(fig)
        self._table = self._position_table(self._position.value)
        self._table_html.value = self._table.to_html(index=False, float_format="{:.3g}".format, escape=True)

    def _outline_position(self, fig: Figure) -> None:
        """Outlines the selected position's column in the heatmap (columns are `result.positions` in order)."""
        from matplotlib.patches import Rectangle

        ax = fig.axes[0]
        column = self._result.positions.index(self._position.value)
        n_rows = self._result.n_readouts
        ax.add_patch(Rectangle((column - 0.5, -0.5), 1, n_rows, fill=False, edgecolor="red", linewidth=1.5))

    def _position_table(self, position: int) -> pd.DataFrame:
        """One row per read-out at `position`: top tokens and metrics (and the target's, with a target)."""
        import pandas as pd

        result = self._result
        column = result.positions.index(position)
        rows = {
            "read-out": result.labels,
            "top tokens": [
                ", ".join(f"{text!r} {float(p):.2f}" for text, p in zip(texts[column], probs[column]))
                for texts, probs in zip(result.top_strs[0], result.top_probs[0])
            ],
            "entropy": result.entropy[0, :, column].tolist(),
            "kl_to_final": result.kl_to_final[0, :, column].tolist(),
        }
        if result.target_ids is not None:
            rows["target_prob"] = result.target_probs[0, :, column, 0].tolist()
            rows["target_rank"] = result.target_ranks[0, :, column, 0].tolist()
        return pd.DataFrame(rows)


# ================================================================================================ helpers
def _mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:,.0f} MiB"


def _strip_tags(text: str) -> str:
    import re

    return re.sub(r"<[^>]+>", "", text)
