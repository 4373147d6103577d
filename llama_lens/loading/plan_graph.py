"""What `ll.attribution_graph` adds to a forward pass's memory, for `ll.plan(..., graph={...})`.

The graph's keywords are those of `ll.attribution_graph` (transcoders, max_feature_nodes, batch_size, offload,
max_n_logits), plus `active_features`: the (layer, pos, feature) triples that fire on the prompt, which only
the run knows (default: every position but the first times each transcoder's k for TopK, else 64 per token).

Shapes: P tokens, L layers, A active features, B = min(max_feature_nodes, A) rows of features and G logit
rows, K rows per batch, C = A + (L + 1) P source columns; `it` the graph's dtype size (float32, or float64 for a
float64 model). The phases and what each holds beyond the model's resident weights:

    clean run   the model's pass (layers in flight, activations) + the cache the graph reads: every layer's
                attention pattern [H, P, P], norm scales, MLP input and output, and the logits [P, V]
    nodes       the cache and logits + the transcoders' encoders + the active features' encoder rows and
                decoder writes [A, d_model] each, gathered per layer and then joined: 4 A d_model at the join
    rows        the frozen replacement model (patterns, gains, V/O copies of a streamed model, errors) + the
                encoder rows and writes + one batch: its row block [K, C] and ~5 gradients [K, P, d_model];
                the rows [B + G, C + G] held in memory unless offloaded (and twice more while ranking)

The per-layer lists of the nodes phase are freed once joined, but where each layer's list is small enough for
glibc's heap (under 32 MiB: short prompts) the allocator keeps that memory in the process, and the rows phase
is counted on top of it. scripts/bench_graph_long.py measures the result.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..config import LlamaConfig
from ..errors import ArgumentError
from ..model.memory import exceeds_offload_share
from .plan_sizes import dictionary_bytes

GRAPH_KEYS = ("transcoders", "max_feature_nodes", "batch_size", "offload", "max_n_logits", "active_features")
# Gradients [K, P, d_model] alive at once in a batch's transposed pass (grad, its product with W_O, the
# attention's permuted copies, the product with W_V).
BATCH_GRADIENTS = 5
# glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: the largest block its malloc serves from the heap.
MMAP_THRESHOLD_MAX = 32 * 2**20


def graph_bytes(graph: Mapping[str, Any], cfg: LlamaConfig, *, tokens: int, act: int, stream: bool) -> tuple[int, int]:
    """(bytes the graph holds during the clean run beyond a plain pass's, bytes of its peak after the clean run),
    for `tokens` positions and activations of `act` bytes (see the module docstring)."""
    unknown = sorted(set(graph) - set(GRAPH_KEYS))
    if unknown or "transcoders" not in graph:
        raise ArgumentError(
            f"graph= takes ll.attribution_graph's keywords {list(GRAPH_KEYS)}, with transcoders (opened with "
            f"ll.load_dictionary); got {sorted(graph)}"
        )
    transcoders = list(graph["transcoders"])
    P, L, D, it = tokens, cfg.n_layers, cfg.d_model, max(act, 4)  # noqa: N806 - the docstring's names
    A = graph.get("active_features")  # noqa: N806
    if A is None:  # position 0 is left out
        per_token = sum(getattr(t, "k", None) or 64 for t in transcoders) / max(len(transcoders), 1)
        A = round(per_token * max(P - 1, 0) * L)  # noqa: N806
    budget = graph.get("max_feature_nodes")
    B = A if budget is None else min(budget, A)  # noqa: N806
    G = graph.get("max_n_logits", 10)  # noqa: N806
    K = graph.get("batch_size", 256)  # noqa: N806
    C = A + (L + 1) * P  # noqa: N806
    # The encoders and biases held (the decoders are read by rows), as a splice holds them.
    held_transcoders = dictionary_bytes(transcoders, P, None) - max(
        (t.splice_memory(P, None)[1] for t in transcoders), default=0
    )
    patterns = L * cfg.n_heads * P * P * it
    per_position = L * P * D * it  # one [L, P, d_model] tensor
    cache = L * (cfg.n_heads * P * P + 2 * P * D + 2 * P) * act + P * D * act
    clean = held_transcoders + cache

    logits = P * cfg.d_vocab * act
    nodes = held_transcoders + cache + logits + 4 * A * D * it + 2 * per_position
    vo = L * (cfg.n_kv_heads * cfg.d_head * D + D * cfg.n_heads * cfg.d_head) * it if stream else 0
    frozen = patterns + 2 * per_position + vo + 2 * per_position  # patterns, gains, V/O, errors and held outputs
    batch = min(K, B + G) * (C + BATCH_GRADIENTS * P * D) * it
    # The nodes phase's per-layer lists, once freed, stay in the process where glibc served them from its heap:
    # blocks under its largest mmap threshold (32 MiB on 64-bit); larger ones are mapped and given back.
    per_layer = A / max(L, 1) * D * it
    retained = 2 * A * D * it if per_layer < MMAP_THRESHOLD_MAX else 0
    rows_held = (B + G) * (C + G) * it
    offload = graph.get("offload", "auto")
    if offload == "auto":  # the choice ll.attribution_graph makes (graphs/offload.resolve_offload)
        offload = exceeds_offload_share(rows_held)
    # Ranking by influence copies the rows twice (abs, normalized); offloaded, it holds a square of rows by rows.
    ranking = (B + G) ** 2 * it if offload else 2 * rows_held
    # A batch's pass and the ranking take turns.
    rows = held_transcoders + frozen + 2 * A * D * it + retained + (0 if offload else rows_held)
    rows += max(batch, ranking if B < A else 0)
    return clean, max(nodes, rows)


def added_bytes(
    graph: Mapping[str, Any], cfg: LlamaConfig, tokens: int, batch: int, act: int, stream: bool, peak: int, held: int
) -> int:
    """What the graph adds to a plain pass's `peak`, given the bytes `held` all along (resident weights,
    dictionaries): the larger of the clean run with the graph's cache and the phases after it."""
    if batch != 1:
        raise ArgumentError(f"an attribution graph is of one prompt; plan it with batch=1, not {batch}")
    during_clean, after_clean = graph_bytes(graph, cfg, tokens=tokens, act=act, stream=stream)
    return max(peak + during_clean, held + after_clean) - peak
