"""The dictionary being trained: its parameters, its forward pass and the gradients of its sparse parts.

Shapes: x [batch, d_in] read at hook_in, y [batch, d_out] at hook_out (y = x for an SAE), d_sae latents, k of them
active per token (topk).

TopK, fast on a CPU (timings of one 4,096-token step at 4,608 latents and k = 32, d_in 576, on a 2-core machine
with torch 2.13's CPU build): the encoder is one dense matmul, [batch, d_in] @ [d_in, d_sae] (about 1 s), which no
sparse trick avoids; everything after it touches only the k active latents per token:
- decode: `embedding_bag` sums the k decoder rows each token picked, weighted by their activations, instead of
  a dense [batch, d_sae] @ [d_sae, d_out] (the backward gives both the decoder rows' gradient and the
  activations', without a [batch, k, d_out] gather);
- the encoder's gradient is a sparse [d_sae, batch] @ x [batch, d_in] product holding batch * k values (0.17 s),
  where sparsify adds up a [batch * k, d_in] tensor of products with index_add (1.2 s).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class _TopKEncode(torch.autograd.Function):
    """(values [batch, k], indices [batch, k]) of relu(topk(x @ W_in.T + b_enc)), with a sparse backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, W_in: torch.Tensor, b_enc: torch.Tensor, k: int):
        pre = F.linear(x, W_in, b_enc)  # [batch, d_sae]
        values, indices = pre.topk(k, dim=-1, sorted=False)
        del pre
        # ReLU after the top k, not before (as sparsify does): the same values and latents, one pass fewer.
        positive = values > 0
        values = values * positive
        ctx.save_for_backward(x, indices, positive, W_in)
        ctx.d_sae = W_in.shape[0]
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx, grad_values: torch.Tensor, _grad_indices):
        x, indices, positive, W_in = ctx.saved_tensors
        grad_k = grad_values * positive  # [batch, k]; ReLU passes no gradient below zero
        grad_x = None
        if ctx.needs_input_grad[0]:  # an SAE's input is x - b_dec: b_dec learns through the encoder too
            grad_x = F.embedding_bag(indices, W_in, per_sample_weights=grad_k, mode="sum")
        grad = grad_k.flatten()  # [batch * k]
        latents = indices.flatten()
        tokens = torch.arange(x.shape[0], device=x.device).repeat_interleave(indices.shape[1])
        # d(loss)/d(W_in[j]) = sum over the tokens where latent j is active of grad * x
        shape = (ctx.d_sae, x.shape[0])
        sparse = torch.sparse_coo_tensor(torch.stack([latents, tokens]), grad, shape, check_invariants=False)
        grad_W_in = torch.sparse.mm(sparse, x)
        grad_b_enc = torch.zeros(ctx.d_sae, dtype=grad.dtype, device=grad.device).index_add_(0, latents, grad)
        return grad_x, grad_W_in, grad_b_enc, None


