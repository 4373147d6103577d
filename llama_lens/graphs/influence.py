"""Influence on the output logits through an attribution graph, and what is built on it: the feature budget's
ranking, pruning, and the replacement and completeness scores. The definitions are circuit-tracer's
(circuit_tracer/graph.py, after Ameisen et al. 2025), so that numbers compare.

Adjacency A [n_nodes, n_nodes]: A[target, source] is the direct effect of source on target. Normalized, each
row's absolute values sum to 1; a node's influence is logit_weights @ (N + N^2 + ...) with N the normalized A.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..errors import ArgumentError, UsageError


def normalize_matrix(matrix: torch.Tensor) -> torch.Tensor:
    """|A| with each row divided by its sum (rows without edges stay zero)."""
    normalized = matrix.abs()
    return normalized / normalized.sum(dim=1, keepdim=True).clamp(min=1e-10)


def compute_influence(normalized: torch.Tensor, logit_weights: torch.Tensor, max_iter: int = 1000) -> torch.Tensor:
    """logit_weights @ (N + N^2 + ...): the graph is acyclic, so the series ends after its depth."""
    current = logit_weights @ normalized
    influence = current
    for _ in range(max_iter):
        if not current.any():
            return influence
        current = current @ normalized
        influence = influence + current
    raise UsageError(f"influence did not converge in {max_iter} steps: the adjacency matrix has a cycle")


def partial_influences(
    edge_matrix: torch.Tensor, logit_probabilities: torch.Tensor, row_to_node: torch.Tensor, max_iter: int = 128
) -> torch.Tensor:
    """Influence of every column node from the rows computed so far (circuit-tracer's
    compute_partial_influences): what ranks the features still to visit.

    Args:
        edge_matrix: the rows computed so far [rows, n_columns], logit rows first.
        logit_probabilities: [n_logits], the weights of the logit rows.
        row_to_node: the node (column) index of each row [rows].
    """
    normalized = edge_matrix.abs()
    normalized = normalized / normalized.sum(dim=1, keepdim=True).clamp(min=1e-8)
    influences = edge_matrix.new_zeros(edge_matrix.shape[1])
    prod = edge_matrix.new_zeros(edge_matrix.shape[1])
    prod[-len(logit_probabilities) :] = logit_probabilities
    for _ in range(max_iter):
        prod = prod[row_to_node] @ normalized
        if not prod.any():
            return influences
        influences = influences + prod
    raise UsageError(f"influence did not converge in {max_iter} steps")


def partial_influences_by_chunks(
    chunks, n_columns: int, logit_probabilities: torch.Tensor, row_to_node: torch.Tensor, max_iter: int = 128
) -> torch.Tensor:
    """`partial_influences` with the rows read a chunk at a time (the offloaded rows, see offload.py), in two
    passes over them and without a copy of them in memory.

    The influence only ever flows through nodes that have a row: with N the normalized rows and S = N[:, nodes
    with rows] (square, rows x rows), the weights q_0 of the logit rows give q_t = q_0 S^t, and the influence is
    (q_0 + q_1 + ...) N. The first pass builds S and each row's normalizer, the second multiplies by N.

    Args:
        chunks: a callable returning an iterator of (first row, rows [c, n_columns]) over the rows so far; the
            rows hold no logit columns (nothing reads a logit: they would be zero).
        n_columns: the source columns; logit nodes are n_columns, n_columns + 1, ...
        logit_probabilities: [n_logits], the weights of the logit rows.
        row_to_node: the node (column) index of each row [rows].

    Returns:
        [n_columns + n_logits] as `partial_influences` (zero at the logits).
    """
    n_rows, n_logits = len(row_to_node), len(logit_probabilities)
    is_logit = row_to_node >= n_columns
    sums = logit_probabilities.new_zeros(n_rows)
    square = logit_probabilities.new_zeros(n_rows, n_rows)  # S; a logit node's column stays zero
    for start, rows in chunks():
        stop = start + len(rows)
        sums[start:stop] = rows.abs().sum(1).clamp(min=1e-8)
        square[start:stop, ~is_logit] = rows[:, row_to_node[~is_logit]].abs() / sums[start:stop, None]
    weights = logit_probabilities.new_zeros(n_rows)  # q_0: the logit rows' probabilities
    weights[is_logit] = logit_probabilities[row_to_node[is_logit] - n_columns]
    total = weights.clone()
    for _ in range(max_iter):
        weights = weights @ square
        if not weights.any():
            break
        total += weights
    else:
        raise UsageError(f"influence did not converge in {max_iter} steps")
    influences = logit_probabilities.new_zeros(n_columns + n_logits)
    for start, rows in chunks():
        stop = start + len(rows)
        influences[:n_columns] += (total[start:stop] / sums[start:stop]) @ rows.abs()
    return influences


def find_threshold(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """The score above which the highest scores hold `threshold` of the total."""
    sorted_scores = torch.sort(scores, descending=True).values
    cumulative = torch.cumsum(sorted_scores, dim=0) / torch.sum(sorted_scores)
    index = min(int(torch.searchsorted(cumulative, threshold).item()), len(cumulative) - 1)
    return sorted_scores[index]


class PruneResult(NamedTuple):
    node_mask: torch.Tensor  # [n_nodes] bool: nodes kept
    edge_mask: torch.Tensor  # [n_nodes, n_nodes] bool: edges kept
    cumulative_scores: torch.Tensor  # [n_nodes]: share of total influence held by nodes at least as influential


def prune(
    adjacency: torch.Tensor,
    logit_probabilities: torch.Tensor,
    *,
    n_features: int,
    n_tokens: int,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
) -> PruneResult:
    """Keeps the nodes holding `node_threshold` of the influence on the logits, then the edges holding
    `edge_threshold` of the influence among those, then drops nodes left without an incoming (features) or
    outgoing (features and errors) edge until nothing changes. Tokens and logits always stay."""
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ArgumentError(f"{name} must lie in [0, 1], got {value}")
    n_logits = len(logit_probabilities)
    kept_always = n_logits + n_tokens
    logit_weights = adjacency.new_zeros(adjacency.shape[0])
    logit_weights[-n_logits:] = logit_probabilities.to(adjacency.dtype)

    node_influence = compute_influence(normalize_matrix(adjacency), logit_weights)
    node_mask = node_influence >= find_threshold(node_influence, node_threshold)
    node_mask[-kept_always:] = True

    pruned = adjacency.clone()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    normalized_pruned = normalize_matrix(pruned)
    edge_scores = normalized_pruned * (compute_influence(normalized_pruned, logit_weights) + logit_weights)[:, None]
    edge_mask = edge_scores >= find_threshold(edge_scores.flatten(), edge_threshold)

    old_node_mask = node_mask.clone()
    node_mask[:-kept_always] &= edge_mask[:, :-kept_always].any(0)
    node_mask[:n_features] &= edge_mask[:n_features].any(1)
    while not torch.equal(node_mask, old_node_mask):
        old_node_mask[:] = node_mask
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        node_mask[:-kept_always] &= edge_mask[:, :-kept_always].any(0)
        node_mask[:n_features] &= edge_mask[:n_features].any(1)

    sorted_scores, order = torch.sort(node_influence, descending=True)
    cumulative = torch.zeros_like(node_influence)
    cumulative[order] = torch.cumsum(sorted_scores, dim=0) / torch.sum(sorted_scores)
    return PruneResult(node_mask, edge_mask, cumulative)


def graph_scores(
    adjacency: torch.Tensor, logit_probabilities: torch.Tensor, *, n_features: int, n_errors: int, n_tokens: int
) -> tuple[float, float]:
    """(replacement score, completeness score), circuit-tracer's compute_graph_scores.

    Replacement: the share of the tokens' and errors' influence on the logits that belongs to the tokens.
    Completeness: each node's share of incoming (normalized) edges not from error nodes, weighted by the node's
    influence on the logits (plus the logits' own weights).
    """
    n_logits = len(logit_probabilities)
    error_start, error_end = n_features, n_features + n_errors
    logit_weights = adjacency.new_zeros(adjacency.shape[0])
    logit_weights[-n_logits:] = logit_probabilities.to(adjacency.dtype)
    normalized = normalize_matrix(adjacency)
    node_influence = compute_influence(normalized, logit_weights)
    token_influence = node_influence[error_end : error_end + n_tokens].sum()
    error_influence = node_influence[error_start:error_end].sum()
    replacement = token_influence / (token_influence + error_influence)
    non_error = 1 - normalized[:, error_start:error_end].sum(dim=-1)
    output_influence = node_influence + logit_weights
    completeness = (non_error * output_influence).sum() / output_influence.sum()
    return float(replacement), float(completeness)
