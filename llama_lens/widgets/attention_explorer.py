"""AttentionExplorer: attention patterns as an instrument in the browser.

The model runs once per prompt. The page draws the head grid, the open head's heatmap and the prompt as text
coloured by the attention from a hovered or clicked query (as circuitsvis does). What it is sent stays small
whatever the layers shown (30 layers x 9 heads x 300 tokens: about 0.35 MB):

- `thumbs`: every shown head as a small picture, at most THUMB x THUMB blocks of positions, each block the
  brightest weight in it (so a sparse head, previous-token or induction, stays visible), as one byte of
  sqrt(weight) (the colour the heatmap gives it), lower triangle only;
- a head's pattern at full resolution (causal triangle, 16-bit fixed point: weights to 1.5e-5) when the page
  opens it: it asks through the widget's message channel (`answer`, as the lens's page asks for its blocks),
  shows the thumbnail, enlarged, in the meantime and keeps every pattern it has been sent. So the synced state,
  which a notebook saved with its widget state stores, holds the thumbnails only.

A page saved by `save_html` has no kernel to ask, so it carries every shown head's full pattern (`patterns`).
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import traitlets

from ..errors import ArgumentError
from ..validate import renamed_keywords
from ..viz import attention as plot_attention
from .base import Control, Explorer, asset, number
from .lens_data import prompt_tokens

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

DEFAULT_PROMPT = "When Mary and John went to the store, John gave a drink to"
# The thumbnails' largest side in blocks of positions: 300 tokens make 43 x 43 blocks of 7 (946 bytes a head).
THUMB = 48
# Bytes of attention patterns kept for every layer at once (the rest of the layers then cost a model run when
# shipped). SmolLM2-135M's 30 layers x 9 heads take 1,080 MiB at 1,024 tokens in float32.
ATTENTION_CACHE_BUDGET = 256 * 2**20


def _check_prompt(explorer: Any, value: Any) -> Any:
    if explorer.model is None:
        raise ArgumentError("this explorer shows a fixed cache; build it from a model to change the prompt")
    if isinstance(value, str) and value:
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(m, dict) and {"role", "content"} <= set(m)
                                                         for m in value):  # fmt: skip
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in value]
    raise ArgumentError(f'prompt must be a non-empty text or a list of {{"role", "content"}} messages, got {value!r}')


def _check_layers(explorer: Any, value: Any) -> list[int]:
    held = explorer.available_layers
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, int) for v in value):
        raise ArgumentError(f"layers must be a non-empty list of layer indices, got {value!r}")
    bad = [v for v in value if v not in held]
    if bad:
        raise ArgumentError(f"layers {bad} are not held; choose among {held}")
    return sorted(set(value))


def _check_head(explorer: Any, value: Any) -> dict[str, int]:
    if not isinstance(value, dict) or set(value) != {"layer", "head"}:
        raise ArgumentError(f'head is {{"layer": l, "head": h}}, got {value!r}')
    if value["layer"] not in explorer.layers:
        raise ArgumentError(f"head layer {value['layer']} is not shown; shown layers are {explorer.layers}")
    if not isinstance(value["head"], int) or not 0 <= value["head"] < explorer.n_heads:
        raise ArgumentError(f"head {value['head']!r} is out of range: there are {explorer.n_heads} heads")
    return {"layer": value["layer"], "head": value["head"]}


def _check_query(explorer: Any, value: Any) -> int:
    n = len(explorer.meta.get("tokens", [])) if explorer.meta else 0
    if value == -1:
        return -1
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n:
        raise ArgumentError(f"query={value!r} is out of range: the prompt has {n} positions (0..{n - 1}), -1 for none")
    return value


class AttentionExplorer(Explorer):
    """Attention patterns in the browser: a head grid, the open head's heatmap, and the prompt as text.

    Hover a cell for query, key and weight; hover or click a token of the text to colour the prompt by that
    query's attention; click a thumbnail to open its head. Several layers' heads show together (`layers=`).

    Args:
        model_or_cache: a HookedLlama (with a tokenizer, to type prompts), or an ActivationCache / dict /
            (logits, cache) pair holding `blocks.{i}.attn.hook_pattern`.
        prompt: text or chat messages (model only; default: a sentence with a name to copy).
        tokens: text of each position, for a cache (`model.to_str_tokens(tokens)`); numbered when omitted.
        layers: the layers whose heads are shown (default: the first held); `layer=` picks one.
        head: the head opened first.
        batch_index: which prompt of a cached batch to show (`prompt_index=`, its former name, is deprecated).
        attention_mask: [batch, pos] 1 for real tokens, 0 for padding, for a cache of a padded batch.
        cache_budget: bytes of patterns kept for all layers at once (model only); past it only the shown
            layers' patterns are kept and showing another layer reruns the model.
        threaded: run browser-driven work in a worker thread (default: when a kernel runs).
    """

    _esm = asset("common.js") + asset("attention.js")
    _css = asset("widgets.css")

    CONTROLS = {
        "prompt": Control("recompute", _check_prompt, "the prompt (model only)"),
        "layers": Control("update", _check_layers, "layers whose heads are shown"),
        "head": Control("redraw", _check_head, "the open head {layer, head} (the page asks for its pattern)"),
        "query": Control("redraw", _check_query, "the query whose attention colours the text (-1: none)"),
        "zoom": Control("redraw", number("zoom", low=1, high=64), "heatmap cell size in pixels"),
    }

    prompt = traitlets.Any("").tag(sync=True)
    layers = traitlets.List([]).tag(sync=True)
    head = traitlets.Dict({"layer": 0, "head": 0}).tag(sync=True)
    query = traitlets.Int(-1).tag(sync=True)
    zoom = traitlets.Float(0.0).tag(sync=True)  # 0: about 560 px, cells of 10 px at least (labelled, scrolling)

    meta = traitlets.Dict({}).tag(sync=True)  # tokens, layers, n_heads, thumb (blocks a side), run
    thumbs = traitlets.Bytes(b"").tag(sync=True)

    @renamed_keywords(prompt_index="batch_index")
    def __init__(
        self,
        model_or_cache: Any,
        prompt: str | Sequence[dict[str, str]] | None = None,
        *,
        tokens: Sequence[str] | None = None,
        layers: Sequence[int] | None = None,
        layer: int | None = None,
        head: int = 0,
        batch_index: int = 0,
        attention_mask: torch.Tensor | None = None,
        cache_budget: int = ATTENTION_CACHE_BUDGET,
        threaded: bool | None = None,
    ) -> None:
        is_model = hasattr(model_or_cache, "run_with_cache") and hasattr(model_or_cache, "cfg")
        self.model = model_or_cache if is_model else None
        self.cache_budget = cache_budget
        self.batch_index = batch_index
        self._attention_mask = attention_mask
        self._cache: Any = None
        self._kept: list[int] = []
        self._str_tokens: list[str] = []
        self._run = 0  # counts the data shipped, so the page never takes a pattern of older data for the new
        if self.model is not None:
            if attention_mask is not None:
                raise ArgumentError("attention_mask= is for a cache of a padded batch; a typed prompt has no padding")
            self.available_layers = list(self.model.layer_indices)
            self.n_heads = self.model.cfg.n_heads
        else:
            if prompt is not None:
                raise ArgumentError("prompt= needs a model; for a cache, pass tokens= (the text of each position)")
            self._cache = plot_attention.as_cache(model_or_cache)
            self.available_layers = plot_attention.attention_layers(self._cache)
            if not self.available_layers:
                plot_attention.attention_pattern(self._cache, 0)  # raises: says how to cache patterns
            pattern = plot_attention.attention_pattern(self._cache, self.available_layers[0])
            batch, self.n_heads, _, k_pos = pattern.shape
            if not 0 <= batch_index < batch:
                raise ArgumentError(
                    f"batch_index={batch_index} is out of range: the cache holds {batch} prompts (0..{batch - 1})"
                )
            keep = self._real_positions(k_pos)
            if tokens is not None:
                tokens = list(tokens)
                if len(tokens) != k_pos:
                    raise ArgumentError(f"tokens= has {len(tokens)} entries but the cache covers {k_pos} positions")
                self._str_tokens = [tokens[p] for p in keep]
            else:
                self._str_tokens = [str(p) for p in keep]
        super().__init__(threaded=threaded)
        self.on_msg(lambda _, request, buffers: self.send(*self.answer(request)))
        if layers is None:
            layers = [self.available_layers[0] if layer is None else layer]
        elif layer is not None:
            raise ArgumentError("pass layers= (several) or layer= (one), not both")
        if not 0 <= head < self.n_heads:
            raise ArgumentError(f"head={head} is out of range: there are {self.n_heads} heads (0..{self.n_heads - 1})")
        self._quiet = True  # nothing to compute until the prompt is set
        try:
            self.layers = _check_layers(self, layers)
            self.head = {"layer": self.layers[0], "head": head}
        finally:
            self._quiet = False
        if self.model is not None:
            self.prompt = prompt if prompt is not None else DEFAULT_PROMPT  # runs the model
        else:
            self._submit(lambda check: self._ship(check))

    # ------------------------------------------------------------------ reading
    @property
    def tokens(self) -> list[str]:
        """The text of each position shown."""
        return list(self._str_tokens)

    def pattern(self, layer: int | None = None) -> torch.Tensor:
        """The pattern of a shown layer, [n_heads, q_pos, k_pos] (padding left out); default the open head's."""
        layer = self.head["layer"] if layer is None else layer
        return self._heads(layer, slice(None))

    def _heads(self, layer: int, heads: slice) -> torch.Tensor:
        """Some heads of a layer's pattern, [heads, q_pos, k_pos], padding left out (none to leave: no copy)."""
        pattern = plot_attention.attention_pattern(self._cache, layer)[self.batch_index, heads]
        if self._attention_mask is not None:
            keep = self._real_positions(pattern.shape[-1])
            pattern = pattern[:, keep][:, :, keep]
        return pattern.detach().float().cpu()

    def to_frame(self) -> pd.DataFrame:
        """The open head's pattern as a table: query, query_token, key, key_token, weight (keys each query
        can see)."""
        import pandas as pd

        pattern = self.pattern()[self.head["head"]]
        n = pattern.shape[0]
        query, key = torch.tril_indices(n, n)
        return pd.DataFrame({
            "layer": self.head["layer"],
            "head": self.head["head"],
            "query": query.tolist(),
            "query_token": [self._str_tokens[q] for q in query.tolist()],
            "key": key.tolist(),
            "key_token": [self._str_tokens[k] for k in key.tolist()],
            "weight": pattern[query, key].tolist(),
        })  # fmt: skip

    def save_csv(self, path: str | Path) -> Path:
        """Writes `to_frame()` as CSV; returns the path."""
        path = Path(path)
        self.to_frame().to_csv(path, index=False)
        return path

    def to_figure(self) -> Figure:
        """The open head's matplotlib heatmap (`ll.plot.attention`), the query row outlined when one is chosen."""
        kwargs = {} if self.query < 0 else {"query": self._padded(self.query)}
        return plot_attention.attention(
            self._cache,
            self.head["layer"],
            self.head["head"],
            tokens=self._all_tokens(),
            batch_index=self.batch_index,
            attention_mask=self._attention_mask,
            **kwargs,
        )

    # ------------------------------------------------------------------ computing
    @property
    def prompt_index(self) -> int:
        """The former name of `batch_index` (read-only)."""
        return self.batch_index

    def _real_positions(self, k_pos: int) -> list[int]:
        if self._attention_mask is None:
            return list(range(k_pos))
        return [p for p in range(k_pos) if bool(self._attention_mask[self.batch_index, p])]

    def _padded(self, position: int) -> int:
        """A shown position as an index into the cache's pos axis (past the padding)."""
        k_pos = plot_attention.attention_pattern(self._cache, self.head["layer"]).shape[-1]
        return self._real_positions(k_pos)[position]

    def _all_tokens(self) -> list[str] | None:
        if self._attention_mask is None:
            return self._str_tokens
        k_pos = plot_attention.attention_pattern(self._cache, self.head["layer"]).shape[-1]
        names = ["<pad>"] * k_pos
        for shown, p in enumerate(self._real_positions(k_pos)):
            names[p] = self._str_tokens[shown]
        return names

    def _recompute(self, check: Callable[[], None]) -> None:
        model = self.model
        tokens = prompt_tokens(model, self.prompt)
        n = tokens.shape[1]
        layer_bytes = model.cfg.n_heads * n * n * 4
        every = layer_bytes * len(self.available_layers) <= self.cache_budget
        keep = self.available_layers if every else self.layers
        wanted = {f"blocks.{i}.attn.hook_pattern" for i in keep}
        self.status = f"running the model on {n} tokens…"

        def cancel_point(tensor: torch.Tensor, *, hook: Any) -> None:
            check()

        names = [f"blocks.{i}.hook_resid_post" for i in self.available_layers]
        with torch.no_grad(), model.hooks([(names, cancel_point)]):
            _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in wanted)
        check()
        self._cache, self._kept = cache, keep
        self._str_tokens = model.to_str_tokens(tokens[0])
        self.batch_index = 0
        self._ship(check)

    def _update(self, names: list[str], check: Callable[[], None]) -> None:
        if self.model is not None and not set(self.layers) <= set(self._kept):
            self._recompute(check)  # over the budget: the newly shown layers need a model run
        else:
            self._ship(check)

    @property
    def patterns(self) -> bytes:
        """Every shown head's pattern as a saved page holds it: `[layer][head]` lower triangles, uint16
        (weight x 65535), layers in the order of `layers`."""
        return b"".join(_packed(self.pattern(layer)) for layer in self.layers)

    def _thumbnails(self) -> tuple[bytes, int]:
        """Every shown head as at most THUMB x THUMB blocks (the brightest weight of each), one byte of
        sqrt(weight) a block, lower triangle: the bytes and the blocks a side."""
        parts, side = [], 1
        for layer in self.layers:
            pattern = self.pattern(layer)  # [n_heads, n, n]
            n = pattern.shape[-1]
            step = -(-n // THUMB)
            side = -(-n // step)
            padded = torch.nn.functional.pad(pattern, (0, side * step - n, 0, side * step - n))
            blocks = padded.view(-1, side, step, side, step).amax(dim=(2, 4))
            query, key = torch.tril_indices(side, side)
            shades = (blocks[:, query, key].clamp(0, 1).sqrt() * 255).round().to(torch.uint8)
            parts.append(shades.numpy().tobytes())
        return b"".join(parts), side

    def _ship(self, check: Callable[[], None]) -> None:
        """Sends what the page draws now: the shown heads' thumbnails and the open head's pattern."""
        thumbs, side = self._thumbnails()
        check()
        with self.hold_sync():
            if self.head["layer"] not in self.layers:
                self._quiet = True
                self.head = {"layer": self.layers[0], "head": self.head["head"]}
                self._quiet = False
            if not 0 <= self.query < len(self._str_tokens):
                self._quiet = True
                self.query = len(self._str_tokens) - 1
                self._quiet = False
            self._run += 1
            self.meta = {
                "tokens": self._str_tokens,
                "layers": self.layers,
                "n_heads": self.n_heads,
                "thumb": side,
                "run": self._run,
            }
            self.thumbs = thumbs
            n = len(self._str_tokens)
            self.status = f"{n} tokens, layer{'s' if len(self.layers) > 1 else ''} {self.layers}"
        self._data_changed()

    def answer(self, request: Any) -> tuple[dict[str, Any], list[bytes]]:
        """The reply to the page's request for a head's full pattern, and its binary buffers.

        Request: {"want": "head", "layer", "head", "run"}. The reply repeats them and carries the pattern as one
        buffer (the head's lower triangle, uint16, weight x 65535); a request about older data gets
        {"stale": True} (the page's new data is on its way), a malformed one {"error": why}.
        """
        if not isinstance(request, dict) or request.get("want") != "head":
            return {"error": f"unknown request {request!r}"}, []
        reply = {key: request.get(key) for key in ("want", "layer", "head", "run")}
        run = self._run
        if request.get("run") != run:
            return reply | {"stale": True}, []
        layer, head = request.get("layer"), request.get("head")
        if layer not in self.layers or type(head) is not int or not 0 <= head < self.n_heads:
            return reply | {"error": f"layer {layer!r}, head {head!r} is not shown"}, []
        packed = _packed(self._heads(layer, slice(head, head + 1)))
        if self._run != run:  # new data came while this was read
            return reply | {"stale": True}, []
        return reply, [packed]

    def page_state(self) -> dict[str, Any]:
        state = super().page_state()
        # The page decodes these; a saved page has no kernel to ask for the other heads, so it has them all.
        for name in ("thumbs", "patterns"):
            state[name] = base64.b64encode(getattr(self, name)).decode("ascii")
        return state


def _packed(pattern: torch.Tensor) -> bytes:
    """Heads' patterns [heads, n, n] as their lower triangles, uint16 (weight x 65535), head after head."""
    n = pattern.shape[-1]
    query, key = torch.tril_indices(n, n)
    values = (pattern[:, query, key].clamp(0, 1) * 65535).round().to(torch.int32)
    return values.numpy().astype("<u2").tobytes()
