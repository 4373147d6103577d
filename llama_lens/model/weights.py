"""Weights in TransformerLens' layout: `model.W_Q`, `model.W_U`, `model.OV`, ... as views of the HF-named
parameters (nothing is copied into the module or folded).

Shapes (glossary of model.py):
    W_E [d_vocab, d_model]                     W_U [d_model, d_vocab]     b_U [d_vocab] (zeros)
    W_Q [n_layers, n_heads, d_model, d_head]   b_Q [n_layers, n_heads, d_head]
    W_K, W_V [n_layers, n_kv_heads, d_model, d_head]   b_K, b_V [n_layers, n_kv_heads, d_head]
    W_O [n_layers, n_heads, d_head, d_model]   b_O [n_layers, d_model]
    W_in, W_gate [n_layers, d_model, d_mlp]    b_in [n_layers, d_mlp]
    W_out [n_layers, d_mlp, d_model]           b_out [n_layers, d_model]
    QK, OV: FactoredMatrix [n_layers, n_heads, d_model, d_model]

Grouped-query attention: `W_K`/`W_V` (and `hook_k`/`hook_v`) have one entry per key/value head. Query head `h`
reads key/value head `h // n_rep` (`n_rep = n_heads // n_kv_heads`); `W_K_per_query_head` and
`W_V_per_query_head` repeat them to [n_layers, n_heads, d_model, d_head], the layout TransformerLens' own
`W_K`/`W_V` use for such models, and `QK`/`OV` are per query head. There is no `W_pos`: Llama encodes positions
by rotating q and k (RoPE), not by adding a learned embedding.

Biases a Llama does not have (`attention_bias=False`, `mlp_bias=False`) read as zeros, as in TransformerLens.
In `W_in`/`W_gate`, TransformerLens' names for gated MLPs: `W_gate` feeds `hook_pre` (the SiLU's input, HF's
`gate_proj`) and `W_in` feeds `hook_pre_linear` (HF's `up_proj`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ArgumentError, OutOfRangeError
from .cpu_matmul import Linear


class FactoredMatrix:
    """A product `A @ B` kept as its two factors (TransformerLens' `FactoredMatrix`, the parts we need).

    Args:
        A: [..., ldim, mdim]
        B: [..., mdim, rdim]; leading dimensions broadcast with A's.
    """

    def __init__(self, A: torch.Tensor, B: torch.Tensor) -> None:  # noqa: N803 - the conventional names
        if A.shape[-1] != B.shape[-2]:
            raise ArgumentError(
                f"FactoredMatrix needs A [..., l, m] and B [..., m, r], got {tuple(A.shape)} and {tuple(B.shape)}"
            )
        self.A, self.B = A, B

    @property
    def AB(self) -> torch.Tensor:  # noqa: N802
        """The product [..., ldim, rdim] (materialized: d_model x d_model per head for QK and OV)."""
        return self.A @ self.B

    @property
    def BA(self) -> torch.Tensor:  # noqa: N802
        """The product the other way round [..., mdim, mdim] (needs ldim == rdim): same non-zero eigenvalues."""
        if self.A.shape[-2] != self.B.shape[-1]:
            raise ArgumentError("BA needs a square product (ldim == rdim)")
        return self.B @ self.A

    @property
    def shape(self) -> torch.Size:
        lead = torch.broadcast_shapes(self.A.shape[:-2], self.B.shape[:-2])
        return torch.Size([*lead, self.A.shape[-2], self.B.shape[-1]])

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def T(self) -> FactoredMatrix:  # noqa: N802
        return FactoredMatrix(self.B.transpose(-2, -1), self.A.transpose(-2, -1))

    @property
    def eigenvalues(self) -> torch.Tensor:
        """Eigenvalues of the product [..., mdim], from the small matrix BA (complex)."""
        return torch.linalg.eigvals(self.BA)

    def norm(self) -> torch.Tensor:
        """Frobenius norm of the product [...]."""
        return self.AB.norm(dim=(-2, -1))

    def __getitem__(self, index) -> FactoredMatrix:
        """Indexes the leading dimensions only (e.g. `model.OV[layer, head]`)."""
        index = index if isinstance(index, tuple) else (index,)
        lead = len(self.shape) - 2
        if len(index) > lead:
            raise OutOfRangeError(f"index the {lead} leading dimensions only; read .AB to index the matrix itself")
        lead_shape = self.shape[:-2]
        A = self.A.expand(*lead_shape, *self.A.shape[-2:])  # noqa: N806
        B = self.B.expand(*lead_shape, *self.B.shape[-2:])  # noqa: N806
        return FactoredMatrix(A[index], B[index])

    def __matmul__(self, other: torch.Tensor | FactoredMatrix) -> FactoredMatrix:
        if isinstance(other, FactoredMatrix):
            return FactoredMatrix(self.A, (self.B @ other.A) @ other.B)
        return FactoredMatrix(self.A, self.B @ other)

    def __rmatmul__(self, other: torch.Tensor) -> FactoredMatrix:
        return FactoredMatrix(other @ self.A, self.B)

    def __repr__(self) -> str:
        return f"FactoredMatrix(shape={tuple(self.shape)}, mdim={self.A.shape[-1]})"


class EmbedViews:
    """TransformerLens' name on an embedding module: `model.embed.W_E` [d_vocab, d_model], the weight itself.

    On a streamed model (`loading/stream_vocab.py`) `W_E` is its `OnDiskWeight`: rows read by index
    (`W_E[ids]`, `W_E[v0:v1]`), the whole matrix by `W_E.read()`.
    """

    @property
    def W_E(self) -> torch.Tensor:  # noqa: N802
        return self.weight


class UnembedViews:
    """TransformerLens' names on an unembedding module: `model.unembed.W_U` [d_model, d_vocab] (a view) and
    `model.unembed.b_U` [d_vocab] (zeros: a Llama's unembedding has no bias).

    On a streamed model `W_U` raises `WeightOnDiskError` (the transpose needs the whole matrix) saying how to
    read it, as `model.W_U` does.
    """

    @property
    def W_U(self) -> torch.Tensor:  # noqa: N802
        return self.weight.T

    @property
    def b_U(self) -> torch.Tensor:  # noqa: N802
        return torch.zeros(self.weight.shape[0], dtype=self.weight.dtype, device=self.weight.device)


class Embed(EmbedViews, nn.Embedding):
    """The token embedding (nn.Embedding: same parameter, name and init) with `W_E`."""


class Unembed(UnembedViews, Linear):
    """The unembedding (Linear: same parameter, name and init) with `W_U` and `b_U`."""


class WeightViews:
    """TransformerLens' weight properties for `HookedLlama` (mixed into it); see the module docstring."""

    def _stacked(self, attr: str) -> torch.Tensor:
        """One per-layer weight view stacked over every layer; the model must hold them all."""
        n_layers = self.cfg.n_layers
        if self.layer_indices != list(range(n_layers)):
            raise ArgumentError(
                f"{attr} stacks all {n_layers} layers but this model holds {self.layer_indices}; "
                f"read model.blocks[i].attn.{attr} / .mlp.{attr} per loaded layer"
            )
        owner = "mlp" if attr in ("W_in", "W_gate", "W_out", "b_in", "b_out") else "attn"
        return torch.stack([getattr(getattr(self.blocks[i], owner), attr) for i in range(n_layers)])

    @property
    def W_E(self) -> torch.Tensor:  # noqa: N802
        return self.embed.weight

    @property
    def W_U(self) -> torch.Tensor:  # noqa: N802
        return self.unembed.weight.T

    @property
    def b_U(self) -> torch.Tensor:  # noqa: N802
        return self.unembed.weight.new_zeros(self.cfg.d_vocab)

    def __getattr__(self, name: str):
        # A property raising AttributeError would be swallowed by nn.Module.__getattr__'s generic message.
        if name == "W_pos":
            raise AttributeError(
                "Llama has no W_pos: positions enter by rotating q and k (RoPE, hook_rot_q / hook_rot_k), not by "
                "adding a learned positional embedding"
            )
        return super().__getattr__(name)

    W_Q = property(lambda self: self._stacked("W_Q"))
    W_K = property(lambda self: self._stacked("W_K"))
    W_V = property(lambda self: self._stacked("W_V"))
    W_O = property(lambda self: self._stacked("W_O"))
    b_Q = property(lambda self: self._stacked("b_Q"))
    b_K = property(lambda self: self._stacked("b_K"))
    b_V = property(lambda self: self._stacked("b_V"))
    b_O = property(lambda self: self._stacked("b_O"))
    W_in = property(lambda self: self._stacked("W_in"))
    W_gate = property(lambda self: self._stacked("W_gate"))
    W_out = property(lambda self: self._stacked("W_out"))
    b_in = property(lambda self: self._stacked("b_in"))
    b_out = property(lambda self: self._stacked("b_out"))

    @property
    def W_K_per_query_head(self) -> torch.Tensor:  # noqa: N802
        """W_K repeated for the query heads that read it: [n_layers, n_heads, d_model, d_head]."""
        return self.W_K.repeat_interleave(self.cfg.n_rep, dim=1)

    @property
    def W_V_per_query_head(self) -> torch.Tensor:  # noqa: N802
        """W_V repeated for the query heads that read it: [n_layers, n_heads, d_model, d_head]."""
        return self.W_V.repeat_interleave(self.cfg.n_rep, dim=1)

    @property
    def QK(self) -> FactoredMatrix:  # noqa: N802
        """W_Q @ W_K^T per query head: FactoredMatrix [n_layers, n_heads, d_model, d_model] (before RoPE, which
        rotates q and k by position: the scores are not a fixed bilinear form of the residual stream)."""
        return FactoredMatrix(self.W_Q, self.W_K_per_query_head.transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:  # noqa: N802
        """W_V @ W_O per query head: FactoredMatrix [n_layers, n_heads, d_model, d_model]."""
        return FactoredMatrix(self.W_V_per_query_head, self.W_O)

    def tokens_to_residual_directions(self, tokens: int | str | torch.Tensor | Sequence[int]) -> torch.Tensor:
        """The unembedding column of each token, TransformerLens' definition: `W_U[:, token]`.

        Not folded: the final RMSNorm's weight multiplies the residual stream before W_U, so the logit of a
        token is `(resid / scale * ln_final.w) @ direction` (what `cache.logit_attrs` computes).

        Args:
            tokens: an id, a single-token text, or ids [batch] / [batch, pos].

        Returns:
            [d_model], or [*tokens.shape, d_model].
        """
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        ids = torch.as_tensor(tokens, dtype=torch.long, device=self.unembed.weight.device)
        return self.unembed.weight[ids]  # rows of unembed.weight are the columns of W_U
