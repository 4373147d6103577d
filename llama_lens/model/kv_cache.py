"""The key/value cache of incremental decoding: each layer's keys (after RoPE) and values of earlier positions.

Its own module so that generation (`generate.py`) and the model (`model.py`) both use it without importing each
other.

Sliding-window layers (Mistral, Qwen2/3) keep every position here too: the window is applied by the attention mask
(`attention.sliding_window_mask`), so a pattern hooked during generation is [batch, n_heads, q_pos, k_pos] over the
whole sequence, zero outside the window, as on a full forward pass.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys (after RoPE) and values of earlier positions, per layer, for incremental decoding."""

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}  # layer -> [batch, n_kv_heads, k_pos, d_head]
        self.values: dict[int, torch.Tensor] = {}
        self.attention_mask: torch.Tensor | None = None  # [batch, k_pos], 1 for real tokens

    @property
    def length(self) -> int:
        return 0 if self.attention_mask is None else self.attention_mask.shape[1]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer in self.keys:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v
