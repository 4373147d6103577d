"""`ll.attribution_graph`: the direct effects between transcoder features, error nodes, token embeddings and the
top logits of one prompt, through the local replacement model (graphs/frozen.py).

The algorithm is circuit-tracer's (Ameisen et al. 2025, "Circuit Tracing"): a clean run; logit rows; then
feature rows in batches, the next features chosen by their influence on the logits through the rows computed so
far, until the feature budget is spent. A row is one transposed pass of the linear replacement model
(`FrozenReplacement.backward`); each batch starts at its highest target layer, and the queue of features is
sorted by layer before it is cut into batches, so low layers do not pay for the layers above them.

A streamed model's layers are read once, by the clean run, which keeps of each what the transposed passes use
(frozen.block_weights); long prompts' rows can go to disk (`offload`, see offload.py).
"""

from __future__ import annotations

import os

import torch

from ..errors import ArgumentError
from .frozen import FrozenReplacement, block_weights
from .influence import partial_influences, partial_influences_by_chunks
from .nodes import CACHED, Nodes, find_nodes
from .offload import DiskRows, mapped_zeros, resolve_offload
from .result import AttributionGraph
from .transcoders import as_transcoder_set


def attribution_graph(
    model,
    prompt,
    transcoders,
    *,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    max_feature_nodes: int | None = None,
    batch_size: int = 256,
    update_interval: int = 4,
    leave_out_first_position: bool = True,
    offload: bool | str = "auto",
    offload_dir: str | os.PathLike | None = None,
) -> AttributionGraph:
    """Builds the attribution graph of `prompt` with the model's MLPs replaced by `transcoders`.

    Args:
        model: a HookedLlama with all its layers, loaded or streamed (`ll.load(path, stream=True)`: the clean run
            reads each layer once, and keeps of it only what the transposed passes use).
        prompt: a text, or token ids [pos] / [1, pos].
        transcoders: one transcoder per layer (`ll.load_dictionary` of a circuit-tracer set, or SAELens /
            sparsify transcoders from mlp.hook_in to hook_mlp_out), a cross-layer transcoder (`ll.load_dictionary`
            of a circuit-tracer CLT), or any `graphs.transcoders.TranscoderSet`.
        max_n_logits: at most this many logit nodes...
        desired_logit_prob: ...the most probable next tokens until their probabilities sum to this.
        max_feature_nodes: the feature budget (all active features if None), spent on the most influential.
        batch_size: rows per transposed pass.
        update_interval: batches between re-rankings of the features by influence.
        leave_out_first_position: zero the features and error of position 0 (BOS, an attention sink) and hold
            its MLP output constant, as circuit-tracer does.
        offload: write the rows to a file while they are computed and return the adjacency as a memory map
            of another (see graphs/offload.py), for long prompts; "auto" (default) does so when the rows would
            take more than a quarter of the memory available. The graph is the same either way.
        offload_dir: the folder for those files (default: the system's temporary folder); they are unlinked
            at once, and gone when the graph is.

    Returns:
        An AttributionGraph (adjacency [n_nodes, n_nodes], target rows by source columns).
    """
    for name, value in (
        ("max_n_logits", max_n_logits),
        ("batch_size", batch_size),
        ("update_interval", update_interval),
    ):
        if not isinstance(value, int) or value < 1:
            raise ArgumentError(f"{name} must be a positive integer, got {value!r}")
    if not 0.0 < desired_logit_prob <= 1.0:
        raise ArgumentError(f"desired_logit_prob must lie in (0, 1], got {desired_logit_prob}")
    if max_feature_nodes is not None and (not isinstance(max_feature_nodes, int) or max_feature_nodes < 0):
        raise ArgumentError(f"max_feature_nodes must be a non-negative integer or None, got {max_feature_nodes!r}")
    if not (isinstance(offload, bool) or offload == "auto"):
        raise ArgumentError(f"offload must be True, False or 'auto', got {offload!r}")
    if offload_dir is not None and not os.path.isdir(offload_dir):
        raise ArgumentError(f"offload_dir must be an existing folder, got {str(offload_dir)!r}")
    cfg = model.cfg
    if len(model.layer_indices) != cfg.n_layers:
        raise ArgumentError(
            "an attribution graph needs every layer of the model; load it whole, or stream it (stream=True)"
        )
    tokens, _ = model.prepare_tokens(prompt)
    if tokens.shape[0] != 1:
        raise ArgumentError(f"an attribution graph is of one prompt; got a batch of {tokens.shape[0]}")
    dtype = torch.float64 if model.dtype == torch.float64 else torch.float32
    transcoders = as_transcoder_set(transcoders, cfg.n_layers, dtype=dtype)

    # A streamed model's blocks hold their weights only while they run: what the replacement model needs of each
    # is copied out then, by a hook at the block's last hook point (see frozen.block_weights).
    streamed = any(param.is_meta for block in model.blocks.values() for param in block.parameters())
    weights: dict[int, dict] = {}

    def keep_weights(tensor, *, hook):
        layer = int(hook.name.split(".")[1])
        weights[layer] = block_weights(model.blocks[layer], dtype, copy=True)

    with torch.no_grad():
        logits, cache = model.run_with_cache(
            tokens,
            names_filter=lambda name: name.endswith(CACHED) or name in ("hook_embed", "ln_final.hook_scale"),
            fwd_hooks=[(lambda name: name.endswith("hook_resid_post"), keep_weights)] if streamed else (),
            check_memory=False,
        )
        nodes = find_nodes(
            model,
            cache,
            logits,
            transcoders,
            dtype=dtype,
            left_out=slice(0, 1) if leave_out_first_position else slice(0, 0),
            max_n_logits=min(max_n_logits, cfg.d_vocab),
            desired_logit_prob=desired_logit_prob,
        )
        frozen = FrozenReplacement.from_cache(model, cache, transcoders, dtype, weights if streamed else None)
        del cache
        rows = _RowComputer(frozen, nodes)
        adjacency, selected = _attribute(
            rows, nodes, max_feature_nodes, batch_size, update_interval, offload, offload_dir
        )
        constants = _constant_terms(frozen, nodes, selected)
    return AttributionGraph(
        tokens=tokens[0].cpu(),
        str_tokens=_str_tokens(model, tokens[0]),
        n_layers=cfg.n_layers,
        active_features=nodes.active_features,
        activation_values=nodes.activation_values,
        selected_features=selected,
        adjacency=adjacency,
        logit_tokens=nodes.logit_ids,
        logit_probabilities=nodes.logit_probabilities,
        node_constants=constants,
        node_values=torch.cat([nodes.pre_activations[selected], nodes.logit_values]),
        d_vocab=cfg.d_vocab,
        prompt=_decode(model, tokens[0].tolist()),
        logit_strings=[_decode(model, [token]) for token in nodes.logit_ids.tolist()],
        model_config=_model_config(model),
    )


