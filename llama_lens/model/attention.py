"""Attention with a named hook at every step: RoPE, grouped-query attention, sliding windows, q/k norms.

Dimension glossary as in model.py (batch, pos, q_pos / k_pos, d_model, n_heads, n_kv_heads, d_head).

One `Attention` serves every architecture llama_lens reads; the config switches on what differs:
- Llama: biases on q, k, v and o when `attention_bias` (Touvron et al. 2023);
- Mistral: a sliding window, each query seeing itself and the `sliding_window - 1` keys before it (Jiang et al.
  2023, arXiv:2310.06825); Qwen2/3 slide on the layers `layer_types` names;
- Qwen2: biases on q, k and v but not o (`qkv_bias`);
- Qwen3: RMSNorm over d_head on each head's q and k before RoPE (`qk_norm`, hook points `attn.q_norm.*` and
  `attn.k_norm.*`, TransformerLens' names).

References: RoPE (Su et al. 2021, arXiv:2104.09864), GQA (Ainslie et al. 2023, arXiv:2305.13245). Numerics follow
transformers' modeling code so that logits agree to float rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LlamaConfig
from .cpu_matmul import Linear, matmul
from .hooks import HookPoint
from .kv_cache import KVCache
from .norm import RMSNorm


# ----------------------------------------------------------------------------------------------- RoPE
def rope_inv_freq(cfg: LlamaConfig, seq_len: int, *, device: torch.device) -> torch.Tensor:
    """Inverse frequencies [d_head // 2] for the config's RoPE variant (float32)."""
    dim = cfg.d_head
    base = cfg.rope_theta
    scaling = cfg.rope_scaling
    # A dynamic scaling built in Python may leave the original length out; transformers grows the base past
    # max_position_embeddings then, and so do we (config.json's reader fills it in the same way).
    original = None if scaling is None else scaling.original_max_position_embeddings or cfg.max_position_embeddings
    if scaling is not None and scaling.kind == "dynamic" and seq_len > original:
        # NTK-aware: grow the base with the context so low frequencies stretch and high ones stay.
        base = base * ((scaling.factor * seq_len / original) - (scaling.factor - 1)) ** (dim / (dim - 2))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    inv_freq = 1.0 / (base**exponents)
    if scaling is None or scaling.kind == "dynamic":
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    # llama3: long wavelengths slow down by `factor`, short ones stay, the band between is interpolated.
    original = scaling.original_max_position_embeddings
    low_freq_wavelen = original / scaling.low_freq_factor
    high_freq_wavelen = original / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (original / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(cfg: LlamaConfig, positions: torch.Tensor, *, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [batch, pos, 1, d_head] for integer `positions` [batch, pos]."""
    inv_freq = rope_inv_freq(cfg, int(positions.max()) + 1, device=positions.device)
    angles = positions[..., None].float() * inv_freq  # [batch, pos, d_head // 2]
    angles = torch.cat([angles, angles], dim=-1)[:, :, None, :]  # [batch, pos, 1, d_head]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates [batch, pos, heads, d_head] in HF's rotate-half layout (pairs i and i + d_head/2)."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


# ------------------------------------------------------------------------------------- sliding window
def sliding_window_mask(
    mask: torch.Tensor | None, q_pos: int, *, k_pos: int, window: int, device: torch.device
) -> torch.Tensor | None:
    """`mask` narrowed to the window: a query sees itself and the `window - 1` keys before it.

    Queries are the last q_pos of the k_pos positions (earlier ones are in the KV cache). Distances count
    positions in the sequence, padding included, as transformers' `sliding_window_overlay` does.

    Args:
        mask: [batch, 1, q_pos, k_pos] (True = may attend), or None for plain causal.
        window: how many keys a query sees at most.

    Returns:
        [batch or 1, 1, q_pos, k_pos], or `mask` itself when no query reaches past the window.
    """
    if k_pos <= window:
        return mask  # the farthest key a query can see is at most window - 1 back
    query = torch.arange(k_pos - q_pos, k_pos, device=device)[:, None]  # [q_pos, 1]
    key = torch.arange(k_pos, device=device)[None, :]  # [1, k_pos]
    in_window = (key <= query) & (key > query - window)  # [q_pos, k_pos], causal as well
    return in_window[None, None] if mask is None else mask & in_window


# ------------------------------------------------------------------------------------------ Attention
class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.window = cfg.attention_window(layer)  # None: every earlier key
        qkv_bias = cfg.has_qkv_bias
        self.q_proj = Linear(cfg.d_model, cfg.n_heads * cfg.d_head, bias=qkv_bias)
        self.k_proj = Linear(cfg.d_model, cfg.n_kv_heads * cfg.d_head, bias=qkv_bias)
        self.v_proj = Linear(cfg.d_model, cfg.n_kv_heads * cfg.d_head, bias=qkv_bias)
        self.o_proj = Linear(cfg.n_heads * cfg.d_head, cfg.d_model, bias=cfg.has_o_bias)
        # Hook points registered in forward order, so hook_names and caches list them as they happen.
        for name in ("q", "k", "v"):
            setattr(self, f"hook_{name}", HookPoint())
        self.q_norm = RMSNorm(cfg.d_head, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.d_head, cfg.norm_eps) if cfg.qk_norm else None
        for name in ("rot_q", "rot_k", "attn_scores", "pattern", "z", "result"):
            setattr(self, f"hook_{name}", HookPoint())
        if cfg.n_rep > 1:
            # Lets these points explain the grouping when a hook indexes them by query head.
            kv_points = [self.hook_k, self.hook_v, self.hook_rot_k]
            if self.k_norm is not None:
                kv_points += [self.k_norm.hook_scale, self.k_norm.hook_normalized]
            for point in kv_points:
                point.kv_grouping = (cfg.n_heads, cfg.n_kv_heads)

    # TransformerLens' weight layout (views, no copies); see llama_lens/model/weights.py for the shapes.
    @property
    def W_Q(self) -> torch.Tensor:  # noqa: N802 - [n_heads, d_model, d_head]
        return self.q_proj.weight.view(self.cfg.n_heads, self.cfg.d_head, self.cfg.d_model).transpose(1, 2)

    @property
    def W_K(self) -> torch.Tensor:  # noqa: N802 - [n_kv_heads, d_model, d_head]
        return self.k_proj.weight.view(self.cfg.n_kv_heads, self.cfg.d_head, self.cfg.d_model).transpose(1, 2)

    @property
    def W_V(self) -> torch.Tensor:  # noqa: N802 - [n_kv_heads, d_model, d_head]
        return self.v_proj.weight.view(self.cfg.n_kv_heads, self.cfg.d_head, self.cfg.d_model).transpose(1, 2)

    @property
    def W_O(self) -> torch.Tensor:  # noqa: N802 - [n_heads, d_head, d_model]
        return self.o_proj.weight.view(self.cfg.d_model, self.cfg.n_heads, self.cfg.d_head).permute(1, 2, 0)

    def _bias(self, linear: nn.Linear, heads: int | None) -> torch.Tensor:
        bias = linear.bias if linear.bias is not None else linear.weight.new_zeros(linear.out_features)
        return bias if heads is None else bias.view(heads, self.cfg.d_head)

    b_Q = property(lambda self: self._bias(self.q_proj, self.cfg.n_heads))  # [n_heads, d_head]
    b_K = property(lambda self: self._bias(self.k_proj, self.cfg.n_kv_heads))  # [n_kv_heads, d_head]
    b_V = property(lambda self: self._bias(self.v_proj, self.cfg.n_kv_heads))
    b_O = property(lambda self: self._bias(self.o_proj, None))  # [d_model]

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        kv_cache: KVCache | None,
    ) -> torch.Tensor:
        """x [batch, pos, d_model]; mask [batch, 1, q_pos, k_pos] (True = may attend) or None for plain causal;
        a sliding window is applied here, on top of it."""
        cfg = self.cfg
        batch, pos, _ = x.shape
        q = self.hook_q(self.q_proj(x).view(batch, pos, cfg.n_heads, cfg.d_head))
        k = self.hook_k(self.k_proj(x).view(batch, pos, cfg.n_kv_heads, cfg.d_head))
        v = self.hook_v(self.v_proj(x).view(batch, pos, cfg.n_kv_heads, cfg.d_head))
        if self.q_norm is not None:
            # Qwen3: each head's q and k normalized over d_head (hook_q/hook_k hold them before, as in TL).
            q, k = self.q_norm(q), self.k_norm(k)
        q = self.hook_rot_q(apply_rope(q, cos, sin))
        k = self.hook_rot_k(apply_rope(k, cos, sin))

        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [batch, heads, pos, d_head]
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, k, v)  # [batch, n_kv_heads, k_pos, d_head]

        # A left-padding query may see no key at all; its pattern row is all zeros (as in TransformerLens), so
        # its z is zero on both paths. (A sliding window changes no row's answer: a real query sees itself.)
        has_key = None if mask is None else mask.any(dim=-1, keepdim=True)  # [batch, 1, q_pos, 1]
        if self.window is not None:
            mask = sliding_window_mask(mask, pos, k_pos=k.shape[2], window=self.window, device=x.device)
        if self.hook_attn_scores.has_hooks or self.hook_pattern.has_hooks:
            z = self._attention_written_out(q, k, v, mask, has_key)
        else:
            # Nothing reads the pattern: let the fused kernel do the same arithmetic. Rows without a key attend
            # everywhere (softmax of nothing is NaN) and are zeroed after.
            sdpa_mask = mask if has_key is None else mask | ~has_key
            z = F.scaled_dot_product_attention(
                q, k, v, attn_mask=sdpa_mask, is_causal=mask is None, enable_gqa=cfg.n_rep > 1
            )
            if has_key is not None:
                z = z * has_key
        z = self.hook_z(z.transpose(1, 2))  # [batch, pos, n_heads, d_head]

        if self.hook_result.has_hooks:
            # Each head's write into the residual stream; they sum (plus the bias) to the attention output.
            w_o = self.o_proj.weight.view(cfg.d_model, cfg.n_heads, cfg.d_head)
            result = self.hook_result(torch.einsum("bphd,mhd->bphm", z, w_o))  # [batch, pos, n_heads, d_model]
            out = result.sum(dim=2)
            return out if self.o_proj.bias is None else out + self.o_proj.bias
        return self.o_proj(z.reshape(batch, pos, cfg.n_heads * cfg.d_head))

    def _attention_written_out(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, has_key: torch.Tensor | None
    ) -> torch.Tensor:
        """Scores, softmax and weighted sum spelled out so the hooks see real tensors; returns z [batch,
        n_heads, q_pos, d_head]."""
        n_rep = self.cfg.n_rep
        # Query head j reads key/value head j // n_rep.
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        scores = matmul(q, k.transpose(-1, -2)) / math.sqrt(self.cfg.d_head)  # [batch, n_heads, q_pos, k_pos]
        if mask is None:
            q_pos, k_pos = scores.shape[-2:]
            mask = torch.ones(q_pos, k_pos, dtype=torch.bool, device=q.device).tril(k_pos - q_pos)
        scores = self.hook_attn_scores(scores.masked_fill(~mask, float("-inf")))
        if has_key is not None:
            # Rows with no key: softmax over zeros (not over -inf, which is NaN in value and gradient), then zeroed.
            scores = scores.masked_fill(~has_key, 0.0)
        # Softmax in float32 at least, as transformers does (float64 stays float64), then back to the activations'
        # dtype.
        pattern = scores.softmax(dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
        pattern = self.hook_pattern(pattern if has_key is None else pattern * has_key)
        return matmul(pattern, v)
