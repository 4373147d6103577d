"""Contrastive steering vectors: the mean activation of one prompt set minus that of another, at one hook
point (Turner et al. 2023, arXiv:2308.10248, "activation addition"; Rimsky et al. 2023, arXiv:2312.06681,
contrastive activation addition).

    vector = ll.steering_vector(model, ["I love this", ...], ["I hate this", ...], layer=6)
    with ll.steer(model, vector, scale=4.0): model.generate("The movie was", temperature=0)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ..errors import ArgumentError
from ..validate import check_choice, check_count, check_index
from .steer import SteeringVector, hook_width

if TYPE_CHECKING:
    from ..model.llama import HookedLlama

REDUCTIONS = ("last", "mean")

Prompt = str | Sequence[int] | torch.Tensor


def steering_vector(
    model: HookedLlama,
    positive_prompts: Sequence[Prompt],
    negative_prompts: Sequence[Prompt],
    layer: int,
    *,
    site: str = "hook_resid_post",
    reduce: str = "last",
    prepend_bos: bool | None = None,
    batch_size: int = 16,
) -> SteeringVector:
    """mean over positive prompts - mean over negative prompts of the activation at `blocks.{layer}.{site}`.

    Args:
        positive_prompts, negative_prompts: texts, or token ids [pos] each (e.g. a chat rendered by
            `model.tokenizer.apply_chat_template`); the two sets may differ in size.
        layer: the block (negative counts from the end).
        site: the block's hook point, the residual stream after the block by default.
        reduce: each prompt's activation: "last", at its last token (where the next token is predicted, as
            contrastive activation addition reads it), or "mean", averaged over its tokens but a leading BOS
            (whose activation is the same in every prompt).
        prepend_bos: for texts: add BOS (True), not (False), or the tokenizer's default (None).
        batch_size: prompts per forward pass (left-padded together).

    Returns:
        A SteeringVector at `blocks.{layer}.{site}` (scale 1), in float32 (float64 for a float64 model).

    Raises:
        ArgumentError: an empty prompt set, a layer outside the model, an unknown `reduce`, a site steering
            cannot write.
    """
    layer = check_index("layer", layer, model.cfg.n_layers, "layers")
    reduce = check_choice("reduce", reduce, REDUCTIONS)
    batch_size = check_count("batch_size", batch_size)
    hook = f"blocks.{layer}.{site}"
    hook_width(model, hook)
    positive = _mean_activation(model, positive_prompts, hook, layer, reduce, prepend_bos, batch_size, "positive")
    negative = _mean_activation(model, negative_prompts, hook, layer, reduce, prepend_bos, batch_size, "negative")
    return SteeringVector(hook, positive - negative)


def _mean_activation(model, prompts, hook, layer, reduce, prepend_bos, batch_size, which) -> torch.Tensor:
    if isinstance(prompts, (str, torch.Tensor)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ArgumentError(f"{which}_prompts must be a non-empty list of prompts (texts or token ids)")
    ids = [_prompt_ids(model, prompt, prepend_bos) for prompt in prompts]
    total = None
    for first in range(0, len(ids), batch_size):
        tokens, mask = _left_padded(ids[first : first + batch_size], model.device)
        with torch.no_grad():
            _, cache = model.run_with_cache(
                tokens, attention_mask=mask, names_filter=hook, stop_at_layer=layer + 1, check_memory=False
            )
        act = cache[hook]
        act = act.flatten(2) if act.dim() == 4 else act  # hook_z: [batch, pos, n_heads * d_head]
        dtype = torch.promote_types(act.dtype, torch.float32)
        if reduce == "last":
            per_prompt = act[:, -1].to(dtype)  # left-padded: every prompt's last token is at -1
        else:
            counted = mask.clone()
            bos = model.cfg.bos_token_id
            first_real = mask.argmax(dim=1)  # [batch]
            rows = torch.arange(len(tokens), device=mask.device)
            # A leading BOS is the same token at the same place in every prompt: its activation is too.
            leading_bos = (tokens[rows, first_real] == bos) & (mask.sum(1) > 1) if bos is not None else None
            if leading_bos is not None:
                counted[rows[leading_bos], first_real[leading_bos]] = 0
            weights = counted.to(dtype)[..., None]  # [batch, pos, 1]
            per_prompt = (act.to(dtype) * weights).sum(1) / weights.sum(1)
        summed = per_prompt.sum(0)
        total = summed if total is None else total + summed
    return total / len(ids)


def _prompt_ids(model, prompt: Prompt, prepend_bos: bool | None) -> torch.Tensor:
    if not isinstance(prompt, (str, torch.Tensor)) and not (
        isinstance(prompt, Sequence) and all(isinstance(i, int) for i in prompt)
    ):
        raise ArgumentError(f"a prompt is a text or token ids [pos], got {type(prompt).__name__}")
    tokens, _ = model.prepare_tokens(prompt, prepend_bos=prepend_bos)
    if tokens.shape[0] != 1:
        raise ArgumentError(f"a prompt is a text or token ids [pos], got ids shaped {tuple(tokens.shape)}")
    return tokens[0]


def _left_padded(ids: list[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, pos] ids and mask, each prompt right-aligned (padding id 0, masked out)."""
    pos = max(len(row) for row in ids)
    tokens = torch.zeros(len(ids), pos, dtype=torch.long, device=device)
    mask = torch.zeros(len(ids), pos, dtype=torch.long, device=device)
    for i, row in enumerate(ids):
        tokens[i, pos - len(row) :] = row
        mask[i, pos - len(row) :] = 1
    return tokens, mask
