"""The nodes of an attribution graph from the clean run: active features, error nodes, token embeddings and
logit targets, with the vectors that read (encoders, logit directions) and write (decoders, errors) them.

Column (source) order, as circuit-tracer's: [active features, errors (layer-major, then pos), tokens]; logit
nodes come after these in the adjacency matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .transcoders import TranscoderSet

# The hook points the graph reads from the clean run.
CACHED = ("ln1.hook_scale", "ln2.hook_scale", "attn.hook_pattern", "mlp.hook_in", "hook_mlp_out")


@dataclass
class Nodes:
    """Everything the rows of one prompt's graph are built from; [n] counts active features."""

    active_features: torch.Tensor  # [n, 3] long: (layer, pos, feature), sorted
    activation_values: torch.Tensor  # [n]
    pre_activations: torch.Tensor  # [n]: each active feature's pre-activation in the clean run
    encoders: torch.Tensor  # [n, d_model]: pre = encoders[i] . mlp_in[layer, pos] + encoder_consts[i]
    encoder_consts: torch.Tensor  # [n]
    writes: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # layer -> (ids [k], pos [k], [k, d_model])
    errors: torch.Tensor  # [n_layers, pos, d_model]
    embed: torch.Tensor  # [pos, d_model]
    frozen_out: torch.Tensor  # [n_layers, pos, d_model]: MLP output held constant (positions left out)
    logit_ids: torch.Tensor  # [n_logits]
    logit_probabilities: torch.Tensor  # [n_logits]
    logit_vectors: torch.Tensor  # [n_logits, d_model]: demeaned unembedding rows
    logit_values: torch.Tensor  # [n_logits]: the demeaned logits of the clean run at the last position

    @property
    def n_features(self) -> int:
        return len(self.active_features)

    @property
    def sources(self) -> torch.Tensor:
        """What each MLP output holds beyond skip and b_dec [n_layers, pos, d_model]."""
        total = self.errors + self.frozen_out
        for layer, (_, positions, vectors) in self.writes.items():
            total[layer].index_add_(0, positions, vectors)
        return total


def find_nodes(
    model,
    cache: dict[str, torch.Tensor],
    logits: torch.Tensor,
    transcoders: TranscoderSet,
    *,
    dtype: torch.dtype,
    left_out: slice,
    max_n_logits: int,
    desired_logit_prob: float,
) -> Nodes:
    """Encodes every layer's MLP input, splits each MLP output into feature writes, skip, bias and error, and
    picks the logit targets: the most probable tokens until their probabilities sum to `desired_logit_prob`,
    at most `max_n_logits`. Features at the `left_out` positions are zeroed and their MLP output is held
    constant (circuit-tracer does so at BOS, an attention sink whose features are not informative)."""
    n_layers = model.cfg.n_layers
    layer_ids, pos_ids, feature_ids, values, pres, encoders, consts = [], [], [], [], [], [], []
    writes: dict[int, list] = {}
    errors, frozen_out = [], []
    for layer in range(n_layers):
        mlp_in = cache[f"blocks.{layer}.mlp.hook_in"][0].to(dtype)  # [pos, d_model]
        mlp_out = cache[f"blocks.{layer}.hook_mlp_out"][0].to(dtype)
        pre, acts = transcoders.encode(layer, mlp_in)
        acts = acts.clone()
        acts[left_out] = 0
        positions, features = acts.nonzero(as_tuple=True)  # sorted by (pos, feature)
        first_id = sum(len(ids) for ids in feature_ids)
        layer_ids.append(torch.full_like(positions, layer))
        pos_ids.append(positions)
        feature_ids.append(features)
        values.append(acts[positions, features])
        pres.append(pre[positions, features])
        encoder, const = transcoders.encoder_rows(layer, features)
        encoders.append(encoder)
        consts.append(const)
        ids = torch.arange(first_id, first_id + len(features))
        for out_layer, rows in transcoders.decoder_rows(layer, features, acts[positions, features]).items():
            writes.setdefault(out_layer, []).append((ids, positions, rows))
        # The error is what the transcoders leave unexplained of this layer's MLP output.
        reconstruction = transcoders.output_bias(layer).expand_as(mlp_out).clone()
        skip = transcoders.skip_weight(layer)
        if skip is not None:
            reconstruction += mlp_in @ skip.T
        errors.append(mlp_out - reconstruction)  # the writes are taken off below, once all layers wrote
        frozen_out.append(torch.zeros_like(mlp_out))
    merged = {layer: tuple(torch.cat(parts) for parts in zip(*chunks, strict=True)) for layer, chunks in writes.items()}
    for layer, (_, positions, rows) in merged.items():
        errors[layer].index_add_(0, positions, rows, alpha=-1)
    for layer in range(n_layers):
        frozen_out[layer][left_out] = errors[layer][left_out]
        errors[layer][left_out] = 0

    last = logits[0, -1].to(dtype)
    probs = last.softmax(-1)
    top_p, top_ids = probs.topk(max_n_logits)
    cutoff = int(torch.searchsorted(top_p.cumsum(0), torch.tensor(desired_logit_prob, dtype=top_p.dtype))) + 1
    top_ids = top_ids[:cutoff]
    logit_vectors = _demeaned_unembed_rows(model.unembed.weight, top_ids, dtype)
    return Nodes(
        active_features=torch.stack([torch.cat(layer_ids), torch.cat(pos_ids), torch.cat(feature_ids)], dim=1),
        activation_values=torch.cat(values),
        pre_activations=torch.cat(pres),
        encoders=torch.cat(encoders),
        encoder_consts=torch.cat(consts),
        writes=merged,
        errors=torch.stack(errors),
        embed=cache["hook_embed"][0].to(dtype),
        frozen_out=torch.stack(frozen_out),
        logit_ids=top_ids,
        logit_probabilities=probs[top_ids],
        logit_vectors=logit_vectors,
        logit_values=last[top_ids] - last.mean(),
    )


def _demeaned_unembed_rows(weight, ids: torch.Tensor, dtype: torch.dtype, block_rows: int = 16384) -> torch.Tensor:
    """The unembedding's rows of `ids` minus its mean row [len(ids), d_model]. A streamed model's unembedding may
    be on disk (read by ranges of rows and gathered by ids, see loading/stream_vocab.py): its mean is summed a
    block of rows at a time."""
    if isinstance(weight, torch.Tensor):
        unembed = weight.detach().to(dtype)  # [d_vocab, d_model]
        return unembed[ids] - unembed.mean(0)
    d_vocab = weight.shape[0]
    total = torch.zeros(weight.shape[1], dtype=dtype)
    for start in range(0, d_vocab, block_rows):
        total += weight[start : start + block_rows].to(dtype).sum(0)
    return weight[ids].to(dtype) - total / d_vocab