def decode_sparse(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """sum_j values[:, j] * W_dec[indices[:, j]]: [batch, d_out] (no b_dec)."""
    return F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")


class SparseCoder(nn.Module):
    """A TopK or ReLU dictionary in training, in fp32.

    Parameters (the encoder stored as nn.Linear stores it, one row per latent, so that a latent's gradient is
    one contiguous row; it is written transposed, as SAELens' W_enc [d_in, d_sae]):
        W_in [d_sae, d_in], b_enc [d_sae], W_dec [d_sae, d_out], b_dec [d_out].

    Encoding: pre = (x - b_dec if apply_b_dec_to_input else x) @ W_in.T + b_enc; acts = relu(pre) (standard) or
    relu of the k largest pre-activations, the rest zero (topk). Decoding: acts @ W_dec + b_dec. After training,
    `losses` holds each step's FVU, `info` the settings and what the run found, and `path` the folder it wrote.
    """

    def __init__(self, d_in: int, d_sae: int, d_out: int, *, k: int | None, apply_b_dec_to_input: bool) -> None:
        super().__init__()
        self.d_in, self.d_sae, self.d_out, self.k = d_in, d_sae, d_out, k
        self.apply_b_dec_to_input = apply_b_dec_to_input
        self.W_in = nn.Parameter(torch.zeros(d_sae, d_in))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_out))
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        self.losses: list[float] = []
        self.info: dict = {}
        self.path: Path | None = None  # the run's folder, once trained

    @property
    def is_topk(self) -> bool:
        return self.k is not None

    # ------------------------------------------------------------------------------------------ initialise
    @torch.no_grad()
    def initialize(self, *, seed: int, transcoder: bool, standard: bool) -> None:
        """Random weights from `seed`.

        TopK (sparsify): the encoder as nn.Linear(d_in, d_sae) draws it (uniform in +-1/sqrt(d_in), the same
        numbers as sparsify's torch.manual_seed(seed)), the SAE's decoder its copy at unit row norm, the
        transcoder's decoder zero. Standard (SAELens 6): a kaiming-uniform decoder scaled to row norm 0.1, the
        encoder its transpose. Biases start at zero; `initialize_biases` sets them from the first batch.
        """
        generator = torch.Generator().manual_seed(seed)
        if standard:
            bound = math.sqrt(6 / self.d_out)  # kaiming_uniform_'s bound for a [d_sae, d_out] tensor (fan_in d_out)
            self.W_dec.uniform_(-bound, bound, generator=generator)
            self.W_dec.mul_(0.1 / self.W_dec.norm(dim=-1, keepdim=True))
            if self.d_in == self.d_out:
                self.W_in.copy_(self.W_dec)
            else:
                self.W_in.uniform_(-bound, bound, generator=generator)
                self.W_in.mul_(0.1 / self.W_in.norm(dim=-1, keepdim=True))
            return
        bound = 1 / math.sqrt(self.d_in)
        self.W_in.uniform_(-bound, bound, generator=generator)
        if transcoder:
            self.W_dec.zero_()
        else:
            self.W_dec.copy_(self.W_in)
            self.normalize_decoder()

    @torch.no_grad()
    def initialize_biases(self, x: torch.Tensor, y: torch.Tensor, *, transcoder: bool) -> None:
        """sparsify's centring from the first batch: b_dec = mean(y); a transcoder's encoder bias makes the mean
        input's pre-activation zero (an SAE gets the same by subtracting b_dec from its input)."""
        self.b_dec.copy_(y.mean(0))
        if transcoder:
            self.b_enc.copy_(-(x.mean(0) @ self.W_in.T))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Decoder rows to unit norm (a TopK SAE's, each step, as sparsify keeps them)."""
        eps = torch.finfo(self.W_dec.dtype).eps
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True) + eps)

    @torch.no_grad()
    def remove_parallel_gradient(self) -> None:
        """Takes from each decoder row's gradient its part along the row, which unit norm would undo anyway."""
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
        self.W_dec.grad.sub_(parallel * self.W_dec)

    # ------------------------------------------------------------------------------------------ forward
    def _encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.b_dec if self.apply_b_dec_to_input else x

    def encode_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """TopK: (values [batch, k], latent indices [batch, k]) of the active latents, differentiable in values."""
        return _TopKEncode.apply(self._encoder_input(x), self.W_in, self.b_enc, self.k)

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d_sae] before the activation function."""
        return F.linear(self._encoder_input(x), self.W_in, self.b_enc)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense activations [..., d_sae], as `Dictionary.encode` gives them."""
        pre = self.pre_activations(x)
        if not self.is_topk:
            return F.relu(pre)
        values, indices = pre.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, indices, F.relu(values))

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        """[..., d_out] from dense activations [..., d_sae]."""
        return acts @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_topk:
            values, indices = self.encode_sparse(x.reshape(-1, self.d_in))
            out = decode_sparse(values, indices, self.W_dec) + self.b_dec
            return out.reshape(*x.shape[:-1], self.d_out)
        return self.decode(self.encode(x))


def fvu(y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained, sparsify's definition: sum |y - out|^2 / sum |y - mean(y)|^2 over the
    batch (the mean over the batch's tokens)."""
    return (y - out).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