class _RowComputer:
    """Direct-effect rows over the source columns [features, errors, tokens] for batches of targets."""

    def __init__(self, frozen: FrozenReplacement, nodes: Nodes) -> None:
        self.frozen, self.nodes = frozen, nodes
        self.n_layers, self.n_pos, _ = nodes.errors.shape
        self.n_columns = nodes.n_features + (self.n_layers + 1) * self.n_pos
        self.writes_by_pos = {layer: _by_position(*writes) for layer, writes in nodes.writes.items()}

    def __call__(self, layers: torch.Tensor, positions: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """Rows [k, n_columns] of targets reading `vectors` [k, d_model] at (layer, pos); layer n_layers
        stands for ln_final's output (a logit)."""
        nodes, n_features, n_pos = self.nodes, self.nodes.n_features, self.n_pos
        out = vectors.new_zeros(len(layers), self.n_columns)
        ids = torch.arange(len(layers))
        inject = {}
        for layer in layers.unique().tolist():
            if layer < self.n_layers:
                mask = layers == layer
                inject[layer] = (ids[mask], positions[mask], vectors[mask])
        final = None
        if (layers == self.n_layers).any():
            mask = layers == self.n_layers
            final = (ids[mask], positions[mask], vectors[mask])

        def on_mlp_out(layer: int, grad: torch.Tensor) -> None:
            # One matmul per position: gathering grad at every feature's position would copy [rows, k, d_model].
            for pos, feature_ids, writes in self.writes_by_pos.get(layer, ()):
                out[:, feature_ids] += grad[:, pos] @ writes.T
            start = n_features + layer * n_pos
            out[:, start : start + n_pos] = (grad * nodes.errors[layer]).sum(-1)

        grad_embed = self.frozen.backward(inject, final, len(layers), on_mlp_out)
        start = n_features + self.n_layers * n_pos
        out[:, start:] = (grad_embed * nodes.embed).sum(-1)
        return out


def _by_position(ids: torch.Tensor, positions: torch.Tensor, writes: torch.Tensor) -> list:
    """[(pos, ids [k], writes [k, d_model])] for each position written: views of `writes` when its rows are
    sorted by position (a per-layer transcoder's are), copies otherwise (a cross-layer transcoder's)."""
    if len(positions) > 1 and not bool((positions[1:] >= positions[:-1]).all()):
        return [(pos, ids[positions == pos], writes[positions == pos]) for pos in positions.unique().tolist()]
    out, start = [], 0
    for pos, count in zip(*(t.tolist() for t in torch.unique_consecutive(positions, return_counts=True))):
        out.append((pos, ids[start : start + count], writes[start : start + count]))
        start += count
    return out


def _attribute(
    rows: _RowComputer,
    nodes: Nodes,
    max_feature_nodes: int | None,
    batch_size: int,
    update_interval: int,
    offload: bool | str,
    offload_dir,
) -> tuple[torch.Tensor, torch.Tensor]:
    """circuit-tracer's phases 3-5: logit rows, feature rows chosen by influence, the square adjacency. The rows
    are held in memory, or written to disk and read back in chunks (`offload`, see offload.py)."""
    n_features, n_columns = nodes.n_features, rows.n_columns
    n_logits = len(nodes.logit_ids)
    budget = n_features if max_feature_nodes is None else min(max_feature_nodes, n_features)
    dtype = nodes.embed.dtype
    offload = resolve_offload(offload, (budget + n_logits) * (n_columns + n_logits) * dtype.itemsize)
    if offload:
        disk = DiskRows(budget + n_logits, n_columns, dtype, offload_dir)
        write = disk.write

        def influences(filled: int) -> torch.Tensor:
            chunks = lambda: disk.chunks(filled)  # noqa: E731
            return partial_influences_by_chunks(chunks, n_columns, nodes.logit_probabilities, row_to_node[:filled])
    else:
        edge_matrix = nodes.embed.new_zeros(budget + n_logits, n_columns + n_logits)

        def write(start: int, block: torch.Tensor) -> None:
            edge_matrix[start : start + len(block), :n_columns] = block

        def influences(filled: int) -> torch.Tensor:
            return partial_influences(edge_matrix[:filled], nodes.logit_probabilities, row_to_node[:filled])

    row_to_node = torch.zeros(budget + n_logits, dtype=torch.long)
    last_pos = rows.n_pos - 1
    for start in range(0, n_logits, batch_size):
        vectors = nodes.logit_vectors[start : start + batch_size]
        k = len(vectors)
        write(start, rows(torch.full((k,), rows.n_layers), torch.full((k,), last_pos), vectors))
        row_to_node[start : start + k] = torch.arange(start, start + k) + n_columns

    feature_layers, feature_pos = nodes.active_features[:, 0], nodes.active_features[:, 1]
    filled = n_logits
    visited = torch.zeros(n_features, dtype=torch.bool)
    n_visited = 0
    while n_visited < budget:
        if budget == n_features:
            pending = torch.arange(n_features)
        else:
            ranked = torch.argsort(influences(filled)[:n_features], descending=True)
            pending = ranked[~visited[ranked]][: min(update_interval * batch_size, budget - n_visited)]
        # Features of one layer together: a batch's pass starts at its highest layer.
        pending = pending[torch.sort(feature_layers[pending], stable=True).indices]
        for chunk in pending.split(batch_size):
            k = len(chunk)
            write(filled, rows(feature_layers[chunk], feature_pos[chunk], nodes.encoders[chunk]))
            row_to_node[filled : filled + k] = chunk
            visited[chunk] = True
            filled += k
            n_visited += k

    selected = visited.nonzero().squeeze(-1)
    order = row_to_node.argsort()  # features in node order, then logits
    if offload:
        # Only the selected features' columns (and the errors' and tokens'), a chunk of rows at a time.
        keep = torch.cat([selected, torch.arange(n_features, n_columns)])
        kept = nodes.embed.new_zeros(budget + n_logits, len(keep) + n_logits)
        for start, block in disk.chunks(filled):
            kept[start : start + len(block), : len(keep)] = block[:, keep]
        disk.close()
        edge_matrix = kept[order]
        del kept
        adjacency = mapped_zeros(edge_matrix.shape[1], edge_matrix.shape[1], dtype, offload_dir)
    else:
        if budget < n_features:
            keep = torch.cat([selected, torch.arange(n_features, n_columns + n_logits)])
            edge_matrix = edge_matrix[:, keep]
        edge_matrix = edge_matrix[order]
        adjacency = edge_matrix.new_zeros(edge_matrix.shape[1], edge_matrix.shape[1])
    n_nodes = edge_matrix.shape[1]
    adjacency[:budget] = edge_matrix[:budget]
    adjacency[n_nodes - n_logits :] = edge_matrix[budget:]
    return adjacency, selected


def _constant_terms(frozen: FrozenReplacement, nodes: Nodes, selected: torch.Tensor) -> torch.Tensor:
    """What each selected feature's and logit's value holds beyond its incoming edges: its encoder bias (or
    none, for a logit) read through the replacement model run on biases and the frozen outputs alone."""
    mlp_in, final = frozen.forward(torch.zeros_like(nodes.embed), nodes.frozen_out.clone(), with_bias=True)
    layers, positions = nodes.active_features[selected, 0], nodes.active_features[selected, 1]
    features = (nodes.encoders[selected] * mlp_in[layers, positions]).sum(-1) + nodes.encoder_consts[selected]
    logits = nodes.logit_vectors @ final[-1]
    n_sources = len(selected) + (len(frozen.layers) + 1) * len(nodes.embed)
    constants = nodes.embed.new_zeros(n_sources + len(logits))
    constants[: len(selected)] = features
    constants[n_sources:] = logits
    return constants


def _decode(model, ids: list[int]) -> str:
    tokenizer = getattr(model, "tokenizer", None)
    return " ".join(map(str, ids)) if tokenizer is None else tokenizer.decode(ids)


def _model_config(model) -> dict:
    """The fields circuit-tracer's UnifiedConfig holds, for exports it reads."""
    cfg = model.cfg
    name = getattr(model, "name_or_path", None) or getattr(cfg, "name_or_path", None) or cfg.model_type
    return {
        "n_layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "d_head": cfg.d_head,
        "n_heads": cfg.n_heads,
        "d_mlp": cfg.d_mlp,
        "d_vocab": cfg.d_vocab,
        "tokenizer_name": str(name),
        "model_name": str(name),
        "original_architecture": cfg.architecture,
        "n_key_value_heads": cfg.n_kv_heads,
    }


def _str_tokens(model, tokens: torch.Tensor) -> list[str]:
    if getattr(model, "tokenizer", None) is None:
        return [str(int(t)) for t in tokens]
    return list(model.to_str_tokens(tokens))
