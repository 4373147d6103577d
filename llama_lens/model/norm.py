"""RMSNorm (Zhang & Sennrich 2019, arXiv:1910.07467) with TransformerLens' two hook points.

Used for the residual stream (`ln1`, `ln2`, `ln_final`: [batch, pos, d_model]) and, in Qwen3, for each head's
queries and keys (`attn.q_norm`, `attn.k_norm`: [batch, pos, heads, d_head]); it normalizes the last dimension.
"""

from __future__ import annotations

import torch
from torch import nn

from .hooks import HookPoint


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))
        self.hook_scale = HookPoint()  # [..., 1]: [batch, pos, 1], or [batch, pos, heads, 1] for q_norm/k_norm
        self.hook_normalized = HookPoint()  # [..., width], before the weight, as in TransformerLens

    @property
    def w(self) -> torch.Tensor:
        """The weight [width] (TransformerLens' name)."""
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in float32 at least, as transformers does (float64 stays float64: exact tests run in it).
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        scale = self.hook_scale((x32.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        normalized = self.hook_normalized((x32 / scale).to(x.dtype))
        return self.weight * normalized
