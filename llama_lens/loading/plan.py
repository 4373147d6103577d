"""`plan`: how much memory (and disk time) a load and a forward pass will take, before running them.

    ll.plan("~/models/Llama-3.1-70B-Instruct", tokens=128, stream=True, dtype=torch.bfloat16)

for a checkpoint folder (or an open Checkpoint, or a LlamaConfig). Everything is counted from the config and
the tensor index, nothing is read: the weights held (all layers; with `stream=True` only the final norm, and
the unembedding unless it is streamed too), the layers in flight, one layer's working activations, the
activations a cache keeps and the attention patterns if asked for. `ll.load` uses the weights part to refuse,
with this estimate in the message, a load that cannot fit, rather than be killed by the OS.

Streaming reads the embedding by rows (the prompt's only) and holds or streams the unembedding (`unembed=`,
see `choose_unembed`): `plan(path, stream=True)` says which (`embed`, `unembed`) and how much that holds.
`peak_rss_bytes` adds this process as it is now, to compare with the peak resident memory a run measures
(`ru_maxrss`; scripts/bench_stream.py does).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..config import LlamaConfig
from ..errors import ArgumentError, NotEnoughMemoryError
from ..model import cpu_matmul
from ..model.memory import GIB, _cached_width, _working_width, available_memory, process_memory
from . import plan_graph, plan_sizes, roofline, stream_vocab
from .plan_sizes import largest_cast_elements, largest_layer_tensor, layer_param_count

# Bytes per second a disk is assumed to read at when `read_bandwidth` is not given: between a SATA SSD
# (~0.5 GB/s) and an NVMe one (2-7 GB/s). scripts/bench_stream.py measures the real figure.
DEFAULT_READ_BANDWIDTH = 1e9

# How a streamed model holds its unembedding: "memory" (read at load and held), "stream" (a vocabulary block at
# a time from disk at each pass, see stream_vocab.py), "auto" (`choose_unembed` decides).
UNEMBED_MODES = ("auto", "memory", "stream")
# "auto" holds the unembedding when a streamed load holding it takes at most this share of the memory available:
# the rest is left for activations, caches and the other programs on the machine. Streaming it instead costs a
# read of the unembedding per forward pass (0.8 GB for a 128k vocabulary at d_model 3072 in bfloat16).
AUTO_UNEMBED_MEMORY_SHARE = 0.5

CACHE_KINDS = ("resid", "all", None)
_OPTIONAL_ROWS = ("dictionary_bytes", "graph_bytes")  # shown only where planned


@dataclass(frozen=True)
class Plan:
    """Estimated peak memory and disk reading of a load plus one forward pass (bytes, seconds).

    Attributes:
        weights_resident_bytes: weights held for the model's lifetime.
        layer_in_flight_bytes: decoder layers held only while they are read or run (streaming: the layer
            computing, the layer being read and the tensor being copied, as stored; a full load: one layer
            as stored while loading).
        activations_bytes: working memory of one layer's forward pass, plus the logits.
        cache_bytes: activations kept by `run_with_cache` (`cache="resid"`: the residual stream at every
            layer, as the logit lens keeps it; "all": every hook point but the attention patterns).
        pattern_bytes: attention scores / patterns kept (`patterns=True`: hook_pattern of every layer;
            `cache="all"` keeps scores and pattern).
        peak_bytes: the sum of the above (with the larger of the layers and the unembedding blocks in flight:
            they are not read at the same time). Not counted: the Python process itself (see `process_bytes`).
        process_bytes: this process's resident memory when the plan was made (CPU; None on other devices, or
            where it cannot be read): about 0.3-0.5 GB with torch imported, more with other models held.
        peak_rss_bytes: process_bytes + peak_bytes, the peak resident memory (`ru_maxrss`) a run would show.
        embed: "memory" (held) or "rows" (streaming: the rows of the prompt's tokens read at each pass).
        unembed: "memory" (held) or "stream" (read a vocabulary block at a time at each pass).
        unembed_in_flight_bytes: the unembedding blocks in memory while it is streamed (the one in use, the
            next being read), else 0.
        available_bytes: memory available on the device now (None when unknown).
        read_bytes: bytes read from disk by the load and one forward pass (streaming re-reads the layers on
            every pass).
        est_read_seconds: `read_bytes` at `read_bandwidth` bytes per second.
        fits: whether `peak_bytes` is within `available_bytes` (True when unknown).
        flops: the matmul FLOPs of one pass: the layers, the model's own unembedding and `readouts` read-outs.
        gemm_rate: float32 FLOP/s the compute is assumed to run at (measured with `roofline.measure_gemm_rate`,
            or `roofline.DEFAULT_GEMM_RATE`).
        est_wall_seconds: the load and one pass, from the read and GEMM rates (`roofline.predicted_wall_seconds`).
    """

    stream: bool
    embed: str
    unembed: str
    dtype: torch.dtype
    n_layers: int
    tokens: int
    batch: int
    cache: str | None
    patterns: bool
    weights_resident_bytes: int
    layer_in_flight_bytes: int
    unembed_in_flight_bytes: int
    activations_bytes: int
    cache_bytes: int
    pattern_bytes: int
    dictionary_bytes: int
    peak_bytes: int
    process_bytes: int | None
    available_bytes: int | None
    read_bytes: int
    read_bandwidth: float
    est_read_seconds: float
    fits: bool
    flops: int = 0
    gemm_rate: float = roofline.DEFAULT_GEMM_RATE
    est_wall_seconds: float = 0.0
    graph_bytes: int = 0

    _ROWS = (
        ("weights resident", "weights_resident_bytes"),
        ("layers in flight", "layer_in_flight_bytes"),
        ("unembed in flight", "unembed_in_flight_bytes"),
        ("activations", "activations_bytes"),
        ("cache", "cache_bytes"),
        ("patterns", "pattern_bytes"),
        ("dictionaries", "dictionary_bytes"),
        ("attribution graph", "graph_bytes"),
        ("peak", "peak_bytes"),
        ("process", "process_bytes"),
        ("peak RSS", "peak_rss_bytes"),
        ("available", "available_bytes"),
        ("read from disk", "read_bytes"),
    )

    @property
    def peak_rss_bytes(self) -> int | None:
        return None if self.process_bytes is None else self.process_bytes + self.peak_bytes

    def to_frame(self):
        """The estimate as a pandas DataFrame: one row per item, columns bytes and GiB."""
        import pandas as pd

        # The dictionaries' and the graph's rows only where planned (as in the printed plan).
        shown = [(label, f) for label, f in self._ROWS if f not in _OPTIONAL_ROWS or getattr(self, f)]
        rows = [(label, getattr(self, f)) for label, f in shown]
        frame = pd.DataFrame(rows, columns=["item", "bytes"]).set_index("item")
        frame["bytes"] = frame["bytes"].astype("Int64")
        frame["GiB"] = (frame["bytes"].astype("Float64") / GIB).round(3)
        return frame

    def __repr__(self) -> str:
        modes = f", embed={self.embed!r}, unembed={self.unembed!r}" if self.stream else ""
        head = (
            f"Plan(stream={self.stream}{modes}, dtype={_dtype_name(self.dtype)}, layers={self.n_layers}, "
            f"tokens={self.tokens}, batch={self.batch}, cache={self.cache!r}, patterns={self.patterns})"
        )
        lines = [head]
        for label, field in self._ROWS[:8]:
            shown = field not in _OPTIONAL_ROWS or getattr(self, field)
            if shown and (field != "unembed_in_flight_bytes" or self.unembed == "stream"):
                lines.append(f"  {label:<18}{_gib(getattr(self, field))}")
        verdict = "fits" if self.fits else "does NOT fit"
        if self.available_bytes is None:
            available = "unknown memory available"
        else:
            available = f"{_gib(self.available_bytes)} available"
        lines.append(f"  {'peak':<18}{_gib(self.peak_bytes)}   of {available}: {verdict}")
        if self.process_bytes is not None:
            lines.append(
                f"  {'peak RSS':<18}{_gib(self.peak_rss_bytes)}   with this process ({_gib(self.process_bytes)} now)"
            )
        per_pass = " per forward pass" if self.stream else ""
        lines.append(
            f"  {'read from disk':<18}{self.read_bytes / 1e9:.2f} GB{per_pass}, ~{self.est_read_seconds:.1f} s "
            f"at {self.read_bandwidth / 1e9:.1f} GB/s"
        )
        lines.append(
            f"  {'compute':<18}{self.flops / 1e12:.3f} TFLOP at {self.gemm_rate / 1e9:.0f} GFLOP/s; "
            f"wall ~{self.est_wall_seconds:.1f} s"
        )
        return "\n".join(lines)


def plan(
    path: str | os.PathLike | Any,
    *,
    tokens: int = 128,
    batch: int = 1,
    dtype: torch.dtype | str | None = torch.float32,
    device: torch.device | str = "cpu",
    layers: Iterable[int] | None = None,
    stream: bool = False,
    unembed: str = "auto",
    cache: str | None = "resid",
    patterns: bool = False,
    read_bandwidth: float | None = None,
    dictionaries: Iterable[Any] = (),
    active_features: int | None = None,
    readouts: int = 0,
    gemm_rate: float | None = None,
    graph: Mapping[str, Any] | None = None,
) -> Plan:
    """Estimates the peak memory and disk reading of loading a checkpoint and running one forward pass.

    Everything after `path` is a keyword; `dtype`, `device`, `layers`, `stream` and `unembed` mean what they mean
    to `ll.load`, so the estimate of `ll.load(path, dtype=..., stream=True)` is `ll.plan(path, dtype=...,
    stream=True)`.

    Args:
        path: a checkpoint folder, an open `Checkpoint`, or a `LlamaConfig`.
        tokens: positions per prompt (pos).
        batch: prompts per forward pass.
        stream: as `ll.load(..., stream=True)`: hold only the final norm and the unembedding (or stream it too,
            see `unembed`); read the embedding's rows of the prompt at each pass.
        dtype: dtype of the weights and activations (None: as stored, see `weights_dtype`).
        layers: decoder layers loaded (default: all).
        cache: activations kept: "resid" (the residual stream at every layer, as the logit lens keeps it),
            "all" (`run_with_cache()` with no filter) or None.
        patterns: also keep every layer's attention pattern.
        device: where the weights go; its free memory is `available_bytes`.
        read_bandwidth: disk read speed in bytes per second (default `DEFAULT_READ_BANDWIDTH`).
        readouts: residual streams a logit lens reads out beyond the model's own output (`ll.logit_lens`'s
            default over n layers reads n: the embedding and every layer's resid_post but the last), for the
            FLOPs and the wall time; 0 for a plain forward pass.
        gemm_rate: float32 FLOP/s of this machine (`roofline.measure_gemm_rate`; default
            `roofline.DEFAULT_GEMM_RATE`), for `est_wall_seconds`.
        unembed: with `stream=True`, as `ll.load`'s: "memory" (hold the unembedding), "stream" (read it a
            vocabulary block at a time at each pass) or "auto" (`choose_unembed` decides from the memory
            available, as `ll.load` will). Without streaming the unembedding is held ("stream" is refused).
        dictionaries: dictionaries to be spliced in (`ll.load_dictionary`'s, opened: only their headers are read):
            each holds its encoder and biases, and reads the decoder rows of the features that fire
            (`Dictionary.splice_memory`); `dictionary_bytes` counts them.
        active_features: features that fire per pass, for the decoder rows read (default: a bound, see
            `Dictionary.splice_memory`).
        graph: `ll.attribution_graph`'s keywords (transcoders, max_feature_nodes, batch_size, offload, ...) for
            a graph of one prompt; `graph_bytes` is what it adds (see `plan_graph`). Pass cache=None.

    Returns:
        Plan (print it, or `.to_frame()`).

    Raises:
        ArgumentError (a ValueError): for a bad cache kind, dtype, token count, layer range or unembed mode.
    """
    from ..validate import check_choice, check_count, check_layers, resolve_device, resolve_dtype

    if cache is not None:
        check_choice("cache", cache, [kind for kind in CACHE_KINDS if kind], "kind of activation cache")
    tokens, batch = check_count("tokens", tokens, 0), check_count("batch", batch, 1)
    readouts = check_count("readouts", readouts, 0)
    source = _open_source(path)
    cfg = _config_of(source)
    dtype, device = weights_dtype(source, resolve_dtype(dtype)), resolve_device(device)
    layers = check_layers(layers, cfg.n_layers)  # a list: an iterator would be spent by the first look
    n_layers = len(layers)
    weight_size = dtype.itemsize
    # Bytes per parameter on disk: a checkpoint's tensors tell (a fraction for a quantized GGUF), else the dtype.
    stored_size = getattr(source, "stored_bytes_per_param", None) or (_stored_dtype(source) or dtype).itemsize
    act = weight_size  # activations take the weights' dtype (the embedding's output)
    rows = batch * tokens

    layer_params = layer_param_count(cfg)
    embed_params = cfg.d_vocab * cfg.d_model
    head_params = cfg.d_model + (0 if cfg.tie_embeddings else embed_params)  # final norm (+ untied unembedding)
    unembed = choose_unembed(source, unembed, stream=stream, dtype=dtype, layers=layers, device=device)
    unembed_in_flight = 0
    # On a CPU without half-precision units, half-precision products compute in float32 (cpu_matmul.py); with
    # no tokens there is no product.
    in_float32 = rows > 0 and cpu_matmul.float32_for(dtype, device, rows=rows)
    layer_cast_bytes = largest_cast_elements(cfg) * 4 if in_float32 else 0
    if stream:
        # The final norm, and the unembedding when held (a tied one serves as the embedding too). The embedding
        # is read by rows at each pass (stream_vocab.py): the prompt's rows count with the activations.
        embed = "memory" if cfg.tie_embeddings and unembed == "memory" else "rows"
        weights_resident = (cfg.d_model + (embed_params if unembed == "memory" else 0)) * weight_size
        # The layer computing, the layer being read, and the stored bytes of the tensor being copied: the pages
        # of a Meta shard it is copied from, or its model-parallel pieces joined, until the copy is done (a
        # safetensors cast buffer is smaller). See CheckpointLayerReader.
        in_flight = layer_params * 2 * weight_size + round(largest_layer_tensor(cfg) * stored_size)
        if unembed == "stream":  # the block in use and the next one being read (OnDiskWeight)
            unembed_block = min(stream_vocab.UNEMBED_BLOCK_ROWS, cfg.d_vocab) * cfg.d_model
            unembed_in_flight = 2 * unembed_block * weight_size
            if in_float32:  # and the block in use cast to float32 (cpu_matmul.py)
                unembed_in_flight += unembed_block * 4
        # A half-precision layer multiplied in float32 casts each weight as it is used: the largest one, at most.
        in_flight += layer_cast_bytes
        layer_cast_bytes = 0
    else:
        embed = "memory"
        weights_resident = (embed_params + head_params + n_layers * layer_params) * weight_size
        in_flight = round(layer_params * stored_size) if n_layers else 0  # one layer as stored while loading
        if in_float32:  # the held unembedding, cast a block at a time when the forward pass makes the logits
            layer_cast_bytes = max(layer_cast_bytes, cpu_matmul.cast_elements(cfg.d_vocab, cfg.d_model) * 4)
    computes_pattern = patterns or cache == "all"
    activations = rows * _working_width(cfg) * act + rows * cfg.d_vocab * (act + 4)  # + logits, float32 softmax
    activations += layer_cast_bytes  # held weights cast to float32 during the pass (streaming: in flight above)
    if embed == "rows":
        activations += rows * cfg.d_model * act  # the prompt's embedding rows, as read
    if computes_pattern and n_layers:
        # Written-out attention: scores, the float32 softmax and the pattern of one layer.
        activations += batch * cfg.n_heads * tokens**2 * (2 * act + 4)
    cache_bytes = 0
    if cache == "resid":
        cache_bytes = (n_layers + 1) * rows * cfg.d_model * act
    elif cache == "all":
        cache_bytes = n_layers * rows * (_cached_width(cfg) * act + 2 * 4) + rows * (
            (2 * cfg.d_model + cfg.d_vocab) * act + 4
        )
    pattern_bytes = 0
    if computes_pattern:
        pattern_bytes = n_layers * batch * cfg.n_heads * tokens**2 * act * (2 if cache == "all" else 1)
    dictionary_bytes = plan_sizes.dictionary_bytes(dictionaries, rows, active_features)
    # The layers are read and run before the unembedding is: the larger of the two is in flight at the peak.
    peak = weights_resident + max(in_flight, unembed_in_flight) + activations + cache_bytes + pattern_bytes
    peak += dictionary_bytes
    held = weights_resident + dictionary_bytes
    graph_extra = 0 if graph is None else plan_graph.added_bytes(graph, cfg, tokens, batch, act, stream, peak, held)
    peak += graph_extra

    if embed == "rows":  # the prompt's rows of the embedding, the final norm, the unembedding (at load or per pass)
        outside = rows * cfg.d_model + cfg.d_model + embed_params
    else:
        outside = embed_params + head_params
    read_bytes = round((outside + n_layers * layer_params) * stored_size)
    bandwidth = float(read_bandwidth or DEFAULT_READ_BANDWIDTH)
    rate = float(gemm_rate or roofline.DEFAULT_GEMM_RATE)
    layer_flops = roofline.layer_flops(cfg, tokens=tokens, batch=batch, n_layers=n_layers)
    head_flops = roofline.unembed_flops(cfg, rows=rows, readouts=readouts)
    head_read_bytes = round(embed_params * stored_size)
    if stream and readouts:
        layer_read_seconds = (read_bytes - (0 if unembed == "stream" else head_read_bytes)) / bandwidth
        idle_seconds = layer_read_seconds - layer_flops / rate
        early = roofline.early_readouts(cfg, rows, readouts, idle_seconds, rate, weight_size)
        peak += early * rows * cfg.d_vocab * weight_size  # their logits, kept until the final distribution exists
    wall = roofline.predicted_wall_seconds(
        layer_read_seconds=(read_bytes - head_read_bytes) / bandwidth, head_read_seconds=head_read_bytes / bandwidth,
        layer_flops=layer_flops, head_flops=head_flops, gemm_rate=rate, stream=stream, unembed=unembed,
    )  # fmt: skip
    available = available_memory(device)
    return Plan(
        stream=stream,
        embed=embed,
        unembed=unembed,
        dtype=dtype,
        n_layers=n_layers,
        tokens=tokens,
        batch=batch,
        cache=cache,
        patterns=patterns,
        weights_resident_bytes=weights_resident,
        layer_in_flight_bytes=in_flight,
        unembed_in_flight_bytes=unembed_in_flight,
        activations_bytes=activations,
        cache_bytes=cache_bytes,
        pattern_bytes=pattern_bytes,
        dictionary_bytes=dictionary_bytes,
        peak_bytes=peak,
        process_bytes=process_memory() if device.type == "cpu" else None,
        available_bytes=available,
        read_bytes=read_bytes,
        read_bandwidth=bandwidth,
        est_read_seconds=read_bytes / bandwidth,
        fits=available is None or peak <= available,
        flops=layer_flops + head_flops,
        gemm_rate=rate,
        est_wall_seconds=wall,
        graph_bytes=graph_extra,
    )


def choose_unembed(
    source: Any,
    unembed: str,
    *,
    stream: bool,
    dtype: torch.dtype | None,
    layers: Iterable[int] | None = None,
    device: torch.device | str = "cpu",
) -> str:
    """How a load holds the unembedding: "memory" or "stream".

    "memory" and "stream" as given; "auto" holds it unless memory is short, i.e. unless a streamed load holding
    it would take more than `AUTO_UNEMBED_MEMORY_SHARE` of the memory available now (held when that is
    unknown). Without streaming the unembedding is always held.

    Args:
        source: a checkpoint folder, an open `Checkpoint`, or a `LlamaConfig`.
        unembed: one of `UNEMBED_MODES`.
        stream: whether the layers are streamed (`ll.load(..., stream=True)`).
        dtype, layers, device: as `plan`'s.

    Raises:
        ArgumentError (a ValueError): for an unknown mode, or "stream" without `stream=True`.
    """
    from ..validate import check_choice

    check_choice("unembed", unembed, UNEMBED_MODES, "unembedding mode")
    if not stream:
        if unembed == "stream":
            raise ArgumentError(
                "unembed='stream' reads the unembedding from disk at each forward pass, which only a streamed model "
                "does: pass stream=True as well, or leave unembed='auto'"
            )
        return "memory"
    if unembed != "auto":
        return unembed
    held = plan(source, tokens=0, stream=True, dtype=dtype, layers=layers, cache=None, device=device, unembed="memory")
    if held.available_bytes is None or held.peak_bytes <= AUTO_UNEMBED_MEMORY_SHARE * held.available_bytes:
        return "memory"
    return "stream"


def weights_dtype(source: Any, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a load with `dtype` gives the weights: `dtype` itself, or for None the dtype they are stored
    in (a Checkpoint's tensors; a config's `checkpoint_dtype`, float32 when it names none)."""
    return dtype or _stored_dtype(source) or torch.float32


def check_fits(
    ckpt: Any,
    *,
    layers: Iterable[int] | None,
    dtype: torch.dtype | None,
    device: torch.device | str,
    stream: bool,
    unembed: str = "auto",
) -> Plan:
    """Raises NotEnoughMemoryError, with the estimate and what to try, when the weights alone of this load
    cannot fit in the memory available now (activations are not counted: the load does not know them).

    `dtype` None means as stored (see `weights_dtype`).

    Returns:
        the Plan (tokens=0); its `unembed` is how the load is to hold the unembedding ("auto" resolved).
    """
    ckpt = _open_source(ckpt)
    dtype = weights_dtype(ckpt, dtype)
    estimate = plan(
        ckpt, tokens=0, stream=stream, dtype=dtype, layers=layers, cache=None, device=device, unembed=unembed
    )
    if estimate.fits:
        return estimate
    where = getattr(ckpt, "path", "this checkpoint")
    if torch.device(device).type == "cpu":
        source = "MemAvailable in /proc/meminfo, or the cgroup's memory limit less its usage where lower"
    else:
        source = f"free on {device}"
    message = (
        f"loading {where} in {_dtype_name(dtype)}{' streamed' if stream else ''} needs about "
        f"{_gib(estimate.peak_bytes)} (weights {_gib(estimate.weights_resident_bytes)} + layers in flight "
        f"{_gib(estimate.layer_in_flight_bytes)}), but only {_gib(estimate.available_bytes)} is available "
        f"({source}). Try: "
    )
    options = []
    if not stream:
        streamed = plan(ckpt, tokens=0, stream=True, dtype=dtype, layers=layers, cache=None, device=device)
        cfg = _config_of(ckpt)
        per_layer = layer_param_count(cfg) * dtype.itemsize
        options.append(
            f"stream=True (about {_gib(streamed.peak_bytes)}: only the final norm and the unembedding stay in "
            "memory, each layer is read when the forward pass reaches it, the embedding by rows)"
        )
        options.append(f"layers=range(0, k) to load fewer of the {cfg.n_layers} layers ({_gib(per_layer)} each)")
    elif estimate.unembed == "memory":
        streamed = plan(
            ckpt, tokens=0, stream=True, dtype=dtype, layers=layers, cache=None, device=device, unembed="stream"
        )
        options.append(
            f"unembed='stream' (about {_gib(streamed.peak_bytes)}: the unembedding is read a vocabulary block at a "
            "time at each forward pass)"
        )
    if dtype.itemsize > 2:
        half = plan(
            ckpt, tokens=0, stream=stream, dtype=torch.bfloat16, layers=layers, cache=None, device=device,
            unembed=estimate.unembed if stream else "auto",
        )  # fmt: skip
        options.append(f"dtype=torch.bfloat16 (about {_gib(half.peak_bytes)})")
    options.append("check_memory=False to load anyway")
    raise NotEnoughMemoryError(message + "; ".join(options) + ".")


def _open_source(path: Any) -> Any:
    """A LlamaConfig or an open Checkpoint as given; a folder opened as a Checkpoint."""
    if isinstance(path, LlamaConfig) or isinstance(getattr(path, "config", None), LlamaConfig):
        return path
    from ..io.checkpoint import Checkpoint

    return Checkpoint(path)


def _config_of(source: Any) -> LlamaConfig:
    return source if isinstance(source, LlamaConfig) else _open_source(source).config


def _stored_dtype(source: Any) -> torch.dtype | None:
    """The dtype the weights are stored in: a Checkpoint's tensors tell, a config may say (`checkpoint_dtype`)."""
    stored = getattr(source, "stored_dtype", None)
    if isinstance(stored, torch.dtype):
        return stored
    named = getattr(torch, _config_of(source).checkpoint_dtype or "", None)
    return named if isinstance(named, torch.dtype) else None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _gib(nbytes: int | None) -> str:
    return "unknown" if nbytes is None else f"{nbytes / GIB:.2f} GiB"
