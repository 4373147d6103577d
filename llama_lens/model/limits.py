"""Checks made before a forward pass runs: is the prompt within the model's context length, and will the pass fit
in memory? Both raise a LlamaLensError that names the figures and what to do, where the work would otherwise end
in numbers the model was never trained on or in the allocator's raw "out of memory" half way through.

The forward pass (`HookedLlama.forward`), the logit lens and `generate` call them with what they are about to do.
"""

from __future__ import annotations

import warnings

import torch

from ..config import LlamaConfig
from ..errors import ArgumentError, NotEnoughMemoryError
from . import memory
from .memory import GIB

# Below this estimate the available memory is not even read: a short prompt (or one generated token) costs a
# few megabytes, and reading /proc and the cgroup files at every step of `generate` would cost more than that.
# Tests set it to 0 to check small models.
CHECK_FLOOR_BYTES = 256 * 2**20


def check_context_length(model, n_positions: int, *, what: str = "the forward pass", advice: str = "") -> None:
    """Raises ArgumentError when `n_positions` is past the model's `max_position_embeddings`: RoPE positions past
    it were never trained, so what the model computes there is unreliable. A model with
    `allow_past_context = True` warns once instead (dynamic NTK scaling, made to stretch RoPE, never complains).
    """
    cfg: LlamaConfig = model.cfg
    limit = cfg.max_position_embeddings
    if n_positions <= limit or (cfg.rope_scaling is not None and cfg.rope_scaling.kind == "dynamic"):
        return
    if not getattr(model, "allow_past_context", False):
        raise ArgumentError(
            f"{what} would run {n_positions} positions, past the model's context length "
            f"(max_position_embeddings {limit}): {advice or f'keep prompts within {limit} tokens'} (e.g. "
            f"tokens[:, -{limit}:] keeps the last {limit}); or set model.allow_past_context = True to run past the "
            "trained length anyway (what the model computes there is unreliable)"
        )
    if not getattr(model, "warned_past_context", False):
        model.warned_past_context = True  # once per model, not once per generated token
        warnings.warn(
            f"{n_positions} positions is past the model's context length (max_position_embeddings {limit}): "
            "positions beyond it were never trained, so what the model computes there is unreliable, and "
            f"attention's time and memory grow with the square of the length. Keep prompts (plus generated "
            f"tokens) within {limit} positions.",
            RuntimeWarning,
            stacklevel=5,  # the caller of model(...): past forward and nn.Module's two call wrappers
        )


def forward_nbytes(
    cfg: LlamaConfig,
    *,
    batch: int,
    pos: int,
    itemsize: int,
    written_out: bool,
    k_pos: int | None = None,
    logits_pos: int | None = None,
) -> int:
    """Working memory of one forward pass over `pos` new positions attending to `k_pos` (default `pos`; more with
    a KV cache), with logits at `logits_pos` positions (default `pos`; 0 when the pass stops before the
    unembedding). `memory.forward_working_nbytes`, with the attention and the logits widened or cut to these."""
    k_pos = pos if k_pos is None else k_pos
    logits_pos = pos if logits_pos is None else logits_pos
    working = memory.forward_working_nbytes(cfg, batch=batch, pos=pos, itemsize=itemsize, written_out=False)
    working += (logits_pos - pos) * batch * cfg.d_vocab * (itemsize + 4)  # the logits and their float32 softmax
    if written_out:
        working += batch * cfg.n_heads * pos * k_pos * (2 * itemsize + 4)  # scores, float32 softmax, pattern
    return working


def check_fits(need: int, device: torch.device | str, *, what: str, advice: str) -> None:
    """Raises NotEnoughMemoryError when `need` bytes are more than the memory available on `device` now (not
    checked below CHECK_FLOOR_BYTES, nor where the available memory is unknown)."""
    if need < CHECK_FLOOR_BYTES:
        return
    device = torch.device(device)
    available = memory.available_memory(device)
    if available is None or need <= available:
        return
    raise NotEnoughMemoryError(
        f"{what} needs about {need / GIB:.2f} GiB ({need} bytes) but only {available / GIB:.2f} GiB ({available} "
        f"bytes) is available on {device}: {advice}"
    )


def check_forward_fits(
    model,
    *,
    batch: int,
    pos: int,
    itemsize: int,
    device: torch.device,
    k_pos: int | None = None,
    logits_pos: int | None = None,
) -> None:
    """`check_fits` for one forward pass of `model` (the attention written out when a hook reads the pattern
    or the scores, as `attention.Attention` then does)."""
    sizes = dict(batch=batch, pos=pos, itemsize=itemsize, k_pos=k_pos, logits_pos=logits_pos)
    if forward_nbytes(model.cfg, written_out=True, **sizes) < CHECK_FLOOR_BYTES:
        return  # small: not worth walking the modules for their hooks
    written_out = any(
        getattr(module, "has_hooks", False)
        for name, module in model.named_modules()
        if name.endswith(("hook_pattern", "hook_attn_scores"))
    )
    need = forward_nbytes(model.cfg, written_out=written_out, **sizes)
    check_fits(
        need,
        device,
        what=f"a forward pass over {batch} x {pos} positions",
        advice="run fewer prompts at a time or shorter ones"
        + (", or read the attention pattern of fewer layers" if written_out else ""),
    )


def check_generation_fits(model, tokens: torch.Tensor, max_new_tokens: int, *, use_kv_cache: bool) -> None:
    """Before `generate` runs: the prompt plus the new tokens within the context length, and the prompt's forward
    pass plus the KV cache of every position in memory."""
    cfg: LlamaConfig = model.cfg
    batch, pos = tokens.shape
    run = pos + max(max_new_tokens - 1, 0)  # the last new token is picked, never run through the model
    check_context_length(
        model,
        run,
        what=f"generate (a prompt of {pos} tokens + max_new_tokens={max_new_tokens})",
        advice=f"lower max_new_tokens to {max(cfg.max_position_embeddings - pos + 1, 0)} or shorten the prompt",
    )
    weight = model.embed.weight  # a streamed model's may stay on disk: its dtype and device are known
    itemsize = weight.dtype.itemsize
    n_layers = len(getattr(model, "layer_indices", range(cfg.n_layers)))
    kv = 2 * n_layers * batch * cfg.n_kv_heads * cfg.d_head * (run if use_kv_cache else 0) * itemsize
    working = forward_nbytes(
        cfg, batch=batch, pos=run if not use_kv_cache else pos, itemsize=itemsize, written_out=False
    )
    check_fits(
        kv + working,
        weight.device,
        what=f"generate over {batch} x {run} positions (KV cache {kv / GIB:.2f} GiB)",
        advice="generate for fewer prompts at a time, fewer new tokens or shorter prompts",
    )
